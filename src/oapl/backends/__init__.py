"""Where Algorithm 1 runs: the :class:`Backend` protocol that :class:`oapl.loop.Run` drives.

:class:`oapl.loop.Run` is the algorithm; a backend owns the trainer, the engine(s) and the rollout
workers, and answers the few things the algorithm asks of them. Three implement it:

* :class:`oapl.backends.local.LocalBackend` — one process: a :class:`~oapl.trainer.policy.Policy`, an in-process engine
  (vLLM or transformers), one background :class:`~oapl.rollout.worker.RolloutWorker`;
* :class:`oapl.distributed.backend.RayBackend` — trainer ranks (DDP/FSDP2) and N engine actors on Ray;
* :class:`oapl.backends.offline.OfflineBackend` — stored rollout groups, no engine and no sync.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from oapl.engines.base import InferenceEngine, SamplingParams
from oapl.rollout.buffer import RolloutBuffer

if TYPE_CHECKING:
    from oapl.config import TrainConfig
    from oapl.data.tasks import Task

T = TypeVar("T")


def built(value: T | None, what: str) -> T:
    """``value``, which :meth:`Backend.build` (or ``start``) sets; a clear error if it has not run."""
    if value is None:
        raise RuntimeError(f"{what} is used before the backend was built")
    return value


class Rollout(Protocol):
    """The generator side of Algorithm 1 (a worker, a fleet of workers, or stored data)."""

    failure: BaseException | None

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def fill(self, k: int) -> None: ...
    def paused(self) -> contextlib.AbstractContextManager: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def gen_counters(self) -> list[tuple[int, float]]: ...


@runtime_checkable
class GeneratingRollout(Rollout, Protocol):
    """A rollout whose engines generate (local worker, Ray fleet): what the online backends' metrics read."""

    @property
    def reward_errors(self) -> int: ...
    @property
    def reward_error_samples(self) -> list[dict[str, Any]]: ...
    @property
    def stale_dropped(self) -> int: ...
    @staticmethod
    def tokens_per_s(now: list[tuple[int, float]], start: list[tuple[int, float]]) -> float: ...


def generating(rollout: Rollout) -> GeneratingRollout:
    if not isinstance(rollout, GeneratingRollout):
        raise TypeError(f"{type(rollout).__name__} does not generate (no reward/staleness counters)")
    return rollout


class Backend(Protocol):
    """What :class:`oapl.loop.Run` needs from where it runs."""

    # what Run reads (read-only here: a backend may use a class attribute, an attribute or a property)
    @property
    def description(self) -> str: ...  # progress-bar label
    @property
    def syncs(self) -> bool: ...  # False: pi_inf is fixed for the whole run (offline)
    @property
    def background_rollout(self) -> bool: ...  # the rollout may run in a background thread (rollout.asynchronous)
    @property
    def buffer_staleness(self) -> int | None: ...  # versions a buffered group may lag (None: any, stored data)
    @property
    def task(self) -> Task | None: ...  # the task (prompts, reward, held-out split); None offline
    @property
    def tokenizer(self) -> Any: ...
    @property
    def checkpoint(self) -> Path | None: ...  # the checkpoint restored by build(), if any
    @property
    def total_steps(self) -> int: ...

    def build(self, run_dir: Path, resume: bool | str) -> dict[str, Any]:
        """Build the trainer and the engines, restored when ``resume`` from the newest intact checkpoint
        (``True``) or from the checkpoint folder it names; return the checkpoint's trainer state ({} when
        fresh). Must not write into ``run_dir``."""
        ...

    def start(self, version: int, buffer: RolloutBuffer, sampling: SamplingParams) -> Rollout:
        """The first sync (pi_inf <- pi as ``version``) and the rollout that fills ``buffer``."""
        ...

    def train_step(self, groups: list[Any]) -> dict[str, float]: ...

    def publish(self, version: int) -> float:
        """pi_inf <- pi: the trainer's weights to the engine(s) as ``version``; seconds taken."""
        ...

    def after_generation(self) -> None:
        """Synchronous mode, after the batch was generated (e.g. put a vLLM engine to sleep)."""
        ...

    def evaluation_engine(self, synced: bool) -> contextlib.AbstractContextManager[InferenceEngine]:
        """An engine holding the trainer's current weights (``synced``: the rollout engine does)."""
        ...

    def save(self, run_dir: Path, step: int, state: dict, config_yaml: str, keep: int) -> str: ...

    def checkpoint_due(self, step: int) -> int | None:
        """A checkpoint the backend itself needs after ``step`` (its ``keep``), else None."""
        ...

    def row_stats(self, rollout: Rollout, since: list[tuple[int, float]]) -> dict[str, Any]: ...
    def progress_fields(self, metrics: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]: ...
    def summary(self, rollout: Rollout) -> dict[str, Any]: ...
    def close(self) -> None: ...


class OnlineBackend(abc.ABC):
    """What the backends with inference engines (local, Ray) share: the engines sample the task's
    prompts into the buffer, the weights sync every L steps, nothing checkpoints on its own."""

    syncs = True
    background_rollout = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.total_steps = cfg.steps
        self.task: Task | None = None
        self.tokenizer: Any = None
        self.checkpoint: Path | None = None
        self.rollout: GeneratingRollout | None = None

    @property
    def buffer_staleness(self) -> int:
        return self.cfg.rollout.max_staleness

    @abc.abstractmethod
    def rollout_factory(self) -> tuple[Callable[..., GeneratingRollout], Any]:
        """``(class, engine)``: what generates (a worker over an engine, a fleet over a pool)."""

    def start(self, version: int, buffer: RolloutBuffer, sampling: SamplingParams) -> GeneratingRollout:
        self.publish(version)
        cfg = self.cfg
        cls, engine = self.rollout_factory()
        self.rollout = cls(
            engine,
            self.task,
            self.tokenizer,
            buffer,
            sampling,
            cfg.rollout.group_size,
            cfg.rollout.prompts_per_generate,
            cfg.seed,
            weights_id=cfg.model.name,
        )
        return self.rollout

    @abc.abstractmethod
    def publish(self, version: int) -> float:
        """pi_inf <- pi: the trainer's weights to the engine(s) as ``version``; seconds taken."""

    def after_generation(self) -> None:  # noqa: B027 - a hook most backends leave empty
        pass

    def checkpoint_due(self, step: int) -> int | None:
        return None

    def row_stats(self, rollout: Rollout, since: list[tuple[int, float]]) -> dict[str, Any]:
        r = generating(rollout)
        return {
            "gen_tokens_per_s": r.tokens_per_s(r.gen_counters(), since),
            "reward_errors": r.reward_errors,
            "stale_dropped": r.stale_dropped,
        }

    def progress_fields(self, metrics: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        return {
            "reward": f"{metrics['reward_mean']:.3f}",
            "loss": f"{metrics['loss']:.4g}",
            "v": row["weight_version"],
            "lag": row["lag"],
        }

    def summary(self, rollout: Rollout) -> dict[str, Any]:
        r = generating(rollout)
        return {"reward_errors": r.reward_errors, "reward_error_samples": r.reward_error_samples}
