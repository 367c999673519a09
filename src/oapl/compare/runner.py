"""Running the study: train what is missing (resuming what was interrupted), evaluate, report."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from oapl.compare.plan import (
    CompareConfig,
    PlannedRun,
    base_eval_dir,
    comparable,
    eval_seed,
    final_eval_settings,
    plan_runs,
    start_eval_key,
)
from oapl.config import TrainConfig, save_config

log = logging.getLogger(__name__)

__all__ = ["completed", "resumable", "run_compare"]


def _saved_config(run: PlannedRun) -> TrainConfig | None:
    saved = run.run_dir / "config.yaml"
    if not saved.exists():
        return None
    try:
        return TrainConfig.model_validate(yaml.safe_load(saved.read_text()))
    except Exception:  # noqa: BLE001 - an unreadable config is simply not this run
        return None


def completed(run: PlannedRun) -> bool:
    """The run's directory holds this very run, trained to its last step."""
    summary = run.run_dir / "summary.yaml"
    if not (summary.exists() and (run.run_dir / "metrics.jsonl").exists()):
        return False
    prev = _saved_config(run)
    try:
        s = yaml.safe_load(summary.read_text()) or {}
    except Exception:  # noqa: BLE001
        return False
    return prev is not None and int(s.get("steps", -1)) == run.cfg.steps and comparable(prev) == comparable(run.cfg)


def resumable(run: PlannedRun) -> bool:
    """The run's directory holds this run, interrupted after a checkpoint."""
    from oapl.trainer.checkpoint import latest_checkpoint

    prev = _saved_config(run)
    return prev is not None and comparable(prev) == comparable(run.cfg) and latest_checkpoint(run.run_dir) is not None


def _start_eval_row(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step") == 0 and "eval/pass@1" in row:
            return row
    return None


def _add_timing(run_dir: Path, seconds: float) -> None:
    """Wall seconds of training, summed over the invocations that trained this run."""
    path = run_dir / "compare_timing.json"
    prev = 0.0
    if path.exists():
        try:
            prev = float(json.loads(path.read_text()).get("wall_seconds", 0.0))
        except (ValueError, json.JSONDecodeError):
            prev = 0.0
    path.write_text(json.dumps({"wall_seconds": prev + seconds}))


def _final_eval(run: PlannedRun, cc: CompareConfig) -> None:
    from oapl.evaluation.policy_eval import evaluate_policy
    from oapl.trainer.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run.run_dir)
    if ckpt is None:
        raise RuntimeError(f"{run.run_dir}: no checkpoint to evaluate (the study sets checkpoint.save_final)")
    t0 = time.perf_counter()
    res = evaluate_policy(
        run.cfg, run.run_dir / "final_eval", checkpoint=ckpt, seed=eval_seed(run.seed), **final_eval_settings(cc)
    )
    log.info(
        "%s: final evaluation (%d prompts x %d) in %.0f s",
        run.key,
        len(res["prompt_ids"]),
        res["n"],
        time.perf_counter() - t0,
    )


def run_compare(
    cc: CompareConfig, only: str = "all", force: bool = False, report_only: bool = False, command: str | None = None
) -> Path:
    """Train every planned run that is not complete yet (resuming interrupted ones from their latest
    checkpoint), evaluate every final policy and the base model, then write the report; returns its path."""
    from oapl.compare.report import build_report

    runs = plan_runs(cc, only)
    out = Path(cc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if only == "all":
        save_config(cc, out / "compare.yaml")
    else:  # a piece of the study: its own report, so the study's report is only written whole
        cc = cc.model_copy(
            update={"report": str(out / f"report_{only}.md"), "figures_dir": str(out / f"figures_{only}")}
        )
    if not report_only:
        if cc.final_eval.enabled and runs:
            from oapl.evaluation.policy_eval import evaluate_policy

            # invocations side by side: the second waits for the first's base evaluation, then reuses it
            with _lock(out / ".locks" / "base_eval.lock", wait=True):
                log.info("base model: held-out evaluation")
                base = runs[0].cfg
                evaluate_policy(
                    base.model_copy(update={"seed": cc.seeds[0]}),
                    base_eval_dir(cc),
                    checkpoint=None,
                    seed=eval_seed(cc.seeds[0]),
                    **final_eval_settings(cc),
                )
        busy = _train_all(cc, runs, force)
        if busy:
            log.warning(
                "%d run(s) were in progress in another invocation (%s); the report below leaves them "
                "out; the invocation that finishes last writes the whole report",
                len(busy),
                ", ".join(busy),
            )
    return build_report(cc, runs, command=command)


@contextlib.contextmanager
def _lock(path: Path, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` for the ``with`` block; yields False (without waiting) when
    ``wait`` is false and another process holds it. Released when the block ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_all(cc: CompareConfig, runs: list[PlannedRun], force: bool) -> list[str]:
    """Train and evaluate every run not complete yet; returns the runs another invocation was busy with.
    Each run is locked while an invocation trains and evaluates it, so several may run side by side."""
    done: set[str] = set()
    busy: list[str] = []
    start_rows: dict[str, dict[str, Any]] = {}
    todo = [r for r in runs if r.same_as is None]
    for i, run in enumerate(todo, 1):
        if str(run.run_dir) in done:
            continue
        with _lock(Path(cc.output_dir) / ".locks" / (_lock_name(run) + ".lock"), wait=False) as mine:
            if not mine:
                log.info("[%d/%d] %s: in progress in another invocation, skipped", i, len(todo), run.key)
                busy.append(run.key)
                continue
            _train_one(cc, run, f"[{i}/{len(todo)}]", force, start_rows)
        done.add(str(run.run_dir))
    return busy


def _lock_name(run: PlannedRun) -> str:
    return "_".join(Path(run.run_dir).resolve().parts[-2:])


def _train_one(
    cc: CompareConfig, run: PlannedRun, tag: str, force: bool, start_rows: dict[str, dict[str, Any]]
) -> None:
    from oapl import loop

    key = start_eval_key(run.cfg)
    if not force and completed(run):
        log.info("%s %s: complete, reused (%s)", tag, run.key, run.run_dir)
        row = _start_eval_row(run.run_dir)
        if row is not None:
            start_rows.setdefault(key, row)
    else:
        cfg = run.cfg
        resume = not force and resumable(run)
        shared = cc.share_start_eval and cfg.eval.at_start and key in start_rows and not resume
        if shared:
            cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"at_start": False})})
        log.info(
            "%s %s: %s %d steps -> %s%s",
            tag,
            run.key,
            "resuming" if resume else "training",
            cfg.steps,
            run.run_dir,
            " (step-0 evaluation shared)" if shared else "",
        )
        t0 = time.perf_counter()
        # an interrupted run continues from its checkpoint; a changed (or --force) one is redone
        loop.train(cfg, resume=resume, overwrite=not resume)
        _add_timing(run.run_dir, time.perf_counter() - t0)
        metrics = run.run_dir / "metrics.jsonl"
        if shared:
            row = dict(start_rows[key], shared_from=start_rows[key].get("shared_from", "first run"))
            metrics.write_text(json.dumps(row) + "\n" + metrics.read_text())
        else:
            row = _start_eval_row(run.run_dir)
            if row is not None:
                start_rows.setdefault(key, dict(row, shared_from=str(run.run_dir)))
    if cc.final_eval.enabled:
        _final_eval(run, cc)
