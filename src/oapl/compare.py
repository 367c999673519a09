"""``oapl compare``: OAPL against GRPO+IS, and an OAPL policy-lag sweep, on one machine, one report.

The evidence behind OAPL's claims is comparative (arXiv 2602.19362): better held-out Pass@k than GRPO
with truncated importance sampling, sequence entropy kept rather than collapsed, stable training with
a large lag ``L`` between the trainer and the inference engine. This module reruns those comparisons
in miniature with the library's own training loop (:func:`oapl.loop.train`) and writes a Markdown
report with figures.

What is compared, and how it is kept fair:

* every run starts from the same ``base`` configuration (model, task, sampling, batch, optimiser,
  number of steps, seed), so all runs see the **same sample budget** (``steps x prompts_per_step x
  group_size`` responses consumed by the trainer) and the same held-out split;
* ``algorithms`` lists the runs of the head-to-head comparison, each a (nested) override of ``base``
  — by default OAPL at ``base.rollout.sync_interval`` and GRPO with token-level truncated IS and
  off-by-one asynchrony (``sync_interval=1``, ``max_staleness=1``, asynchronous worker);
* ``lag_sweep`` reruns OAPL with each sync interval ``L`` in ``intervals``. ``steps`` defaults to
  ``max(base.steps, min_syncs * max(L))`` so that the largest lag still sees ``min_syncs`` weight
  windows (the sync at the final step is the one ``oapl train`` always does). A sweep run whose
  configuration equals one of the algorithm runs is not trained twice.

Runs are resumable at run granularity: a run directory whose ``summary.yaml`` reports the requested
number of steps (and whose saved ``config.yaml`` equals the requested configuration) is reused, so
``oapl compare`` after an interruption continues with the missing runs; ``--force`` retrains.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from oapl.config import ConfigError, TrainConfig, Section, set_dotted, load_config, save_config

log = logging.getLogger(__name__)

__all__ = [
    "CompareConfig",
    "LagSweepConfig",
    "PlannedRun",
    "build_report",
    "plan_runs",
    "run_compare",
    "summarize_run",
]


def _default_algorithms() -> dict[str, dict[str, Any]]:
    return {
        "oapl": {"algorithm": {"name": "oapl"}},
        "grpo_is": {
            "algorithm": {"name": "grpo", "is_cap": 2.0, "clip_eps": 0.2},
            "rollout": {"sync_interval": 1, "max_staleness": 1, "asynchronous": True},
        },
    }


class LagSweepConfig(Section):
    enabled: bool = Field(True, description="Run the OAPL lag sweep.")
    intervals: list[int] = Field(default_factory=lambda: [1, 10, 50, 100],
                                 description="Sync intervals L (trainer steps between weight syncs).")
    steps: int | None = Field(None, ge=1, description="Steps of every sweep run (default: max(base.steps, "
                              "min_syncs * max(intervals))).")
    min_syncs: int = Field(2, ge=1, description="Weight windows the largest L must see when `steps` is unset.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Nested overrides of `base` for "
                                      "the sweep runs (algorithm.name is forced to oapl).")

    @field_validator("intervals")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(L < 1 for L in v):
            raise ValueError("lag_sweep.intervals must be a non-empty list of integers >= 1")
        return sorted(dict.fromkeys(v))


class CompareConfig(Section):
    """An ``oapl compare`` study."""

    output_dir: str = Field("runs/compare", description="One sub-directory per run (config, metrics, summary).")
    report: str | None = Field(None, description="Markdown report path (default: OUTPUT_DIR/report.md).")
    figures_dir: str | None = Field(None, description="Where the PNGs go (default: next to the report).")
    figure_prefix: str = Field("compare", description="PNG file-name prefix.")
    title: str = Field("OAPL vs GRPO+IS, and an OAPL lag sweep", description="Report title.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="Run every configuration once per seed.")
    smooth: int = Field(10, ge=1, description="Rolling-mean window (steps) of per-step curves in the figures.")
    share_start_eval: bool = Field(True, description="Evaluate the initial weights once per seed and copy that "
                                   "step-0 row into the other runs (same weights, task, eval settings and "
                                   "engine seed give the same samples).")
    base: dict[str, Any] = Field(default_factory=dict, description="The shared `oapl train` configuration.")
    algorithms: dict[str, dict[str, Any]] = Field(default_factory=_default_algorithms,
                                                  description="Head-to-head runs: name -> nested overrides of base.")
    lag_sweep: LagSweepConfig = Field(default_factory=LagSweepConfig)
    notes: str | None = Field(None, description="Free text copied into the report.")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must not be empty")
        return list(dict.fromkeys(v))

    def report_path(self) -> Path:
        return Path(self.report) if self.report else Path(self.output_dir) / "report.md"

    def figures_path(self) -> Path:
        return Path(self.figures_dir) if self.figures_dir else self.report_path().parent


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; keys may be nested dicts or dotted strings."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if "." in key:
            set_dotted(out, key, copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class PlannedRun:
    """One training run of the study."""

    name: str  # e.g. "oapl", "grpo_is", "oapl_L10"
    group: str  # "algorithms" or "lag_sweep"
    seed: int
    cfg: TrainConfig
    label: str = ""
    lag: int | None = None
    same_as: str | None = None  # a sweep point that reuses an algorithm run
    run_dir: Path = field(default_factory=Path)

    @property
    def key(self) -> str:
        return f"{self.name}/seed{self.seed}"


def _train_config(tree: dict[str, Any], where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except Exception as e:  # pydantic.ValidationError: name the run
        raise ConfigError(f"{where}: {e}") from None


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    d.pop("output_dir", None)
    d.get("logging", {}).pop("progress", None)
    d.get("eval", {}).pop("at_start", None)  # may be switched off by share_start_eval
    return d


def _start_eval_key(cfg: TrainConfig) -> str:
    """What the step-0 held-out evaluation depends on."""
    d = cfg.model_dump(mode="json")
    return json.dumps({k: d[k] for k in ("seed", "model", "task", "eval", "engine")}, sort_keys=True)


def _start_eval_row(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step") == 0 and "eval/pass@1" in row:
            return row
    return None


def plan_runs(cc: CompareConfig, only: str = "all") -> list[PlannedRun]:
    """The runs of the study, in execution order (algorithms first, then the lag sweep)."""
    if only not in ("all", "algorithms", "lag"):
        raise ValueError(f"only must be all, algorithms or lag; got {only!r}")
    out_root = Path(cc.output_dir)
    base = copy.deepcopy(cc.base)
    base_cfg = _train_config(_deep_merge(base, {"output_dir": str(out_root / "_base")}), "base")
    runs: list[PlannedRun] = []
    for seed in cc.seeds:
        algo_runs: list[PlannedRun] = []
        for name, over in cc.algorithms.items():
            if "/" in name or not name:
                raise ConfigError(f"algorithms: bad run name {name!r}")
            run_dir = out_root / f"{name}" / f"seed{seed}"
            tree = _deep_merge(base, over)
            tree = _deep_merge(tree, {"seed": seed, "output_dir": str(run_dir)})
            cfg = _train_config(tree, f"algorithms.{name}")
            label = _algo_label(name, cfg)
            algo_runs.append(PlannedRun(name, "algorithms", seed, cfg, label, cfg.rollout.sync_interval,
                                        run_dir=run_dir))
        if only in ("all", "algorithms"):
            runs.extend(algo_runs)
        if cc.lag_sweep.enabled and only in ("all", "lag"):
            sweep_steps = cc.lag_sweep.steps or max(base_cfg.steps, cc.lag_sweep.min_syncs * max(cc.lag_sweep.intervals))
            for L in cc.lag_sweep.intervals:
                name = f"oapl_L{L}"
                run_dir = out_root / name / f"seed{seed}"
                tree = _deep_merge(base, cc.lag_sweep.overrides)
                tree = _deep_merge(tree, {"seed": seed, "steps": sweep_steps, "output_dir": str(run_dir),
                                          "algorithm": {"name": "oapl"},
                                          "rollout": {"sync_interval": L, "max_staleness": 0}})
                cfg = _train_config(tree, f"lag_sweep (L={L})")
                same = next((r for r in algo_runs if _comparable(r.cfg) == _comparable(cfg)), None)
                if same is not None:
                    runs.append(PlannedRun(name, "lag_sweep", seed, same.cfg, f"OAPL L={L}", L,
                                           same_as=same.name, run_dir=same.run_dir))
                else:
                    runs.append(PlannedRun(name, "lag_sweep", seed, cfg, f"OAPL L={L}", L, run_dir=run_dir))
    return runs


def _algo_label(name: str, cfg: TrainConfig) -> str:
    a, r = cfg.algorithm, cfg.rollout
    if a.name == "oapl":
        return f"OAPL (L={r.sync_interval})"
    corr = f"IS cap {a.is_cap:g}" if a.is_cap is not None else "no IS"
    asyn = ", off-by-one async" if (r.asynchronous and r.max_staleness >= 1) else ""
    return f"GRPO ({corr}, L={r.sync_interval}{asyn})"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _completed(run: PlannedRun) -> bool:
    summary = run.run_dir / "summary.yaml"
    saved = run.run_dir / "config.yaml"
    if not (summary.exists() and saved.exists() and (run.run_dir / "metrics.jsonl").exists()):
        return False
    try:
        s = yaml.safe_load(summary.read_text()) or {}
        prev = TrainConfig.model_validate(yaml.safe_load(saved.read_text()))
    except Exception:
        return False
    return int(s.get("steps", -1)) == run.cfg.steps and _comparable(prev) == _comparable(run.cfg)


def _write_timing(run_dir: Path, seconds: float) -> None:
    (run_dir / "compare_timing.json").write_text(json.dumps({"wall_seconds": seconds}))


def run_compare(cc: CompareConfig, only: str = "all", force: bool = False, report_only: bool = False,
                command: str | None = None) -> Path:
    """Train every planned run that is not complete yet, then write the report; returns its path."""
    from oapl.loop import train

    runs = plan_runs(cc, only)
    Path(cc.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cc, Path(cc.output_dir) / "compare.yaml")
    if not report_only:
        done: set[str] = set()
        start_rows: dict[str, dict[str, Any]] = {}
        todo = [r for r in runs if r.same_as is None]
        for i, run in enumerate(todo, 1):
            if str(run.run_dir) in done:
                continue
            key = _start_eval_key(run.cfg)
            if not force and _completed(run):
                log.info("[%d/%d] %s: complete, reused (%s)", i, len(todo), run.key, run.run_dir)
                done.add(str(run.run_dir))
                row = _start_eval_row(run.run_dir)
                if row is not None:
                    start_rows.setdefault(key, row)
                continue
            cfg = run.cfg
            shared = cc.share_start_eval and cfg.eval.at_start and key in start_rows
            if shared:
                cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"at_start": False})})
            log.info("[%d/%d] %s: training %d steps -> %s%s", i, len(todo), run.key, cfg.steps, run.run_dir,
                     " (step-0 evaluation shared)" if shared else "")
            t0 = time.perf_counter()
            train(cfg, overwrite=True)  # an incomplete (or --force) run is redone from scratch
            _write_timing(run.run_dir, time.perf_counter() - t0)
            metrics = run.run_dir / "metrics.jsonl"
            if shared:
                row = dict(start_rows[key], shared_from=start_rows[key].get("shared_from", "first run"))
                metrics.write_text(json.dumps(row) + "\n" + metrics.read_text())
            else:
                row = _start_eval_row(run.run_dir)
                if row is not None:
                    start_rows.setdefault(key, dict(row, shared_from=str(run.run_dir)))
            done.add(str(run.run_dir))
    return build_report(cc, runs, command=command)


# --------------------------------------------------------------------------------------------
# Summaries and the report
# --------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _tail(rows: list[dict[str, Any]], frac: float = 0.1) -> list[dict[str, Any]]:
    return rows[-max(1, int(round(len(rows) * frac))):] if rows else []


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
    out: dict[str, Any] = {"steps": len(train_rows), "k_max": kmax,
                           "samples_seen": train_rows[-1]["samples_seen"] if train_rows else 0}
    if eval_rows:
        first, last = eval_rows[0], eval_rows[-1]
        out["eval_steps"] = [r["step"] for r in eval_rows]
        out["pass1_before"], out["pass1_after"] = first.get("eval/pass@1"), last.get("eval/pass@1")
        out["passk_before"], out["passk_after"] = first.get(f"eval/pass@{kmax}"), last.get(f"eval/pass@{kmax}")
        out["pass1_best"] = max(r.get("eval/pass@1", -1.0) for r in eval_rows)
    for key in ("reward_mean", "seq_entropy", "entropy", "kl", "is_weight_mean", "clip_frac",
                "response_len_mean", "logprob_absdiff_mean"):
        vals = [r.get(key) for r in train_rows if r.get(key) is not None]
        if not vals:
            continue
        out[f"{key}_first"] = _mean([r.get(key) for r in _head(train_rows) if r.get(key) is not None])
        out[f"{key}_last"] = _mean([r.get(key) for r in _tail(train_rows) if r.get(key) is not None])
        out[f"{key}_mean"] = _mean(vals)
        out[f"{key}_max"] = max(v for v in vals if math.isfinite(v)) if any(math.isfinite(v) for v in vals) else math.nan
    lags = [r.get("lag") for r in train_rows if r.get("lag") is not None]
    out["lag_max"] = max(lags) if lags else None
    out["syncs"] = sum(1 for r in train_rows if "synced_to_version" in r)
    out["skipped_steps"] = int(sum(r.get("skipped", 0.0) or 0.0 for r in train_rows))
    out["stale_dropped"] = train_rows[-1].get("stale_dropped", 0) if train_rows else 0
    out["train_elapsed_s"] = train_rows[-1].get("elapsed_s") if train_rows else None
    timing = run_dir / "compare_timing.json"
    if timing.exists():
        out["wall_s"] = json.loads(timing.read_text()).get("wall_seconds")
    return out


def _smoothed_metrics(src: Path, dst: Path, window: int) -> Path:
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


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_change(a: Any, b: Any) -> str:
    if a is None or b is None:
        return "–"
    return f"{_fmt(a)} → {_fmt(b)} ({(b - a) * 100:+.1f} pts)"


def _machine() -> str:
    import torch

    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    try:
        load = ", load average at report time {:.1f}".format(os.getloadavg()[0])
    except OSError:
        load = ""
    return (f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}){load}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def _setup_table(cfg: TrainConfig) -> list[str]:
    s, r, o, m, e = cfg.sampling, cfg.rollout, cfg.optim, cfg.model, cfg.eval
    lora = (f"LoRA r={m.lora.r}, alpha={m.lora.alpha} on `{m.lora.target_modules}`" if m.lora.enabled
            else "all weights")
    rows = [
        ("model", f"`{m.name}` ({lora}, weights {m.param_dtype}, compute {m.compute_dtype})"),
        ("task", f"`{cfg.task.name}` (max operand {cfg.task.max_operand}, ops {''.join(cfg.task.operations)}, "
                 f"{cfg.task.num_eval} fixed held-out prompts)" if cfg.task.name == "arithmetic" else f"`{cfg.task.name}`"),
        ("batch", f"{r.prompts_per_step} prompts x G={r.group_size} = {r.prompts_per_step * r.group_size} "
                  f"responses per trainer step"),
        ("sampling", f"temperature {s.temperature}, top-p {s.top_p}, max {s.max_tokens} tokens"),
        ("optimiser", f"AdamW lr {o.lr:g}, betas {tuple(o.betas)}, grad-norm clip {o.max_grad_norm}, "
                      f"{o.schedule} schedule"),
        ("OAPL", f"beta1 {cfg.algorithm.beta1:g}, beta2 {cfg.algorithm.beta2:g}, log pi_inf from "
                 f"`{cfg.algorithm.reference_logprobs}`"),
        ("held-out eval", f"every {e.every or '—'} steps, n={e.n} samples per prompt at temperature "
                          f"{e.temperature}, top-p {e.top_p}"),
        ("engine", f"`{cfg.engine.kind}`; threads {cfg.threads}"),
    ]
    pipe = "\\|"  # a literal pipe inside a Markdown table cell (also inside code spans)
    return ["| setting | value |", "| --- | --- |", *[f"| {a} | {b.replace('|', pipe)} |" for a, b in rows]]


def _run_table(items: list[tuple[PlannedRun, dict[str, Any]]], kmax: int, sweep: bool) -> list[str]:
    head = ["run", "seed", "steps", "samples", "syncs", "max lag", "held-out pass@1 (start → end)",
            f"held-out pass@{kmax} (start → end)", "best pass@1", "train reward (first → last 10%)",
            "seq entropy (first → last 10%)", "token entropy (first → last 10%)",
            "response tokens (first → last 10%)", "KL to pi_inf (mean / max)", "minutes"]
    if not sweep:
        head.insert(-1, "IS weight / clip frac")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run, s in items:
        cells = [run.label, str(run.seed), _fmt(s.get("steps")), _fmt(s.get("samples_seen")), _fmt(s.get("syncs")),
                 _fmt(s.get("lag_max")),
                 _fmt_change(s.get("pass1_before"), s.get("pass1_after")),
                 _fmt_change(s.get("passk_before"), s.get("passk_after")),
                 _fmt(s.get("pass1_best")),
                 f"{_fmt(s.get('reward_mean_first'))} → {_fmt(s.get('reward_mean_last'))}",
                 f"{_fmt(s.get('seq_entropy_first'), 2)} → {_fmt(s.get('seq_entropy_last'), 2)}",
                 f"{_fmt(s.get('entropy_first'))} → {_fmt(s.get('entropy_last'))}",
                 f"{_fmt(s.get('response_len_mean_first'), 1)} → {_fmt(s.get('response_len_mean_last'), 1)}",
                 f"{_fmt(s.get('kl_mean'), 4)} / {_fmt(s.get('kl_max'), 4)}"]
        if not sweep:
            cells.append(f"{_fmt(s.get('is_weight_mean_mean'))} / {_fmt(s.get('clip_frac_mean'))}"
                         if "is_weight_mean_mean" in s else "–")
        wall = s.get("wall_s") or s.get("train_elapsed_s")
        cells.append(_fmt(wall / 60, 1) if wall else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot(cc: CompareConfig, items: list[tuple[PlannedRun, dict[str, Any]]], out_png: Path, kmax: int,
          title: str, extra_keys: tuple[str, ...] = ()) -> Path:
    from oapl.evaluation.plots import plot_training

    smooth_dir = Path(cc.output_dir) / "_curves"
    files: dict[str, str] = {}
    multi_seed = len(cc.seeds) > 1
    for run, _ in items:
        label = run.label + (f" s{run.seed}" if multi_seed else "")
        dst = smooth_dir / run.name / f"seed{run.seed}.jsonl"
        files[label] = str(_smoothed_metrics(run.run_dir / "metrics.jsonl", dst, cc.smooth))
    keys = ["eval/pass@1"] + ([f"eval/pass@{kmax}"] if kmax > 1 else []) + [
        "reward_mean", "seq_entropy", "entropy", "kl", *extra_keys]
    return plot_training(files, out_png, keys=keys, x="samples_seen",
                         title=f"{title} (x = responses consumed; per-step curves: rolling mean of {cc.smooth})")


def build_report(cc: CompareConfig, runs: list[PlannedRun] | None = None, command: str | None = None) -> Path:
    """Write the Markdown report and its PNGs from the run directories; returns the report path."""
    runs = runs if runs is not None else plan_runs(cc)
    report = cc.report_path()
    figdir = cc.figures_path()
    figdir.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    present = [(r, summarize_run(r.run_dir)) for r in runs if (r.run_dir / "metrics.jsonl").exists()]
    missing = [r for r in runs if not (r.run_dir / "metrics.jsonl").exists()]
    algos = [(r, s) for r, s in present if r.group == "algorithms"]
    sweep = [(r, s) for r, s in present if r.group == "lag_sweep"]
    kmax = max([s.get("k_max", 1) for _, s in present] or [1])

    def rel(p: Path) -> str:
        return os.path.relpath(p, report.parent)

    lines = [f"# {cc.title}", ""]
    lines += ["Generated by `oapl compare` (`oapl.compare`). Re-create it with:", "", "```bash",
              command or "oapl compare <config.yaml>", "```", ""]
    lines += [f"Machine: {_machine()}.", ""]
    if cc.notes:
        lines += [cc.notes.strip(), ""]
    ref = (algos or sweep or [(None, None)])[0][0]
    if ref is not None:
        lines += ["## Setup (shared by every run)", "", *_setup_table(ref.cfg), ""]
        lines += [f"Seeds: {', '.join(map(str, cc.seeds))}. All runs of a group train for the same number of "
                  f"steps on the same batch shape, so they consume the same number of responses "
                  f"(\"samples\"); the held-out split is fixed. \"KL to pi_inf\" is the per-token k3 estimate "
                  f"of KL(pi_inf || pi) on the training batch; \"seq entropy\" is the Monte-Carlo sequence "
                  f"entropy of pi_inf, E[-log pi_inf(y)] over the batch's responses (nats; it grows with response "
                  f"length), \"token entropy\" the trainer's mean per-token entropy on the batch (nats).", ""]
    if algos:
        png = _plot(cc, algos, figdir / f"{cc.figure_prefix}_algorithms.png", kmax, "OAPL vs GRPO+IS")
        lines += ["## OAPL vs GRPO with importance sampling", "",
                  f"![OAPL vs GRPO+IS]({rel(png)})", "", *_run_table(algos, kmax, sweep=False), ""]
        for r, _ in algos:
            a, ro = r.cfg.algorithm, r.cfg.rollout
            if a.name == "grpo":
                lines.append(f"- {r.label}: group-normalised advantages, PPO clip {a.clip_eps}, per-sequence "
                             f"length normalisation, token-level truncated IS weight min(pi_old/pi_inf, "
                             f"{a.is_cap}); weight sync every {ro.sync_interval} step(s), "
                             f"max_staleness={ro.max_staleness}, asynchronous={ro.asynchronous}.")
            else:
                lines.append(f"- {r.label}: Eq. 3 squared regression against pi_inf, buffer cleared at every "
                             f"sync (one weight version per batch), asynchronous={ro.asynchronous}.")
        lines += ["", *_comparison_sentences(algos, kmax), ""]
    if sweep:
        png = _plot(cc, sweep, figdir / f"{cc.figure_prefix}_lag_sweep.png", kmax, "OAPL lag sweep",
                    extra_keys=("lag",))
        steps = sweep[0][0].cfg.steps
        lines += ["## OAPL policy-lag sweep", "",
                  f"OAPL with sync interval L in {{{', '.join(str(r.lag) for r, _ in sweep)}}}, {steps} "
                  f"trainer steps each (the engine's weights are refreshed every L steps and once more at the "
                  f"end; `syncs` counts the mid-run ones).", "",
                  f"![OAPL lag sweep]({rel(png)})", "", *_run_table(sweep, kmax, sweep=True), ""]
        reused = [r for r, _ in sweep if r.same_as]
        if reused:
            lines += ["Reused from the comparison above (identical configuration): " +
                      ", ".join(f"{r.label} = `{r.same_as}`" for r in reused) + ".", ""]
    if missing:
        lines += ["## Not run", "", *[f"- {r.label} (seed {r.seed}): no metrics at `{r.run_dir}`" for r in missing], ""]
    lines += ["## Files", "", f"Run directories (config, `metrics.jsonl`, summary, checkpoints): `{cc.output_dir}/`.",
              ""]
    report.write_text("\n".join(lines))
    log.info("report written: %s", report)
    return report


def _comparison_sentences(algos: list[tuple[PlannedRun, dict[str, Any]]], kmax: int) -> list[str]:
    """Neutral read-outs: which run ends higher on each headline number (no claims beyond the table)."""
    oapl = [(r, s) for r, s in algos if r.cfg.algorithm.name == "oapl"]
    grpo = [(r, s) for r, s in algos if r.cfg.algorithm.name == "grpo"]
    if not oapl or not grpo:
        return []
    out = ["Read-out (final held-out evaluation; one line per OAPL/GRPO pair and seed):", ""]
    for ro, so in oapl:
        for rg, sg in grpo:
            if ro.seed != rg.seed:
                continue
            parts = []
            for key, name in (("pass1_after", "pass@1"), ("passk_after", f"pass@{kmax}"),
                              ("seq_entropy_last", "sequence entropy (last 10%)")):
                a, b = so.get(key), sg.get(key)
                if a is None or b is None:
                    continue
                parts.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
            out.append(f"- seed {ro.seed}: {ro.label} vs {rg.label}: " + "; ".join(parts) + ".")
    return out


def load_compare_config(path: str | None, overrides: list[str] | None = None) -> CompareConfig:
    return load_config(path, overrides, cls=CompareConfig)


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "oapl " + " ".join(shlex.quote(a) for a in args)
