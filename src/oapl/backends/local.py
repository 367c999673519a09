"""One process: the policy, an in-process engine (vLLM or transformers) and a background rollout worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oapl.backends import OnlineBackend, built
from oapl.config import TrainConfig
from oapl.engines.base import InferenceEngine

if TYPE_CHECKING:
    from oapl.trainer.policy import Policy


class LocalBackend(OnlineBackend):
    """One process: the policy, an in-process engine and a background rollout worker."""

    description = "oapl train"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.policy: Policy | None = None
        self.engine: InferenceEngine | None = None

    def build(self, run_dir: Path, resume: bool | str) -> dict[str, Any]:
        from oapl.data.tasks import build_task
        from oapl.engines.factory import engine_kind, make_engine
        from oapl.trainer.checkpoint import resume_checkpoint
        from oapl.trainer.policy import load_policy

        cfg = self.cfg
        self.checkpoint = resume_checkpoint(run_dir, resume) if resume else None
        self.task = build_task(cfg.task, cfg.seed)
        policy, state = load_policy(cfg, cfg.steps, self.checkpoint)
        self.policy = policy
        self.tokenizer = policy.tokenizer
        # a LoRA checkpoint has no merged model: the engine starts from the base and the first sync
        # (Backend.start) sends it the trainer's weights
        weights = (
            str(self.checkpoint / "model")
            if self.checkpoint is not None and not cfg.model.lora.enabled
            else policy.model_path
        )
        in_memory = policy.hf_model() if engine_kind(cfg) == "transformers" else None
        self.engine = make_engine(cfg, weights, self.tokenizer, hf_model=in_memory)
        return state

    def rollout_factory(self):
        from oapl.rollout.worker import RolloutWorker

        return RolloutWorker, self.engine

    def train_step(self, groups: list[Any]) -> dict[str, float]:
        return built(self.policy, "the policy").train_step(groups)

    def publish(self, version: int) -> float:
        policy = built(self.policy, "the policy")
        seconds = built(self.engine, "the engine").load_weights(policy.engine_weights(), version)
        if self.cfg.algorithm.reference_logprobs == "recompute":
            policy.snapshot_reference()
        return seconds

    def after_generation(self) -> None:
        sleep = getattr(self.engine, "sleep", None)  # vLLM's
        if self.cfg.engine.enable_sleep_mode and sleep is not None:
            sleep()  # free GPU memory for the trainer; the engine wakes on next use

    @contextlib.contextmanager
    def evaluation_engine(self, synced: bool) -> Iterator[InferenceEngine]:
        if synced:  # the engine holds the trainer's weights
            yield built(self.engine, "the engine")
            return
        from oapl.engines.transformers_engine import TransformersEngine

        model = built(self.policy, "the policy").hf_model()  # score the trainer's current weights directly
        was_training = model.training
        model.eval()
        try:
            yield TransformersEngine(model, self.tokenizer, self.cfg.engine.max_batch_size, seed=self.cfg.seed + 17)
        finally:
            model.train(was_training)

    def save(self, run_dir: Path, step: int, state: dict, config_yaml: str, keep: int) -> str:
        from oapl.trainer.checkpoint import save_checkpoint

        return str(save_checkpoint(run_dir, step, built(self.policy, "the policy"), state, config_yaml, keep=keep))

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.stop()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
