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
bad value stops before anything runs: `oapl: optim.lr: Input should be greater than 0 (got -1.0) (in
configs/arithmetic_cpu.yaml + overrides)`. The resolved configuration is saved as `config.yaml` in the
run directory.

Example configs: `configs/arithmetic_cpu.yaml` (the CPU default), `configs/math_qwen3_4b.yaml` (the
paper's math setting, GPU), `configs/two_stage_cpu.yaml` and `configs/two_stage_deepcoder.yaml` (the
offline two-stage recipe), `configs/code_cpu.yaml` (code task).

## Run directory and errors

- **A run never overwrites another.** `oapl train` refuses a non-empty `output_dir` unless `--resume`
  (continue from its latest checkpoint) or `--overwrite` (replace it) is given. Nothing in the
  directory changes before the model, data and engine are loaded: a run that fails at start-up,
  even with `--overwrite`, leaves the old one as it was; `--overwrite` then deletes only what a run
  writes (`config.yaml`, `metrics.jsonl`, `samples.jsonl`, `summary.yaml`, `checkpoints/`,
  `tensorboard/`, `wandb/`). Pruning (`checkpoint.keep`) never deletes the checkpoint just written.
- **Kills.** A checkpoint is written to `checkpoints/.tmp-step-*` and renamed into place; a kill
  leaves no half checkpoint, and the `.tmp-step-*` leftovers (and the temp dirs and cgroups of the
  code sandbox of a killed run) are removed at the next start. `--resume` loses at most
  `checkpoint.every` steps (or `checkpoint.every_minutes` minutes, 10 by default) and rewrites
  `metrics.jsonl` without the steps it redoes (`tests/test_kill_resume.py` kills a run 12 times,
  including inside checkpoint writes).
- **SIGTERM and SIGUSR1 are Ctrl-C.** `kill`, `timeout`, `docker stop`, Kubernetes and SLURM send
  SIGTERM (SLURM's `--signal=USR1@90` sends SIGUSR1 90 s before its kill): the run writes a checkpoint
  and exits with one line, `oapl: interrupted (SIGTERM); checkpoint written: <dir>; continue with
  --resume`, and status 128 + the signal: 143 (SIGTERM), 138 (SIGUSR1), 130 (Ctrl-C). See
  [training.md](training.md#stopping-and-resuming).
- **One line per mistake.** A user error ends in `oapl: <what>: <why>` naming the field, file and
  row, with exit status 2: unknown `task.name` (the nearest is suggested), `rollout.group_size=1`
  (every gradient would be 0), a missing dataset file or column, a reward that cannot be imported,
  a read-only `output_dir`, a missing file for `oapl plot`/`oapl eval`. `--debug` (anywhere on the
  line) or `OAPL_DEBUG=1` shows the traceback.
- **Model and dataset names are checked first.** A local path that does not exist fails at once,
  naming `model.name` (or `--model`, `model.tokenizer`, `task.dataset`); a Hub name is looked up once
  with an 8 s cap, so no network means a message in seconds, not a minute of retries. With the Hub
  unreachable, a model already in the Hugging Face cache is used from it (offline mode); to force
  that, set `HF_HUB_OFFLINE=1`.

## Fields

| field | default | meaning |
|---|---|---|
"""


def main() -> None:
    rows = [f"| `{name}` | `{default}` | {desc.replace('|', '/')} |" for name, default, desc in describe_fields()]
    Path(__file__).resolve().parents[1].joinpath("docs", "configuration.md").write_text(HEADER + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
