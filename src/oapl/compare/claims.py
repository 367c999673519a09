"""From the runs' per-prompt final evaluations to intervals and a verdict on each of the paper's claims.

Every configuration (an algorithm run, a lag-sweep point, a beta2 value) is trained once per seed
and evaluated on the same held-out prompts with ``n`` samples each. For a configuration, a seed's
score is the mean over prompts; its mean over seeds gets a Student-t interval
(:func:`oapl.evaluation.intervals.t_interval`). Two configurations are compared on the per-prompt,
per-seed differences with the two-level paired bootstrap
(:func:`oapl.evaluation.intervals.paired_bootstrap`).

A verdict reads an interval against the claim's direction:

* **reproduced**: the 95% interval lies entirely on the side the paper claims;
* **not reproduced**: it lies entirely on the other side, or (for a claimed *advantage*) it is
  narrower than ``margin`` around zero, so no advantage of that size exists here;
* **inconclusive**: neither; the report then says how many seeds would bring the interval's
  half-width to ``margin`` if it shrinks as ``1/sqrt(seeds)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oapl.evaluation.intervals import Interval, paired_bootstrap, passk_matrix, seeds_needed, t_interval

__all__ = ["Claim", "ConfigResults", "collect", "judge_claims", "paired"]


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


def paired(a: ConfigResults, b: ConfigResults | dict[str, Any], metric: str, k: int | None = None,
           reps: int = 10_000) -> tuple[Interval, int, int]:
    """Paired interval of ``a - b`` on the seeds both have; ``b`` may be the base model's single result
    (then every seed of ``a`` is paired with it). Returns (interval, seeds, prompts)."""
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
        ma = passk_matrix(np.array([a.results[i]["correct"] for i in ia]), a.n, [k])[..., 0]
        mb = passk_matrix(np.array([b_cfg.results[j]["correct"] for j in ib]), b_cfg.n, [k])[..., 0]
    else:
        ma = np.array([a.results[i][metric] for i in ia], dtype=np.float64)
        mb = np.array([b_cfg.results[j][metric] for j in ib], dtype=np.float64)
    return paired_bootstrap(ma, mb, reps=reps), len(common), ma.shape[1]


@dataclass
class Claim:
    text: str
    verdict: str
    evidence: str


def _pts(iv: Interval) -> str:
    return f"{iv.mean * 100:+.1f} pts (95% CI {iv.lo * 100:+.1f} to {iv.hi * 100:+.1f})"


def _nats(iv: Interval) -> str:
    return f"{iv.mean:+.3f} nats (95% CI {iv.lo:+.3f} to {iv.hi:+.3f})"


def _needs(iv: Interval, seeds: int, margin: float) -> str:
    if iv.half_width <= margin:
        return ""
    need = seeds_needed(iv, seeds, margin)
    return (f" Not settled: the interval's half-width is {iv.half_width * 100:.1f} pts > {margin * 100:g}; "
            f"about {need} seeds (at this prompt count) would bring it to {margin * 100:g} if it shrinks as "
            f"1/sqrt(seeds)." if need else "")


def _advantage_verdict(iv: Interval, margin: float) -> str:
    side = iv.excludes_zero()
    if side > 0:
        return "reproduced"
    if side < 0:
        return "not reproduced"
    if iv.half_width <= margin:
        return "not reproduced (no advantage of that size here)"
    return "inconclusive"


def judge_claims(configs: dict[str, ConfigResults], base: dict[str, Any] | None, margin: float,
                 reps: int = 10_000) -> list[Claim]:
    """One :class:`Claim` per claim of the paper that this study's runs can test."""
    algos = [c for c in configs.values() if c.group == "algorithms"]
    oapl = next((c for c in algos if c.beta2 is not None), None)
    grpo = next((c for c in algos if c.beta2 is None), None)
    claims: list[Claim] = []
    if oapl is not None and grpo is not None:
        iv, S, P = paired(oapl, grpo, "pass@k", 1, reps)
        if S:
            side = iv.excludes_zero()
            if side < 0:
                verdict = "not reproduced (GRPO+IS is better here)"
            elif side > 0:
                verdict = "reproduced (OAPL is better)"
            elif iv.lo > -margin:
                verdict = f"reproduced as non-inferiority (OAPL at most {-iv.lo * 100:.1f} pts worse)"
            else:
                verdict = "inconclusive"
            claims.append(Claim(f"OAPL >= GRPO+IS in held-out pass@1 at equal training samples ({oapl.label} vs "
                                f"{grpo.label})", verdict,
                                f"OAPL - GRPO+IS = {_pts(iv)}; {S} seed{'s' if S != 1 else ''} x {P} prompts." + _needs(iv, S, margin)))
        kmax = min(oapl.n, grpo.n)
        if kmax > 1:
            iv, S, P = paired(oapl, grpo, "pass@k", kmax, reps)
            iv1, _, _ = paired(oapl, grpo, "pass@k", 1, reps)
            if S:
                claims.append(Claim(f"OAPL's pass@k is better than GRPO+IS's at large k (k = {kmax})",
                                    _advantage_verdict(iv, margin),
                                    f"pass@{kmax}: OAPL - GRPO+IS = {_pts(iv)} (pass@1: {iv1.mean * 100:+.1f} pts); "
                                    f"{S} seed{'s' if S != 1 else ''} x {P} prompts." + _needs(iv, S, margin)))
        if oapl.results[0].get("token_entropy") is not None and grpo.results[0].get("token_entropy") is not None:
            iv, S, P = paired(oapl, grpo, "token_entropy", None, reps)
            if S:
                extra = ""
                if base is not None and base.get("token_entropy") is not None:
                    b = float(np.mean(base["token_entropy"]))
                    o = oapl.over_seeds("token_entropy").mean
                    g = grpo.over_seeds("token_entropy").mean
                    extra = f" Base model {b:.3f}, OAPL {o:.3f}, GRPO+IS {g:.3f} nats/token."
                side = iv.excludes_zero()
                claims.append(Claim("OAPL keeps the policy's entropy where GRPO+IS reduces it (trained policy, "
                                    "held-out prompts, token entropy)",
                                    "reproduced" if side > 0 else "not reproduced" if side < 0 else "inconclusive",
                                    f"OAPL - GRPO+IS = {_nats(iv)}; {S} seed{'s' if S != 1 else ''} x {P} prompts." + extra))
    sweep = sorted((c for c in configs.values() if c.group == "lag_sweep" and c.lag is not None), key=lambda c: c.lag)
    if sweep and base is not None:
        big = sweep[-1]
        iv, S, P = paired(big, base, "pass@k", 1, reps)
        diverged = [s for s, summ in zip(big.seeds, big.summaries)
                    if summ.get("skipped_steps") or not all(math.isfinite(float(summ.get(k, 0.0) or 0.0))
                                                             for k in ("kl_max", "reward_mean_last"))]
        side = iv.excludes_zero()
        verdict = ("not reproduced (diverged)" if diverged else "reproduced" if side > 0
                   else "not reproduced" if side < 0 else "inconclusive")
        ev = f"L={big.lag} vs the base model: pass@1 {_pts(iv)}; {S} seed{'s' if S != 1 else ''} x {P} prompts; no non-finite or " \
             f"skipped steps" if not diverged else f"seeds {diverged} had skipped or non-finite steps"
        if len(sweep) > 1:
            small = sweep[0]
            iv2, _, _ = paired(big, small, "pass@k", 1, reps)
            ev += f". L={big.lag} - L={small.lag}: {_pts(iv2)}"
        claims.append(Claim(f"OAPL trains stably with a large policy lag (L = {big.lag})", verdict, ev + "."))
    return claims
