"""Math reward: math-verify on the last ``\\boxed{}`` answer, with timeouts that work in any thread.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread, and
the rollout worker is a background thread (TRL turns the timeouts off there). So every check runs
in a small pool of worker processes (where it *is* the main thread, and math-verify's timeouts
apply), and the caller additionally waits at most ``timeout_s`` per completion; a hung worker pool
is killed and replaced. This works the same when TRL's ``GRPOTrainer`` calls :func:`math_reward`.

The workers are started with multiprocessing's ``spawn``, which re-imports the main script in each
worker. A script that starts training without an ``if __name__ == "__main__":`` guard would start it
again in every worker, and the workers die. The pool is therefore checked when it starts: workers
that cannot start raise :class:`~oapl.rewards.base.RewardUnavailableError` saying to add the guard
(instead of scoring every completion 0). A worker that dies on one completion (a crash inside
math-verify) costs only that completion: the others are rescored in a fresh pool.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import threading
import weakref
from typing import Any

from oapl.rewards.base import RewardUnavailableError, completion_text

log = logging.getLogger(__name__)

GUARD_HINT = (
    'if this is a script, put the code that starts training under `if __name__ == "__main__":` '
    "(multiprocessing's spawn re-imports the main script in every worker process, so unguarded "
    "top-level code runs again there)"
)


def bootstrapping() -> bool:
    """True while this process is a multiprocessing worker still importing the parent's main script."""
    return bool(getattr(mp.current_process(), "_inheriting", False))


def _ping() -> int:
    return os.getpid()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; ``None`` if absent."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _verify_one(completion: str, gold: str, timeout: int) -> float:
    from math_verify import parse, verify

    boxed = last_boxed(completion)
    if boxed is None:
        return 0.0
    gold_text = gold if "\\boxed" in gold or "$" in gold else f"${gold}$"
    gold_parsed = parse(gold_text, parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=timeout) else 0.0


class MathVerifier:
    """A pool of processes running math-verify; call it like a TRL reward function.

    ``completions`` may be strings or TRL's conversational message lists; ``answer`` is the gold
    column. A check that takes longer than ``timeout_s`` scores 0 and its worker is killed.
    """

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, start_timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.workers = workers
        self.start_timeout_s = start_timeout_s
        self.crashes = 0
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        _live.add(self)

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = self._start_pool()
            return self._pool

    def _start_pool(self) -> cf.ProcessPoolExecutor:
        """A started pool whose workers answered; else :class:`RewardUnavailableError` saying what to do."""
        if bootstrapping():
            raise RewardUnavailableError(
                "math reward: called while this process is still starting as a worker of another one, i.e. "
                f"the main script is being re-imported by multiprocessing; {GUARD_HINT}"
            )
        pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        try:
            pool.submit(_ping).result(timeout=self.start_timeout_s)
        except (cf.process.BrokenProcessPool, cf.TimeoutError, OSError) as e:
            _kill(pool)
            what = (
                f"did not answer within {self.start_timeout_s:g}s"
                if isinstance(e, cf.TimeoutError)
                else f"died at start ({e})"
            )
            raise RewardUnavailableError(
                f"math reward: its {self.workers} math-verify worker processes {what}; {GUARD_HINT}. Their own "
                "error, if any, is printed above by the workers"
            ) from e
        return pool

    def _reset_pool(self, pool: cf.ProcessPoolExecutor | None = None) -> None:
        with self._lock:
            if self._pool is not None and (pool is None or self._pool is pool):
                _kill(self._pool)
                self._pool = None

    def __call__(self, prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        golds = [str(a) for a in answer]
        out = self._score(texts, golds)
        for i in [i for i, v in enumerate(out) if v is None]:  # their worker died: rescore each alone
            value: float | None = self._score([texts[i]], [golds[i]])[0]
            if value is None:
                self.crashes += 1
                log.warning("math-verify's worker process died on completion %r; scored 0", texts[i][:120])
                value = 0.0
            out[i] = value
        return [0.0 if v is None else float(v) for v in out]

    def _score(self, texts: list[str], golds: list[str]) -> list[float | None]:
        """Scores, ``None`` where the pool broke before the check finished (the pool is then replaced)."""
        pool = self._get_pool()
        inner = max(1, int(self.timeout_s))
        try:
            futures = [pool.submit(_verify_one, t, g, inner) for t, g in zip(texts, golds)]
        # broken or shut down by another thread; OSError: a dead worker is being replaced while the pool
        # is breaking (its pipe already closed: "handle is closed"), seen after a worker was killed
        except (cf.process.BrokenProcessPool, RuntimeError, OSError):
            self._reset_pool(pool)
            return [None] * len(texts)
        out: list[float | None] = []
        reset = False
        for f in futures:
            try:
                out.append(f.result(timeout=self.timeout_s + 5))
            except cf.TimeoutError:
                log.warning("math-verify timed out after %.1fs; scored 0", self.timeout_s)
                out.append(0.0)
                reset = True  # its worker is stuck: replace the pool
            except cf.process.BrokenProcessPool:
                out.append(None)
                reset = True
            except cf.CancelledError:
                out.append(None)
            except Exception as e:  # noqa: BLE001 - math-verify raised on this completion: it scores 0
                log.warning("math-verify failed (%s: %s); scored 0", type(e).__name__, e)
                out.append(0.0)
        if reset:
            self._reset_pool(pool)
        return out

    def close(self) -> None:
        self._reset_pool()


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


_live: weakref.WeakSet[MathVerifier] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop the worker pools before the interpreter tears its modules down (no noise at exit)."""
    for verifier in list(_live):
        verifier.close()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def math_reward(prompts: list[Any], completions: list[Any], answer: list[Any], **columns: Any) -> list[float]:
    """1.0 when the last ``\\boxed{}`` of a completion is mathematically equal to ``answer`` (math-verify), else 0.0.

    TRL's reward-function convention (``completions`` as strings or conversational message lists,
    extra keyword arguments ignored), safe from any thread: checks run in worker processes with
    a timeout. Workers that cannot start raise :class:`~oapl.rewards.base.RewardUnavailableError`.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
    return _default(prompts, completions, answer=answer, **columns)
