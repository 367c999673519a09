"""A configuration's final evaluations over seeds, and the paired interval two configurations are compared on.

Every configuration (an algorithm run, a lag-sweep point, a beta2 value) is trained once per seed
and evaluated on the same held-out prompts with ``n`` samples each; :class:`ConfigResults` holds those
evaluations, one per seed.


**Intervals.** Seeds are the experimental unit: a training run is what a repetition of the study
redraws. A configuration's mean over seeds gets a Student-t interval over its per-seed means (prompts
averaged within a seed). Two configurations are compared on the paired differences ``d[s, i]`` (seed
``s``, held-out prompt ``i``) by :func:`seed_prompt_interval`: the t-interval over the per-seed mean
differences, widened by the part of the prompt-to-prompt variance that all seeds share (a prompt that
one arm solves better in every seed, or the base model's single evaluation, which every seed is
paired with). Without such a shared part it *is* the t-interval over seeds with ``S - 1`` degrees of
freedom. The simulation in ``tests/test_compare_claims.py`` checks that it covers at >= 93% for a
nominal 95% with 3 seeds when seed variance dominates and when prompt variance does; the earlier
two-level bootstrap covered 78% when seed variance dominated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oapl.evaluation.intervals import Interval, passk_matrix, t975, t_interval

__all__ = ["ConfigResults", "collect", "paired", "seed_prompt_half_widths", "seed_prompt_interval"]


@dataclass
class ConfigResults:
    """One configuration's final evaluations, one per seed (aligned prompts)."""

    name: str
    label: str
    group: str
    seeds: list[int] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)  # result.json of each seed
    summaries: list[dict[str, Any]] = field(default_factory=list)  # summarize_run of each seed
    lag: int | None = None
    beta2: float | None = None

    @property
    def n(self) -> int:
        return min(r["n"] for r in self.results)

    def matrix(self, metric: str, ks: list[int] | None = None) -> np.ndarray:
        """``(S, P)`` per-seed, per-prompt scores (``(S, P, len(ks))`` for ``pass@k``)."""
        if metric == "pass@k":
            counts = np.array([r["correct"] for r in self.results])
            return passk_matrix(counts, self.n, ks or list(range(1, self.n + 1)))
        rows = [r.get(metric) for r in self.results]
        if any(v is None for v in rows):
            return np.zeros((0, 0))
        return np.array(rows, dtype=np.float64)

    def over_seeds(self, metric: str, k: int | None = None) -> Interval:
        """Mean over prompts per seed, then mean +- t-interval over seeds."""
        if metric == "pass@k":
            if k is None:
                raise ValueError("metric pass@k needs k")
            per_seed = self.matrix("pass@k", [k]).mean(axis=1)[:, 0]
        else:
            m = self.matrix(metric)
            if m.size == 0:
                return Interval(math.nan, math.nan, math.nan, 0)
            per_seed = m.mean(axis=1)
        return t_interval(per_seed.tolist())


def collect(items, results_of, summary_of) -> dict[str, ConfigResults]:
    """Group planned runs by configuration; only runs with a final evaluation count."""
    out: dict[str, ConfigResults] = {}
    for run in items:
        res = results_of(run)
        if res is None:
            continue
        key = f"{run.group}:{run.name}"
        c = out.setdefault(key, ConfigResults(run.name, run.label, run.group, lag=run.lag, beta2=run.beta2))
        c.seeds.append(run.seed)
        c.results.append(res)
        c.summaries.append(summary_of(run))
    return out


def seed_prompt_interval(d: np.ndarray) -> Interval:
    r"""95% interval of the mean of paired differences ``d`` of shape ``(S seeds, P prompts)``.

    With ``m_s`` the seed means, ``q_i`` the prompt means and the two-way mean squares
    ``MS_seed = P var(m)``, ``MS_prompt = S var(q)``, ``MS_res`` (residual), the variance of the grand
    mean is estimated as

    .. math::

        V = \frac{MS_{seed}}{SP} + \frac{\max(MS_{prompt} - MS_{res}, 0)}{SP}

    (the first term is the t-interval's ``var(m)/S``; the second the prompt effect that every seed
    shares), with Welch-Satterthwaite degrees of freedom, at least ``S - 1`` and rounded down
    (conservative). The half-width is never below ``t_{(S-1)(P-1)} sqrt(MS_res / SP)``, what the prompts'
    own noise puts into the mean (``E[MS_seed] >= E[MS_res]``): seed means that agree by chance (in the
    quick study two seeds' differences were both exactly -1/256) must not make a zero-width interval.
    With one seed the prompts are the only replication (``V = var(q)/P``, ``P - 1``
    degrees of freedom) and the interval ignores the training run's variance.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"paired differences must be a non-empty (seeds, prompts) array, got shape {d.shape}")
    mean, half = seed_prompt_half_widths(d[None])
    S = d.shape[0]
    return Interval(float(mean[0]), float(mean[0] - half[0]), float(mean[0] + half[0]), S)


def seed_prompt_half_widths(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`seed_prompt_interval` for a stack ``(R, S, P)`` of difference arrays: (means, half-widths);
    the half-width is NaN where no interval exists (one seed and one prompt)."""
    d = np.asarray(d, dtype=np.float64)
    R, S, P = d.shape
    g = d.mean(axis=(1, 2))
    floor = np.zeros(R)  # the half-width the prompts' own noise alone gives (see seed_prompt_interval)
    if S == 1:
        if P < 2:
            return g, np.full(R, np.nan)
        v, df = d[:, 0].var(axis=1, ddof=1) / P, np.full(R, P - 1.0)
    else:
        m, q = d.mean(axis=2), d.mean(axis=1)
        ms_seed = P * m.var(axis=1, ddof=1)
        if P < 2:
            v, df = ms_seed / (S * P), np.full(R, S - 1.0)
        else:
            ms_prompt = S * q.var(axis=1, ddof=1)
            resid = d - m[:, :, None] - q[:, None, :] + g[:, None, None]
            ms_res = (resid**2).sum(axis=(1, 2)) / ((S - 1) * (P - 1))
            v1, v2 = ms_seed / (S * P), np.maximum(ms_prompt - ms_res, 0.0) / (S * P)
            v = v1 + v2
            den = v1**2 / (S - 1) + (ms_prompt / (S * P)) ** 2 / (P - 1) + (ms_res / (S * P)) ** 2 / ((S - 1) * (P - 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                df = np.where(den > 0, np.maximum(S - 1.0, v * v / np.where(den > 0, den, 1.0)), S - 1.0)
            floor = t975((S - 1) * (P - 1)) * np.sqrt(ms_res / (S * P))
    t = np.array([t975(int(math.floor(x))) for x in np.minimum(df, 1e6)])
    return g, np.maximum(t * np.sqrt(np.maximum(v, 0.0)), floor)


def paired(
    a: ConfigResults, b: ConfigResults | dict[str, Any], metric: str, k: int | None = None, relative: bool = False
) -> tuple[Interval, int, int]:
    """Paired interval of ``a - b`` on the seeds both have; ``b`` may be the base model's single result
    (then every seed of ``a`` is paired with it). ``relative``: of ``(a - b) / mean(b)``. Returns
    (interval, seeds, prompts)."""
    if isinstance(b, dict):  # the base model: one evaluation shared by every seed
        b_cfg = ConfigResults("base", "base", "base", seeds=list(a.seeds), results=[b] * len(a.seeds))
    else:
        b_cfg = b
    common = [s for s in a.seeds if s in b_cfg.seeds]
    ia = [a.seeds.index(s) for s in common]
    ib = [b_cfg.seeds.index(s) for s in common]
    for i, j in zip(ia, ib):
        if a.results[i]["prompt_ids"] != b_cfg.results[j]["prompt_ids"]:
            raise ValueError(f"{a.name} and {b_cfg.name} were evaluated on different held-out prompts")
    if not common:
        return Interval(math.nan, math.nan, math.nan, 0), 0, 0
    if metric == "pass@k":
        if k is None:
            raise ValueError("metric pass@k needs k")
        ma = passk_matrix(np.array([a.results[i]["correct"] for i in ia]), a.n, [k])[..., 0]
        mb = passk_matrix(np.array([b_cfg.results[j]["correct"] for j in ib]), b_cfg.n, [k])[..., 0]
    else:
        if any(a.results[i].get(metric) is None for i in ia) or any(b_cfg.results[j].get(metric) is None for j in ib):
            return Interval(math.nan, math.nan, math.nan, 0), 0, 0
        ma = np.array([a.results[i][metric] for i in ia], dtype=np.float64)
        mb = np.array([b_cfg.results[j][metric] for j in ib], dtype=np.float64)
    d = ma - mb
    if relative:
        d = d / float(mb.mean())
    return seed_prompt_interval(d), len(common), ma.shape[1]
