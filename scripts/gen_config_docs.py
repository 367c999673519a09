"""Regenerate docs/configuration.md from the typed config (python scripts/gen_config_docs.py)."""

from __future__ import annotations

from pathlib import Path

from oapl.config import describe_fields

HEADER = """# Configuration

Every command reads one typed configuration (`oapl.config.TrainConfig`): a YAML file plus `key=value`
overrides on the command line, validated with errors that name the field:

```bash
oapl train configs/arithmetic_cpu.yaml optim.lr=2e-5 rollout.sync_interval=8 'sampling.stop=["\\n\\n"]'
oapl train --help          # prints every field below with its default
```

Values are parsed as YAML (`1e-5`, `true`, `null`, `[a, b]`, `{prompt: problem}`). An unknown key or a
bad value stops before anything runs: `oapl: invalid configuration (...): optim.lr: Input should be
greater than 0 (got -1.0)`. The resolved configuration is saved as `config.yaml` in the run directory.

Example configs: `configs/arithmetic_cpu.yaml` (the CPU default), `configs/math_qwen3_4b.yaml` (the
paper's math setting, GPU), `configs/two_stage_cpu.yaml` and `configs/two_stage_deepcoder.yaml` (the
offline two-stage recipe), `configs/code_cpu.yaml` (code task).

| field | default | meaning |
|---|---|---|
"""


def main() -> None:
    rows = [f"| `{name}` | `{default}` | {desc.replace('|', '/')} |" for name, default, desc in describe_fields()]
    Path(__file__).resolve().parents[1].joinpath("docs", "configuration.md").write_text(HEADER + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
