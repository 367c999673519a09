"""From the runs' per-prompt final evaluations to intervals and a verdict on each of the paper's claims.

Every configuration (an algorithm run, a lag-sweep point, a beta2 value) is trained once per seed
and evaluated on the same held-out prompts with ``n`` samples each.

**Intervals** come from :mod:`oapl.compare.results` (:func:`seed_prompt_interval`, re-exported here):
seeds are the experimental unit, and two configurations are compared on their paired per-prompt
differences.

**Verdicts** read an interval against the claim's direction (:data:`LEGEND`, the same words the report
prints):

* a claimed **advantage** ("outperforms", "better at large k"): *reproduced* when the interval lies
  above 0; *not reproduced* when it lies below 0, or when its upper bound is below ``margin`` (no
  advantage of the size that matters); *inconclusive* otherwise;
* a **non-inferiority** claim, declared with its margin ``m`` in the study's config before it runs:
  *reproduced* when the lower bound is above ``-m``; *not reproduced* when the upper bound is below
  ``-m``; *inconclusive* otherwise;
* **keeps the entropy** (relative to the base model, threshold ``keeps_entropy``): the
  non-inferiority rule on the relative change with ``m = keeps_entropy``; **reduces the entropy**: its
  mirror (reproduced when the upper bound is below ``-keeps_entropy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from oapl.compare.results import ConfigResults, collect, paired, seed_prompt_half_widths, seed_prompt_interval
from oapl.evaluation.intervals import Interval, seeds_needed

__all__ = [
    "LEGEND",
    "Claim",
    "ConfigResults",
    "Row",
    "collect",
    "correction_acted",
    "judge_claims",
    "paired",
    "seed_prompt_half_widths",
    "seed_prompt_interval",
    "sharpening",
    "verdict_advantage",
    "verdict_non_inferior",
    "verdict_reduces",
]

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

LEGEND = (
    "Every interval is a 95% interval over seeds (the training run is the experimental unit; "
    '`seed_prompt_interval` in `oapl.compare.claims`). A claimed **advantage** ("outperforms", "better '
    'at large k", "improves over the base model") is *reproduced* when its interval lies above 0, *not '
    "reproduced* when it lies below 0 or when its upper bound is below the margin that matters ({margin}); "
    "*inconclusive* otherwise. A **non-inferiority** claim is only tested when the study's config declares "
    "its margin before the runs (`claims.non_inferiority_margin`: {ni}); it is *reproduced* when the lower "
    "bound is above minus that margin, *not reproduced* when the upper bound is below it. **Keeps the "
    "entropy** is that non-inferiority rule on the change relative to the base model with the declared "
    "threshold (`claims.keeps_entropy`: a fall of less than {keep}); **reduces the entropy** is its "
    "mirror. A row marked *not reproduced* is a result of this miniature that contradicts the paper."
)


# ----------------------------------------------------------------------------------------------- verdicts


def verdict_advantage(iv: Interval, margin: float, unit: str = "pts") -> tuple[str, str]:
    """A claimed advantage (a - b > 0): (verdict, reason)."""
    if not math.isfinite(iv.lo):
        return INCONCLUSIVE, "no interval (one seed and one prompt)"
    if iv.lo > 0:
        return REPRODUCED, "the interval lies above 0"
    if iv.hi < 0:
        return NOT_REPRODUCED, "the interval lies below 0: the opposite holds here"
    if iv.hi < margin:
        return (
            NOT_REPRODUCED,
            f"the upper bound {_num(iv.hi, unit)} is below the margin {_num(margin, unit)}: no advantage of that size here",
        )
    return INCONCLUSIVE, "the interval contains 0 and reaches the margin"


def verdict_non_inferior(iv: Interval, margin: float, unit: str = "pts") -> tuple[str, str]:
    """A declared non-inferiority claim (a - b > -margin): (verdict, reason)."""
    if not math.isfinite(iv.lo):
        return INCONCLUSIVE, "no interval (one seed and one prompt)"
    if iv.lo > -margin:
        return REPRODUCED, f"the lower bound lies above -{_num(margin, unit)}"
    if iv.hi < -margin:
        return NOT_REPRODUCED, f"the upper bound lies below -{_num(margin, unit)}"
    return INCONCLUSIVE, f"the interval contains -{_num(margin, unit)}"


def verdict_reduces(iv: Interval, margin: float, unit: str = "pts") -> tuple[str, str]:
    """A claimed reduction by more than ``margin`` (a - b < -margin): the mirror of non-inferiority."""
    if not math.isfinite(iv.lo):
        return INCONCLUSIVE, "no interval (one seed and one prompt)"
    if iv.hi < -margin:
        return REPRODUCED, f"the upper bound lies below -{_num(margin, unit)}"
    if iv.lo > -margin:
        return NOT_REPRODUCED, f"the lower bound lies above -{_num(margin, unit)}: it is kept"
    return INCONCLUSIVE, f"the interval contains -{_num(margin, unit)}"


def _num(x: float, unit: str) -> str:
    """``x`` in the claim's unit: points of pass@k, nats, or a fraction of the base model's value."""
    if unit == "pts":
        return f"{x * 100:.1f} pts"
    if unit == "nats":
        return f"{x:.3f} nats"
    return f"{x * 100:.0f}%"


def sharpening(arm: ConfigResults, base: dict[str, Any]) -> tuple[list[int], list[int], list[int], dict[int, Interval]]:
    """pass@k of ``arm`` minus the base model's at every k = 1..n: (k above, k below, k undecided, intervals)."""
    ks = list(range(1, min(arm.n, base["n"]) + 1))
    ivs = {k: paired(arm, base, "pass@k", k)[0] for k in ks}
    up = [k for k in ks if ivs[k].lo > 0]
    down = [k for k in ks if ivs[k].hi < 0]
    return up, down, [k for k in ks if k not in up and k not in down], ivs


def _ranges(ks: list[int]) -> str:
    if not ks:
        return "none"
    out, start, prev = [], ks[0], ks[0]
    for k in ks[1:] + [None]:
        if k is not None and k == prev + 1:
            prev = k
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if k is not None:
            start = prev = k
    return ", ".join(out)


def sharpening_sentence(arm: ConfigResults, base: dict[str, Any]) -> str:
    up, down, mid, ivs = sharpening(arm, base)
    kmax = max(ivs)
    what = (
        "sharpens: it gains at small k and loses at large k"
        if up and down and max(up) < min(down)
        else "improves pass@k at every k"
        if len(up) == len(ivs)
        else "is below the base model at every k"
        if len(down) == len(ivs)
        else "loses at large k, with no gain at small k that its interval settles"
        if down and not up
        else "gains at small k; at large k its interval contains the base model"
        if up and not down
        else "has no k where its interval excludes the base model"
        if not up and not down
        else "mixed"
    )
    return (
        f"{arm.label} {what} (above the base model at k = {_ranges(up)}; below at k = {_ranges(down)}; "
        f"undecided at k = {_ranges(mid)}; pass@1 {_pts(ivs[1])}, pass@{kmax} {_pts(ivs[kmax])})."
    )


# ------------------------------------------------------------------------------------ did the correction act


def correction_acted(cfg: ConfigResults, clip_acted: float, is_acted: float) -> dict[str, Any]:
    """GRPO's importance weights and PPO clip in one arm (means over steps, then over seeds), and whether
    each acted by the declared rule."""

    def mean(key: str) -> float | None:
        vals = [float(v) for s in cfg.summaries if (v := s.get(key)) is not None and math.isfinite(float(v))]
        return float(np.mean(vals)) if vals else None

    out: dict[str, Any] = {
        "clip_frac": mean("clip_frac_mean"),
        "is_mean": mean("is_weight_mean_mean"),
        "is_p1": mean("is_weight_p1_mean"),
        "is_p99": mean("is_weight_p99_mean"),
        "kl": mean("kl_mean"),
        "lag_max": max((s.get("lag_max") or 0 for s in cfg.summaries), default=None),
    }
    out["clip"] = None if out["clip_frac"] is None else out["clip_frac"] > clip_acted
    devs = [abs(out[k] - 1.0) for k in ("is_mean", "is_p1", "is_p99") if out[k] is not None]
    out["is"] = None if not devs else max(devs) > is_acted
    out["is_quantiles"] = out["is_p1"] is not None
    return out


def acted_text(info: dict[str, Any]) -> str:
    def yn(v: bool | None) -> str:
        return "not recorded" if v is None else "yes" if v else "no"

    q = f", p1 {info['is_p1']:.3f}, p99 {info['is_p99']:.3f}" if info["is_quantiles"] else " (p1/p99 not recorded)"
    return (
        f"IS acted: {yn(info['is'])} (mean weight {_f(info['is_mean'])}{q}); clip acted: {yn(info['clip'])} "
        f"(clip fraction {_f(info['clip_frac'])}); KL to the engine {_f(info['kl'], 4)}"
    )


def _f(v: float | None, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}f}"


# ---------------------------------------------------------------------------------------------------- claims


@dataclass
class Row:
    comparison: str
    verdict: str
    evidence: str
    acted: str = "–"


@dataclass
class Claim:
    text: str
    rows: list[Row]

    @property
    def verdict(self) -> str:
        """The claim over all its rows: contradicted when any row is, reproduced when every row is."""
        vs = [r.verdict for r in self.rows]
        if any(v == NOT_REPRODUCED for v in vs):
            return NOT_REPRODUCED
        if vs and all(v == REPRODUCED for v in vs):
            return REPRODUCED
        return INCONCLUSIVE


def _pts(iv: Interval) -> str:
    if not math.isfinite(iv.lo):
        return f"{iv.mean * 100:+.1f} pts (no interval)"
    return f"{iv.mean * 100:+.1f} pts (95% CI {iv.lo * 100:+.1f} to {iv.hi * 100:+.1f})"


def _pct(iv: Interval) -> str:
    return f"{iv.mean * 100:+.0f}% (95% CI {iv.lo * 100:+.0f}% to {iv.hi * 100:+.0f}%)"


def _size(S: int, P: int) -> str:
    return f"{S} seed{'s' if S != 1 else ''} x {P} prompts"


def _needs(iv: Interval, seeds: int, margin: float) -> str:
    if not math.isfinite(iv.half_width) or iv.half_width <= margin:
        return ""
    need = seeds_needed(iv, seeds, margin)
    return (
        f" Half-width {iv.half_width * 100:.1f} pts > {margin * 100:g}: about {need} seeds would bring it to "
        f"{margin * 100:g} if it shrinks as 1/sqrt(seeds)."
        if need
        else ""
    )


def _row(rule, iv: Interval, margin: float, comparison: str, evidence: str, acted: str = "–", unit: str = "pts") -> Row:
    verdict, why = rule(iv, margin, unit)
    return Row(comparison, verdict, f"{evidence} {why[0].upper()}{why[1:]}.", acted)


def judge_claims(
    configs: dict[str, ConfigResults],
    base: dict[str, Any] | None,
    margin: float,
    non_inferiority_margin: float | None = None,
    keeps_entropy: float = 0.10,
    clip_acted: float = 0.001,
    is_acted: float = 0.02,
) -> list[Claim]:
    """One :class:`Claim` per claim of the paper that this study's runs can test, each with one row per
    comparison: OAPL against every GRPO+IS arm, and every arm against the base model."""
    algos = [c for c in configs.values() if c.group == "algorithms"]
    oapls = [c for c in algos if c.beta2 is not None]
    grpos = sorted((c for c in algos if c.beta2 is None), key=lambda c: c.lag or 0)
    oapl = oapls[0] if oapls else None
    acted = {g.name: acted_text(correction_acted(g, clip_acted, is_acted)) for g in grpos}
    claims: list[Claim] = []
    if oapl is not None and grpos:
        claims += _oapl_against_grpo(oapl, grpos, acted, margin, non_inferiority_margin)
    arms = [*oapls, *grpos]
    if base is not None and arms:
        claims.append(_better_than_base_at_every_k(arms, base, acted, margin))
        claims += _entropy_kept(oapls, grpos, base, acted, keeps_entropy)
    sweep = sorted(
        (c for c in configs.values() if c.group == "lag_sweep" and c.lag is not None), key=lambda c: c.lag or 0
    )
    if sweep and base is not None:
        claims.append(_stable_with_a_large_lag(sweep, base, margin))
    return claims


def _oapl_against_grpo(
    oapl: ConfigResults,
    grpos: list[ConfigResults],
    acted: dict[str, str],
    margin: float,
    non_inferiority_margin: float | None,
) -> list[Claim]:
    """OAPL beats GRPO+IS at pass@1 (and, when a margin is declared, is non-inferior), and at large k."""
    rows = []
    for g in grpos:
        iv, S, P = paired(oapl, g, "pass@k", 1)
        rows.append(
            _row(
                verdict_advantage,
                iv,
                margin,
                f"{oapl.label} − {g.label}",
                f"pass@1 {_pts(iv)}; {_size(S, P)}." + _needs(iv, S, margin),
                acted[g.name],
            )
        )
    claims = [Claim("OAPL outperforms GRPO+IS in held-out pass@1 at equal training samples", rows)]
    if non_inferiority_margin is not None:
        rows = []
        for g in grpos:
            iv, S, P = paired(oapl, g, "pass@k", 1)
            rows.append(
                _row(
                    verdict_non_inferior,
                    iv,
                    non_inferiority_margin,
                    f"{oapl.label} − {g.label}",
                    f"pass@1 {_pts(iv)}; {_size(S, P)}.",
                    acted[g.name],
                )
            )
        claims.append(
            Claim(
                f"OAPL is non-inferior to GRPO+IS in held-out pass@1 (declared margin "
                f"{non_inferiority_margin * 100:g} pts)",
                rows,
            )
        )
    kmax = min([oapl.n, *(g.n for g in grpos)])
    if kmax > 1:
        rows = []
        for g in grpos:
            iv, S, P = paired(oapl, g, "pass@k", kmax)
            rows.append(
                _row(
                    verdict_advantage,
                    iv,
                    margin,
                    f"{oapl.label} − {g.label}",
                    f"pass@{kmax} {_pts(iv)}; {_size(S, P)}." + _needs(iv, S, margin),
                    acted[g.name],
                )
            )
        claims.append(Claim(f"OAPL's pass@k is better than GRPO+IS's at large k (k = {kmax})", rows))
    return claims


def _better_than_base_at_every_k(
    arms: list[ConfigResults], base: dict[str, Any], acted: dict[str, str], margin: float
) -> Claim:
    """Every arm beats the base model at every k (RL that only sharpens the policy loses at large k)."""
    rows = []
    for a in arms:
        up, down, mid, ivs = sharpening(a, base)
        k = max(ivs)
        per_k = {j: verdict_advantage(iv, margin)[0] for j, iv in ivs.items()}
        failed = [j for j, v in per_k.items() if v == NOT_REPRODUCED]
        verdict = (
            NOT_REPRODUCED if failed else REPRODUCED if all(v == REPRODUCED for v in per_k.values()) else INCONCLUSIVE
        )
        why = (
            f"not reproduced at k = {_ranges(failed)} (below 0, or upper bound below the margin)"
            if failed
            else "above 0 at every k"
            if verdict == REPRODUCED
            else f"above 0 at k = {_ranges(up)}; undecided at k = {_ranges(mid)}"
        )
        rows.append(
            Row(
                f"{a.label} − base model",
                verdict,
                f"pass@1 {_pts(ivs[1])}, pass@{k} {_pts(ivs[k])}; {_size(len(a.seeds), len(base['correct']))}. "
                f"{why[0].upper()}{why[1:]}.",
                acted.get(a.name, "–"),
            )
        )
    return Claim(
        f"RL improves pass@k over the base model at every k up to {max(ivs)} (not only sharpening pass@1)", rows
    )


def _entropy_kept(
    oapls: list[ConfigResults],
    grpos: list[ConfigResults],
    base: dict[str, Any],
    acted: dict[str, str],
    keeps_entropy: float,
) -> list[Claim]:
    """Per entropy the base evaluation has: OAPL keeps it (within ``keeps_entropy`` of the base
    model's), GRPO+IS reduces it, and OAPL minus each GRPO+IS arm."""
    oapl = oapls[0] if oapls else None
    claims = []
    for metric, what in (("token_entropy", "token entropy"), ("seq_entropy", "sequence entropy")):
        if base.get(metric) is None:
            continue
        b = float(np.mean(base[metric]))
        rows = []
        for a in oapls:
            iv, S, P = paired(a, base, metric, relative=True)
            if S:
                rows.append(
                    _row(
                        verdict_non_inferior,
                        iv,
                        keeps_entropy,
                        f"{a.label} vs base model",
                        f"{what} {a.over_seeds(metric).mean:.3f} vs {b:.3f}: {_pct(iv)}; {_size(S, P)}.",
                        unit="rel",
                    )
                )
        for g in grpos:
            iv, S, P = paired(g, base, metric, relative=True)
            if S:
                rows.append(
                    _row(
                        verdict_reduces,
                        iv,
                        keeps_entropy,
                        f"{g.label} vs base model (claimed: reduces)",
                        f"{what} {g.over_seeds(metric).mean:.3f} vs {b:.3f}: {_pct(iv)}; {_size(S, P)}.",
                        acted[g.name],
                        unit="rel",
                    )
                )
        if oapl is not None:
            for g in grpos:
                iv, S, P = paired(oapl, g, metric)
                if S:
                    rows.append(
                        _row(
                            verdict_advantage,
                            iv,
                            keeps_entropy * b,
                            f"{oapl.label} − {g.label}",
                            f"{what} {iv.mean:+.3f} nats (95% CI {iv.lo:+.3f} to {iv.hi:+.3f}); "
                            f"{_size(S, P)}; margin {keeps_entropy:g} x base = {keeps_entropy * b:.3f}.",
                            acted[g.name],
                            unit="nats",
                        )
                    )
        if rows:
            claims.append(
                Claim(
                    f"OAPL keeps the policy's {what} (falls by less than {keeps_entropy:.0%} of the "
                    "base model's) where GRPO+IS reduces it",
                    rows,
                )
            )
    return claims


def _stable_with_a_large_lag(sweep: list[ConfigResults], base: dict[str, Any], margin: float) -> Claim:
    """The largest lag of the sweep trains without skipped or non-finite steps and beats the base model."""
    big = sweep[-1]
    iv, S, P = paired(big, base, "pass@k", 1)
    diverged = [
        s
        for s, summ in zip(big.seeds, big.summaries)
        if summ.get("skipped_steps")
        or not all(math.isfinite(float(summ.get(k, 0.0) or 0.0)) for k in ("kl_max", "reward_mean_last"))
    ]
    if diverged:
        rows = [Row(f"OAPL L={big.lag}", NOT_REPRODUCED, f"Seeds {diverged} had skipped or non-finite steps.")]
    else:
        ev = (
            f"pass@1 {_pts(iv)} vs the base model; {_size(S, P)}; no non-finite or skipped steps"
            + (" (one seed: the interval ignores the training run's variance)" if S == 1 else "")
            + "."
        )
        if len(sweep) > 1:
            small = sweep[0]
            iv2, _, _ = paired(big, small, "pass@k", 1)
            ev += f" L={big.lag} − L={small.lag}: pass@1 {_pts(iv2)} (shown, not judged)."
        rows = [_row(verdict_advantage, iv, margin, f"OAPL L={big.lag} − base model", ev)]
    return Claim(f"OAPL trains stably with a large policy lag (L = {big.lag})", rows)


def contradicted(claims: list[Claim]) -> list[tuple[Claim, list[Row]]]:
    """The claims, and their rows, that this study's results contradict."""
    return [(c, [r for r in c.rows if r.verdict == NOT_REPRODUCED]) for c in claims if c.verdict == NOT_REPRODUCED]
