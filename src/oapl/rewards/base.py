"""Reward functions: TRL's calling convention, loaded as ``module:function``, run so a bad completion never stops a run.

A reward function is ``fn(prompts: list[str], completions: list[str], **columns) -> list[float]``
where every dataset column arrives as a list aligned with ``completions`` (TRL's ``reward_funcs``).

A completion whose scoring fails scores 0 and is counted (:class:`SafeReward`). What is not the
completion's fault stops the run instead, saying what to fix: a reward that cannot run at all
(:class:`RewardUnavailableError`: its worker processes cannot start, the code sandbox cannot isolate
programs), and a scoring call where more than ``task.max_reward_error_fraction`` of the rewards
failed (:class:`RewardErrorRateError`, naming the first failure): a broken reward function would
otherwise train the model on zeros.
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

#: Default of ``task.max_reward_error_fraction``.
DEFAULT_MAX_ERROR_FRACTION = 0.5


class RewardUnavailableError(UserError):
    """A reward that cannot score anything here (its workers cannot start, no sandbox): stops the run."""


class RewardErrorRateError(UserError):
    """More than ``task.max_reward_error_fraction`` of one scoring call's rewards failed: stops the run."""


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or TRL's conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        if completion and all(isinstance(m, dict) and "role" in m for m in completion):
            msgs = [m for m in completion if m.get("role") == "assistant"] or list(completion)
            return completion_text(msgs[-1].get("content", ""))
        parts = [p.get("text", "") if isinstance(p, dict) else p for p in completion]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def load_reward(spec: str, field: str = "task.reward") -> RewardFn:
    """Import ``package.module:function`` (or ``path/to/file.py:function``).

    ``spec`` may also be an ``<in-memory:reward:...>`` marker of a callable registered in this
    process (:mod:`oapl.data.memory`). Every failure is a :class:`~oapl.errors.UserError` naming
    ``field`` and what went wrong (missing file, import error, an exception while the module runs,
    no such function).
    """
    from oapl.data import memory

    if memory.is_marker(spec):
        return memory.lookup_reward(spec, field)
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
    """Call a reward function so that a bad completion never stops training, and a broken reward does.

    The batch is scored in one call; if that raises, each completion is scored alone. A completion
    whose scoring raises, returns a non-number or a non-finite value scores 0; the error is counted
    and logged once with a sample. Two things stop the run instead:

    * a :class:`RewardUnavailableError` (or the code sandbox's ``SandboxUnavailableError``) from the
      reward: it cannot score anything here, and says what to do;
    * a call where more than ``max_error_fraction`` of the completions errored: raises
      :class:`RewardErrorRateError` with the first error (``1.0`` never stops). The default is the
      wrapped function's ``max_error_fraction`` attribute (set by :func:`oapl.data.tasks.build_task`
      from ``task.max_reward_error_fraction``), else :data:`DEFAULT_MAX_ERROR_FRACTION`.
    """

    def __init__(self, fn: RewardFn, name: str | None = None, max_logged: int = 5,
                 max_error_fraction: float | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self.stats = RewardStats()
        self.max_logged = max_logged
        if max_error_fraction is None:
            max_error_fraction = getattr(fn, "max_error_fraction", DEFAULT_MAX_ERROR_FRACTION)
        if not 0.0 <= float(max_error_fraction) <= 1.0:
            raise ValueError(f"task.max_reward_error_fraction must be in [0, 1], got {max_error_fraction}")
        self.max_error_fraction = float(max_error_fraction)
        self._first: tuple[str, str, BaseException | None] | None = None  # this call's first error

    def _record(self, err: str, prompt: str, completion: str, exc: BaseException | None = None) -> None:
        self.stats.errors += 1
        self.stats.last_error = err
        if self._first is None:
            self._first = (err, completion, exc)
        if len(self.stats.samples) < self.max_logged:
            self.stats.samples.append({"error": err, "prompt": str(prompt)[-300:],
                                       "completion": str(completion)[:300]})
            log.warning("reward %s failed (%s) on completion %r; scored 0", self.name, err, str(completion)[:120])

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
        errors_before = self.stats.errors
        self._first = None
        rewards = self._score(prompts, completions, columns)
        failed = self.stats.errors - errors_before
        if failed and failed > self.max_error_fraction * n:
            err, completion, exc = self._first or ("?", "", None)
            raise RewardErrorRateError(
                f"task.reward: {self.name} failed on {failed} of {n} completions in one scoring call (more than "
                f"task.max_reward_error_fraction={self.max_error_fraction:g}); the first: {err} on completion "
                f"{str(completion)[:80]!r}. Fix the reward function (a bug there would train the model on "
                f"zeros), or set task.max_reward_error_fraction=1.0 to score failures 0 and go on") from exc
        return rewards

    def _score(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
        n = len(completions)
        try:
            out = self.fn(prompts, completions, **columns)
            out = list(out)
            if len(out) != n:
                raise ValueError(f"returned {len(out)} rewards for {n} completions")
            return [self._clean(v, p, c) for v, p, c in zip(out, prompts, completions)]
        except Exception as e:  # noqa: BLE001 - fall back to one-by-one to isolate the bad completion
            if _fatal(e):
                raise
        rewards = []
        for i in range(n):
            one = {k: [v[i]] for k, v in columns.items()}
            try:
                res = list(self.fn([prompts[i]], [completions[i]], **one))
                rewards.append(self._clean(res[0] if res else None, prompts[i], completions[i]))
            except Exception as e:  # noqa: BLE001
                if _fatal(e):
                    raise
                self._record(_where(e), prompts[i], completions[i], e)
                rewards.append(0.0)
        return rewards


def _fatal(e: BaseException) -> bool:
    """Errors that are not about one completion: the reward cannot run here at all."""
    if isinstance(e, (RewardUnavailableError, RewardErrorRateError)):
        return True
    return type(e).__name__ == "SandboxUnavailableError"  # oapl.rewards.sandbox, without importing it


def reward_name(fn: Any) -> str:
    """A readable name of a reward callable (function, partial, callable object)."""
    from oapl.data.memory import callable_name

    return callable_name(fn)


class CombinedReward:
    """Several TRL-style rewards summed with weights, as TRL's ``reward_funcs`` + ``reward_weights``.

    A function may return ``None`` for a completion it does not apply to: it adds nothing there
    (TRL's convention). With ``conversational``, each function receives what TRL passes for a
    conversational dataset: ``prompts`` as the rows' message lists (the ``prompt`` column, which is
    then not passed as a keyword) and every completion as ``[{"role": "assistant", "content": text}]``.
    """

    def __init__(self, fns: list[RewardFn], weights: list[float] | None = None, conversational: bool = False) -> None:
        if not fns:
            raise ValueError("task.reward: no reward functions")
        if weights is not None and len(weights) != len(fns):
            raise ValueError(f"task.reward_weights has {len(weights)} weights for {len(fns)} reward functions")
        self.fns = list(fns)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(fns)
        self.conversational = conversational
        self.names = [reward_name(f) for f in self.fns]
        self.__name__ = "+".join(self.names)

    def __call__(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        if self.conversational:
            columns = dict(columns)
            prompts = columns.pop("prompt", prompts)
            completions = [[{"role": "assistant", "content": c}] for c in completions]  # type: ignore[misc]
        n = len(completions)
        total = [0.0] * n
        for fn, name, weight in zip(self.fns, self.names, self.weights):
            out = list(fn(prompts, completions, **columns))
            if len(out) != n:
                raise ValueError(f"reward {name} returned {len(out)} rewards for {n} completions")
            for i, v in enumerate(out):
                if v is None:
                    continue
                try:
                    value = float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"reward {name} returned non-number {v!r}") from None
                total[i] += weight * value
        return total

    def close(self) -> None:
        for fn in self.fns:
            close = getattr(fn, "close", None)
            if callable(close):
                close()
