"""Algorithm 1 on a Ray cluster (``distributed.backend: ray``): the :class:`RayBackend` of :class:`oapl.loop.Run`.

    sync: pi_inf <- pi ; v = 0 ; D = {}            rank 0's weights -> every engine actor
    in the background: N engine actors generate, the driver scores and fills D (tag v)
    for n = 1, 2, ...:
        batch <- sample from D ; the optimiser step(s) on W trainer ranks (DDP / FSDP2)
        if n % L == 0: pi_inf <- pi ; v += 1 ; clear D

The driver (this process) runs :class:`oapl.loop.Run` and owns the buffer, the prompt sampler, the
rewards and the metrics; it holds no model. Engines are :class:`~oapl.distributed.engines.EngineActor`
actors, trainer ranks :class:`~oapl.distributed.trainer.TrainerRank` actors, each set in its own
placement group. Same configuration, metric rows (plus ``num_engines`` and ``engine_restarts``),
checkpoints (a local run resumes a Ray run's checkpoint and vice versa) and resume rules as the
local backend.

Faults: a dead engine actor is restarted with the current weights and version (or, under the
collective transport with >= 2 engines in the background, waits for the next sync's broadcast) and
its in-flight groups are dropped (:class:`~oapl.distributed.engines.EnginePool`); a dead trainer rank stops the
attempt with :class:`~oapl.distributed.cluster.TrainerFailure` and :func:`oapl.loop.train` resumes
the whole run from the latest checkpoint (``distributed.max_trainer_restarts``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oapl.backends import OnlineBackend, Rollout, built
from oapl.config import TrainConfig
from oapl.distributed.cluster import ensure_ray, require_ray
from oapl.distributed.engines import EnginePool, PoolEngine, RankZeroEngine
from oapl.distributed.fleet import RolloutFleet
from oapl.distributed.trainer import TrainerGroup, parallel_mode

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
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size // cfg.algorithm.mini_batches
    if n < d.trainer_workers:
        raise ValueError(
            f"distributed.trainer_workers={d.trainer_workers} exceeds the {n} sequences of a "
            "mini-batch (rollout.prompts_per_step x rollout.group_size / algorithm.mini_batches)"
        )
    if parallel_mode(cfg) == "fsdp":
        L = cfg.rollout.sync_interval
        if cfg.eval.every and cfg.eval.every % L:
            raise ValueError(
                "with FSDP2 trainer ranks eval.every must be a multiple of rollout.sync_interval "
                "(mid-window evaluation needs the full weights on one rank)"
            )
        if cfg.algorithm.reference_logprobs == "recompute":
            raise ValueError("algorithm.reference_logprobs=recompute is not supported with FSDP2 trainer ranks")


@contextlib.contextmanager
def ray_session(cfg: TrainConfig) -> Iterator[None]:
    """Connect to (or start) the Ray cluster once for every attempt of a run; stop what we started."""
    validate(cfg)
    owns = ensure_ray(cfg)
    from oapl import signals

    signals.reclaim()  # ray.init sets SIGTERM to sys.exit: a stop signal still writes a checkpoint
    try:
        yield
    finally:
        if owns:
            require_ray().shutdown()


class RayBackend(OnlineBackend):
    """W trainer ranks and N engine actors on Ray, driven from this process."""

    description = "oapl train (ray)"

    def __init__(self, cfg: TrainConfig) -> None:
        validate(cfg)
        super().__init__(cfg)
        d = cfg.distributed
        self.transport = default_transport(cfg) if d.weight_transport == "auto" else d.weight_transport
        if self.transport not in TRANSPORTS:
            raise ValueError(f"distributed.weight_transport must be one of {TRANSPORTS}, got {self.transport!r}")
        self.trainers: TrainerGroup | None = None
        self.pool: EnginePool | None = None
        self._owns_ray = False

    def build(self, run_dir: Path, resume: bool | str) -> dict[str, Any]:
        from oapl.data.tasks import build_task
        from oapl.config_views import load_config_tokenizer

        cfg = self.cfg
        self._owns_ray = ensure_ray(cfg)  # a no-op inside ray_session
        self.task = build_task(cfg.task, cfg.seed)
        self.tokenizer = load_config_tokenizer(cfg)
        # start every actor at once (model loading overlaps), then join the trainer ranks, which
        # find and load the checkpoint
        self.trainers = TrainerGroup(cfg)
        self.pool = EnginePool(cfg, self.transport)
        self.trainers.setup(resume, str(run_dir))
        self.checkpoint = Path(self.trainers.ckpt) if self.trainers.ckpt else None
        self.pool.wait_ready()
        return self.trainers.state

    def rollout_factory(self):
        return RolloutFleet, self.pool

    def train_step(self, groups: list[Any]) -> dict[str, float]:
        metrics, _ = built(self.trainers, "the trainer ranks").train_step(groups)
        return metrics

    def publish(self, version: int) -> float:
        trainers = built(self.trainers, "the trainer ranks")
        t0 = time.perf_counter()
        built(self.pool, "the engine pool").load(trainers, version)
        seconds = time.perf_counter() - t0
        if self.cfg.algorithm.reference_logprobs == "recompute":
            trainers.call("snapshot_reference")
        return seconds

    @contextlib.contextmanager
    def evaluation_engine(self, synced: bool) -> Iterator:
        if synced:  # the engines hold the trainer's weights
            yield PoolEngine(built(self.pool, "the engine pool"))
            return
        engine = RankZeroEngine(
            built(self.trainers, "the trainer ranks"), self.cfg.seed + 17
        )  # rank 0's current weights
        with engine.session():
            yield engine

    def save(self, run_dir: Path, step: int, state: dict, config_yaml: str, keep: int) -> str:
        return built(self.trainers, "the trainer ranks").call(
            "save_checkpoint", str(run_dir), step, state, config_yaml, keep
        )[0]

    def row_stats(self, rollout: Rollout, since: list[tuple[int, float]]) -> dict[str, Any]:
        return {
            **super().row_stats(rollout, since),
            "num_engines": self.cfg.distributed.num_engines,
            "engine_restarts": self._restarts(),
        }

    def progress_fields(self, metrics: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        return {**super().progress_fields(metrics, row), "restarts": self._restarts()}

    def summary(self, rollout: Rollout) -> dict[str, Any]:
        return {
            **super().summary(rollout),
            "num_engines": self.cfg.distributed.num_engines,
            "engine_restarts": self._restarts(),
        }

    def _restarts(self) -> int:
        return built(self.pool, "the engine pool").total_restarts

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.stop()
        if self.pool is not None:
            self.pool.close()
        if self.trainers is not None:
            self.trainers.close()
        if self._owns_ray:
            require_ray().shutdown()
            self._owns_ray = False


__all__ = ["RayBackend", "default_transport", "ray_session", "validate"]
