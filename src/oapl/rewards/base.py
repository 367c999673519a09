"""Reward functions: TRL's calling convention, loaded as ``module:function``, run so a bad completion never stops a run.

A reward function is called as TRL's ``GRPOTrainer`` calls its ``reward_funcs``, by keyword:
``fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float]``
where every other dataset column arrives as a list aligned with ``completions``. ``prompts`` are the
dataset's ``prompt`` values (a string, or a conversational list of messages) and, for a
conversational dataset, every completion is ``[{"role": "assistant", "content": text}]``. A function
that takes no ``completions`` parameter (``fn(p, c, **kw)``, oapl's earlier convention) gets prompts
and completions by position. ``completion_ids``, ``trainer_state``, ``log_extra`` and ``log_metric``
are passed only to a function that takes them (by name or through ``**kwargs``); a dataset column
that the function does not take is an error, as in TRL (:class:`~oapl.rewards.user.UserReward`).

Every user reward runs under ``task.reward_timeout_s`` (:func:`~oapl.rewards.user.call_with_deadline`): a call that does
not return in time scores its completions as errors and the run goes on without it.

A completion whose scoring fails scores 0 and is counted (:class:`SafeReward`). What is not the
completion's fault stops the run instead, saying what to fix: a reward that cannot run at all
(:class:`RewardUnavailableError`: its worker processes cannot start, the code sandbox cannot isolate
programs, too many of its calls hang), a reward that returns something other than numbers
(:class:`RewardTypeError`), and a scoring call where more than ``task.max_reward_error_fraction`` of
the rewards failed (:class:`RewardErrorRateError`, naming the first failure): a broken reward
function would otherwise train the model on zeros.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oapl.errors import UserError
from oapl.rewards.errors import (
    RewardErrorRateError,
    RewardLengthError,
    RewardSignatureError,
    RewardTypeError,
    RewardUnavailableError,
)
from oapl.rewards.user import OPTIONAL_KEYS, RewardFn, RewardTimeoutError, UserReward, check_number, signature_facts

log = logging.getLogger(__name__)

#: Default of ``task.max_reward_error_fraction``.
DEFAULT_MAX_ERROR_FRACTION = 0.5


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
        if spec_ is None:
            raise UserError(f"{field}: {path} is not a Python module")
        module = importlib.util.module_from_spec(spec_)
        try:
            spec_.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - the user's file failed to run
            raise UserError(f"{field}: {path} fails to load: {_where(e)}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(
                f"{field}: cannot import module {mod_name!r}: {e} (is it on PYTHONPATH, or give "
                f"path/to/file.py:{fn_name})"
            ) from e
        except Exception as e:  # noqa: BLE001 - the user's module raised while importing
            raise UserError(f"{field}: module {mod_name!r} fails to import: {_where(e)}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
        raise UserError(
            f"{field}: {mod_name!r} has no function {fn_name!r}" + (f"; it has {', '.join(names[:8])}" if names else "")
        )
    return fn


def _where(e: BaseException) -> str:
    """``SyntaxError: invalid syntax (file.py, line 3)`` / ``NameError: ... (file.py, line 3)``."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    last = frames[-1] if frames else None
    return f"{type(e).__name__}: {e}" + (f" ({last.filename}, line {last.lineno})" if last else "")


#: What TRL passes as one object for the whole scoring call (not aligned with the completions).
CONTEXT_KEYS = ("trainer_state", "log_extra", "log_metric")


class Scores(list):
    """The rewards of one scoring call, and in ``parts`` each reward function's own values (TRL's
    ``rewards_per_func``: ``{name: values}``, NaN where a function returned ``None`` or failed); in
    ``metrics`` the values the functions logged with TRL's ``log_metric(name, value)``."""

    def __init__(
        self,
        values: Any = (),
        parts: dict[str, list[float]] | None = None,
        metrics: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__(values)
        self.parts: dict[str, list[float]] = dict(parts or {})
        self.metrics: dict[str, list[float]] = dict(metrics or {})


def split_context(columns: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(columns, context)``: the per-call objects (``trainer_state``, ...) taken out of ``columns``."""
    cols = dict(columns)
    return cols, {k: cols.pop(k) for k in CONTEXT_KEYS if k in cols}


@dataclass
class RewardStats:
    errors: int = 0
    calls: int = 0
    last_error: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)


class SafeReward:
    """Call a reward function so that a bad completion never stops training, and a broken reward does.

    The batch is scored in one call; if that raises, each completion is scored alone. A completion
    whose scoring raises, returns NaN or inf, or is not scored within ``task.reward_timeout_s`` (a
    timed-out batch call counts every completion of the call, and is not retried one by one) scores
    0; the error is counted and logged once with a sample. These stop the run instead:

    * a :class:`RewardUnavailableError` (or the code sandbox's ``SandboxUnavailableError``) from the
      reward: it cannot score anything here (also: too many of its calls hang), and says what to do;
    * a :class:`RewardTypeError`: the reward returned a string or another non-number;
    * a call where more than ``max_error_fraction`` of the completions errored: raises
      :class:`RewardErrorRateError` with the first error (``1.0`` never stops). The default is the
      wrapped function's ``max_error_fraction`` attribute (set by :func:`oapl.data.tasks.build_task`
      from ``task.max_reward_error_fraction``), else :data:`DEFAULT_MAX_ERROR_FRACTION`.

    Returns :class:`Scores`: ``parts`` holds each reward function's values (NaN where it failed),
    or the rewards themselves under this reward's name when the function does not report them.
    ``trainer_state``, ``log_extra``, ``log_metric`` and ``completion_ids`` are passed on only when
    the function takes them.
    """

    def __init__(
        self, fn: RewardFn, name: str | None = None, max_logged: int = 5, max_error_fraction: float | None = None
    ) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "reward"))
        self.stats = RewardStats()
        self.max_logged = max_logged
        if max_error_fraction is None:
            max_error_fraction = getattr(fn, "max_error_fraction", DEFAULT_MAX_ERROR_FRACTION)
        if not 0.0 <= float(max_error_fraction) <= 1.0:
            raise ValueError(f"task.max_reward_error_fraction must be in [0, 1], got {max_error_fraction}")
        self.max_error_fraction = float(max_error_fraction)
        _, self._named, self._var_kw, _ = signature_facts(fn)
        self._first: tuple[str, str, BaseException | None] | None = None  # this call's first error
        self._pending: list[tuple[Any, ...]] = []

    def _record(self, err: str, prompt: Any, completion: Any, exc: BaseException | None = None, count: int = 1) -> None:
        self.stats.errors += count
        self.stats.last_error = err
        if self._first is None:
            self._first = (err, completion, exc)
        if len(self.stats.samples) < self.max_logged:
            self.stats.samples.append({"error": err, "prompt": str(prompt)[-300:], "completion": str(completion)[:300]})
            what = f"on completion {str(completion)[:120]!r}" if count == 1 else f"on {count} completions"
            self._pending.append(("reward %s failed (%s) %s; scored 0", self.name, err, what))

    def _clean(self, value: Any, prompt: Any, completion: Any, index: int) -> float:
        v = check_number(value, self.name, index)
        if v is None:
            self._record("returned None", prompt, completion)
            return 0.0
        if not math.isfinite(v):
            self._record(f"returned {v}", prompt, completion)
            return 0.0
        return v

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Scores:
        self.stats.calls += 1
        n = len(completions)
        columns = {k: v for k, v in columns.items() if k not in OPTIONAL_KEYS or self._var_kw or k in self._named}
        cols, context = split_context(columns)
        for key, col in cols.items():
            if len(col) != n:
                raise ValueError(f"reward column {key!r} has {len(col)} values for {n} completions")
        errors_before = self.stats.errors
        self._first = None
        self._pending = []  # warnings of this call: logged unless the call stops the run (said once, then)
        rewards = self._score(prompts, completions, cols, context)
        failed = self.stats.errors - errors_before
        if failed and failed > self.max_error_fraction * n:
            err, completion, exc = self._first or ("?", "", None)
            if isinstance(exc, RewardTimeoutError):
                fix = (
                    f"Fix the hang in {exc.name}, or raise task.reward_timeout_s if it is only slow (or set "
                    "task.max_reward_error_fraction=1.0 to score such completions 0 and go on)"
                )
            else:
                fix = (
                    "Fix the reward function (a bug there would train the model on zeros), or set "
                    "task.max_reward_error_fraction=1.0 to score failures 0 and go on"
                )
            raise RewardErrorRateError(
                f"task.reward: {self.name} failed on {failed} of {n} completions in one scoring call (more than "
                f"task.max_reward_error_fraction={self.max_error_fraction:g}); the first: {err} on completion "
                f"{str(completion)[:80]!r}. {fix}"
            ) from exc
        for args in self._pending:
            log.warning(*args)
        return rewards

    def _score(
        self, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]], context: dict[str, Any]
    ) -> Scores:
        n = len(completions)
        try:
            out = self.fn(prompts, completions, **columns, **context)
            parts, metrics = getattr(out, "parts", None), getattr(out, "metrics", None)
            out = list(out)
            if len(out) != n:
                raise ValueError(f"returned {len(out)} rewards for {n} completions")
            values = [self._clean(v, p, c, i) for i, (v, p, c) in enumerate(zip(out, prompts, completions))]
            return Scores(values, parts or {self.name: list(values)}, metrics)
        except RewardTimeoutError as e:  # one hang: every completion of the call errs, none is retried
            self._record(str(e), prompts[0] if prompts else "", completions[0] if completions else "", e, count=n)
            return Scores([0.0] * n, {self.name: [math.nan] * n})
        except Exception as e:  # noqa: BLE001 - fall back to one-by-one to isolate the bad completion
            if _fatal(e):
                raise
        rewards: list[float] = []
        each: list[dict[str, float]] = []  # each completion's parts ({} where it failed)
        logged: dict[str, list[float]] = {}
        for i in range(n):
            one = {k: [v[i]] for k, v in columns.items()}
            try:
                res = self.fn([prompts[i]], [completions[i]], **one, **context)
                res_parts = getattr(res, "parts", None)
                for k, v in (getattr(res, "metrics", None) or {}).items():
                    logged.setdefault(k, []).extend(v)
                res = list(res)
                value = self._clean(res[0] if res else None, prompts[i], completions[i], i)
                rewards.append(value)
                each.append({k: float(v[0]) for k, v in res_parts.items()} if res_parts else {self.name: value})
            except Exception as e:  # noqa: BLE001
                if _fatal(e):
                    raise
                self._record(str(e) if isinstance(e, RewardTimeoutError) else _where(e), prompts[i], completions[i], e)
                rewards.append(0.0)
                each.append({})
        names = list(dict.fromkeys(k for d in each for k in d)) or [self.name]
        return Scores(rewards, {k: [d.get(k, math.nan) for d in each] for k in names}, logged)


def reward_trainer_state(step: int, max_steps: int) -> Any:
    """The ``trainer_state`` TRL passes to rewards: a ``transformers.TrainerState`` at ``step``."""
    from transformers import TrainerState

    return TrainerState(global_step=step, max_steps=max_steps)


def _fatal(e: BaseException) -> bool:
    """Errors that are not about one completion: the reward cannot run here at all, or returns non-numbers."""
    if isinstance(e, (RewardUnavailableError, RewardErrorRateError, RewardTypeError, RewardSignatureError)):
        return True
    return type(e).__name__ == "SandboxUnavailableError"  # oapl.rewards.sandbox, without importing it


class CombinedReward:
    """Several TRL-style rewards summed with weights, as TRL's ``reward_funcs`` + ``reward_weights``.

    Each function is a :class:`UserReward`: called by keyword as TRL calls it, under ``timeout_s``,
    its values checked. ``prompts`` are the dataset's ``prompt`` values when the ``prompt`` column is
    passed (it is then not passed as a keyword), as in TRL; with ``conversational`` every completion
    is ``[{"role": "assistant", "content": text}]``. A function may return ``None`` for a completion
    it does not apply to: it adds nothing there (TRL's convention). Returns :class:`Scores` whose
    ``parts`` are each function's values (NaN for ``None``), for TRL's ``rewards/<name>/mean``.
    """

    def __init__(
        self,
        fns: list[RewardFn],
        weights: list[float] | None = None,
        conversational: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        if not fns:
            raise ValueError("task.reward: no reward functions")
        if weights is not None and len(weights) != len(fns):
            raise ValueError(f"task.reward_weights has {len(weights)} weights for {len(fns)} reward functions")
        self.fns = [f if isinstance(f, UserReward) else UserReward(f, timeout_s=timeout_s) for f in fns]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(fns)
        self.conversational = conversational
        self.names: list[str] = []
        for f in self.fns:  # TRL's names; a repeated one gets a suffix so its metrics stay apart
            name, k = f.name, 2
            while name in self.names:
                name, k = f"{f.name}_{k}", k + 1
            self.names.append(name)
        self.__name__ = "+".join(self.names)

    def _inputs(
        self, prompts: list[Any], completions: list[Any], columns: dict[str, Any]
    ) -> tuple[list[Any], list[Any], dict[str, Any], dict[str, Any]]:
        cols, extra = split_context(columns)
        if "completion_ids" in cols:
            extra["completion_ids"] = cols.pop("completion_ids")
        prompts = cols.pop("prompt", prompts)  # TRL: the dataset's prompts, not the rendered text
        if self.conversational:
            completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
        return prompts, completions, cols, extra

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Scores:
        prompts, completions, cols, extra = self._inputs(prompts, completions, columns)
        n = len(completions)
        total = [0.0] * n
        parts: dict[str, list[float]] = {}
        logged: dict[str, list[float]] = {}

        def log_metric(name: str, value: float) -> None:  # TRL's: a scalar averaged into the step's metrics
            logged.setdefault(str(name), []).append(float(value))

        def log_extra(column: str, values: list[Any]) -> None:  # TRL's completions-table columns: not kept
            pass

        extra = {"log_extra": log_extra, "log_metric": log_metric, **extra}
        for fn, name, weight in zip(self.fns, self.names, self.weights):
            out = fn(prompts, completions, cols, extra)
            parts[name] = [math.nan if v is None else v for v in out]
            for i, v in enumerate(out):
                if v is not None:
                    total[i] += weight * v
        return Scores(total, parts, logged)

    def check(self, prompts: list[Any], completions: list[Any], **columns: Any) -> None:
        """Call each function once (on one row, before the model loads) and refuse, in one line naming
        the function and the argument, what would fail on every completion: a signature that cannot
        take what is passed, a ``TypeError`` (e.g. string completions where it expects TRL's message
        lists), a hang, or values that are not numbers. oapl's own rewards are only checked for their
        signature."""
        prompts, completions, cols, extra = self._inputs(prompts, completions, columns)
        for fn in self.fns:
            fn.check_signature(cols, extra)
            if fn.own:
                continue
            try:
                fn(prompts, completions, cols, extra)
            except RewardTimeoutError as e:
                raise RewardSignatureError(
                    f"task.reward: {e} on one completion (a test call on the first training row, made before the "
                    f"model loads); fix the hang, or raise task.reward_timeout_s if it is only slow"
                ) from None
            except TypeError as e:
                shape = (
                    "message lists [{'role': 'assistant', 'content': ...}]"
                    if self.conversational
                    else "strings (the dataset's prompts are plain text; TRL passes message lists only for a "
                    "conversational dataset)"
                )
                raise RewardSignatureError(
                    f"task.reward: {fn.name} fails on the first training row (a test call with one short completion, "
                    f"before the model loads): {_where(e)}; its completions are {shape}"
                ) from None
            except RewardLengthError as e:
                raise RewardSignatureError(
                    f"task.reward: {e} (a test call on the first training row, before the "
                    "model loads); return one reward per completion"
                ) from None
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - may be about that completion only: scored as errors later
                log.info("reward %s raised %s on a test call before training", fn.name, _where(e))

    def close(self) -> None:
        for fn in self.fns:
            fn.close()
