"""One user reward function, called as TRL calls it and bounded in time.

:class:`UserReward` passes a function what TRL's ``GRPOTrainer`` passes its ``reward_funcs`` (by
keyword, or prompts and completions by position for oapl's earlier convention), refuses a signature
that cannot take it before the model loads, and checks the values it returns
(:func:`check_number`). Every call runs under ``task.reward_timeout_s`` (:func:`call_with_deadline`):
in a thread of its own, abandoned when it does not return in time; too many abandoned calls alive at
once stop the run. :mod:`oapl.rewards.base` scores batches through it and counts the failures.
"""

from __future__ import annotations

import asyncio
import inspect
import numbers
import threading
from collections.abc import Callable
from typing import Any

from oapl.rewards.errors import RewardLengthError, RewardSignatureError, RewardTypeError, RewardUnavailableError

RewardFn = Callable[..., list[float]]


class RewardTimeoutError(RuntimeError):
    """One call of a reward did not return within ``task.reward_timeout_s``: its completions score as errors."""

    def __init__(self, name: str, timeout_s: float) -> None:
        super().__init__(f"{name} did not return within task.reward_timeout_s={timeout_s:g}s")
        self.name, self.timeout_s = name, timeout_s


#: When this many reward calls that timed out are still running at once (a thread cannot be killed),
#: the run stops with a :class:`RewardUnavailableError`.
MAX_HUNG_CALLS = 4

_hung_lock = threading.Lock()


_hung: list[tuple[threading.Thread, str]] = []


def hung_calls() -> list[str]:
    """Names of the reward functions whose timed-out calls are still running in this process."""
    with _hung_lock:
        _hung[:] = [(t, n) for t, n in _hung if t.is_alive()]
        return [n for _, n in _hung]


def call_with_deadline(
    fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], timeout_s: float | None, name: str
) -> Any:
    """``fn(*args, **kwargs)`` (awaited if it is a coroutine), or :class:`RewardTimeoutError` after ``timeout_s``.

    The call runs in a daemon thread of its own; the caller waits at most ``timeout_s``. A thread
    cannot be killed, so a call that times out is abandoned and keeps running; the timeout that makes
    :data:`MAX_HUNG_CALLS` of them alive at once stops the run (:class:`RewardUnavailableError`),
    naming the function. Daemon threads never hold up the
    interpreter's exit. (A function stuck inside one C call that holds the GIL, such as a regular
    expression with catastrophic backtracking, stalls every thread until that call returns: no
    in-process timeout can cut it.) ``timeout_s=None`` calls ``fn`` in the caller's thread.
    """
    if timeout_s is None:
        return _await(fn(*args, **kwargs))
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = _await(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=run, name=f"oapl-reward-{name}", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        with _hung_lock:
            _hung[:] = [(t, n) for t, n in _hung if t.is_alive()]
            _hung.append((thread, name))
            hung = [n for _, n in _hung]
        if len(hung) >= MAX_HUNG_CALLS:
            raise RewardUnavailableError(
                f"task.reward: {name} did not return within task.reward_timeout_s={timeout_s:g}s, and {len(hung)} "
                f"timed-out reward calls ({', '.join(sorted(set(hung)))}) are still running (a thread cannot be "
                f"stopped); stopping the run. Fix the hang in {name}, or raise task.reward_timeout_s if it is "
                "only slow"
            )
        raise RewardTimeoutError(name, timeout_s)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _await(result: Any) -> Any:
    """The value of an ``async def`` reward (TRL runs those too), else ``result``."""
    return asyncio.run(result) if inspect.iscoroutine(result) else result


def check_number(value: Any, name: str, index: int) -> float | None:
    """A reward value as a float (``None`` stays ``None``); anything but a number is refused.

    Numbers are ``int``, ``float``, ``bool`` (1.0 / 0.0: TRL turns the returned list into a float
    tensor, which does the same) and numeric scalars with ``__float__`` (NumPy, a 0-d tensor). A
    string such as ``'1.0'``, a list or a dict raises :class:`RewardTypeError` naming ``name``.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Real):  # int, float, bool, numpy ints and floats
        return float(value)
    if not isinstance(value, (str, bytes)) and hasattr(value, "__float__") and getattr(value, "ndim", 0) == 0:
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise RewardTypeError(
        f"task.reward: {name} returned {value!r} ({type(value).__name__}) for completion {index}; "
        "a reward must be a number (int, float or bool) or None where it does not apply"
    )


#: What TRL passes besides ``prompts``, ``completions`` and the dataset's columns: passed to a function
#: only when it takes them (by name or through ``**kwargs``). ``completion_ids`` is aligned with the
#: completions; the others are one object for the whole call.
OPTIONAL_KEYS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


def signature_facts(fn: Any) -> tuple[inspect.Signature | None, set[str], bool, int]:
    """``(signature, named parameters, takes **kwargs, positional slots)``; ``None`` when not inspectable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, set(), True, 2
    named, var_kw, slots = set(), False, 0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            named.add(p.name)
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            slots += 1
        elif p.kind == p.VAR_POSITIONAL:
            slots += 2
        elif p.kind == p.VAR_KEYWORD:
            var_kw = True
    return sig, named, var_kw, slots


def _is_oapl_reward(fn: Any) -> bool:
    """oapl's own rewards (math, code, arithmetic, countdown): they bound their own time per completion."""
    while hasattr(fn, "func") and not hasattr(fn, "__code__"):  # functools.partial
        fn = fn.func
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if not isinstance(module, str) or module == "builtins":
        module = type(fn).__module__
    return module.startswith("oapl.rewards.")


class UserReward:
    """One reward function called as TRL's ``GRPOTrainer`` calls it, checked, and bounded in time.

    * by keyword: ``prompts=``, ``completions=``, the dataset's columns, and ``completion_ids=``,
      ``trainer_state=``, ``log_extra=``, ``log_metric=`` when the function takes them; a function
      with no ``completions`` parameter but two positional ones gets prompts and completions by
      position (oapl's earlier convention);
    * under ``timeout_s`` (:func:`call_with_deadline`; oapl's own rewards bound themselves per completion);
    * its values checked: one per completion, each a number or ``None`` (:func:`check_number`).
    """

    def __init__(self, fn: RewardFn, name: str | None = None, timeout_s: float | None = None) -> None:
        self.fn = fn
        self.name = name or reward_name(fn)
        self.__name__ = self.name
        self.own = _is_oapl_reward(fn)
        self.timeout_s = None if self.own else timeout_s
        self.sig, self.named, self.var_kw, slots = signature_facts(fn)
        self.positional = self.sig is not None and "completions" not in self.named and slots >= 2

    def takes(self, key: str) -> bool:
        return self.var_kw or key in self.named

    def arguments(
        self, prompts: Any, completions: Any, columns: dict[str, Any], extra: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of one call: ``columns`` always, the ``extra`` keys it takes."""
        kwargs = {k: v for k, v in extra.items() if self.takes(k)}
        kwargs.update(columns)
        if self.positional:
            return (prompts, completions), kwargs
        if self.takes("prompts") or self.sig is None:
            kwargs["prompts"] = prompts
        kwargs["completions"] = completions
        return (), kwargs

    def __call__(
        self, prompts: Any, completions: Any, columns: dict[str, Any], extra: dict[str, Any]
    ) -> list[float | None]:
        args, kwargs = self.arguments(prompts, completions, columns, extra)
        out = call_with_deadline(self.fn, args, kwargs, self.timeout_s, self.name)
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
            raise RewardTypeError(
                f"task.reward: {self.name} returned {type(out).__name__} {str(out)[:60]!r}; a reward "
                "function returns a list with one number (or None) per completion"
            )
        out = list(out)
        if len(out) != len(completions):
            raise RewardLengthError(f"{self.name} returned {len(out)} rewards for {len(completions)} completions")
        return [check_number(v, self.name, i) for i, v in enumerate(out)]

    def check_signature(self, columns: dict[str, Any], extra: dict[str, Any]) -> None:
        """Refuse, in one line naming the argument, a function that cannot take what it will be passed."""
        if self.sig is None:
            return
        if not self.positional and not self.takes("completions"):
            raise RewardSignatureError(
                f"task.reward: {self.name}{self.sig} has no 'completions' parameter: TRL and "
                "oapl call a reward as fn(prompts=..., completions=..., **columns); write it "
                "as fn(prompts, completions, **kwargs)"
            )
        args, kwargs = self.arguments(["p"], ["c"], columns, extra)
        try:
            self.sig.bind(*args, **kwargs)
        except TypeError as e:
            raise RewardSignatureError(
                f"task.reward: {self.name}{self.sig} {_signature_problem(str(e), columns)}"
            ) from None

    def close(self) -> None:
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()


def _signature_problem(error: str, columns: dict[str, Any]) -> str:
    """What is wrong, from ``Signature.bind``'s TypeError, in the words of TRL's convention."""
    import re

    passed = "prompts, completions, completion_ids, trainer_state" + "".join(f", {c}" for c in sorted(columns))
    m = re.search(r"missing a required argument: '([^']+)'", error)
    if m:
        return (
            f"needs the argument {m.group(1)!r}, which is not passed: no dataset column is named {m.group(1)!r} "
            f"(a reward is called with {passed}); rename the parameter, map a column to it with task.columns, "
            "or give it a default"
        )
    m = re.search(r"unexpected keyword argument '([^']+)'", error)
    if m:
        what = "the dataset column" if m.group(1) in columns else "the argument"
        return (
            f"does not take {what} {m.group(1)!r}: TRL and oapl pass every column by name; add **kwargs to "
            "its parameters"
        )
    m = re.search(r"too many positional arguments", error)
    if m:
        return "takes fewer than two positional arguments; write it as fn(prompts, completions, **kwargs)"
    return f"cannot be called as TRL calls a reward ({error}); write it as fn(prompts, completions, **kwargs)"


def reward_name(fn: Any) -> str:
    """A readable name of a reward callable (function, partial, callable object), as TRL names it."""
    from oapl.data.memory import callable_name

    return callable_name(fn)
