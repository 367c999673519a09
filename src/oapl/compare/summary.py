"""One run's headline numbers, read from its ``metrics.jsonl`` (training curves, in-run evaluations)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["smoothed_metrics", "summarize_run"]


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _tail(rows: list[dict[str, Any]], frac: float = 0.1) -> list[dict[str, Any]]:
    return rows[-max(1, int(round(len(rows) * frac))) :] if rows else []


def _head(rows: list[dict[str, Any]], frac: float = 0.1) -> list[dict[str, Any]]:
    return rows[: max(1, int(round(len(rows) * frac)))] if rows else []


def summarize_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Headline numbers of one run from its ``metrics.jsonl`` (and ``summary.yaml`` when present)."""
    from oapl.evaluation.plots import load_metrics

    run_dir = Path(run_dir)
    rows = load_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/pass@1" in r]
    ks = sorted({int(k.split("@", 1)[1]) for r in eval_rows for k in r if k.startswith("eval/pass@")})
    kmax = ks[-1] if ks else 1
    out: dict[str, Any] = {
        "steps": len(train_rows),
        "k_max": kmax,
        "samples_seen": train_rows[-1]["samples_seen"] if train_rows else 0,
    }
    if eval_rows:
        first, last = eval_rows[0], eval_rows[-1]
        out["eval_steps"] = [r["step"] for r in eval_rows]
        out["pass1_before"], out["pass1_after"] = first.get("eval/pass@1"), last.get("eval/pass@1")
        out["passk_before"], out["passk_after"] = first.get(f"eval/pass@{kmax}"), last.get(f"eval/pass@{kmax}")
        out["pass1_best"] = max(r.get("eval/pass@1", -1.0) for r in eval_rows)
    for key in (
        "reward_mean",
        "seq_entropy",
        "entropy",
        "kl",
        "is_weight_mean",
        "is_weight_p1",
        "is_weight_p99",
        "clip_frac",
        "response_len_mean",
        "logprob_absdiff_mean",
    ):
        vals: list[float] = [v for r in train_rows if (v := r.get(key)) is not None]
        if not vals:
            continue
        out[f"{key}_first"] = _mean([v for r in _head(train_rows) if (v := r.get(key)) is not None])
        out[f"{key}_last"] = _mean([v for r in _tail(train_rows) if (v := r.get(key)) is not None])
        out[f"{key}_mean"] = _mean(vals)
        out[f"{key}_max"] = (
            max(v for v in vals if math.isfinite(v)) if any(math.isfinite(v) for v in vals) else math.nan
        )
    lags: list[int] = [lag for r in train_rows if (lag := r.get("lag")) is not None]
    out["lag_max"] = max(lags) if lags else None
    out["syncs"] = sum(1 for r in train_rows if "synced_to_version" in r)
    out["skipped_steps"] = int(sum(r.get("skipped", 0.0) or 0.0 for r in train_rows))
    out["stale_dropped"] = train_rows[-1].get("stale_dropped", 0) if train_rows else 0
    out["train_elapsed_s"] = train_rows[-1].get("elapsed_s") if train_rows else None
    timing = run_dir / "compare_timing.json"
    if timing.exists():
        out["wall_s"] = json.loads(timing.read_text()).get("wall_seconds")
    return out


def smoothed_metrics(src: Path, dst: Path, window: int) -> Path:
    """A copy of ``metrics.jsonl`` whose per-step keys are rolling means over ``window`` steps."""
    from oapl.evaluation.plots import load_metrics

    rows = load_metrics(src)
    keys = ("reward_mean", "seq_entropy", "entropy", "kl", "response_len_mean", "is_weight_mean", "clip_frac")
    hist: dict[str, list[float]] = {k: [] for k in keys}
    out = []
    for r in rows:
        r = dict(r)
        if "loss" in r:
            for k in keys:
                v = r.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    hist[k].append(float(v))
                    r[k] = _mean(hist[k][-window:])
        out.append(r)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r) + "\n" for r in out))
    return dst
