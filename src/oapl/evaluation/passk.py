"""Unbiased Pass@k from ``n`` samples per prompt, aggregated per benchmark.

For one prompt with ``n`` sampled responses of which ``c`` are correct, the probability that at
least one of ``k`` responses drawn *without replacement* from the ``n`` is correct is

.. math::

    \\text{pass@}k = 1 - \\binom{n-c}{k} \\Big/ \\binom{n}{k},

which is an unbiased estimate of the Pass@k of the policy on that prompt (Chen et al., 2021,
"Evaluating Large Language Models Trained on Code"). The binomials overflow floats for ``n`` in the
hundreds, so it is computed as the equivalent product

.. math::

    \\binom{n-c}{k} \\Big/ \\binom{n}{k} = \\prod_{i=n-c+1}^{n} \\Big(1 - \\frac{k}{i}\\Big),

summed in log space (``log1p``) and finished with ``-expm1`` so that small values (large ``n``,
small ``c``) keep full relative precision. The benchmark score is the mean over prompts.
"""

from __future__ import annotations

import csv
import json
import math
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from oapl.data.rollouts import RolloutGroup

__all__ = ["OVERALL", "default_ks", "evaluate_groups", "load_report", "pass_at_k", "write_report"]

#: Key of the pooled statistics in :func:`evaluate_groups` results and ``scope`` in the CSV.
OVERALL = "overall"


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one prompt with ``n`` samples of which ``c`` are correct.

    ``pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which is 1.0 when
    ``n - c < k`` (every draw of ``k`` contains a correct sample) and 0.0 when ``c = 0``.

    Requires integers with ``n >= 1``, ``1 <= k <= n`` and ``0 <= c <= n``.

    >>> pass_at_k(2, 1, 1)
    0.5
    >>> pass_at_k(4, 1, 2)
    0.5
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k} with n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must satisfy 0 <= c <= n, got c={c} with n={n}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    # every factor 1 - k/i lies in (0, 1) because i >= n-c+1 > k
    log_prod = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_prod)


def default_ks(n: int) -> list[int]:
    """``[1, 2, 4, ..., 2^m]`` with ``2^m <= n``, plus ``n`` itself if it is not a power of two."""
    n = _as_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def _stats(values: Sequence[float]) -> dict[str, float]:
    """mean, population std (ddof=0) and standard error of the mean (sample std / sqrt(N))."""
    m = len(values)
    if m == 0:
        return {"mean": math.nan, "std": math.nan, "stderr": math.nan}
    mean = math.fsum(values) / m
    ss = math.fsum((v - mean) ** 2 for v in values)
    std = math.sqrt(ss / m)
    stderr = math.sqrt(ss / (m - 1)) / math.sqrt(m) if m > 1 else 0.0
    return {"mean": mean, "std": std, "stderr": stderr}


def _benchmark_key(g: RolloutGroup) -> str:
    return g.benchmark or g.task or "default"


def _summarise(groups: list[RolloutGroup], ks: list[int], threshold: float) -> dict[str, Any]:
    counts = [(g.n, g.num_correct(threshold)) for g in groups]
    rewards = [r for g in groups for r in g.rewards if not math.isnan(r)]
    rows = []
    for k in ks:
        values = [pass_at_k(n, c, k) for n, c in counts if k <= n]
        rows.append({"k": k, **_stats(values), "num_prompts": len(values)})
    return {
        "num_prompts": len(groups),
        "num_responses": sum(n for n, _ in counts),
        "n_min": min(n for n, _ in counts),
        "n_max": max(n for n, _ in counts),
        "mean_reward": math.fsum(rewards) / len(rewards) if rewards else math.nan,
        "accuracy": sum(c for _, c in counts) / sum(n for n, _ in counts),
        "all_correct": sum(c == n for n, c in counts),
        "all_wrong": sum(c == 0 for _, c in counts),
        "pass_at_k": rows,
    }


def evaluate_groups(
    groups: Iterable[RolloutGroup], ks: Sequence[int] | None = None, threshold: float = 0.5
) -> dict[str, Any]:
    """Pass@k per benchmark and overall.

    A response is correct when ``reward >= threshold``. Each prompt contributes
    ``pass_at_k(n, c, k)``; a benchmark's score at ``k`` is the mean over its prompts. Groups are
    keyed by ``benchmark`` (falling back to ``task``, then ``"default"`` when empty).

    ``ks`` defaults to :func:`default_ks` of the smallest group size. A prompt with fewer than
    ``k`` samples is left out of that ``k`` (its ``num_prompts`` shows it); a ``k`` larger than
    every group is an error.

    Returns (JSON-able; the same structure comes back from :func:`load_report`)::

        {
          "threshold": 0.5, "ks": [1, 2, 4, ...], "weights_ids": [...], "versions": [...],
          "benchmarks": {
            "<name>": {"num_prompts", "num_responses", "n_min", "n_max", "mean_reward",
                       "accuracy", "all_correct", "all_wrong",
                       "pass_at_k": [{"k", "mean", "std", "stderr", "num_prompts"}, ...]},
            ...
          },
          "overall": {same fields, pooled over all prompts; each pass_at_k entry also has
                      "macro_mean": the unweighted mean of the benchmark means}
        }

    ``std`` is the population standard deviation over prompts; ``stderr`` is the standard error
    of the mean (sample std / sqrt(num_prompts)).
    """
    groups = list(groups)
    if not groups:
        raise ValueError("evaluate_groups needs at least one rollout group")
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got NaN")
    n_min = min(g.n for g in groups)
    n_max = max(g.n for g in groups)
    if ks is None:
        ks_list = default_ks(n_min)
    else:
        ks_list = sorted({_as_int("k", k) for k in ks})
        if not ks_list:
            raise ValueError("ks is empty")
        if ks_list[0] < 1:
            raise ValueError(f"every k must be >= 1, got {ks_list[0]}")
        if ks_list[-1] > n_max:
            raise ValueError(
                f"k={ks_list[-1]} exceeds the number of samples of every prompt (largest group has "
                f"n={n_max}); Pass@k needs n >= k"
            )
    by_bench: dict[str, list[RolloutGroup]] = {}
    for g in groups:
        by_bench.setdefault(_benchmark_key(g), []).append(g)
    benchmarks = {name: _summarise(gs, ks_list, threshold) for name, gs in sorted(by_bench.items())}
    overall = _summarise(groups, ks_list, threshold)
    for j, row in enumerate(overall["pass_at_k"]):
        means = [b["pass_at_k"][j]["mean"] for b in benchmarks.values() if b["pass_at_k"][j]["num_prompts"] > 0]
        row["macro_mean"] = math.fsum(means) / len(means) if means else math.nan
    return {
        "threshold": float(threshold),
        "ks": ks_list,
        "weights_ids": sorted({g.weights_id for g in groups}),
        "versions": sorted({g.version for g in groups}),
        "benchmarks": benchmarks,
        OVERALL: overall,
    }


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


_CSV_FIELDS = ("scope", "benchmark", "k", "mean", "std", "stderr", "num_prompts", "macro_mean")


def write_report(result: dict[str, Any], out_prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``<out_prefix>.json`` (the whole result) and ``<out_prefix>.csv`` (one row per
    benchmark and k, plus ``scope=overall`` rows); return ``(json_path, csv_path)``.

    Non-finite numbers are written as JSON ``null`` / empty CSV cells.
    """
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    csv_path = prefix.with_name(prefix.name + ".csv")
    json_path.write_text(json.dumps(_nan_to_none(result), indent=2, allow_nan=False) + "\n")

    def cell(v: Any) -> Any:
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        w.writeheader()
        scopes = [("benchmark", name, b) for name, b in result["benchmarks"].items()]
        scopes.append((OVERALL, OVERALL, result[OVERALL]))
        for scope, name, summary in scopes:
            for row in summary["pass_at_k"]:
                w.writerow(
                    {
                        "scope": scope,
                        "benchmark": name,
                        "k": row["k"],
                        "mean": cell(row["mean"]),
                        "std": cell(row["std"]),
                        "stderr": cell(row["stderr"]),
                        "num_prompts": row["num_prompts"],
                        "macro_mean": cell(row.get("macro_mean")),
                    }
                )
    return json_path, csv_path


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON report written by :func:`write_report` (``null`` statistics become NaN)."""
    from oapl.errors import UserError

    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not a Pass@k report: not UTF-8 text (byte offset {e.start}, line {line})") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg} (truncated? write "
            f"it again with `oapl eval --out`)"
        ) from None
    if not isinstance(data, dict) or "benchmarks" not in data or OVERALL not in data:
        raise UserError(f"{path} is not a Pass@k report (no 'benchmarks'/'overall' keys)")
    summaries = [*data["benchmarks"].values(), data[OVERALL]] if isinstance(data["benchmarks"], dict) else None
    if summaries is None or not all(
        isinstance(s, dict)
        and isinstance(s.get("pass_at_k"), list)
        and all(isinstance(r, dict) and "k" in r for r in s["pass_at_k"])
        for s in summaries
    ):
        raise UserError(
            f"{path} is not a Pass@k report: a benchmark lacks its 'pass_at_k' list of {{k, mean, ...}} rows"
        )
    for summary in summaries:
        for row in summary["pass_at_k"]:
            for key in ("mean", "std", "stderr", "macro_mean"):
                if key in row and row[key] is None:
                    row[key] = math.nan
        if summary.get("mean_reward") is None:
            summary["mean_reward"] = math.nan
    return data
