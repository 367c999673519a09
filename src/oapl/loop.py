"""The training loop: Algorithm 1 of the paper (OAPL with a lagged inference policy), written once.

    sync: pi_inf <- pi ; v = 0 ; D = {}
    in the background: sample prompts, generate G responses with pi_inf, score, add to D (tag v)
    for n = 1, 2, ...:
        batch <- sample from D ; optimiser step(s) on the loss
        if n % L == 0: pi_inf <- pi ; v += 1 ; clear D

:class:`Run` is that loop — counters, weight versions, lag, sync, evaluation, checkpoint state and
summary — over a :class:`~oapl.backends.Backend` that says *where* it runs: one process
(:class:`~oapl.backends.local.LocalBackend`), a Ray cluster (:class:`~oapl.distributed.backend.RayBackend`)
or stored rollouts with no engine (:class:`~oapl.backends.offline.OfflineBackend`, the paper's code
experiment: L = the whole run). :func:`train` chooses the backend, in this one place.

The same loop runs the GRPO baseline (``algorithm.name: grpo``); only the objective differs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from oapl import signals
from oapl.atomic import atomic_write_text
from oapl.backends import Backend
from oapl.config import TrainConfig, config_yaml, save_config
from oapl.config_views import eval_sampling_params, is_offline, sampling_params
from oapl.errors import DiskFullError
from oapl.evaluation.heldout import evaluate
from oapl.metrics import MetricsLogger
from oapl.rewards.base import reward_trainer_state
from oapl.rollout.buffer import BufferClosed, RolloutBuffer
from oapl.rollout.group import reward_metrics
from oapl.rundir import begin_run, check_resume_config, check_run_dir, mark_trained, refuse_multi_process_launch
from oapl.trainer.checkpoint import list_checkpoints, seed_everything, set_rng_state

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


class RolloutFailed(RuntimeError):
    """The rollout worker died; the run stops (with a checkpoint of the steps trained) and exits non-zero."""


class CheckpointClock:
    """The wall-clock cadence ``checkpoint.every_minutes``: due once that long has passed since the
    last checkpoint (or the start of training). ``clock`` is injectable (tests), in seconds."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = 60.0 * minutes
        self.clock = clock
        self.since = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.since >= self.seconds

    def reset(self) -> None:
        self.since = self.clock()


@dataclass
class RunResult:
    output_dir: str
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    last_metrics: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


class Run:
    """One run of Algorithm 1 over ``backend``.

    Building it restores the latest checkpoint when ``resume`` (the trainer, the counters, the
    prompt order, the RNG), touches ``output_dir`` only once everything is loaded, and performs the
    first sync. ``callbacks`` receive every metrics row as it is logged.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        backend: Backend,
        resume: bool | str = False,
        overwrite: bool = False,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.cfg, self.backend = cfg, backend
        self.callbacks = list(callbacks or [])
        self.stop_requested = False  # set by a callback (TrainerControl.should_training_stop): end after this step
        self.run_dir = Path(cfg.output_dir)
        self.metrics: MetricsLogger | None = None
        self._last_checkpoint: int | None = None  # the step of the last checkpoint written (or restored)
        self._last_checkpoint_path: str | None = None
        self.checkpoint_clock = CheckpointClock(cfg.checkpoint.every_minutes)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)  # refuses to clobber a run
        if resume:
            check_resume_config(cfg, self.run_dir)  # refuses a resume that changes the run
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        try:
            self._start(resume, overwrite)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_config(
        cls,
        cfg: TrainConfig,
        resume: bool | str = False,
        overwrite: bool = False,
        callbacks: list[Callback] | None = None,
    ) -> Run:
        """The run of ``cfg`` on the backend :func:`make_backend` chooses for it."""
        return cls(cfg, make_backend(cfg), resume=resume, overwrite=overwrite, callbacks=callbacks)

    def _start(self, resume: bool | str, overwrite: bool) -> None:
        cfg, backend = self.cfg, self.backend
        state = backend.build(self.run_dir, resume)  # the trainer (restored) and the engines
        self.ckpt = backend.checkpoint
        if resume and self.ckpt is None:
            log.warning("resume requested but %s has no checkpoint: starting from scratch", self.run_dir)
        self.step = int(state.get("step", 0))
        self.version = int(state.get("version", 0))
        self.sync_step = int(state.get("sync_step", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.eval_before = state.get("eval_before")
        self.version_steps: dict[int, int] = dict(state.get("version_steps", {self.version: self.sync_step}))
        self.checkpoints: list[str] = list(state.get("checkpoints", []))
        # the rollout generates in a background worker (Algorithm 1) or on demand (deterministic)
        self.background = cfg.rollout.asynchronous and backend.background_rollout
        if state and backend.syncs and self.sync_step != self.step:
            log.warning(
                "checkpoint step %d is mid-window (last sync at %d): the engine restarts from "
                "the trainer's weights as a new sync",
                self.step,
                self.sync_step,
            )
            self.version += 1
            self.sync_step = self.step
            self.version_steps[self.version] = self.step
        self._restored_step = self.step if self.ckpt is not None else None
        self._check_prompt_budgets()  # a prompt too long for the engine: refused now, naming its row
        signals.reclaim()  # a library may have replaced the stop-signal handlers while loading
        # everything is loaded: the run starts, and only now is anything in its directory changed
        with signals.deferred():  # a stop signal never leaves the directory half replaced
            begin_run(self.run_dir, resume=resume, overwrite=overwrite)
            save_config(cfg, self.run_dir / "config.yaml")
            self.metrics = MetricsLogger(
                self.run_dir,
                cfg.logging.tensorboard,
                cfg.logging.wandb,
                cfg.logging.wandb_project,
                cfg.model_dump(),
                resume=self.ckpt is not None,
            )
            if self.ckpt is not None:
                self.metrics.truncate_after(self.step)
        # --- sync: pi_inf <- pi ; D = {} -------------------------------------------------------
        self.buffer = RolloutBuffer(
            max(cfg.rollout.buffer_groups, cfg.rollout.prompts_per_step), self.version, backend.buffer_staleness
        )
        self.buffer.set_demand(self._window_demand())
        self.rollout = backend.start(self.version, self.buffer, sampling_params(cfg))
        if state:
            self.rollout.load_state_dict(state.get("worker") or {})
            set_rng_state(state["rng"])

    def _check_prompt_budgets(self) -> None:
        """Every training (and, when the run evaluates, held-out) prompt plus its max_tokens fits the
        engine's limit: tokenized once, in batches, and cached (:func:`oapl.data.budget.check_splits`)."""
        from oapl.data.budget import check_splits, engine_max_model_len

        cfg, backend = self.cfg, self.backend
        task, tokenizer = getattr(backend, "task", None), getattr(backend, "tokenizer", None)
        limit = cfg.engine.max_model_len or engine_max_model_len(getattr(backend, "engine", None))
        if task is None or tokenizer is None or limit is None or not getattr(backend, "syncs", False):
            return
        e = cfg.eval
        check_splits(cfg, task, tokenizer, limit, evaluate=e.at_start or e.at_end or e.every > 0)

    # -- the pieces of Algorithm 1 ---------------------------------------------------------------
    def sync(self) -> float:
        """pi_inf <- pi ; v += 1 ; clear D."""
        with self.rollout.paused():
            self.version += 1
            seconds = self.backend.publish(self.version)
            self.buffer.clear(self.version, self._window_demand())
        self.sync_step = self.step
        self.version_steps[self.version] = self.step
        return seconds

    def _window_demand(self) -> int | None:
        """Groups the trainer takes from now to the next sync (or the end), when the buffer is cleared at
        every sync (``max_staleness=0``): more would be generated for nothing. ``None``: no limit."""
        cfg = self.cfg
        if self.backend.buffer_staleness != 0 or not self.backend.syncs:
            return None
        L, total = cfg.rollout.sync_interval, self.backend.total_steps
        next_sync = (self.step // L + 1) * L
        return cfg.rollout.prompts_per_step * max(0, min(next_sync, total) - self.step)

    def sample_batch(self):
        p = self.cfg.rollout.prompts_per_step
        if not self.background:
            self.rollout.fill(p)
            self.backend.after_generation()
        try:
            return self.buffer.take(p)
        except BufferClosed:
            if self.rollout.failure is not None:
                raise RolloutFailed("the rollout worker failed") from self.rollout.failure
            raise

    @property
    def can_evaluate(self) -> bool:
        task = self.backend.task
        return task is not None and bool(task.eval)

    def evaluate(self) -> dict[str, float]:
        params = eval_sampling_params(self.cfg)
        with self.rollout.paused(), self.backend.evaluation_engine(synced=self.sync_step == self.step) as engine:
            summary, _ = evaluate(engine, self.backend.task, self.backend.tokenizer, params)
        return summary

    def checkpoint(self, keep: int | None = None) -> str:
        state = {
            "step": self.step,
            "version": self.version,
            "sync_step": self.sync_step,
            "samples_seen": self.samples_seen,
            "worker": self.rollout.state_dict(),
            "version_steps": self.version_steps,
            "eval_before": self.eval_before,
            "checkpoints": self.checkpoints,
        }
        with signals.deferred():  # a stop signal waits for the write (atomic either way)
            try:
                path = str(
                    self.backend.save(
                        self.run_dir, self.step, state, config_yaml(self.cfg), keep or self.cfg.checkpoint.keep
                    )
                )
            except DiskFullError as e:  # say how much a checkpoint of this run takes
                e.needed = e.needed or _checkpoint_bytes(getattr(self.backend, "policy", None))
                raise
            self._last_checkpoint, self._last_checkpoint_path = self.step, path
            self.checkpoint_clock.reset()
        log.info("checkpoint written: %s", path)
        self._event("save", path=path)
        return path

    def _log(self, row: dict[str, Any]) -> None:
        assert self.metrics is not None, "a row logged before the run started"
        self.metrics.log(row)
        for cb in self.callbacks:
            cb(row)

    def _event(self, name: str, **kw: Any) -> None:
        """``train_begin``, ``step_begin``, ``save``, ``train_end`` to callbacks with ``on_run_event(name, run)``."""
        for cb in self.callbacks:
            hook = getattr(cb, "on_run_event", None)
            if hook is not None:
                hook(name, self, **kw)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> RunResult:
        cfg, backend = self.cfg, self.backend
        L = cfg.rollout.sync_interval
        total = backend.total_steps
        # the restored checkpoint is this step's: an interrupt before the next step need not rewrite it
        self._last_checkpoint = self._restored_step
        self._last_checkpoint_path = None if self.ckpt is None else str(self.ckpt)
        # checkpoints of the cadence, where the backend keeps its own (pruned apart from those)
        self._cadence = [] if self.ckpt is None or str(self.ckpt) in self.checkpoints else [str(self.ckpt)]
        self.checkpoint_clock.reset()
        self._event("train_begin")
        if self.eval_before is None and cfg.eval.at_start and self.can_evaluate:
            self.eval_before = self.evaluate()
            self._log(
                {
                    "step": self.step,
                    "samples_seen": self.samples_seen,
                    **{f"eval/{k}": v for k, v in self.eval_before.items()},
                }
            )
            log.info("held-out before training: %s", _fmt(self.eval_before))
        progress = None
        if cfg.logging.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, initial=self.step, desc=backend.description, dynamic_ncols=True)
        task = backend.task
        if task is not None:  # TRL's trainer_state for the reward functions
            task.trainer_state = reward_trainer_state(self.step, total)
        if self.background and self.step < total:
            self.rollout.start()
        last: dict[str, Any] = {}
        unlogged: dict[str, Any] | None = None  # a step trained and counted whose row is not logged yet
        t_start = time.perf_counter()
        gen0 = self.rollout.gen_counters()
        try:
            while self.step < total and not self.stop_requested:
                self._event("step_begin")
                groups = self.sample_batch()
                # a stop signal inside a step takes effect once the step is trained, counted and synced
                with signals.deferred():
                    batch_version = min(g.version for g in groups)
                    metrics = backend.train_step(groups)
                    self.step += 1
                    mark_trained(self.run_dir)  # a step is trained: the run is never taken for a failed start
                    if task is not None:
                        task.trainer_state.global_step = self.step
                    self.samples_seen += sum(g.n for g in groups)
                    row: dict[str, Any] = {
                        "step": self.step,
                        "samples_seen": self.samples_seen,
                        **reward_metrics(groups),
                        **metrics,
                        "weight_version": batch_version,
                        "lag": self.step - 1 - self.version_steps.get(batch_version, self.sync_step),
                        **backend.row_stats(self.rollout, gen0),
                        "elapsed_s": time.perf_counter() - t_start,
                    }
                    unlogged = row
                    if backend.syncs and self.step % L == 0 and self.step < total:
                        row["sync_seconds"] = self.sync()
                        row["synced_to_version"] = self.version
                if (
                    cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < total and self.can_evaluate
                ):  # a stop signal here logs the row without it
                    row.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                with signals.deferred():
                    self._log(row)
                    unlogged = None
                    if cfg.logging.log_samples_every and self.step % cfg.logging.log_samples_every == 0:
                        self._log_samples(groups)
                    keep = backend.checkpoint_due(self.step)
                    if keep is not None:
                        self.checkpoints.append(self.checkpoint(keep + len(self._cadence)))
                        self._prune_cadence(0)  # superseded by a checkpoint the backend keeps
                    elif cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                        self._save()
                    elif self.checkpoint_clock.due() and self.step < total:
                        log.info(
                            "checkpoint.every_minutes=%g since the last checkpoint: writing one",
                            cfg.checkpoint.every_minutes,
                        )
                        self._save()
                last = row
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(backend.progress_fields(metrics, row))
        except KeyboardInterrupt as interrupt:
            self._stop_with_checkpoint(interrupt, unlogged)
            raise
        except RolloutFailed as failed:
            raise self._rollout_failed(failed.__cause__) from failed.__cause__
        finally:
            self.rollout.stop()
            if progress is not None:
                progress.close()
        try:
            eval_after = None
            if backend.syncs and self.sync_step != self.step:
                with signals.deferred():
                    self.sync()  # the engine gets the final weights (for evaluation and for users)
            if self.rollout.failure is not None:  # it died after the trainer took its last batch
                raise self._rollout_failed(self.rollout.failure) from self.rollout.failure
            if cfg.eval.at_end and self.can_evaluate:
                eval_after = self.evaluate()
                with signals.deferred():
                    self._log(
                        {
                            "step": self.step,
                            "samples_seen": self.samples_seen,
                            **{f"eval/{k}": v for k, v in eval_after.items()},
                        }
                    )
                log.info("held-out after training: %s", _fmt(eval_after))
            with signals.deferred():
                if cfg.checkpoint.save_final and self._last_checkpoint != self.step:
                    self._save()
                summary = {
                    "eval_before": self.eval_before,
                    "eval_after": eval_after,
                    "steps": self.step,
                    "samples_seen": self.samples_seen,
                    **backend.summary(self.rollout),
                    "checkpoints": [str(p) for p in list_checkpoints(self.run_dir)],
                }  # those on disk now
                if self.checkpoints:  # the backend's own (offline: one per epoch, all kept)
                    summary["epoch_checkpoints"] = self.checkpoints
                atomic_write_text(self.run_dir / "summary.yaml", yaml.safe_dump(summary, sort_keys=False))
        except KeyboardInterrupt as interrupt:
            self._stop_with_checkpoint(interrupt, None)
            raise
        self._event("train_end")
        return RunResult(str(self.run_dir), self.step, self.eval_before, eval_after, last, summary)

    def _save(self) -> str:
        """A checkpoint of the step or time cadence (or of an interrupt). Where the backend keeps checkpoints of
        its own (offline: one per epoch) it never prunes those: it keeps ``checkpoint.keep`` of its kind."""
        if not self.checkpoints and self.backend.syncs:
            return self.checkpoint()
        path = self.checkpoint(keep=1_000_000)
        self._cadence.append(path)
        self._prune_cadence(self.cfg.checkpoint.keep)
        return path

    def _prune_cadence(self, keep: int) -> None:
        import shutil

        doomed = self._cadence[: max(0, len(self._cadence) - keep)]
        self._cadence = self._cadence[len(doomed) :]
        for path in doomed:
            if path not in self.checkpoints and path != self._last_checkpoint_path:
                shutil.rmtree(path, ignore_errors=True)

    def _stop_with_checkpoint(self, interrupt: KeyboardInterrupt, unlogged: dict[str, Any] | None) -> None:
        """Ctrl-C, SIGTERM, SIGUSR1: log the step in hand, write a checkpoint (unless this step has one)
        and name it on the exception for the CLI. Repeated SIGTERM/SIGUSR1 are ignored from here on."""
        signals.stopping(interrupt)
        log.warning("%s at step %d: writing a checkpoint", signals.signal_name(interrupt), self.step)
        self.buffer.close()  # the rollout worker ends at its next push; the checkpoint does not wait for it
        if unlogged is not None:
            self._log(unlogged)  # the step is trained and counted: its row goes with its checkpoint
        if self._last_checkpoint == self.step and self._last_checkpoint_path:
            path = self._last_checkpoint_path
        else:
            path = self._save()
        interrupt.oapl_checkpoint = path  # type: ignore[attr-defined]  # the CLI says which one, truthfully
        signals.note_checkpoint(path)

    def _rollout_failed(self, cause: BaseException | None) -> RolloutFailed:
        """A dead rollout worker ends the run non-zero, after a checkpoint of the steps trained (unless the
        trainer itself failed: the Ray backend then resumes from the latest checkpoint)."""
        if _retryable(cause):
            return RolloutFailed("the rollout worker failed")
        try:
            if self._last_checkpoint != self.step:
                self._save()
            saved = f"checkpoint of step {self.step}: {self._last_checkpoint_path}"
        except Exception as e:  # noqa: BLE001 - the worker's failure is the error to report
            log.warning("could not write a checkpoint after the rollout worker failed: %s", e)
            saved = "no checkpoint written"
        return RolloutFailed(f"the rollout worker failed at step {self.step} ({saved})")

    def _log_samples(self, groups) -> None:
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for g in groups[:2]:
                f.write(
                    json.dumps(
                        {
                            "step": self.step,
                            "prompt": g.prompt,
                            "responses": g.responses,
                            "rewards": g.rewards,
                            "version": g.version,
                        }
                    )
                    + "\n"
                )

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.backend.close()


def _checkpoint_bytes(policy) -> int | None:
    """About what a checkpoint of ``policy`` takes on disk: its weights (stored and exported) and the
    optimiser's state."""
    if policy is None:
        return None
    try:
        weights = sum(p.numel() * p.element_size() for p in policy.model.parameters())
        optim = sum(
            t.numel() * t.element_size()
            for st in policy.optimizer.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        return 2 * weights + optim
    except Exception:  # noqa: BLE001 - an estimate only
        return None


def _fmt(summary: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("pass@") or k == "reward_mean")


def make_backend(cfg: TrainConfig) -> Backend:
    """The backend for ``cfg``: the one place where it is chosen."""
    if is_offline(cfg):
        from oapl.backends.offline import OfflineBackend

        return OfflineBackend(cfg)
    if cfg.distributed.backend == "ray":
        from oapl.distributed.backend import RayBackend

        return RayBackend(cfg)
    from oapl.backends.local import LocalBackend

    return LocalBackend(cfg)


def train(
    cfg: TrainConfig, resume: bool | str = False, overwrite: bool = False, callbacks: list[Callback] | None = None
) -> RunResult:
    """Run Algorithm 1 with ``cfg``; ``resume`` continues from the newest intact checkpoint in
    ``output_dir`` (damaged newer ones are named and skipped), or from the kept checkpoint it names.

    A non-empty ``output_dir`` is refused (:class:`~oapl.errors.RunDirError`) unless ``resume`` or
    ``overwrite`` (replace the previous run, once this one has started) is given. Under the Ray
    backend a trainer failure resumes the run from its latest checkpoint, up to
    ``distributed.max_trainer_restarts`` times.
    """
    refuse_multi_process_launch()  # torchrun / accelerate launch: one line, not N copies of the job
    failures = 0
    # SIGTERM and SIGUSR1 stop the run as Ctrl-C does (unless the program handles them itself)
    with signals.handle_stop_signals(replace=False), backend_session(cfg):
        while True:
            run = None
            try:
                run = Run.for_config(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks)
                return run.train()
            except Exception as e:
                if not _retryable(e) or failures >= cfg.distributed.max_trainer_restarts:
                    raise
                failures += 1
                log.warning(
                    "trainer failure (%s): resuming from the latest checkpoint (attempt %d of %d)",
                    e,
                    failures,
                    cfg.distributed.max_trainer_restarts,
                )
                resume, overwrite = True, False
            finally:
                if run is not None:
                    run.close()


def _retryable(e: BaseException | None) -> bool:
    """A trainer failure, also when it surfaced through a rollout worker (``raise ... from``)."""
    from oapl.distributed.cluster import TrainerFailure

    while e is not None:
        if isinstance(e, TrainerFailure):
            return True
        e = e.__cause__
    return False


def backend_session(cfg: TrainConfig):
    """Process-wide resources shared by every attempt of a run (a Ray cluster it started)."""
    import contextlib

    if cfg.distributed.backend != "ray":
        return contextlib.nullcontext()
    from oapl.distributed.backend import ray_session

    return ray_session(cfg)
