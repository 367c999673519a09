"""The rollout workers that drive the engine slots of an :class:`~oapl.distributed.engines.EnginePool`.

* :class:`RolloutFleet`: one :class:`RayRolloutWorker` per slot sharing one prompt sampler
  (:class:`SharedSampler`) and one buffer: background threads (``rollout.asynchronous``) or,
  synchronously, one round of parallel engine calls at a time in a deterministic order.
* :class:`RayRolloutWorker`: a :class:`~oapl.rollout.worker.RolloutWorker` on one slot that survives the
  death of its actor (the pool restarts it; the in-flight groups are dropped) and idles while its slot
  is pending.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from oapl.distributed.cluster import TrainerFailure
from oapl.distributed.engines import EngineDied, EnginePending, EnginePool, RemoteEngine
from oapl.engines.base import SamplingParams
from oapl.rollout.buffer import BufferClosed, RolloutBuffer
from oapl.rollout.worker import PromptSampler, RolloutWorker

log = logging.getLogger(__name__)


class SharedSampler:
    """One :class:`PromptSampler` shared by every slot (thread-safe; resumable like the local one)."""

    def __init__(self, sampler: PromptSampler) -> None:
        self._sampler = sampler
        self._lock = threading.Lock()

    def next(self, k: int) -> list[int]:
        with self._lock:
            return self._sampler.next(k)

    def state_dict(self) -> dict[str, int]:
        with self._lock:
            return self._sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        with self._lock:
            self._sampler.load_state_dict(state)


class _SlotSampler:
    """A slot's view of the shared sampler; in synchronous mode the driver presets its draw."""

    def __init__(self, shared: SharedSampler) -> None:
        self.shared = shared
        self.preset: list[int] | None = None

    def next(self, k: int) -> list[int]:
        if self.preset is not None:
            out, self.preset = self.preset, None
            return out
        return self.shared.next(k)

    def state_dict(self) -> dict[str, int]:
        return self.shared.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.shared.load_state_dict(state)


class RayRolloutWorker(RolloutWorker):
    """A :class:`RolloutWorker` for one engine slot that survives the death of its actor."""

    def __init__(self, engine: RemoteEngine, shared: SharedSampler, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)
        self.slot = engine  # the same engine, typed: its pool and slot index
        self.slot_sampler = _SlotSampler(shared)
        self.sampler = self.slot_sampler

    def produce_or_restart(self) -> list | None:
        """One engine call; ``None`` when the actor died (restarted, in-flight groups dropped)."""
        pending = self.slot.pool.is_pending(self.slot.index)
        try:
            if not pending:  # (checked first: a pending slot draws no prompts)
                return self.produce()
        except EnginePending:
            pending = True
        except EngineDied as e:
            if self._stop.is_set():
                raise BufferClosed("stopping") from None
            with self.engine_lock:
                self.slot.pool.restart(self.slot.index, e.actor)
            return None
        if pending and self._stop.wait(0.05):  # idle until the next sync gives the slot its weights
            raise BufferClosed("stopping")
        return None

    def _generates(self) -> bool:
        return not self.slot.pool.is_pending(self.slot.index)  # a pending slot idles until the next sync

    def _next_groups(self) -> list | None:
        return self.produce_or_restart()


class RolloutFleet:
    """The N rollout workers of an :class:`EnginePool`, filling one shared buffer."""

    def __init__(
        self,
        pool: EnginePool,
        task,
        tokenizer,
        buffer: RolloutBuffer,
        sampling: SamplingParams,
        group_size: int,
        prompts_per_call: int,
        seed: int,
        weights_id: str = "",
    ) -> None:
        self.pool, self.buffer = pool, buffer
        self.prompts_per_call = prompts_per_call
        self.sampler = SharedSampler(PromptSampler(len(task.train), seed))
        self.workers = [
            RayRolloutWorker(
                engine,
                self.sampler,
                task,
                tokenizer,
                buffer,
                sampling,
                group_size,
                prompts_per_call,
                seed,
                weights_id=weights_id,
            )
            for engine in pool.engines
        ]
        self._executor: ThreadPoolExecutor | None = None

    # -- synchronous mode --------------------------------------------------------------------
    def fill(self, k: int) -> None:
        """Generate until the buffer holds ``k`` groups: rounds of parallel calls on as many slots as
        needed, prompts drawn and results pushed in slot order (deterministic)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="oapl-fill")
        while len(self.buffer) < k:
            need = math.ceil((k - len(self.buffer)) / self.prompts_per_call)
            ready = [w for w in self.workers if not self.pool.is_pending(w.slot.index)]
            if not ready:  # (not expected: synchronous generation keeps the object-store copy)
                raise TrainerFailure("no engine actor holds the synced weights")
            ws = ready[: min(need, len(ready))]
            for w in ws:
                w.slot_sampler.preset = self.sampler.next(self.prompts_per_call)
            futures = [self._executor.submit(w.produce_or_restart) for w in ws]
            for w, f in zip(ws, futures):
                groups = f.result()
                if groups is not None:
                    w.push(groups)

    # -- asynchronous mode --------------------------------------------------------------------
    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        for w in self.workers:
            w.request_stop()
        self.buffer.close()
        for w in self.workers:
            w.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for w in self.workers:
                stack.enter_context(w.paused())
            yield

    @property
    def failure(self) -> BaseException | None:
        return next((w.failure for w in self.workers if w.failure is not None), None)

    # -- stats ---------------------------------------------------------------------------------
    def gen_counters(self) -> list[tuple[int, float]]:
        return [(w.stats.gen_tokens, w.stats.gen_seconds) for w in self.workers]

    @staticmethod
    def tokens_per_s(now: list[tuple[int, float]], start: list[tuple[int, float]]) -> float:
        """Engine throughput: the sum over slots of generated tokens per second of generation."""
        return sum((t - t0) / max(s - s0, 1e-9) for (t, s), (t0, s0) in zip(now, start))

    @property
    def reward_errors(self) -> int:
        return sum(w.reward.stats.errors for w in self.workers)

    @property
    def reward_error_samples(self) -> list[dict[str, Any]]:
        return [s for w in self.workers for s in w.reward.stats.samples]

    @property
    def stale_dropped(self) -> int:
        return sum(w.stats.stale_dropped for w in self.workers)

    @property
    def groups_generated(self) -> int:
        return sum(w.stats.groups + w.stats.stale_dropped for w in self.workers)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
