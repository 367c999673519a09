"""The run directory's safety rules: never lose a user's run.

* :func:`check_run_dir` (before anything is loaded): a non-empty ``output_dir`` is refused unless the
  run resumes (``--resume``) or replaces it (``--overwrite``); the directory must be writable. It
  writes nothing there, except that it creates the directory when missing and removes leftovers
  of killed runs (``checkpoints/.tmp-step-*``), which no one can use.
* :func:`check_resume_config` (``--resume``): the new config may extend ``steps`` and change logging,
  checkpoint and evaluation cadence, but not what defines the run (:data:`RESUME_FIXED`).
* :func:`begin_run` (once the model, data and engine are loaded, i.e. the run is known to start):
  with ``overwrite`` the previous run's files are deleted only now, so a run that fails at start-up
  leaves the old one as it was.
* A failed start never blocks the same command: :func:`begin_run` marks a new run as starting
  (``.oapl-starting``) and :func:`mark_trained` removes the mark once the first step is trained. A
  directory that still has the mark and no checkpoint holds only what a start that failed wrote
  (``config.yaml``, ``metrics.jsonl``, ...): :func:`check_run_dir` lets a new run start there and
  :func:`begin_run` replaces those files. A run that has trained a step is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from oapl.config_views import get_dotted
from oapl.errors import RunDirError, UserError


class LaunchError(UserError):
    """oapl was started as several processes (torchrun, accelerate launch)."""


log = logging.getLogger(__name__)

#: What a run writes in its directory (``--overwrite`` removes these and nothing else).
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "samples.jsonl",
    "summary.yaml",
    "checkpoints",
    "tensorboard",
    "wandb",
    "compare_timing.json",
    "metrics.garbled.jsonl",
    "samples.garbled.jsonl",
)
TMP_CHECKPOINT_PREFIX = ".tmp-step-"
#: Present from :func:`begin_run` of a new run until its first trained step (:func:`mark_trained`).
STARTING_MARKER = ".oapl-starting"


def failed_start(run_dir: str | Path) -> bool:
    """``run_dir`` holds a start that failed before training a step (the mark, and no checkpoint)."""
    path = Path(run_dir)
    if not (path / STARTING_MARKER).is_file():
        return False
    return not [e for e in _entries(path / "checkpoints") if not e.startswith(TMP_CHECKPOINT_PREFIX)]


def mark_trained(run_dir: str | Path) -> None:
    """The run has trained a step: from now on it is a run to resume or overwrite, never a failed start."""
    try:
        (Path(run_dir) / STARTING_MARKER).unlink()
    except FileNotFoundError:
        pass


def _entries(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _check_writable(path: Path) -> None:
    """Create ``path`` if needed and prove a file can be written in it (root ignores mode bits)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"output_dir: {path} exists and is not a directory") from None
    except OSError as e:
        raise RunDirError(f"output_dir: cannot create {path}: {e.strerror or e}") from None
    if not path.is_dir():
        raise RunDirError(f"output_dir: {path} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".oapl-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(
            f"output_dir: cannot write to {path}: {e.strerror or e} (choose another output_dir=...)"
        ) from None


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete ``checkpoints/.tmp-step-*`` (and ``*.jsonl.tmp``) left by a run killed while writing."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    for name in _entries(root):
        if name.startswith(TMP_CHECKPOINT_PREFIX):
            p = root / name
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    for name in ("metrics.jsonl.tmp", "samples.jsonl.tmp"):  # a kill while truncating on resume
        p = Path(run_dir) / name
        if p.is_file():
            p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d unfinished write(s) of a killed run: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def check_run_dir(run_dir: str | Path, resume: bool | str = False, overwrite: bool = False) -> None:
    """Refuse to start in ``run_dir`` when that could lose an earlier run's files.

    Raises :class:`~oapl.errors.RunDirError` naming ``output_dir`` and what to pass.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output_dir: {path} exists and is not a directory")
    present = [e for e in _entries(path) if not e.startswith(".oapl-write-test-") and e != STARTING_MARKER]
    if present and failed_start(path):
        log.info(
            "%s holds a start that failed before training a step (%s): this run replaces it",
            path,
            ", ".join(e for e in present if e in RUN_FILES),
        )
        present = [e for e in present if e not in RUN_FILES]
    if present and not resume and not overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise RunDirError(
            f"output_dir: {path} is not empty ({shown}); pass --resume to continue that run, "
            f"--overwrite to replace it, or choose another output_dir=..."
        )
    _check_writable(path)
    if resume or overwrite:
        remove_stale_temporaries(path)
    cleanup_stale_sandboxes()


def begin_run(run_dir: str | Path, resume: bool | str = False, overwrite: bool = False) -> None:
    """The run is starting: with ``overwrite`` (and no ``resume``) delete the previous run's files now."""
    path = Path(run_dir)
    leftover = failed_start(path)
    if overwrite and not resume or leftover:
        removed = []
        for name in RUN_FILES:
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(name)
            elif p.exists() or p.is_symlink():
                p.unlink()
                removed.append(name)
        if removed and not leftover:
            log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), path)
        elif removed:
            log.info("removed what a failed start left in %s: %s", path, ", ".join(removed))
    path.mkdir(parents=True, exist_ok=True)
    if not resume or leftover:  # a new run: a failure before its first step leaves a rerunnable directory
        (path / STARTING_MARKER).touch()


def refuse_multi_process_launch() -> None:
    """``torchrun`` / ``accelerate launch`` with more than one process: refuse (never N copies of one job)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return
    if world > 1:
        rank = os.environ.get("RANK", "?")
        raise LaunchError(
            f"WORLD_SIZE={world} (rank {rank}): oapl was started as {world} processes (torchrun or "
            "accelerate launch), which would run the whole job once per process; start it once "
            "(python script.py / oapl train) and scale with distributed.backend=ray over the GPUs "
            "and nodes (docs/scaling.md)"
        )


def cleanup_stale_sandboxes() -> None:
    """Remove sandbox temp directories and cgroups of code-reward runs whose process is gone."""
    try:
        from oapl.rewards.sandbox.host import cleanup_stale_sandboxes_once as clean
    except ImportError:  # pragma: no cover - the sandbox is part of the package
        return
    clean()


#: What a resumed run may not change (dotted prefixes): the algorithm and its objective, the model,
#: the task (its data, prompts and rewards), G, and the sampling temperature the trainer scores with.
RESUME_FIXED = (
    "algorithm",
    "model.name",
    "model.tokenizer",
    "model.lora",
    "task",
    "rollout.group_size",
    "sampling.temperature",
    "offline.data",
    "offline.min_correct",
    "offline.drop_all_correct",
)
#: Task fields a resumed run may change: held-out evaluation and reward robustness only.
RESUME_TASK_ALLOWED = (
    "task.eval_dataset",
    "task.eval_split",
    "task.eval_dataset_config",
    "task.max_eval_prompts",
    "task.num_eval",
    "task.eval_benchmarks",
    "task.reward_timeout_s",
    "task.max_reward_error_fraction",
)


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _fixed(dotted: str) -> bool:
    if any(dotted == a or dotted.startswith(a + ".") for a in RESUME_TASK_ALLOWED):
        return False
    return any(dotted == f or dotted.startswith(f + ".") for f in RESUME_FIXED)


def check_resume_config(cfg, run_dir: str | Path | None = None) -> None:
    """Refuse to resume the run in ``run_dir`` with a config that changes what the run is.

    The one place that decides: compares ``cfg`` with the run's stored ``config.yaml`` and raises a
    :class:`~oapl.errors.UserError` listing every changed field of :data:`RESUME_FIXED` (a data set or
    reward passed in Python is compared by content); other changes (``steps``, logging, checkpoint and
    eval cadence, ...) are allowed and logged. Nothing is checked when the run has no ``config.yaml``.
    """
    import yaml

    from oapl.config import TrainConfig
    from oapl.data import memory
    from oapl.errors import UserError

    saved = Path(run_dir or cfg.output_dir) / "config.yaml"
    if not saved.exists():
        return
    try:
        old_tree = yaml.safe_load(saved.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"{saved}: the stored config of the run to resume is unreadable "
            f"({type(e).__name__}); restore it or start a new run"
        ) from None
    try:  # the stored config with today's defaults filled in, so that only real changes show
        old_tree = TrainConfig.model_validate(old_tree).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - an older oapl's config: compare what it has
        pass
    new_tree = cfg.model_dump(mode="json")
    old_mem, new_mem = memory.in_memory_fields(old_tree), memory.in_memory_fields(new_tree)
    for dotted in sorted(set(old_mem) | set(new_mem)):
        before, now = old_mem.get(dotted), new_mem.get(dotted)
        if before == now:
            if now is not None and memory.marker_kind(now) == "reward":
                log.warning(
                    "resuming with the in-memory reward %s (%s): oapl cannot check that it is the same "
                    "function as in the first run",
                    now,
                    dotted,
                )
            continue
        was = before or get_dotted(old_tree, dotted)
        is_ = now or get_dotted(new_tree, dotted)
        raise UserError(
            f"{dotted}: resuming {saved.parent} with other data or rewards than it was trained with "
            f"(was {was!r} in {saved}, now {is_!r}); pass the same ones (rows are compared by "
            "content), or start a new run"
        )
    old, new = _leaves(old_tree), _leaves(new_tree)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k != "output_dir"]
    refused = [k for k in changed if _fixed(k)]
    if refused:
        shown = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in refused[:6])
        more = f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise UserError(
            f"{', '.join(refused)}: cannot change when resuming {saved.parent} ({shown}{more}); "
            "a resumed run keeps its algorithm, model, task, group size and objective (steps, "
            "logging, checkpoint and eval cadence may change): pass the stored values, or start a "
            "new run in another output_dir"
        )
    if changed:
        log.warning(
            "resuming %s with changed settings: %s",
            saved.parent,
            ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed),
        )
    if old_mem:
        log.info("resuming with the same in-memory data and rewards: %s", ", ".join(sorted(old_mem)))
