"""The generator side of Algorithm 1: sample prompts, generate G responses with pi_inf, score, add to D.

:class:`RolloutWorker` runs in a background thread (``start()``) concurrently with the trainer, or on
demand (``fill()``) for a deterministic, synchronous run. The engine is used under a lock so a weight
sync (``with worker.paused(): ...``) never interleaves with a generation call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from oapl.data.budget import check_prompt_budget, engine_max_model_len
from oapl.engines.base import InferenceEngine, SamplingParams, sampling_dict
from oapl.rewards.base import SafeReward
from oapl.rollout.buffer import BufferClosed, RolloutBuffer
from oapl.rollout.group import RolloutGroup, score_groups

log = logging.getLogger(__name__)


class Sampler(Protocol):
    """Where a worker's prompts come from: a :class:`PromptSampler`, or a view of one shared by workers."""

    def next(self, k: int) -> list[int]: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...


class PromptSampler:
    """Deterministic shuffled pass over the training prompts, epoch after epoch; resumable."""

    def __init__(self, n: int, seed: int) -> None:
        if n == 0:
            raise ValueError("no training prompts")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)


@dataclass
class WorkerStats:
    groups: int = 0
    responses: int = 0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    reward_seconds: float = 0.0
    stale_dropped: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)


def report_failure(e: BaseException) -> None:
    """Say once, in one line, why the rollout worker stopped; the traceback only with ``--debug``
    (``OAPL_DEBUG``). A user error (a reward that fails on most completions, hangs, returns strings)
    is not logged here at all: the trainer raises it, and the ``oapl`` command prints it on one line."""
    from oapl.errors import UserError, debug_enabled

    debug = debug_enabled()
    if isinstance(e, UserError) and not debug:
        return
    log.error(
        "rollout worker stopped: %s: %s",
        type(e).__name__,
        " ".join(str(e).split())[:500],
        exc_info=e if debug else None,
    )


class RolloutWorker:
    """Fill a :class:`RolloutBuffer` with scored groups from an :class:`InferenceEngine`."""

    def __init__(
        self,
        engine: InferenceEngine,
        task,
        tokenizer,
        buffer: RolloutBuffer,
        sampling: SamplingParams,
        group_size: int,
        prompts_per_call: int,
        seed: int,
        weights_id: str = "",
    ) -> None:
        self.engine = engine
        self.task = task
        self.tokenizer = tokenizer
        self.buffer = buffer
        self.sampling = dataclasses.replace(sampling, n=group_size)
        self.prompts_per_call = prompts_per_call
        self.weights_id = weights_id
        self.sampling_dict = sampling_dict(self.sampling)
        self.sampler: Sampler = PromptSampler(len(task.train), seed)
        self.reward = SafeReward(task.reward_fn)
        self.stats = WorkerStats()
        self.engine_lock = threading.Lock()
        self._rendered: dict[int, tuple[str, list[int]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: BaseException | None = None

    # -- producing ---------------------------------------------------------------------------
    def _prompt(self, idx: int) -> tuple[str, list[int]]:
        if idx not in self._rendered:
            example = self.task.train[idx]
            text = self.task.render(example, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            # the engine would silently cut a response that does not fit max_model_len
            check_prompt_budget(
                len(ids),
                self.sampling.max_tokens,
                engine_max_model_len(self.engine),
                split="train",
                row=idx,
                prompt_id=str(example.get("prompt_id", idx)),
                max_tokens_field="sampling.max_tokens",
            )
            self._rendered[idx] = (text, ids)
        return self._rendered[idx]

    def produce(self) -> list[RolloutGroup]:
        """One engine call: ``prompts_per_call`` prompts x G responses, scored, tagged with the version."""
        with self.engine_lock:
            idxs = self.sampler.next(self.prompts_per_call)
            prompts = [self._prompt(i) for i in idxs]
            version = self.engine.version
            t0 = time.perf_counter()
            outputs = self.engine.generate([ids for _, ids in prompts], self.sampling)
            gen_s = time.perf_counter() - t0
        examples = [self.task.train[i] for i in idxs]
        t1 = time.perf_counter()
        groups = score_groups(
            self.reward,
            self.task,
            prompts,
            examples,
            outputs,
            n=self.sampling.n,
            weights_id=self.weights_id,
            sampling=self.sampling_dict,
            default_ids=idxs,
            version=version,
        )
        self.stats.reward_seconds += time.perf_counter() - t1
        n_tok = sum(len(c.token_ids) for out in outputs for c in out.completions)
        self.stats.gen_tokens += n_tok
        self.stats.gen_seconds += gen_s
        self.stats.responses += sum(len(out.completions) for out in outputs)
        self.stats.truncated += sum(c.finish_reason == "length" for out in outputs for c in out.completions)
        return groups

    def push(self, groups: list[RolloutGroup]) -> None:
        """Put generated groups into the buffer (stale ones are dropped and counted)."""
        for grp in groups:
            if self.buffer.put(grp):
                self.stats.groups += 1
            else:
                self.stats.stale_dropped += 1

    def fill(self, k: int) -> None:
        """Synchronous mode: generate until the buffer holds at least ``k`` groups."""
        while len(self.buffer) < k:
            self.push(self.produce())

    # -- background thread ------------------------------------------------------------------
    def _generates(self) -> bool:
        """Whether the next :meth:`_next_groups` will call the engine (and so needs a reservation)."""
        return True

    def _next_groups(self) -> list[RolloutGroup] | None:
        """One engine call's groups for the background loop (``None``: nothing to push this time)."""
        return self.produce()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # OAPL's buffer is cleared at every sync: generate only what the trainer will take before
                # it. A worker that will not generate this time (an engine without the synced weights)
                # reserves nothing, or it would hold back the others until the sync that it waits for.
                k = self.prompts_per_call if self._generates() else 0
                version = self.buffer.reserve(k) if k else None
                try:
                    groups = self._next_groups()
                    if groups is not None:
                        self.push(groups)
                finally:
                    if version is not None:
                        self.buffer.release(k, version)
        except BufferClosed:
            pass
        except BaseException as e:  # noqa: BLE001 - surfaced to the trainer via self.failure
            report_failure(e)
            self.failure = e
            self.buffer.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oapl-rollout", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the background thread to stop after its current engine call (does not wait)."""
        self._stop.set()

    def stop(self) -> None:
        self.request_stop()
        self.buffer.close()
        if self._thread is not None:
            self._thread.join(timeout=600)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine: no generation runs inside this block (weight sync, evaluation)."""
        with self.engine_lock:
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    # -- stats, in the interface of a fleet of workers (oapl.distributed.fleet.RolloutFleet) ----
    def gen_counters(self) -> list[tuple[int, float]]:
        return [(self.stats.gen_tokens, self.stats.gen_seconds)]

    @staticmethod
    def tokens_per_s(now: list[tuple[int, float]], start: list[tuple[int, float]]) -> float:
        """Engine throughput: generated tokens per second of generation (summed over engines)."""
        return sum((t - t0) / max(s - s0, 1e-9) for (t, s), (t0, s0) in zip(now, start))

    @property
    def reward_errors(self) -> int:
        return self.reward.stats.errors

    @property
    def reward_error_samples(self) -> list[dict[str, Any]]:
        return list(self.reward.stats.samples)

    @property
    def stale_dropped(self) -> int:
        return self.stats.stale_dropped
