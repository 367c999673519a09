"""Confidence intervals for comparing training runs: over seeds, and paired per prompt.

Two runs evaluated on the same held-out prompts give, for every seed ``s`` and prompt ``i``, a
per-prompt score (the unbiased pass@k estimate from ``n`` samples, or a mean entropy) ``a[s, i]``
and ``b[s, i]``. What varies between repetitions of the study is both the training run (the seed)
and which prompts were drawn for the held-out split, so the interval of the difference

.. math::

    \\Delta = \\frac{1}{S\\,P} \\sum_{s,i} (a_{s,i} - b_{s,i})

is a two-level (seeds, then prompts) paired bootstrap: each replicate draws ``S`` seeds with
replacement and ``P`` prompts with replacement (the same prompts for every drawn seed, since the
split is shared) and recomputes the mean difference; the interval is the percentile interval of
the replicates. Pairing removes the prompt difficulty that both runs share, which is most of the
variance of pass@k across prompts.

The mean of one configuration over seeds gets a Student-t interval, ``mean +- t_{0.975, S-1} *
sd / sqrt(S)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "paired_bootstrap", "passk_matrix", "seeds_needed", "t_interval"]

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval ``[lo, hi]`` (``lo = hi = mean`` when it cannot be computed)."""

    mean: float
    lo: float
    hi: float
    n: int  # what the interval is over: seeds for t_interval, replicates for the bootstrap

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes_zero(self) -> int:
        """+1 if the whole interval is above 0, -1 if below, 0 if it contains 0."""
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def t_interval(values: Sequence[float]) -> Interval:
    """Mean over seeds with its 95% Student-t interval (no interval from a single value: ``lo = hi``)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return Interval(m, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    h = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return Interval(m, m - h, m + h, len(xs))


def passk_matrix(counts: np.ndarray, n: int, ks: Sequence[int]) -> np.ndarray:
    """Per-prompt unbiased pass@k for every k: ``counts`` (any shape) of correct samples out of ``n``.

    Returns ``counts.shape + (len(ks),)``. Same formula as :func:`oapl.evaluation.passk.pass_at_k`,
    ``1 - C(n-c, k)/C(n, k)``, evaluated exactly with Python integers (``n`` is small here).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > n):
        raise ValueError(f"correct counts must lie in [0, n={n}]")
    table = np.empty((n + 1, len(ks)), dtype=np.float64)
    for j, k in enumerate(ks):
        if not 1 <= k <= n:
            raise ValueError(f"k must satisfy 1 <= k <= n, got k={k} with n={n}")
        for c in range(n + 1):
            table[c, j] = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    return table[counts]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 10_000, seed: int = 0) -> Interval:
    """95% interval of ``mean(a - b)`` by the two-level (seeds x prompts) paired bootstrap.

    ``a`` and ``b`` are ``(S, P)`` arrays: seed ``s``'s score on prompt ``i`` for each of the two
    configurations (seed ``s`` of one paired with seed ``s`` of the other; prompts aligned). With
    one seed only the prompts are resampled (the interval then ignores training-run variance, and
    the report says so).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired scores must be two (seeds, prompts) arrays of one shape, got {a.shape} and {b.shape}")
    d = a - b
    S, P = d.shape
    mean = float(d.mean())
    if P == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    # in chunks: a replicate is one (seed draw, prompt draw); the mean over the drawn cells factorises
    # as mean over drawn seeds of (mean over drawn prompts), and a drawn prompt set is shared by seeds
    chunk = 1000
    for start in range(0, reps, chunk):
        m = min(chunk, reps - start)
        si = rng.integers(0, S, size=(m, S)) if S > 1 else np.zeros((m, 1), dtype=np.int64)
        pi = rng.integers(0, P, size=(m, P))
        # counts of each prompt in each replicate: (m, P) -> mean over prompts of every seed row
        w = np.zeros((m, P))
        np.add.at(w, (np.repeat(np.arange(m), P), pi.reshape(-1)), 1.0)
        per_seed = w @ d.T / P  # (m, S): each seed's mean over the drawn prompts
        stats[start : start + m] = np.take_along_axis(per_seed, si, axis=1).mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return Interval(mean, float(lo), float(hi), reps)


def seeds_needed(interval: Interval, seeds: int, target_half_width: float) -> int | None:
    """Seeds for a half-width of ``target_half_width`` if it shrinks as 1/sqrt(seeds) (None if unknown)."""
    h = interval.half_width
    if not (math.isfinite(h) and h > 0) or seeds < 1:
        return None
    return max(seeds, math.ceil(seeds * (h / target_half_width) ** 2))
