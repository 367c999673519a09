"""The study's Markdown report and figures, built from the run directories alone."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

from oapl.compare.claims import LEGEND, contradicted, judge_claims, sharpening_sentence
from oapl.compare.plan import CompareConfig, PlannedRun, base_eval_dir, plan_runs
from oapl.compare.results import ConfigResults, collect
from oapl.compare.summary import smoothed_metrics, summarize_run
from oapl.compare.tables import acted_table, config_table, diff_table, fmt, run_table, setup_table

log = logging.getLogger(__name__)

__all__ = ["build_report"]


def _machine() -> str:
    import torch

    try:
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
    except OSError:
        cpu = platform.processor()
    try:
        load = f", load average at report time {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}){load}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def _plot_training(
    cc: CompareConfig,
    items: list[tuple[PlannedRun, dict[str, Any]]],
    out_png: Path,
    title: str,
    extra_keys: tuple[str, ...] = (),
) -> Path:
    from oapl.evaluation.plots import plot_training

    smooth_dir = Path(cc.output_dir) / "_curves"
    files: dict[str, str] = {}
    multi_seed = len({r.seed for r, _ in items}) > 1
    for run, _ in items:
        label = run.label + (f" s{run.seed}" if multi_seed else "")
        dst = smooth_dir / run.name / f"seed{run.seed}.jsonl"
        files[label] = str(smoothed_metrics(run.run_dir / "metrics.jsonl", dst, cc.smooth))
    keys = ["reward_mean", "seq_entropy", "entropy", "kl", *extra_keys]
    return plot_training(
        files,
        out_png,
        keys=keys,
        x="samples_seen",
        title=f"{title} (x = responses consumed; rolling mean of {cc.smooth} steps)",
    )


def _plot_passk(configs: list[ConfigResults], base: dict[str, Any] | None, out_png: Path, title: str) -> Path:
    from oapl.evaluation.plots import plot_bands

    series = {}
    if base is not None:
        b = ConfigResults("base", "base model", "base", seeds=[0], results=[base])
        ks = list(range(1, b.n + 1))
        series[b.label] = (ks, [b.over_seeds("pass@k", k) for k in ks])
    for c in configs:
        ks = list(range(1, c.n + 1))
        series[f"{c.label} ({len(c.seeds)} seeds)"] = (ks, [c.over_seeds("pass@k", k) for k in ks])
    return plot_bands(series, out_png, xlabel="k (samples)", ylabel="held-out pass@k", title=title, logx=True)


def _load_final(run: PlannedRun) -> dict[str, Any] | None:
    from oapl.evaluation.policy_eval import load_result

    return load_result(run.run_dir / "final_eval")


def _final_numbers(res: dict[str, Any] | None, kmax: int) -> dict[str, float]:
    if res is None:
        return {}
    c = ConfigResults("x", "x", "x", seeds=[0], results=[res])
    out = {"pass@1": c.over_seeds("pass@k", 1).mean}
    if c.n >= kmax:
        out[f"pass@{kmax}"] = c.over_seeds("pass@k", kmax).mean
    if res.get("token_entropy") is not None:
        out["token_entropy"] = c.over_seeds("token_entropy").mean
    return out


@dataclasses.dataclass
class _Study:
    """What the report is written from: the planned runs and what their directories hold."""

    cc: CompareConfig
    runs: list[PlannedRun]
    base: dict[str, Any] | None  # the base model's held-out evaluation
    kmax: int  # the largest k every final evaluation reaches
    present: list[tuple[PlannedRun, dict[str, Any]]]  # runs with metrics, and their summaries
    missing: list[PlannedRun]  # runs without metrics
    unevaluated: list[PlannedRun]  # trained, no final evaluation yet
    configs: dict[str, ConfigResults]  # final evaluations grouped over seeds

    def rel(self, p: Path) -> str:
        """``p`` as the report links to it."""
        return os.path.relpath(p, self.cc.report_path().parent)

    def figure(self, name: str) -> Path:
        return self.cc.figures_path() / f"{self.cc.figure_prefix}_{name}.png"

    def group(self, group: str) -> list[tuple[PlannedRun, dict[str, Any]]]:
        return [(r, s) for r, s in self.present if r.group == group]

    def group_configs(self, group: str) -> list[ConfigResults]:
        return [c for c in self.configs.values() if c.group == group]


def build_report(cc: CompareConfig, runs: list[PlannedRun] | None = None, command: str | None = None) -> Path:
    """Write the Markdown report and its PNGs from the run directories; returns the report path."""
    study = _read_study(cc, runs if runs is not None else plan_runs(cc))
    report = cc.report_path()
    cc.figures_path().mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    cl = cc.claims
    claims = judge_claims(
        study.configs, study.base, cc.margin, cl.non_inferiority_margin, cl.keeps_entropy, cl.clip_acted, cl.is_acted
    )
    lines = [
        *_header(cc, command),
        *_setup_section(study),
        *_claims_section(cc, claims),
        *_algorithms_section(study),
        *_lag_sweep_section(study),
        *_beta2_section(study),
        *_not_run_section(study),
        *_files_section(cc),
    ]
    report.write_text("\n".join(lines))
    Path(cc.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cc.output_dir) / "claims.json").write_text(
        json.dumps(
            [{"text": c.text, "verdict": c.verdict, "rows": [dataclasses.asdict(r) for r in c.rows]} for c in claims],
            indent=1,
        )
    )
    log.info("report written: %s", report)
    return report


def _read_study(cc: CompareConfig, runs: list[PlannedRun]) -> _Study:
    """Summaries and final evaluations of the runs that have them."""
    from oapl.evaluation.policy_eval import load_result

    base = load_result(base_eval_dir(cc)) if cc.final_eval.enabled else None
    finals = {r.key: _load_final(r) for r in runs}
    kmax = max([f["n"] for f in finals.values() if f] or [cc.final_eval.n])
    summaries: dict[str, dict[str, Any]] = {}
    present = []
    for r in runs:
        if not (r.run_dir / "metrics.jsonl").exists():
            continue
        s = summarize_run(r.run_dir)
        s["final"] = _final_numbers(finals[r.key], kmax)
        summaries[r.key] = s
        present.append((r, s))
    missing = [r for r in runs if r.key not in summaries]
    unevaluated = [r for r in runs if r.key in summaries and cc.final_eval.enabled and finals[r.key] is None]
    configs = collect(runs, lambda r: finals.get(r.key), lambda r: summaries.get(r.key, {}))
    return _Study(cc, runs, base, kmax, present, missing, unevaluated, configs)


def _header(cc: CompareConfig, command: str | None) -> list[str]:
    lines = [
        f"# {cc.title}",
        "",
        "Generated by `oapl compare` (`oapl.compare`). Re-create it with:",
        "",
        "```bash",
        command or "oapl compare <config.yaml>",
        "```",
        "",
        f"Machine: {_machine()}.",
        "",
    ]
    if cc.notes:
        lines += [cc.notes.strip(), ""]
    return lines


def _setup_section(st: _Study) -> list[str]:
    if not st.present:
        return []
    study_seeds = sorted({r.seed for r in st.runs if r.group != "beta2_sweep"})
    return [
        "## Setup (shared by every run)",
        "",
        *setup_table(st.present[0][0].cfg, st.cc, [x for x, *_ in st.present]),
        "",
        f"Seeds: {', '.join(map(str, study_seeds))}. Every run of the comparison and the lag sweep "
        "trains on the same number of responses; the held-out split is fixed. Means are over seeds "
        "(each seed's mean over prompts) ± the half-width of a 95% Student-t interval over seeds; "
        "differences are paired per prompt and seed, and their 95% interval is the t-interval over "
        "the per-seed mean differences, widened by any prompt effect that all seeds share (the base "
        "model's single evaluation is one); with one seed it rests on the prompts alone. "
        '"token entropy" is the trained policy\'s mean per-token entropy '
        '(nats, full vocabulary, sampling temperature) on its own held-out samples; "seq entropy" '
        "the Monte-Carlo sequence entropy E[-log pi(y|x)] of the same samples.",
        "",
    ]


def _claims_section(cc: CompareConfig, claims: list) -> list[str]:
    if not claims:
        return []
    cl = cc.claims
    ni = f"{cl.non_inferiority_margin * 100:g} pts" if cl.non_inferiority_margin is not None else "none declared"
    lines = [
        "## The paper's claims, tested",
        "",
        LEGEND.format(
            margin=f"{cc.margin * 100:g} pts of pass@k; for entropy {cl.keeps_entropy:g} x the base model's",
            ni=ni,
            keep=f"{cl.keeps_entropy:.0%}",
        ),
        "",
        "| claim | comparison | verdict | evidence | GRPO+IS correction in that arm |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in claims:
        for i, r in enumerate(c.rows):
            lines.append(
                f"| {c.text if i == 0 else '〃'} | {r.comparison} | **{r.verdict}** | {r.evidence} | {r.acted} |"
            )
    bad = contradicted(claims)
    lines += [
        "",
        "**Contradicted by this miniature:** "
        + (
            "; ".join(f'"{c.text}" ({", ".join(r.comparison for r in rows)})' for c, rows in bad) + "."
            if bad
            else "none of the claims tested here."
        ),
        "",
    ]
    return lines


def _algorithms_section(st: _Study) -> list[str]:
    """OAPL against GRPO+IS: pass@k, paired differences, each arm against the base, the IS correction,
    training curves, and what each arm does."""
    algos = st.group("algorithms")
    if not algos:
        return []
    lines = ["## OAPL vs GRPO with importance sampling", ""]
    cfgs = st.group_configs("algorithms")
    if cfgs:
        lines += _algorithm_results(st, cfgs)
    png = _plot_training(st.cc, algos, st.figure("algorithms"), "OAPL vs GRPO+IS")
    lines += [f"![training curves]({st.rel(png)})", "", *run_table(algos, st.kmax), ""]
    for r, _ in algos[: sum(v is not None for v in st.cc.algorithms.values())]:
        lines.append(_algorithm_sentence(r))
    lines.append("")
    return lines


def _algorithm_results(st: _Study, cfgs: list[ConfigResults]) -> list[str]:
    cc, base, kmax = st.cc, st.base, st.kmax
    ks = sorted({1, 2, 4, 8, kmax} & set(range(1, kmax + 1)))
    png = _plot_passk(cfgs, base, st.figure("passk"), "Held-out pass@k, final weights")
    lines = [f"![held-out pass@k]({st.rel(png)})", "", *config_table(cfgs, ks, base), ""]
    oapls = [c for c in cfgs if c.beta2 is not None]
    grpos = sorted((c for c in cfgs if c.beta2 is None), key=lambda c: c.lag or 0)
    allk = list(range(1, kmax + 1))
    if oapls and grpos:
        o = oapls[0]
        lines += [
            "Paired differences, OAPL minus each GRPO+IS arm (pass@k in points; entropy in nats; 95% "
            "interval in brackets):",
            "",
            *diff_table([(f"{o.label} − {g.label}", o, g) for g in grpos], allk),
            "",
        ]
    if base is not None:
        lines += [
            "### Every arm against the base model",
            "",
            "Each arm minus the base model (pass@k in points, entropy in nats; 95% interval in "
            "brackets). RL that only sharpens the policy gains at small k and loses at large k.",
            "",
            *diff_table([(f"{c.label} − base", c, base) for c in [*oapls, *grpos]], allk, base),
            "",
            *[f"- {sharpening_sentence(c, base)}" for c in [*oapls, *grpos]],
            "",
        ]
    if grpos:
        cl = cc.claims
        lines += [
            "### Did GRPO+IS's correction act?",
            "",
            f"Declared rule (`claims` in the config): the importance weight acted when its mean, p1 "
            f"or p99 over tokens (mean over steps and seeds) is more than {cl.is_acted:g} from 1; the "
            f"PPO clip acted when the clip fraction exceeds {cl.clip_acted:g}. The weight is "
            "min(pi_old/pi_inf, cap) per token; its p1/p99 are read from a histogram of log w in bins "
            "of 0.01 (about 1% of w).",
            "",
            *acted_table(grpos, cc),
            "",
        ]
    return lines


def _algorithm_sentence(r: PlannedRun) -> str:
    """What the arm ``r`` does, in one bullet."""
    a, ro = r.cfg.algorithm, r.cfg.rollout
    if a.name == "grpo":
        return (
            f"- {r.label}: group-normalised advantages, PPO clip {a.clip_eps} with pi_old = the "
            f"trainer at the start of each batch, {a.mini_batches} optimiser step(s) per batch, "
            f"token-level truncated IS weight min(pi_old/pi_inf, {a.is_cap}); weight sync every "
            f"{ro.sync_interval} step(s), max_staleness={ro.max_staleness}, "
            f"asynchronous={ro.asynchronous}."
        )
    return (
        f"- {r.label}: Eq. 3 squared regression against pi_inf (beta1 {a.beta1:g}, beta2 "
        f"{a.beta2:g}), buffer cleared at every sync, asynchronous={ro.asynchronous}."
    )


def _lag_sweep_section(st: _Study) -> list[str]:
    sweep = st.group("lag_sweep")
    if not sweep:
        return []
    kmax = st.kmax
    steps = sweep[0][0].cfg.steps
    lags = sorted({r.lag for r, _ in sweep if r.lag is not None})
    few = [L for L in lags if L <= 50 and steps // L < 4]
    lines = [
        "## OAPL policy-lag sweep",
        "",
        f"OAPL with sync interval L in {{{', '.join(map(str, lags))}}}, {steps} trainer steps each (the "
        "engine gets the trainer's weights every L steps; `syncs` counts the mid-run ones)."
        + (f" L = {few} see fewer than 4 weight windows." if few else ""),
        "",
    ]
    cfgs = sorted(st.group_configs("lag_sweep"), key=lambda c: c.lag or 0)
    if cfgs:
        ks = sorted({1, 4, kmax} & set(range(1, kmax + 1)))
        png = _plot_passk(cfgs, st.base, st.figure("lag_passk"), "Lag sweep: held-out pass@k")
        lines += [f"![lag sweep pass@k]({st.rel(png)})", "", *config_table(cfgs, ks, st.base), ""]
    png = _plot_training(st.cc, sweep, st.figure("lag_sweep"), "OAPL lag sweep", extra_keys=("lag",))
    lines += [f"![lag sweep curves]({st.rel(png)})", "", *run_table(sweep, kmax), ""]
    reused = sorted({f"{r.label} = `{r.same_as}`" for r, _ in sweep if r.same_as})
    if reused:
        lines += ["Reused from the comparison above (identical configuration): " + ", ".join(reused) + ".", ""]
    return lines


def _beta2_section(st: _Study) -> list[str]:
    b2 = st.group("beta2_sweep")
    if not b2:
        return []
    cc, kmax = st.cc, st.kmax
    cfgs = sorted(st.group_configs("beta2_sweep"), key=lambda c: c.beta2 or 0.0)
    chosen = next((r.beta2 for r, _ in st.group("algorithms") if r.beta2 is not None), None)
    best = []
    for what, metric, k in (
        ("pass@1", "pass@k", 1),
        (f"pass@{kmax}", "pass@k", kmax),
        ("token entropy", "token_entropy", None),
    ):
        vals = [(c.over_seeds(metric, k).mean, c.beta2) for c in cfgs]
        vals = [v for v in vals if math.isfinite(v[0])]
        if vals:
            best.append(f"{what} {max(vals)[1]:g}")
    lines = [
        "## beta2 sweep",
        "",
        f"OAPL with beta2 in {{{', '.join(f'{c.beta2:g}' for c in cfgs)}}} on seed(s) "
        f"{', '.join(map(str, cc.beta2_sweep.seeds))}, which the comparison does not use. The study "
        f"uses beta2 = {fmt(chosen, 4) if chosen is not None else '–'}."
        + (f" Highest on these seeds: {', '.join(best)}." if best else "")
        + (f" {cc.beta2_sweep.note.strip()}" if cc.beta2_sweep.note else ""),
        "",
    ]
    if cfgs:
        lines += [*config_table(cfgs, sorted({1, kmax}), None), ""]
    return lines + [*run_table(b2, kmax), ""]


def _not_run_section(st: _Study) -> list[str]:
    if not (st.missing or st.unevaluated):
        return []
    return [
        "## Not run yet",
        "",
        *[f"- {r.label} (seed {r.seed}): no metrics at `{r.run_dir}`" for r in st.missing],
        *[f"- {r.label} (seed {r.seed}): trained, not evaluated yet" for r in st.unevaluated],
        "",
    ]


def _files_section(cc: CompareConfig) -> list[str]:
    return [
        "## Files",
        "",
        f"Run directories (config, `metrics.jsonl`, checkpoints, `final_eval/` with the "
        f"held-out samples as a rollout dataset and `result.json`): `{cc.output_dir}/`.",
        "",
    ]
