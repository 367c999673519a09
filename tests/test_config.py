"""Config: YAML + overrides, errors that name the field, --help documents every field."""

from __future__ import annotations

from pathlib import Path

import pytest

from oapl.config import ConfigError, TrainConfig, describe_fields, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(
        p, ["optim.lr=3e-4", "rollout.sync_interval=7", "sampling.stop=[a, b]", "task.columns={prompt: q}"]
    )
    assert cfg.steps == 5 and cfg.optim.lr == 3e-4 and cfg.rollout.sync_interval == 7
    assert cfg.sampling.stop == ["a", "b"] and cfg.task.columns == {"prompt": "q"}


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=-1", "optim.lr"),
        ("rollout.group_size=0", "rollout.group_size"),
        ("optim.lr=fast", "optim.lr"),
        ("rollout.grop_size=4", "rollout.grop_size"),
        ("algorithm.name=ppo", "algorithm.name"),
    ],
)
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_oapl_refuses_top_p_and_staleness():
    with pytest.raises(ConfigError, match="top_p"):
        load_config(None, ["sampling.top_p=0.9"])
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(None, ["rollout.max_staleness=1"])
    assert load_config(None, ["algorithm.name=grpo", "rollout.max_staleness=1"]).rollout.max_staleness == 1


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_validate():
    paths = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if not p.name.startswith("compare")]
    assert len(paths) >= 4
    for path in paths:  # (compare configs have their own schema, tested in test_compare.py)
        load_config(path)


def test_help_and_docs_list_every_field(capsys):
    from oapl.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for name, _, desc in describe_fields(TrainConfig):
        assert name in out, name
        assert f"`{name}`" in docs, f"{name} missing from docs/configuration.md: run scripts/gen_config_docs.py"
        assert desc, f"{name} has no description"
