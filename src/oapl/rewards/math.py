"""Math reward: math-verify on the last ``\\boxed{}`` answer, with timeouts that work in any thread.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread, and
the rollout worker is a background thread. So every check runs in a small pool of worker processes
(where it *is* the main thread, and math-verify's timeouts apply), and the caller additionally waits
at most ``timeout_s`` per completion; a hung worker pool is killed and replaced.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import threading
from typing import Any

log = logging.getLogger(__name__)


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
    """A pool of processes running math-verify; call it like a TRL reward function."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2) -> None:
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            return self._pool

    def _reset_pool(self) -> None:
        with self._lock:
            if self._pool is not None:
                for p in list(getattr(self._pool, "_processes", {}).values()):
                    p.kill()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def __call__(self, prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
        pool = self._get_pool()
        inner = max(1, int(self.timeout_s))
        futures = [pool.submit(_verify_one, c, str(a), inner) for c, a in zip(completions, answer)]
        out = []
        broken = False
        for f in futures:
            try:
                out.append(f.result(timeout=self.timeout_s + 5))
            except cf.TimeoutError:
                log.warning("math-verify timed out after %.1fs; scored 0", self.timeout_s)
                out.append(0.0)
                broken = True
            except Exception as e:  # noqa: BLE001 - a verifier crash scores 0
                log.warning("math-verify failed (%s); scored 0", e)
                out.append(0.0)
                broken = broken or isinstance(e, cf.process.BrokenProcessPool)
        if broken:
            self._reset_pool()
        return out

    def close(self) -> None:
        self._reset_pool()


_default: MathVerifier | None = None


def math_reward(prompts: list[str], completions: list[str], answer: list[Any], **columns: Any) -> list[float]:
    """1.0 when the last boxed answer is mathematically equal to ``answer`` (math-verify), else 0.0."""
    global _default
    if _default is None:
        _default = MathVerifier()
    return _default(prompts, completions, answer=answer, **columns)
