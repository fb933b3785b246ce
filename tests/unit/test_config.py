import pytest

from rigface.config import ConfigError, RigFaceConfig, load_config, parse_overrides


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RigFaceConfig)
    assert cfg.train.lr == 1e-5
    assert cfg.model.prompt == "A close up of a person."


def test_yaml_then_env_then_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 2.0e-5\n  batch_size: 8\nprepare:\n  shard_size: 16\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("include: [base.yaml]\ntrain:\n  batch_size: 2\n")
    env = {"RIGFACE__TRAIN__MAX_STEPS": "50", "RIGFACE__PREPARE__SHARD_SIZE": "32", "UNRELATED": "x"}
    cfg = load_config([extra], ["prepare.shard_size=4", "model.preset=sd15"], environ=env)
    assert cfg.train.lr == 2e-5  # from the included file
    assert cfg.train.batch_size == 2  # the including file wins over its include
    assert cfg.train.max_steps == 50  # env
    assert cfg.prepare.shard_size == 4  # command line wins over env
    assert cfg.model.preset == "sd15"


def test_invalid_value_names_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.lr=-1"], environ={})
    assert "train.lr" in str(err.value)


def test_unknown_field_names_the_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("prepare:\n  shard_sise: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config([f], environ={})
    assert "prepare.shard_sise" in str(err.value)


def test_bad_files_and_overrides_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"], environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([bad], environ={})
    with pytest.raises(ConfigError, match="section.field"):
        parse_overrides(["lr=1"])
    with pytest.raises(ConfigError, match="section.field"):
        parse_overrides(["train.lr"])


def test_flat_has_dotted_keys_and_no_secrets():
    flat = load_config(environ={}).flat()
    assert flat["train.lr"] == 1e-5
    assert not any("secret" in k.lower() or "password" in k.lower() for k in flat)


def test_repo_configs_validate():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs").rglob("*.yaml"))
    assert files, "configs/ holds no YAML"
    for f in files:
        load_config([f], environ={})
