"""Code-execution reward (DeepCoder training / LiveCodeBench evaluation).

The reward takes the **last fenced code block** of a completion, runs it in the
sandbox (:mod:`oapl.rewards.sandbox`) on every test case and returns ``1.0``
only if all test cases pass, else ``0.0``.  Two test formats are supported,
as in LiveCodeBench and DeepCoder:

* ``stdin``: the program reads the input on stdin; its stdout is compared with
  the expected output the LiveCodeBench way (both stripped, split into lines,
  each line stripped; lines must match exactly or, token by token, as equal
  decimal numbers);
* ``functional``: the code defines ``func_name`` (a function, or a method of
  ``class Solution`` as on LeetCode); it is called with the JSON-decoded
  arguments (one JSON value per input line) and the return value (tuples
  become lists) must equal the JSON-decoded expected output.

Usage with TRL (dataset columns arrive as lists aligned with ``completions``)::

    from oapl.rewards.code import code_reward, make_code_reward
    trainer = GRPOTrainer(..., reward_funcs=[code_reward])           # defaults
    reward = make_code_reward(SandboxConfig(timeout_s=4, workers=16))  # custom

A reward function never raises because of model output (it returns 0.0).  It
*does* raise :class:`~oapl.rewards.sandbox.SandboxUnavailableError` if the
host cannot isolate programs and ``allow_no_netns`` is not set: failing closed
is a configuration error, not a zero reward.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MIN_EMIN, Decimal, InvalidOperation, localcontext
from typing import Any
from collections.abc import Callable, Sequence

from oapl.rewards.base import completion_text
from oapl.rewards.sandbox import (
    ProgramJob,
    ProgramResult,
    SandboxConfig,
    SandboxRunner,
    SandboxUnavailableError,
    TestRun,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CodeTest",
    "CodeEvaluation",
    "SandboxConfig",
    "SandboxUnavailableError",
    "code_reward",
    "compare_functional",
    "compare_stdout",
    "evaluate_completions",
    "extract_code",
    "make_code_reward",
    "parse_tests",
]

_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """Code of the last fenced (```) block in ``text``; ``None`` if there is none."""
    if not isinstance(text, str):
        return None
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    code = blocks[-1][1]
    return code if code.strip() else None


# --------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class CodeTest:
    """One normalized test case.

    ``input`` is the stdin text (stdin tests) or the list of arguments
    (functional tests); ``output`` is the expected stdout text or the expected
    (JSON-decoded) return value.
    """

    input: Any
    output: Any
    testtype: str  # "stdin" | "functional"
    func_name: str | None = None
    #: other accepted return values (TACO stores ``[value]``; both are accepted, as in TACO)
    alternatives: tuple = ()


def _as_obj(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            return json.loads(s)
        except ValueError:
            try:
                return ast.literal_eval(s)  # PrimeIntellect rows use Python literals
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
    return value


def _func_name_of(*sources: Any) -> str | None:
    for src in sources:
        src = _as_obj(src) if isinstance(src, str) else src
        if isinstance(src, dict):
            for key in ("func_name", "fn_name"):
                name = src.get(key)
                if isinstance(name, str) and name.strip():
                    return name.strip()
            nested = src.get("metadata")
            if nested is not None and nested is not src:
                name = _func_name_of(nested)
                if name:
                    return name
    return None


def _parse_args(value: Any) -> list | None:
    """LCB functional input: one JSON value per line (or an argument list)."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            return [json.loads(line) for line in value.split("\n") if line.strip()]
        except ValueError:
            return None
    return None


def _expected_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _stdin_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return "" if value is None else str(value)


def parse_tests(tests: Any, metadata: Any = None) -> list[CodeTest]:
    """Normalize DeepCoder / LiveCodeBench / TACO / PrimeIntellect test formats.

    Accepts a JSON string or object: a list of ``{"input", "output",
    "testtype"}`` dicts (LiveCodeBench, DeepCoder ``lcbv5``/``codeforces``,
    PrimeIntellect's ``type``/``fn_name`` variant), or a TACO/APPS dict
    ``{"inputs": [...], "outputs": [...], "fn_name"?}``.  ``func_name`` comes
    from the test, the tests dict or ``metadata``.  Invalid entries are dropped;
    unparseable input gives ``[]`` (the reward is then 0).
    """
    tests = _as_obj(tests)
    meta_name = _func_name_of(metadata)
    items: list[dict] = []
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        inputs, outputs = tests.get("inputs") or [], tests.get("outputs") or []
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            return []
        name = _func_name_of(tests) or meta_name
        for inp, out in zip(inputs, outputs):
            items.append(
                {
                    "input": inp,
                    "output": out,
                    "_taco": True,
                    "testtype": "functional" if name else "stdin",
                    "fn_name": name,
                }
            )
    elif isinstance(tests, dict) and "input" in tests:
        items = [tests]
    elif isinstance(tests, list):
        items = [t for t in tests if isinstance(t, dict)]
    else:
        return []

    out_tests: list[CodeTest] = []
    for t in items:
        if "input" not in t or "output" not in t:
            continue
        kind = str(t.get("testtype") or t.get("type") or "").lower()
        name = _func_name_of(t) or meta_name
        functional = kind in ("functional", "function_call", "call_based") or (
            kind == "" and name is not None and not isinstance(t.get("input"), str)
        )
        if functional:
            args = _parse_args(t["input"])
            if args is None or not name:
                return []  # cannot run this test: never reward
            expected = _expected_value(t["output"])
            alts: tuple = ()
            if t.get("_taco") and isinstance(expected, list) and expected:
                alts = (expected[0],)  # TACO wraps return values in a list
            out_tests.append(CodeTest(args, expected, "functional", name, alts))
        else:
            out_tests.append(CodeTest(_stdin_text(t["input"]), _stdin_text(t["output"]), "stdin"))
    return out_tests


# --------------------------------------------------------------------------- comparison


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except (InvalidOperation, ValueError):
        return None


def _close(a: Decimal, b: Decimal, tol: float) -> bool:
    if a == b:
        return True
    if tol <= 0 or not (a.is_finite() and b.is_finite()):
        return False
    try:
        # exact-width exponents, so 1e400 vs 1.0000001e400 compares; a token beyond even those
        # (e.g. ``1E+999999999999999999`` minus a normal number) is just a wrong answer
        with localcontext() as ctx:
            ctx.Emax, ctx.Emin = MAX_EMAX, MIN_EMIN
            return abs(a - b) <= Decimal(str(tol)) * max(Decimal(1), abs(b))
    except ArithmeticError as exc:  # decimal.Overflow / InvalidOperation
        logger.debug("float_tolerance: cannot compare %.40s with %.40s (%s); scored as wrong", a, b, type(exc).__name__)
        return False


def compare_stdout(prediction: str, expected: str, float_tolerance: float = 0.0) -> bool:
    """LiveCodeBench stdin/stdout comparison.

    Both sides are stripped and split into lines, each line stripped; the line
    counts must match and each pair must be equal, or equal token by token as
    decimals (``Decimal``, exact by default; with ``float_tolerance`` > 0 a
    token may differ by that absolute-or-relative amount).
    """
    if not isinstance(prediction, str) or not isinstance(expected, str):
        return False
    pred_lines, exp_lines = _stripped_lines(prediction), _stripped_lines(expected)
    if len(pred_lines) != len(exp_lines):
        return False
    for p, e in zip(pred_lines, exp_lines):
        if p == e:
            continue
        dp, de = _decimals(p), _decimals(e)
        if dp is None or de is None or len(dp) != len(de):
            return False
        if not all(_close(a, b, float_tolerance) for a, b in zip(dp, de)):
            return False
    return True


def compare_functional(result_json: str | None, expected: Any, alternatives: Sequence[Any] = ()) -> bool:
    """LiveCodeBench functional comparison: decoded return value ``==`` expected.

    ``alternatives`` are further accepted values (TACO's wrapped outputs).
    """
    if not isinstance(result_json, str):
        return False
    try:
        prediction = json.loads(result_json)
    except (ValueError, RecursionError):
        return False
    try:
        return any(bool(prediction == e) for e in (expected, *alternatives))
    except RecursionError:
        return False


# --------------------------------------------------------------------------- evaluation


@dataclass
class CodeEvaluation:
    """Per-completion outcome (``reward`` is 1.0 iff every test passed)."""

    reward: float
    reason: str
    n_tests: int = 0
    results: list[ProgramResult] = field(default_factory=list)


def _select_tests(tests: list[CodeTest], max_tests: int | None) -> list[CodeTest]:
    """Keep at most ``max_tests`` (those with the longest inputs, like DeepCoder)."""
    if not max_tests or len(tests) <= max_tests:
        return tests
    order = sorted(range(len(tests)), key=lambda i: (-len(json.dumps(tests[i].input)), i))
    keep = sorted(order[:max_tests])
    return [tests[i] for i in keep]


def _jobs_for(code: str, tests: list[CodeTest], float_tolerance: float) -> list[ProgramJob]:
    """One job per test type (a problem's tests normally share one type)."""
    jobs = []
    for kind in ("stdin", "functional"):
        group = [t for t in tests if t.testtype == kind]
        names = {t.func_name for t in group}
        for name in sorted(names, key=str):
            sub = [t for t in group if t.func_name == name]
            expected = [(t.output, t.alternatives) for t in sub]
            if kind == "stdin":

                def check(run: TestRun, expected=expected) -> bool:
                    return compare_stdout(run.stdout, expected[run.index][0], float_tolerance)
            else:

                def check(run: TestRun, expected=expected) -> bool:
                    exp, alts = expected[run.index]
                    return compare_functional(run.result, exp, alts)

            jobs.append(ProgramJob(code=code, mode=kind, inputs=[t.input for t in sub], func_name=name, check=check))
    return jobs


def evaluate_completions(
    completions: Sequence[Any],
    tests: Sequence[Any],
    metadata: Sequence[Any] | None = None,
    *,
    runner: SandboxRunner | None = None,
    float_tolerance: float = 0.0,
    max_tests: int | None = None,
) -> list[CodeEvaluation]:
    """Evaluate each completion against its tests; programs run in parallel.

    Raises only :class:`SandboxUnavailableError` (fail closed).
    """
    runner = runner or SandboxRunner()
    n = len(completions)
    metadata = list(metadata) if metadata is not None else [None] * n
    evals: list[CodeEvaluation] = []
    all_jobs: list[ProgramJob] = []
    owner: list[int] = []
    for i in range(n):
        try:
            code = extract_code(completion_text(completions[i]))
            parsed = parse_tests(tests[i] if i < len(tests) else None, metadata[i] if i < len(metadata) else None)
        except Exception:  # malformed row: never crash the trainer
            logger.exception("could not prepare completion %d", i)
            code, parsed = None, []
        if code is None:
            evals.append(CodeEvaluation(0.0, "no code block"))
            continue
        if not parsed:
            evals.append(CodeEvaluation(0.0, "no usable tests"))
            continue
        parsed = _select_tests(parsed, max_tests)
        evals.append(CodeEvaluation(0.0, "pending", n_tests=len(parsed)))
        for job in _jobs_for(code, parsed, float_tolerance):
            all_jobs.append(job)
            owner.append(i)
    if all_jobs:
        results = runner.run_many(all_jobs)
        for i, res in zip(owner, results):
            evals[i].results.append(res)
    for ev in evals:
        if ev.reason != "pending":
            continue
        if ev.results and all(r.passed for r in ev.results):
            ev.reward, ev.reason = 1.0, "all tests passed"
        else:
            ev.reason = _failure_reason(ev.results)
    return evals


def _failure_reason(results: list[ProgramResult]) -> str:
    for r in results:
        if r.passed:
            continue
        if r.error:
            return r.error
        bad = next((run for run in r.runs if run.status != "ok"), None)
        if bad is not None:
            return f"test {bad.index}: {bad.status}"
        if r.runs:
            return f"test {r.runs[-1].index}: wrong answer"
        return "not run"
    return "failed"


def make_code_reward(
    config: SandboxConfig | None = None, *, float_tolerance: float = 0.0, max_tests: int | None = None
) -> Callable[..., list[float]]:
    """Build a TRL-style reward ``fn(prompts, completions, tests, metadata, **kw)``.

    Args:
        config: sandbox limits/policy (defaults: :class:`SandboxConfig`).
        float_tolerance: optional numeric tolerance for stdout tokens (0 = exact,
            as LiveCodeBench).
        max_tests: if set, run only this many tests per problem (the ones with
            the longest inputs, as DeepCoder training does).
    """
    runner = SandboxRunner(config)

    def code_reward(
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] = (),
        tests: Sequence[Any] | None = None,
        metadata: Sequence[Any] | None = None,
        **_: Any,
    ) -> list[float]:
        """1.0 if the last code block passes every test case, else 0.0."""
        completions = list(completions or [])
        if tests is None:
            tests = [None] * len(completions)
        evals = evaluate_completions(
            completions, list(tests), metadata, runner=runner, float_tolerance=float_tolerance, max_tests=max_tests
        )
        return [ev.reward for ev in evals]

    code_reward.runner = runner  # type: ignore[attr-defined]
    return code_reward


_default_reward: Callable[..., list[float]] | None = None


def code_reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any) -> list[float]:
    """Code-execution reward with default :class:`SandboxConfig` (TRL convention).

    Dataset columns: ``tests`` (JSON string or list of ``{"input", "output",
    "testtype"}``; TACO ``{"inputs", "outputs", "fn_name"}`` also accepted) and
    optionally ``metadata`` (dict or JSON string with ``func_name``).
    """
    global _default_reward
    if _default_reward is None:
        _default_reward = make_code_reward()
    return _default_reward(prompts, completions, **columns)
