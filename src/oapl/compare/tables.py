"""The Markdown tables of the study's report: the shared setup, one row per run, one row per configuration
(means over seeds), paired differences with their intervals, and whether GRPO+IS's correction acted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from oapl.compare.claims import correction_acted
from oapl.compare.plan import CompareConfig, PlannedRun, final_eval_settings
from oapl.compare.results import ConfigResults, paired
from oapl.config import TrainConfig
from oapl.evaluation.intervals import Interval

__all__ = ["acted_table", "ci", "config_table", "diff_table", "fmt", "iv_pts", "run_table", "setup_table"]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def ci(iv: Interval, digits: int = 3) -> str:
    if not math.isfinite(iv.mean):
        return "–"
    if not math.isfinite(iv.lo):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} ± {iv.half_width:.{digits}f}"


def setup_table(cfg: TrainConfig, cc: CompareConfig, runs: Sequence[PlannedRun] = ()) -> list[str]:
    s, r, o, m, e = cfg.sampling, cfg.rollout, cfg.optim, cfg.model, cfg.eval
    # runs whose batch differs from the first one's (e.g. GRPO+IS with 2 mini-batches of whole groups)
    other = {
        f"{x.label}: {x.cfg.rollout.prompts_per_step} x {x.cfg.rollout.group_size} per step, {x.cfg.steps} steps"
        for x in runs
        if (x.cfg.rollout.prompts_per_step, x.cfg.rollout.group_size) != (r.prompts_per_step, r.group_size)
    }
    lora = f"LoRA r={m.lora.r}, alpha={m.lora.alpha} on `{m.lora.target_modules}`" if m.lora.enabled else "all weights"
    t = cfg.task
    fields = {k: v for k, v in t.model_dump(mode="json", exclude_defaults=True).items() if k != "name"}
    task = f"`{t.name}`" + (f" ({', '.join(f'{k}={v}' for k, v in fields.items())})" if fields else "")
    rows = [
        ("model", f"`{m.name}` ({lora}, weights {m.param_dtype}, compute {m.compute_dtype})"),
        ("task", task),
        (
            "batch",
            f"{r.prompts_per_step} prompts x G={r.group_size} = {r.prompts_per_step * r.group_size} "
            f"responses per trainer step" + (f" ({'; '.join(sorted(other))})" if other else ""),
        ),
        ("sampling", f"temperature {s.temperature}, top-p {s.top_p}, max {s.max_tokens} tokens"),
        (
            "optimiser",
            f"AdamW lr {o.lr:g}, betas {tuple(o.betas)}, grad-norm clip {o.max_grad_norm}, {o.schedule} schedule",
        ),
        (
            "OAPL",
            f"beta1 {cfg.algorithm.beta1:g}, beta2 {cfg.algorithm.beta2:g}, log pi_inf from "
            f"`{cfg.algorithm.reference_logprobs}`",
        ),
        (
            "in-run eval",
            f"every {e.every or '—'} steps, n={e.n} at temperature {e.temperature}"
            + ("" if e.at_start or e.at_end or e.every else " (off)"),
        ),
        ("engine", f"`{cfg.engine.kind}`; threads {cfg.threads}"),
    ]
    if cc.final_eval.enabled:
        fe = final_eval_settings(cc)
        rows.append(
            (
                "final eval",
                f"every run's final weights and the base model: n={fe['n']} samples per held-out "
                f"prompt at temperature {fe['temperature'] or s.temperature}, top-p "
                f"{fe['top_p'] or s.top_p}; entropy of the same weights on those samples",
            )
        )
    pipe = "\\|"
    return ["| setting | value |", "| --- | --- |", *[f"| {a} | {b.replace('|', pipe)} |" for a, b in rows]]


def run_table(items: list[tuple[PlannedRun, dict[str, Any]]], kmax: int) -> list[str]:
    head = [
        "run",
        "seed",
        "steps",
        "samples",
        "syncs",
        "max lag",
        f"final pass@1 / pass@{kmax}",
        "token entropy (held-out)",
        "train reward (first → last 10%)",
        "seq entropy of pi_inf batch (first → last 10%)",
        "response tokens (first → last 10%)",
        "KL to pi_inf (mean / max)",
        "IS weight mean / p1 / p99",
        "clip frac",
        "minutes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run, s in items:
        fin = s.get("final") or {}
        wall = s.get("wall_s") or s.get("train_elapsed_s")
        cells = [
            run.label,
            str(run.seed),
            fmt(s.get("steps")),
            fmt(s.get("samples_seen")),
            fmt(s.get("syncs")),
            fmt(s.get("lag_max")),
            f"{fmt(fin.get('pass@1'))} / {fmt(fin.get(f'pass@{kmax}'))}" if fin else "–",
            fmt(fin.get("token_entropy")),
            f"{fmt(s.get('reward_mean_first'))} → {fmt(s.get('reward_mean_last'))}",
            f"{fmt(s.get('seq_entropy_first'), 2)} → {fmt(s.get('seq_entropy_last'), 2)}",
            f"{fmt(s.get('response_len_mean_first'), 1)} → {fmt(s.get('response_len_mean_last'), 1)}",
            f"{fmt(s.get('kl_mean'), 4)} / {fmt(s.get('kl_max'), 4)}",
            (
                f"{fmt(s.get('is_weight_mean_mean'))} / {fmt(s.get('is_weight_p1_mean'))} / "
                f"{fmt(s.get('is_weight_p99_mean'))}"
                if "is_weight_mean_mean" in s
                else "–"
            ),
            fmt(s.get("clip_frac_mean")),
            fmt(wall / 60, 1) if wall else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def config_table(configs: list[ConfigResults], ks: list[int], base: dict[str, Any] | None) -> list[str]:
    head = ["configuration", "seeds", *[f"pass@{k}" for k in ks], "token entropy", "seq entropy", "response tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    if base is not None:
        b = ConfigResults("base", "base model (before training)", "base", seeds=[0], results=[base])
        lines.append(
            "| "
            + " | ".join(
                [
                    b.label,
                    "–",
                    *[ci(b.over_seeds("pass@k", k)) for k in ks],
                    ci(b.over_seeds("token_entropy")),
                    ci(b.over_seeds("seq_entropy"), 2),
                    ci(b.over_seeds("response_tokens"), 1),
                ]
            )
            + " |"
        )
    for c in configs:
        lines.append(
            "| "
            + " | ".join(
                [
                    c.label,
                    str(len(c.seeds)),
                    *[ci(c.over_seeds("pass@k", k)) for k in ks],
                    ci(c.over_seeds("token_entropy")),
                    ci(c.over_seeds("seq_entropy"), 2),
                    ci(c.over_seeds("response_tokens"), 1),
                ]
            )
            + " |"
        )
    return lines


def iv_pts(iv: Interval) -> str:
    if not math.isfinite(iv.mean):
        return "–"
    if not math.isfinite(iv.lo):
        return f"{iv.mean * 100:+.1f}"
    return f"{iv.mean * 100:+.1f} ({iv.lo * 100:+.1f} to {iv.hi * 100:+.1f})"


def diff_table(
    pairs: list[tuple[str, ConfigResults, ConfigResults | dict[str, Any]]],
    ks: list[int],
    base: dict[str, Any] | None = None,
) -> list[str]:
    """Rows k, one column per pair: pass@k difference in points with its 95% interval; then the entropies."""
    head = ["k", *(["base model"] if base is not None else []), *[name for name, _, _ in pairs]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    b = ConfigResults("base", "base", "base", seeds=[0], results=[base]) if base is not None else None
    for k in ks:
        cells = [str(k), *([fmt(b.over_seeds("pass@k", k).mean)] if b is not None else [])]
        cells += [iv_pts(paired(x, y, "pass@k", k)[0]) for _, x, y in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    for metric, what in (("token_entropy", "token entropy (nats)"), ("seq_entropy", "seq entropy (nats)")):
        ivs = [paired(x, y, metric)[0] for _, x, y in pairs]
        if all(not math.isfinite(iv.mean) for iv in ivs):
            continue
        cells = [what, *([fmt(b.over_seeds(metric).mean)] if b is not None else [])]
        cells += [
            "–"
            if not math.isfinite(iv.mean)
            else f"{iv.mean:+.3f} ({iv.lo:+.3f} to {iv.hi:+.3f})"
            if math.isfinite(iv.lo)
            else f"{iv.mean:+.3f}"
            for iv in ivs
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def acted_table(grpos: list[ConfigResults], cc: CompareConfig) -> list[str]:
    head = [
        "GRPO+IS arm",
        "seeds",
        "max lag",
        "KL to the engine (mean)",
        "IS weight mean",
        "IS p1",
        "IS p99",
        "clip fraction",
        "IS acted",
        "clip acted",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for g in grpos:
        a = correction_acted(g, cc.claims.clip_acted, cc.claims.is_acted)

        def yn(v):
            return "not recorded" if v is None else "**yes**" if v else "no"

        lines.append(
            "| "
            + " | ".join(
                [
                    g.label,
                    str(len(g.seeds)),
                    fmt(a["lag_max"]),
                    fmt(a["kl"], 4),
                    fmt(a["is_mean"]),
                    fmt(a["is_p1"]),
                    fmt(a["is_p99"]),
                    fmt(a["clip_frac"]),
                    yn(a["is"]),
                    yn(a["clip"]),
                ]
            )
            + " |"
        )
    return lines
