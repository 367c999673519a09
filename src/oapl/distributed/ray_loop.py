"""Algorithm 1 on a Ray cluster (``distributed.backend: ray``).

    sync: pi_inf <- pi ; v = 0 ; D = {}            rank 0's weights -> every engine actor
    in the background: N engine actors generate, the driver scores and fills D (tag v)
    for n = 1, 2, ...:
        batch <- sample from D ; one optimiser step on W trainer ranks (DDP / FSDP2)
        if n % L == 0: pi_inf <- pi ; v += 1 ; clear D

The driver (this process) owns the buffer, the prompt sampler, the rewards, the metrics and the
loop; it holds no model. Engines are :class:`~oapl.distributed.engines.EngineActor` actors,
trainer ranks :class:`~oapl.distributed.trainer.TrainerRank` actors, each set in its own placement
group. Same configuration, metric rows (plus ``num_engines`` and ``engine_restarts``), checkpoints
(same format: a local run resumes a Ray run's checkpoint and vice versa) and resume rules as
:class:`oapl.loop.Trainer`.

Faults: a dead engine actor is restarted with the current weights and version and its in-flight
groups are dropped (:class:`~oapl.distributed.engines.EnginePool`); a dead trainer rank stops the
attempt with :class:`~oapl.distributed.cluster.TrainerFailure` and :func:`train` resumes the whole
run from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from oapl.config import TrainConfig, save_config
from oapl.data.tasks import build_task
from oapl.distributed.cluster import TrainerFailure, ensure_ray, require_ray
from oapl.distributed.engines import EnginePool, PoolEngine, RankZeroEngine, RolloutFleet
from oapl.distributed.trainer import TrainerGroup, parallel_mode
from oapl.engines.base import SamplingParams
from oapl.evaluation.heldout import evaluate
from oapl.metrics import MetricsLogger
from oapl.rollout.buffer import BufferClosed, RolloutBuffer
from oapl.rundir import begin_run, check_run_dir
from oapl.trainer.checkpoint import set_rng_state
from oapl.trainer.model import load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "collective")


def default_transport(cfg: TrainConfig) -> str:
    """NCCL broadcast when trainer ranks and engines have whole GPUs, the object store otherwise
    (NCCL refuses two members on one GPU, which fractional GPUs allow)."""
    d = cfg.distributed
    return "collective" if d.trainer_num_gpus >= 1 and d.engine_num_gpus >= 1 else "object_store"


def validate(cfg: TrainConfig) -> None:
    d = cfg.distributed
    if d.backend != "ray":
        raise ValueError("oapl.distributed runs distributed.backend=ray configurations")
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if n < d.trainer_workers:
        raise ValueError(f"distributed.trainer_workers={d.trainer_workers} exceeds the {n} sequences of a "
                         "batch (rollout.prompts_per_step x rollout.group_size)")
    if parallel_mode(cfg) == "fsdp":
        L = cfg.rollout.sync_interval
        if cfg.eval.every and cfg.eval.every % L:
            raise ValueError("with FSDP2 trainer ranks eval.every must be a multiple of rollout.sync_interval "
                             "(mid-window evaluation needs the full weights on one rank)")
        if cfg.algorithm.reference_logprobs == "recompute":
            raise ValueError("algorithm.reference_logprobs=recompute is not supported with FSDP2 trainer ranks")


class RayTrainer:
    """Driver of one attempt of a Ray run; the local :class:`oapl.loop.Trainer`'s counterpart."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, weight_transport: str | None = None,
                 overwrite: bool = False) -> None:
        validate(cfg)
        self.cfg = cfg
        self.trainers: TrainerGroup | None = None
        self.pool: EnginePool | None = None
        self.rollout: RolloutFleet | None = None
        self.metrics: MetricsLogger | None = None
        self._owns_ray = False
        self.transport = weight_transport or default_transport(cfg)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"weight_transport must be one of {TRANSPORTS}, got {self.transport!r}")
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool, overwrite: bool = False) -> None:
        cfg = self.cfg
        self.run_dir = Path(cfg.output_dir)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)  # refuses to clobber a run
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._owns_ray = ensure_ray(cfg)
        self.task = build_task(cfg.task, cfg.seed)
        model_path = resolve_model_path(cfg.model.name)
        self.tokenizer = load_tokenizer(resolve_model_path(cfg.model.tokenizer) if cfg.model.tokenizer else model_path,
                                        cfg.model.trust_remote_code)
        # start every actor at once (model loading overlaps), then join the trainer ranks, which
        # find and load the checkpoint
        self.trainers = TrainerGroup(cfg)
        self.pool = EnginePool(cfg, self.transport)
        self.trainers.setup(resume)
        self.ckpt = self.trainers.ckpt
        if resume and self.ckpt is None:
            log.warning("resume requested but %s has no checkpoint: starting from scratch", self.run_dir)
        state = self.trainers.state
        self.step = int(state.get("step", 0))
        self.version = int(state.get("version", 0))
        self.sync_step = int(state.get("sync_step", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.eval_before = state.get("eval_before")
        self.version_steps: dict[int, int] = dict(state.get("version_steps", {self.version: self.sync_step}))
        if state and self.sync_step != self.step:
            log.warning("checkpoint step %d is mid-window (last sync at %d): the engines restart from "
                        "the trainer's weights as a new sync", self.step, self.sync_step)
            self.version += 1
            self.sync_step = self.step
            self.version_steps[self.version] = self.step
        s = cfg.sampling
        self.sampling = SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop))
        # --- sync: pi_inf <- pi ; D = {} -------------------------------------------------------
        self.pool.wait_ready()
        begin_run(self.run_dir, resume=resume, overwrite=overwrite)  # loaded: only now touch the run dir
        save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                                     cfg.logging.wandb_project, cfg.model_dump(), resume=self.ckpt is not None)
        if self.ckpt is not None:
            self.metrics.truncate_after(self.step)
        self.pool.load(self.trainers.publish_weights(), self.version)
        if cfg.algorithm.reference_logprobs == "recompute":
            self.trainers.call("snapshot_reference")
        self.buffer = RolloutBuffer(cfg.rollout.buffer_groups, self.version, cfg.rollout.max_staleness)
        self.rollout = RolloutFleet(self.pool, self.task, self.tokenizer, self.buffer, self.sampling,
                                    cfg.rollout.group_size, cfg.rollout.prompts_per_generate, cfg.seed,
                                    weights_id=cfg.model.name)
        if state:
            self.rollout.load_state_dict(state["worker"])
            set_rng_state(state["rng"])

    # -- the pieces of Algorithm 1 ---------------------------------------------------------------
    def sync(self) -> float:
        """pi_inf <- pi ; v += 1 ; clear D."""
        with self.rollout.paused():
            self.version += 1
            t0 = time.perf_counter()
            self.pool.load(self.trainers.publish_weights(), self.version, trainers=self.trainers)
            seconds = time.perf_counter() - t0
            self.buffer.clear(self.version)
            if self.cfg.algorithm.reference_logprobs == "recompute":
                self.trainers.call("snapshot_reference")
        self.sync_step = self.step
        self.version_steps[self.version] = self.step
        return seconds

    def sample_batch(self):
        p = self.cfg.rollout.prompts_per_step
        if not self.cfg.rollout.asynchronous:
            self.rollout.fill(p)
        try:
            return self.buffer.take(p)
        except BufferClosed:
            if self.rollout.failure is not None:
                raise RuntimeError("a rollout worker failed") from self.rollout.failure
            raise

    def evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        params = SamplingParams(e.temperature, e.top_p, e.max_tokens or self.cfg.sampling.max_tokens,
                                tuple(self.cfg.sampling.stop), n=e.n)
        with self.rollout.paused():
            if self.sync_step == self.step:  # the engines hold the trainer's weights
                summary, _ = evaluate(PoolEngine(self.pool), self.task, self.tokenizer, params)
            else:  # score the trainer's current weights directly (rank 0)
                engine = RankZeroEngine(self.trainers, self.cfg.seed + 17)
                with engine.session():
                    summary, _ = evaluate(engine, self.task, self.tokenizer, params)
        return summary

    def checkpoint(self) -> str:
        state = {"step": self.step, "version": self.version, "sync_step": self.sync_step,
                 "samples_seen": self.samples_seen, "worker": self.rollout.state_dict(),
                 "version_steps": self.version_steps, "eval_before": self.eval_before}
        paths = self.trainers.call("save_checkpoint", str(self.run_dir), self.step, state,
                                   yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False),
                                   self.cfg.checkpoint.keep)
        log.info("checkpoint written: %s", paths[0])
        return paths[0]

    # -- the loop --------------------------------------------------------------------------------
    def train(self):
        from oapl.loop import RunResult

        cfg = self.cfg
        L = cfg.rollout.sync_interval
        n_engines = cfg.distributed.num_engines
        if self.eval_before is None and cfg.eval.at_start and self.task.eval:
            self.eval_before = self.evaluate()
            self.metrics.log({"step": self.step, "samples_seen": self.samples_seen,
                              **{f"eval/{k}": v for k, v in self.eval_before.items()}})
            log.info("held-out before training: %s", _fmt(self.eval_before))
        progress = None
        if cfg.logging.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc="oapl train (ray)", dynamic_ncols=True)
        if cfg.rollout.asynchronous:
            self.rollout.start()
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        gen0 = self.rollout.gen_counters()
        try:
            while self.step < cfg.steps:
                groups = self.sample_batch()
                batch_version = min(g.version for g in groups)
                metrics, _ = self.trainers.train_step(groups)
                self.step += 1
                self.samples_seen += sum(g.n for g in groups)
                row: dict[str, Any] = {
                    "step": self.step, "samples_seen": self.samples_seen, **metrics,
                    "weight_version": batch_version,
                    "lag": self.step - 1 - self.version_steps.get(batch_version, self.sync_step),
                    "gen_tokens_per_s": self.rollout.tokens_per_s(self.rollout.gen_counters(), gen0),
                    "reward_errors": self.rollout.reward_errors, "stale_dropped": self.rollout.stale_dropped,
                    "num_engines": n_engines, "engine_restarts": self.pool.total_restarts,
                    "elapsed_s": time.perf_counter() - t_start,
                }
                if self.step % L == 0 and self.step < cfg.steps:
                    row["sync_seconds"] = self.sync()
                    row["synced_to_version"] = self.version
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps and self.task.eval:
                    row.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                self.metrics.log(row)
                if cfg.logging.log_samples_every and self.step % cfg.logging.log_samples_every == 0:
                    self._log_samples(groups)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps:
                    self.checkpoint()
                last = row
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4g}",
                                         v=batch_version, lag=row["lag"], restarts=self.pool.total_restarts)
        except KeyboardInterrupt as interrupt:
            log.warning("interrupted at step %d: writing a checkpoint", self.step)
            self.rollout.stop()
            interrupt.oapl_checkpoint = self.checkpoint()  # the CLI says which one, truthfully
            raise
        finally:
            self.rollout.stop()
            if progress is not None:
                progress.close()
        eval_after = None
        if self.sync_step != self.step:
            self.sync()  # the engines get the final weights (for evaluation and for users)
        if cfg.eval.at_end and self.task.eval:
            eval_after = self.evaluate()
            self.metrics.log({"step": self.step, "samples_seen": self.samples_seen,
                              **{f"eval/{k}": v for k, v in eval_after.items()}})
            log.info("held-out after training: %s", _fmt(eval_after))
        if cfg.checkpoint.save_final:
            self.checkpoint()
        summary = {"eval_before": self.eval_before, "eval_after": eval_after, "steps": self.step,
                   "samples_seen": self.samples_seen, "reward_errors": self.rollout.reward_errors,
                   "reward_error_samples": self.rollout.reward_error_samples,
                   "num_engines": n_engines, "engine_restarts": self.pool.total_restarts}
        (self.run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        return RunResult(str(self.run_dir), self.step, self.eval_before, eval_after, last)

    def _log_samples(self, groups) -> None:
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for g in groups[:2]:
                f.write(json.dumps({"step": self.step, "prompt": g.prompt, "responses": g.responses,
                                    "rewards": g.rewards, "version": g.version}) + "\n")

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.stop()
        if self.pool is not None:
            self.pool.close()
        if self.trainers is not None:
            self.trainers.close()
        if self.metrics is not None:
            self.metrics.close()
        if self._owns_ray:
            require_ray().shutdown()
            self._owns_ray = False


def _fmt(summary: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("pass@") or k == "reward_mean")


def train(cfg: TrainConfig, resume: bool = False, *, weight_transport: str | None = None,
          max_trainer_restarts: int = 3, overwrite: bool = False):
    """Run Algorithm 1 on Ray; a trainer failure resumes the run from its latest checkpoint.

    ``weight_transport``: ``object_store`` or ``collective`` (default: collective/NCCL when trainer
    and engines have GPUs). ``max_trainer_restarts``: resumes after a trainer failure before giving up.
    """
    validate(cfg)
    owns_ray = ensure_ray(cfg)  # one cluster for every attempt
    failures = 0
    try:
        while True:
            trainer = None
            try:
                trainer = RayTrainer(cfg, resume=resume, weight_transport=weight_transport, overwrite=overwrite)
                return trainer.train()
            except TrainerFailure as e:
                failures += 1
                if failures > max_trainer_restarts:
                    raise
                log.warning("trainer failure (%s): resuming from the latest checkpoint (attempt %d of %d)",
                            e, failures, max_trainer_restarts)
                resume, overwrite = True, False
            finally:
                if trainer is not None:
                    trainer.close()
    finally:
        if owns_ray:
            require_ray().shutdown()


__all__ = ["RayTrainer", "default_transport", "train", "validate"]
