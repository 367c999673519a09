"""Metric sinks: metrics.jsonl always, TensorBoard and W&B when asked."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from oapl.atomic import atomic_write_text

log = logging.getLogger(__name__)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _truncate_jsonl(path: Path, step: int, drop_eval_only_at_step: bool) -> int:
    """Keep the rows of ``path`` up to ``step``; lines that are not a JSON row go to ``<stem>.garbled.jsonl``.

    Returns how many garbled lines were kept aside (appended there, before ``path`` is rewritten, so a
    kill in between loses none).
    """
    if not path.exists():
        return 0
    rows, garbled = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            garbled.append(line)  # a line cut short by a kill, or damaged
            continue
        s = row.get("step", 0)
        if s > step:
            continue
        if drop_eval_only_at_step and s == step and step > 0 and "loss" not in row:
            continue
        rows.append(line)
    if garbled:
        aside = path.with_name(f"{path.stem}.garbled.jsonl")
        with aside.open("a") as f:
            f.write("".join(g + "\n" for g in garbled))
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "%s: %d garbled line(s) (not a JSON row; e.g. cut short by a kill) kept aside in %s",
            path,
            len(garbled),
            aside,
        )
    atomic_write_text(path, "".join(r + "\n" for r in rows))
    return len(garbled)


class MetricsLogger:
    """Append one JSON object per row to ``metrics.jsonl``; mirror to TensorBoard/W&B if enabled."""

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "oapl",
        config: dict | None = None,
        resume: bool = False,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a" if resume else "w")
        samples = self.path.parent / "samples.jsonl"
        if not resume and samples.exists():  # a fresh start (or a resume with no checkpoint yet)
            samples.unlink()
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError as e:
                raise RuntimeError("logging.tensorboard=true needs `pip install tensorboard`") from e
        if wandb:
            try:
                import wandb as wb
            except ImportError as e:
                raise RuntimeError("logging.wandb=true needs `pip install wandb`") from e
            self._wandb = wb.init(project=wandb_project, config=config, dir=str(run_dir), resume="allow")

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint of ``step``: drop rows the resumed run will write again.

        Kept: rows of steps up to ``step``, except an evaluation-only row at ``step`` itself (the
        final evaluation, logged before the final checkpoint, is redone). ``samples.jsonl`` is cut
        the same way. Files are replaced atomically, so a kill here loses nothing.
        """
        self._f.close()
        _truncate_jsonl(self.path, step, drop_eval_only_at_step=True)
        _truncate_jsonl(self.path.parent / "samples.jsonl", step, drop_eval_only_at_step=False)
        self._f = self.path.open("a")

    def log(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._f.flush()
        step = row.get("step", 0)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
