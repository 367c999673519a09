"""The training loop: Algorithm 1 of the paper (OAPL with a lagged inference policy).

    sync: pi_inf <- pi ; v = 0 ; D = {}
    in the background: sample prompts, generate G responses with pi_inf, score, add to D (tag v)
    for n = 1, 2, ...:
        batch <- sample from D ; optimiser step on the loss
        if n % L == 0: pi_inf <- pi ; v += 1 ; clear D

The same loop runs the GRPO baseline (``algorithm.name: grpo``); only the loss differs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from oapl.config import TrainConfig, save_config
from oapl.data.tasks import build_task
from oapl.engines.base import SamplingParams
from oapl.engines.factory import engine_kind, make_engine
from oapl.evaluation.heldout import evaluate
from oapl.metrics import MetricsLogger
from oapl.rollout.buffer import BufferClosed, RolloutBuffer
from oapl.rollout.worker import RolloutWorker
from oapl.rundir import begin_run, check_run_dir
from oapl.trainer.checkpoint import latest_checkpoint, save_checkpoint, seed_everything, set_rng_state
from oapl.trainer.policy import load_policy

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: str
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    last_metrics: dict[str, Any]


class Trainer:
    """Owns the policy, the engine, the buffer and the rollout worker of one run."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)  # refuses to clobber a run
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.ckpt = latest_checkpoint(self.run_dir) if resume else None
        if resume and self.ckpt is None:
            log.warning("resume requested but %s has no checkpoint: starting from scratch", self.run_dir)
        self.task = build_task(cfg.task, cfg.seed)
        self.policy, state = load_policy(cfg, cfg.steps, self.ckpt)
        self.step = int(state.get("step", 0))
        self.version = int(state.get("version", 0))
        self.sync_step = int(state.get("sync_step", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.eval_before = state.get("eval_before")
        self.version_steps: dict[int, int] = dict(state.get("version_steps", {self.version: self.sync_step}))
        if state:
            if self.sync_step != self.step:
                log.warning("checkpoint step %d is mid-window (last sync at %d): the engine restarts from "
                            "the trainer's weights as a new sync", self.step, self.sync_step)
                self.version += 1
                self.sync_step = self.step
                self.version_steps[self.version] = self.step
        s = cfg.sampling
        self.sampling = SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop))
        # --- sync: pi_inf <- pi ; D = {} -------------------------------------------------------
        weights_path = str(self.ckpt / "model") if self.ckpt is not None else self.policy.model_path
        in_memory = self.policy.hf_model() if engine_kind(cfg) == "transformers" else None
        self.engine = make_engine(cfg, weights_path, self.policy.tokenizer, hf_model=in_memory)
        # everything is loaded: the run starts, and only now is anything in its directory changed
        begin_run(self.run_dir, resume=resume, overwrite=overwrite)
        save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                                     cfg.logging.wandb_project, cfg.model_dump(), resume=self.ckpt is not None)
        if self.ckpt is not None:
            self.metrics.truncate_after(self.step)
        self.engine.load_weights(self.policy.engine_weights(), self.version)
        if cfg.algorithm.reference_logprobs == "recompute":
            self.policy.snapshot_reference()
        self.buffer = RolloutBuffer(cfg.rollout.buffer_groups, self.version, cfg.rollout.max_staleness)
        self.worker = RolloutWorker(self.engine, self.task, self.policy.tokenizer, self.buffer, self.sampling,
                                    cfg.rollout.group_size, cfg.rollout.prompts_per_generate, cfg.seed,
                                    weights_id=cfg.model.name)
        if state:
            self.worker.load_state_dict(state["worker"])
            set_rng_state(state["rng"])

    # -- the pieces of Algorithm 1 ---------------------------------------------------------------
    def sync(self) -> float:
        """pi_inf <- pi ; v += 1 ; clear D."""
        with self.worker.paused():
            self.version += 1
            seconds = self.engine.load_weights(self.policy.engine_weights(), self.version)
            self.buffer.clear(self.version)
            if self.cfg.algorithm.reference_logprobs == "recompute":
                self.policy.snapshot_reference()
        self.sync_step = self.step
        self.version_steps[self.version] = self.step
        return seconds

    def sample_batch(self):
        p = self.cfg.rollout.prompts_per_step
        if not self.cfg.rollout.asynchronous:
            self.worker.fill(p)
            if self.cfg.engine.enable_sleep_mode and hasattr(self.engine, "sleep"):
                self.engine.sleep()  # free GPU memory for the trainer; the engine wakes on next use
        try:
            return self.buffer.take(p)
        except BufferClosed:
            if self.worker.failure is not None:
                raise RuntimeError("the rollout worker failed") from self.worker.failure
            raise

    def evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        params = SamplingParams(e.temperature, e.top_p, e.max_tokens or self.cfg.sampling.max_tokens,
                                tuple(self.cfg.sampling.stop), n=e.n)
        with self.worker.paused():
            if self.sync_step == self.step:  # the engine holds the trainer's weights
                summary, _ = evaluate(self.engine, self.task, self.policy.tokenizer, params)
            else:  # score the trainer's current weights directly
                from oapl.engines.transformers_engine import TransformersEngine

                model = self.policy.hf_model()
                was_training = model.training
                model.eval()
                try:
                    eng = TransformersEngine(model, self.policy.tokenizer, self.cfg.engine.max_batch_size,
                                             seed=self.cfg.seed + 17)
                    summary, _ = evaluate(eng, self.task, self.policy.tokenizer, params)
                finally:
                    model.train(was_training)
        return summary

    def checkpoint(self) -> Path:
        state = {"step": self.step, "version": self.version, "sync_step": self.sync_step,
                 "samples_seen": self.samples_seen, "worker": self.worker.state_dict(),
                 "version_steps": self.version_steps,
                 "eval_before": self.eval_before}
        path = save_checkpoint(self.run_dir, self.step, self.policy, state,
                               yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False),
                               keep=self.cfg.checkpoint.keep)
        log.info("checkpoint written: %s", path)
        return path

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> RunResult:
        cfg = self.cfg
        L = cfg.rollout.sync_interval
        if self.eval_before is None and cfg.eval.at_start and self.task.eval:
            self.eval_before = self.evaluate()
            self.metrics.log({"step": self.step, "samples_seen": self.samples_seen,
                              **{f"eval/{k}": v for k, v in self.eval_before.items()}})
            log.info("held-out before training: %s", _fmt(self.eval_before))
        progress = None
        if cfg.logging.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc="oapl train", dynamic_ncols=True)
        if cfg.rollout.asynchronous:
            self.worker.start()
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        gen_tokens0, gen_s0 = self.worker.stats.gen_tokens, self.worker.stats.gen_seconds
        try:
            while self.step < cfg.steps:
                groups = self.sample_batch()
                batch_version = min(g.version for g in groups)
                metrics = self.policy.train_step(groups)
                self.step += 1
                self.samples_seen += sum(g.n for g in groups)
                st = self.worker.stats
                row: dict[str, Any] = {
                    "step": self.step, "samples_seen": self.samples_seen, **metrics,
                    "weight_version": batch_version, "lag": self.step - 1 - self.version_steps.get(batch_version, self.sync_step),
                    "gen_tokens_per_s": (st.gen_tokens - gen_tokens0) / max(st.gen_seconds - gen_s0, 1e-9),
                    "reward_errors": self.worker.reward.stats.errors, "stale_dropped": st.stale_dropped,
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
                                         v=batch_version, lag=row["lag"])
        except KeyboardInterrupt as interrupt:
            log.warning("interrupted at step %d: writing a checkpoint", self.step)
            self.worker.stop()
            interrupt.oapl_checkpoint = str(self.checkpoint())  # the CLI says which one, truthfully
            raise
        finally:
            self.worker.stop()
            if progress is not None:
                progress.close()
        eval_after = None
        if self.sync_step != self.step:
            self.sync()  # the engine gets the final weights (for evaluation and for users)
        if cfg.eval.at_end and self.task.eval:
            eval_after = self.evaluate()
            self.metrics.log({"step": self.step, "samples_seen": self.samples_seen,
                              **{f"eval/{k}": v for k, v in eval_after.items()}})
            log.info("held-out after training: %s", _fmt(eval_after))
        if cfg.checkpoint.save_final:
            self.checkpoint()
        summary = {"eval_before": self.eval_before, "eval_after": eval_after, "steps": self.step,
                   "samples_seen": self.samples_seen, "reward_errors": self.worker.reward.stats.errors,
                   "reward_error_samples": self.worker.reward.stats.samples}
        (self.run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        return RunResult(str(self.run_dir), self.step, self.eval_before, eval_after, last)

    def _log_samples(self, groups) -> None:
        import json

        with (self.run_dir / "samples.jsonl").open("a") as f:
            for g in groups[:2]:
                f.write(json.dumps({"step": self.step, "prompt": g.prompt, "responses": g.responses,
                                    "rewards": g.rewards, "version": g.version}) + "\n")

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()


def _fmt(summary: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("pass@") or k == "reward_mean")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run Algorithm 1 with ``cfg``; ``resume`` continues from the latest checkpoint in ``output_dir``.

    A non-empty ``output_dir`` is refused (:class:`~oapl.errors.RunDirError`) unless ``resume`` or
    ``overwrite`` (replace the previous run, once this one has started) is given.
    """
    if cfg.distributed.backend == "ray":  # engines as Ray actors, trainer ranks placed by Ray
        from oapl.distributed import train as train_ray

        d = cfg.distributed
        return train_ray(cfg, resume=resume, overwrite=overwrite, max_trainer_restarts=d.max_trainer_restarts,
                         weight_transport=None if d.weight_transport == "auto" else d.weight_transport)
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    try:
        return trainer.train()
    finally:
        trainer.close()
