"""cluster/aws/cluster.yaml checked with Ray's own cluster-launcher schema and config preparation (no AWS calls)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "aws" / "cluster.yaml"


def _config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_config_validates_against_rays_schema():
    jsonschema.validate(_config(), _ray_schema())


def test_config_survives_rays_own_prepare_and_validate():
    # The same steps `ray up` runs before it talks to AWS: merge aws/defaults.yaml, check docker and node types.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_config())
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    assert {"ray.worker.cpu", "ray.worker.gpu"} <= set(types)
    assert sum(t["max_workers"] for k, t in types.items() if k != prepared["head_node_type"]) >= 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("idle_timeout_minute", 5),  # misspelt top-level key
        lambda c: c["provider"].pop("type"),
        lambda c: c["docker"].__setitem__("imagee", "x"),
        lambda c: c["available_node_types"]["ray.worker.gpu"].__setitem__("min_worker", 0),
    ],
)
def test_schema_catches_a_broken_config(mutate):
    cfg = copy.deepcopy(_config())
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _ray_schema())


def test_nodes_use_the_project_image_and_gpu_workers_have_gpus():
    import ray

    cfg = _config()
    assert cfg["provider"]["type"] == "aws"
    assert f"ray{ray.__version__}-py311" in cfg["docker"]["image"]
    gpu_type = cfg["available_node_types"]["ray.worker.gpu"]["node_config"]["InstanceType"]
    assert gpu_type.split(".")[0] in {"g5", "g6", "g6e", "p4d", "p4de", "p5", "p5e"}, gpu_type
    cpu_type = cfg["available_node_types"]["ray.worker.cpu"]["node_config"]["InstanceType"]
    assert cpu_type.split(".")[0][0] in "mcr", cpu_type
    # Workers reach S3 through an instance profile, not keys.
    for name in ("ray.worker.cpu", "ray.worker.gpu"):
        assert "IamInstanceProfile" in cfg["available_node_types"][name]["node_config"], name


def test_no_credentials_in_the_launcher_config():
    text = CONFIG.read_text()
    cfg = _config()
    assert "ssh_private_key" not in cfg["auth"], "keys stay on the user's machine"
    for word in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY=", "AWS_ACCESS_KEY_ID="):
        assert word not in text, word
