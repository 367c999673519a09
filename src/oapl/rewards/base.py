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

from oapl.errors import UserError

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


def load_reward(spec: str, field: str = "task.reward") -> RewardFn:
    """Import ``package.module:function`` (or ``path/to/file.py:function``).

    Every failure is a :class:`~oapl.errors.UserError` naming ``field`` and what went wrong
    (missing file, import error, an exception while the module runs, no such function).
    """
    if ":" not in spec:
        raise UserError(f"{field}: {spec!r} is not of the form module:function (or path/to/file.py:function)")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.exists():
            raise UserError(f"{field}: file {path} does not exist")
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec_)
        try:
            spec_.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - the user's file failed to run
            raise UserError(f"{field}: {path} fails to load: {_where(e)}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"{field}: cannot import module {mod_name!r}: {e} (is it on PYTHONPATH, or give "
                            f"path/to/file.py:{fn_name})") from e
        except Exception as e:  # noqa: BLE001 - the user's module raised while importing
            raise UserError(f"{field}: module {mod_name!r} fails to import: {_where(e)}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
        raise UserError(f"{field}: {mod_name!r} has no function {fn_name!r}"
                        + (f"; it has {', '.join(names[:8])}" if names else ""))
    return fn


def _where(e: BaseException) -> str:
    """``SyntaxError: invalid syntax (file.py, line 3)`` / ``NameError: ... (file.py, line 3)``."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    last = frames[-1] if frames else None
    return f"{type(e).__name__}: {e}" + (f" ({last.filename}, line {last.lineno})" if last else "")


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
