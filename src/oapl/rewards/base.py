"""Reward functions: TRL's calling convention, loaded as ``module:function``, run so they never stop a run.

A reward function is ``fn(prompts: list[str], completions: list[str], **columns) -> list[float]``
where every dataset column arrives as a list aligned with ``completions`` (TRL's ``reward_funcs``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


def load_reward(spec: str) -> RewardFn:
    """Import ``package.module:function`` (or ``path/to/file.py:function``)."""
    if ":" not in spec:
        raise ValueError(f"task.reward: {spec!r} is not of the form module:function")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.exists():
            raise ValueError(f"task.reward: file {path} does not exist")
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"task.reward: cannot import module {mod_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"task.reward: {mod_name!r} has no function {fn_name!r}")
    return fn


@dataclass
class RewardStats:
    errors: int = 0
    calls: int = 0
    last_error: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)


class SafeReward:
    """Call a reward function so that it never stops training.

    The batch is scored in one call; if that raises, each completion is scored alone. A completion
    whose scoring raises, returns a non-number or a non-finite value scores 0; the error is counted
    and logged once with a sample.
    """

    def __init__(self, fn: RewardFn, name: str | None = None, max_logged: int = 5) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self.stats = RewardStats()
        self.max_logged = max_logged

    def _record(self, err: str, prompt: str, completion: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = err
        if len(self.stats.samples) < self.max_logged:
            self.stats.samples.append({"error": err, "prompt": prompt[-300:], "completion": completion[:300]})
            log.warning("reward %s failed (%s) on completion %r; scored 0", self.name, err, completion[:120])

    def _clean(self, value: Any, prompt: str, completion: str) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self._record(f"returned non-number {value!r}", prompt, completion)
            return 0.0
        if not math.isfinite(v):
            self._record(f"returned {v}", prompt, completion)
            return 0.0
        return v

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        self.stats.calls += 1
        n = len(completions)
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(f"reward column {key!r} has {len(col)} values for {n} completions")
        try:
            out = self.fn(prompts, completions, **columns)
            out = list(out)
            if len(out) != n:
                raise ValueError(f"returned {len(out)} rewards for {n} completions")
            return [self._clean(v, p, c) for v, p, c in zip(out, prompts, completions)]
        except Exception:  # noqa: BLE001 - fall back to one-by-one to isolate the bad completion
            pass
        rewards = []
        for i in range(n):
            one = {k: [v[i]] for k, v in columns.items()}
            try:
                res = list(self.fn([prompts[i]], [completions[i]], **one))
                rewards.append(self._clean(res[0] if res else None, prompts[i], completions[i]))
            except Exception as e:  # noqa: BLE001
                self._record(f"{type(e).__name__}: {e}", prompts[i], completions[i])
                rewards.append(0.0)
        return rewards
