"""The offline backend: Algorithm 1 on a stored rollout dataset, with no inference engine.

This is the paper's code experiment: the data was sampled once by a fixed policy (the "lagged
inference policy"), V* comes from the stored group rewards, the KL reference is the stored engine
log-probs (or a frozen copy of the sampling weights recomputing them), and the trainer makes several
passes over it without any weight sync (L = the whole run).

The trainer is this process's policy, or, with ``distributed.backend: ray``, W trainer ranks
(``distributed.trainer_workers``; FSDP2 shards with ``distributed.parallel: fsdp``, the way a 14B model
trains on one 8-GPU node): the same :class:`~oapl.distributed.trainer.TrainerGroup`, train step and
(sharded) checkpoints as an online Ray run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oapl.backends import Rollout, built
from oapl.config import TrainConfig
from oapl.data.rollouts import RolloutGroup, filter_groups, read_rollouts
from oapl.trainer.checkpoint import resume_checkpoint, save_checkpoint
from oapl.trainer.policy import load_policy

if TYPE_CHECKING:
    from oapl.distributed.trainer import TrainerGroup
    from oapl.trainer.policy import Policy

log = logging.getLogger(__name__)


def _epoch_batches(n_groups: int, per_step: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n_groups))
    random.Random(seed * 7_919 + epoch).shuffle(order)
    return [order[i : i + per_step] for i in range(0, n_groups - per_step + 1, per_step)]


def _same_weights(recorded: str, configured: str) -> bool:
    if recorded == configured:
        return True
    a, b = Path(recorded).expanduser(), Path(configured).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def check_sampling_provenance(groups: list[RolloutGroup], cfg: TrainConfig) -> None:
    """Refuse offline data sampled otherwise than the configuration says (unless allowed).

    Each group records how it was sampled (``sampling.temperature``, ``sampling.top_p``) and by which
    weights (``weights_id``). The trainer scores responses at ``sampling.temperature`` with
    ``model.name`` as the starting point (and, with ``reference_logprobs: recompute``, as pi_inf), so
    the stored engine log-probs must come from that same distribution. A mismatch raises
    ``ValueError`` naming the recorded and the configured value and an example ``prompt_id``; with
    ``offline.allow_sampling_mismatch`` it is logged as a warning instead.
    """
    source = cfg.offline.data
    s = cfg.sampling
    checks = (("temperature", "sampling.temperature", s.temperature), ("top_p", "sampling.top_p", s.top_p))
    problems: list[str] = []
    for key, field_name, want in checks:
        bad = [
            g
            for g in groups
            if not isinstance(g.sampling.get(key), (int, float))
            or not math.isclose(float(g.sampling[key]), want, rel_tol=0.0, abs_tol=1e-9)
        ]
        if bad:
            got = sorted({repr(g.sampling.get(key, "not recorded")) for g in bad})
            problems.append(
                f"{len(bad)} of {len(groups)} groups were sampled with {key}={', '.join(got)} "
                f"(e.g. prompt_id {bad[0].prompt_id!r}) but {field_name} is {want}"
            )
    bad = [g for g in groups if not _same_weights(g.weights_id, cfg.model.name)]
    if bad:
        got = sorted({repr(g.weights_id) for g in bad})
        problems.append(
            f"{len(bad)} of {len(groups)} groups were sampled by weights_id={', '.join(got)} "
            f"(e.g. prompt_id {bad[0].prompt_id!r}) but model.name is {cfg.model.name!r}"
        )
    if not problems:
        return
    text = (
        f"offline.data {source}: " + "; ".join(problems) + ". The stored log-probs are pi_inf of the "
        "data's own sampling; training at other settings regresses onto a distribution the data was not "
        "drawn from. Set the configuration to the recorded values, or offline.allow_sampling_mismatch="
        "true to train anyway"
    )
    if cfg.offline.allow_sampling_mismatch:
        log.warning("%s (allowed by offline.allow_sampling_mismatch)", text)
        return
    raise ValueError(text)


class StoredRollout:
    """The rollout of an offline run: stored groups, a seeded shuffle per epoch, one batch per fill."""

    failure: BaseException | None = None  # stored data never fails in the background

    def __init__(self, groups: list[RolloutGroup], per_step: int, seed: int, buffer, position: int = 0) -> None:
        self.groups, self.per_step, self.seed, self.buffer = groups, per_step, seed, buffer
        self.per_epoch = len(groups) // per_step
        self.position = position  # batches handed out so far (= trainer steps)
        self.epoch_progress = 0.0

    def fill(self, k: int) -> None:
        if k != self.per_step:
            raise ValueError(f"offline batches are of rollout.prompts_per_step={self.per_step} groups, not {k}")
        epoch, b = divmod(self.position, self.per_epoch)
        for i in _epoch_batches(len(self.groups), self.per_step, self.seed, epoch)[b]:
            self.buffer.put(self.groups[i])
        self.position += 1
        self.epoch_progress = epoch + (b + 1) / self.per_epoch

    def start(self) -> None:
        raise RuntimeError("offline data is read on demand, not generated in the background")

    def stop(self) -> None:
        pass

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield

    def gen_counters(self) -> list[tuple[int, float]]:
        return []

    def state_dict(self) -> dict[str, Any]:
        # nothing: the position is the trainer's step (a batch read but not trained on, e.g. when
        # Ctrl-C lands inside the step, is read again on resume)
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OfflineBackend:
    """Algorithm 1 with L = the whole run: the policy trains on stored rollouts; no engine, no sync."""

    description = "oapl offline"
    syncs = False
    background_rollout = False
    buffer_staleness = None  # stored groups keep the versions that sampled them
    tokenizer = None

    def __init__(self, cfg: TrainConfig) -> None:
        off = cfg.offline
        if not off.data:
            raise ValueError("offline.data is required for offline training")
        self.cfg = cfg
        self.task = None  # no held-out evaluation here: `oapl eval` the checkpoints
        self.checkpoint: Path | None = None
        self.policy: Policy | None = None
        self.trainers: TrainerGroup | None = None  # W ranks (distributed.backend=ray) instead of self.policy
        self._owns_ray = False
        self._resume_step = 0
        groups = read_rollouts(off.data)
        check_sampling_provenance(groups, cfg)  # before anything slow is loaded
        self.groups, self.filter_counts = filter_groups(
            groups, min_correct=off.min_correct, drop_all_correct=off.drop_all_correct
        )
        log.info("offline data %s: %s", off.data, self.filter_counts)
        if len(self.groups) < cfg.rollout.prompts_per_step:
            raise ValueError(
                f"offline.data: only {len(self.groups)} prompt groups left after filtering "
                f"{self.filter_counts}; need at least rollout.prompts_per_step="
                f"{cfg.rollout.prompts_per_step}"
            )
        self.per_epoch = len(self.groups) // cfg.rollout.prompts_per_step
        self.total_steps = self.per_epoch * off.epochs

    def build(self, run_dir: Path, resume: bool | str) -> dict[str, Any]:
        cfg = self.cfg
        self.checkpoint = resume_checkpoint(run_dir, resume) if resume else None
        if self.checkpoint is not None and cfg.algorithm.reference_logprobs == "recompute":
            raise ValueError(
                "resuming offline training with reference_logprobs=recompute needs the "
                "sampling weights; restart the stage instead"
            )
        if cfg.distributed.backend == "ray":
            state = self._build_ranks(run_dir, resume)
        else:  # the one restore path: fp32 masters (or LoRA adapters), optimiser and schedule
            policy, state = load_policy(cfg, self.total_steps, self.checkpoint)
            self.policy, self.tokenizer = policy, policy.tokenizer
        self._resume_step = int(state.get("step", 0))
        return state

    def _build_ranks(self, run_dir: Path, resume: bool | str) -> dict[str, Any]:
        """Start the W trainer ranks (which find and load the checkpoint themselves)."""
        from oapl.distributed.cluster import ensure_ray
        from oapl.distributed.trainer import TrainerGroup
        from oapl.config_views import load_config_tokenizer

        cfg = self.cfg
        self._owns_ray = ensure_ray(cfg)  # a no-op inside the run's ray_session
        self.tokenizer = load_config_tokenizer(cfg)
        self.trainers = trainers = TrainerGroup(cfg, total_steps=self.total_steps)
        trainers.setup(resume, str(run_dir))
        return trainers.state

    def start(self, version: int, buffer, sampling) -> StoredRollout:
        if self.cfg.algorithm.reference_logprobs == "recompute":  # the frozen sampling weights = the start
            if self.trainers is not None:
                self.trainers.call("snapshot_reference")
            else:
                built(self.policy, "the policy").snapshot_reference()
        return StoredRollout(
            self.groups, self.cfg.rollout.prompts_per_step, self.cfg.seed, buffer, position=self._resume_step
        )

    def train_step(self, groups) -> dict[str, float]:
        if self.trainers is not None:
            return self.trainers.train_step(groups)[0]
        return built(self.policy, "the policy").train_step(groups)

    def publish(self, version: int) -> float:
        raise RuntimeError("offline training never syncs: pi_inf is the policy that sampled the data")

    def after_generation(self) -> None:
        pass

    def evaluation_engine(self, synced: bool):
        raise RuntimeError("offline runs do not evaluate; use `oapl eval` on their checkpoints")

    def save(self, run_dir: Path, step: int, state: dict, config_yaml: str, keep: int) -> str:
        state = {**state, "epoch": step / self.per_epoch}
        if self.trainers is not None:
            return self.trainers.call("save_checkpoint", str(run_dir), step, state, config_yaml, keep)[0]
        return str(save_checkpoint(run_dir, step, built(self.policy, "the policy"), state, config_yaml, keep=keep))

    def checkpoint_due(self, step: int) -> int | None:
        """An end-of-epoch checkpoint (every epoch, or the last), all of them kept."""
        off = self.cfg.offline
        if step % self.per_epoch == 0 and (off.checkpoint_every_epoch or step == self.total_steps):
            return off.epochs + 1
        return None

    def row_stats(self, rollout: Rollout, since: list[tuple[int, float]]) -> dict[str, Any]:
        assert isinstance(rollout, StoredRollout)
        return {"epoch": rollout.epoch_progress}

    def progress_fields(self, metrics: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": int(row["epoch"] + 0.999), "loss": f"{metrics['loss']:.4g}"}

    def summary(self, rollout: Rollout) -> dict[str, Any]:
        return {"filter": self.filter_counts}

    def close(self) -> None:
        if self.trainers is not None:
            self.trainers.close()
            self.trainers = None
        if self._owns_ray:
            from oapl.distributed.cluster import require_ray

            require_ray().shutdown()
            self._owns_ray = False
