"""The study's configuration and its runs: who is trained, with what, on which seed."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from oapl.config import ConfigError, Section, TrainConfig, load_config
from oapl.config_views import set_dotted

__all__ = [
    "Beta2SweepConfig",
    "ClaimsConfig",
    "CompareConfig",
    "FinalEvalConfig",
    "LagSweepConfig",
    "PlannedRun",
    "base_eval_dir",
    "eval_seed",
    "final_eval_settings",
    "load_compare_config",
    "plan_runs",
]


def _default_algorithms() -> dict[str, dict[str, Any] | None]:
    return {
        "oapl": {"algorithm": {"name": "oapl"}},
        "grpo_is": {
            "algorithm": {"name": "grpo", "is_cap": 2.0, "clip_eps": 0.2, "mini_batches": 2},
            "rollout": {"sync_interval": 1, "max_staleness": 1, "asynchronous": True},
        },
    }


class LagSweepConfig(Section):
    enabled: bool = Field(True, description="Run the OAPL lag sweep.")
    intervals: list[int] = Field(
        default_factory=lambda: [1, 10, 50, 100], description="Sync intervals L (trainer steps between weight syncs)."
    )
    steps: int | None = Field(
        None, ge=1, description="Steps of every sweep run (default: max(base.steps, min_syncs * max(intervals)))."
    )
    min_syncs: int = Field(2, ge=1, description="Weight windows the largest L must see when `steps` is unset.")
    seeds: list[int] | None = Field(
        None,
        description="Seeds of the sweep (default: the study's `seeds`). A "
        "subset of them shares its L that equals an algorithm run's with that run; "
        "fewer seeds make the sweep cheaper and its claim looser.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Nested overrides of `base` for the sweep runs (algorithm.name is forced to oapl).",
    )

    @field_validator("intervals")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(L < 1 for L in v):
            raise ValueError("lag_sweep.intervals must be a non-empty list of integers >= 1")
        return sorted(dict.fromkeys(v))


class Beta2SweepConfig(Section):
    enabled: bool = Field(False, description="Run OAPL once per beta2 value (how the study's beta2 was chosen).")
    values: list[float] = Field(
        default_factory=lambda: [0.005, 0.02, 0.05, 0.2], description="beta2 values (OAPL's KL weight)."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [100],
        description="Seeds of the sweep runs (kept apart "
        "from the study's seeds, so the choice is not made on the runs it is judged by).",
    )
    steps: int | None = Field(None, ge=1, description="Steps of every sweep run (default: base.steps).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Nested overrides of `base` for the sweep runs (algorithm.name is forced to oapl).",
    )
    note: str | None = Field(
        None,
        description="How the study's beta2 relates to this sweep (fixed beforehand, "
        "or chosen by a stated rule on the sweep's seeds); printed in the report.",
    )

    @field_validator("values")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("beta2_sweep.values must be a non-empty list of numbers > 0")
        return sorted(dict.fromkeys(v))


class FinalEvalConfig(Section):
    enabled: bool = Field(
        True,
        description="Evaluate every run's final weights (and the base model once) on the "
        "held-out split, kept per prompt: Pass@k for k = 1..n, the trained policy's entropy, "
        "paired intervals in the report.",
    )
    n: int = Field(16, ge=1, description="Samples per held-out prompt.")
    max_prompts: int | None = Field(
        None, ge=1, description="First N held-out prompts (default: all of task.num_eval / the eval dataset)."
    )
    temperature: float | None = Field(
        None, gt=0, description="Default: base.sampling.temperature (the training distribution)."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Default: base.sampling.top_p.")
    entropy: bool = Field(
        True,
        description="Score the samples with the same weights: token and sequence "
        "entropy of the trained policy on held-out prompts.",
    )
    entropy_samples: int | None = Field(
        4, ge=1, description="Responses per prompt whose entropy is scored (null = all n)."
    )
    engine: Literal["auto", "vllm", "transformers"] | None = Field(
        None,
        description="Engine that samples the final evaluations (default: base.engine.kind); vllm is much "
        "faster for n x prompts samples and gets an export of each run's final weights.",
    )
    batch_prompts: int = Field(32, ge=1, description="Prompts per generate call.")


class ClaimsConfig(Section):
    """The verdict thresholds, declared with the study before it runs (docs/compare.md, "Verdict rules")."""

    non_inferiority_margin: float | None = Field(
        None,
        gt=0,
        description="Declare the claim 'OAPL's pass@1 is at most this much below GRPO+IS's' "
        "(0.03 = 3 points); null = no non-inferiority claim. Declared before the study, never chosen after.",
    )
    keeps_entropy: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="An arm 'keeps the entropy' when its token (and "
        "sequence) entropy falls by less than this fraction of the base model's (its "
        "95% interval's lower bound above -keeps_entropy x base); 'reduces' it when "
        "the upper bound is below that.",
    )
    clip_acted: float = Field(
        0.001,
        gt=0,
        description="GRPO's PPO clip acted in an arm when its clip fraction (mean over steps and seeds) exceeds this.",
    )
    is_acted: float = Field(
        0.02,
        gt=0,
        description="GRPO's importance weight acted in an arm when its p1 or "
        "p99 over tokens (mean over steps and seeds) is more than this away from 1, or its "
        "mean is.",
    )


class CompareConfig(Section):
    """An ``oapl compare`` study."""

    output_dir: str = Field("runs/compare", description="One sub-directory per run (config, metrics, summary).")
    report: str | None = Field(None, description="Markdown report path (default: OUTPUT_DIR/report.md).")
    figures_dir: str | None = Field(None, description="Where the PNGs go (default: next to the report).")
    figure_prefix: str = Field("compare", description="PNG file-name prefix.")
    title: str = Field("OAPL vs GRPO+IS, and an OAPL lag sweep", description="Report title.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Run every configuration once per seed.")
    smooth: int = Field(10, ge=1, description="Rolling-mean window (steps) of per-step curves in the figures.")
    share_start_eval: bool = Field(
        True,
        description="Evaluate the initial weights once per seed and copy that "
        "step-0 row into the other runs (same weights, task, eval settings and "
        "engine seed give the same samples).",
    )
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="Checkpoint every run about this often (rounded up to a "
        "multiple of its L, so a resumed run continues bit-exactly at a sync); an "
        "interrupted study resumes every run from its latest checkpoint. 0 = only at "
        "the end.",
    )
    base: dict[str, Any] = Field(default_factory=dict, description="The shared `oapl train` configuration.")
    algorithms: dict[str, dict[str, Any] | None] = Field(
        default_factory=_default_algorithms,
        description="Head-to-head runs: name -> nested overrides of base "
        "(null leaves the run out, e.g. in the `quick` section).",
    )
    lag_sweep: LagSweepConfig = Field(default_factory=LagSweepConfig)
    beta2_sweep: Beta2SweepConfig = Field(default_factory=Beta2SweepConfig)
    final_eval: FinalEvalConfig = Field(default_factory=FinalEvalConfig)
    margin: float = Field(
        0.05,
        gt=0,
        description="The smallest advantage that matters (0.05 = 5 points of "
        "pass@k): a claimed advantage whose 95% interval's upper bound is below it is not "
        "reproduced; the report says how many seeds would narrow an interval to it.",
    )
    claims: ClaimsConfig = Field(default_factory=ClaimsConfig)
    quick: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of this study applied by `oapl compare --quick` (fewer seeds, steps, prompts).",
    )
    notes: str | None = Field(None, description="Free text copied into the report.")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must not be empty")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _lag_seeds(self) -> CompareConfig:
        extra = [s for s in (self.lag_sweep.seeds or []) if s not in self.seeds]
        if self.lag_sweep.seeds is not None and (not self.lag_sweep.seeds or extra):
            raise ValueError(
                f"lag_sweep.seeds must be a non-empty subset of seeds {self.seeds}; "
                f"{'not in seeds: ' + str(extra) if extra else 'got []'}"
            )
        return self

    def report_path(self) -> Path:
        return Path(self.report) if self.report else Path(self.output_dir) / "report.md"

    def figures_path(self) -> Path:
        return Path(self.figures_dir) if self.figures_dir else self.report_path().parent


def load_compare_config(path: str | None, overrides: list[str] | None = None, quick: bool = False) -> CompareConfig:
    """The study of ``path`` with ``key=value`` overrides; ``quick`` then applies its ``quick`` section."""
    cc = load_config(path, overrides, cls=CompareConfig)
    if not quick:
        return cc
    if not cc.quick:
        raise ConfigError("--quick: the study has no `quick` section (overrides of the study for a short version)")
    tree = _deep_merge(cc.model_dump(mode="json"), cc.quick)
    tree["quick"] = {}
    try:
        return CompareConfig.model_validate(tree)
    except Exception as e:  # pydantic.ValidationError: say where it came from
        raise ConfigError(f"quick: {e}") from None


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

    name: str  # e.g. "oapl", "grpo_is", "oapl_L10", "oapl_b2_0.05"
    group: str  # "algorithms", "lag_sweep" or "beta2_sweep"
    seed: int
    cfg: TrainConfig
    label: str = ""
    lag: int | None = None
    same_as: str | None = None  # a sweep point that reuses an algorithm run
    run_dir: Path = field(default_factory=Path)
    beta2: float | None = None

    @property
    def key(self) -> str:
        return f"{self.name}/seed{self.seed}"


def _train_config(tree: dict[str, Any], where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except Exception as e:  # pydantic.ValidationError: name the run
        raise ConfigError(f"{where}: {e}") from None


def comparable(cfg: TrainConfig) -> dict[str, Any]:
    """What makes two runs the same run (the output folder and display settings aside)."""
    d = cfg.model_dump(mode="json")
    d.pop("output_dir", None)
    d.get("logging", {}).pop("progress", None)
    d.get("eval", {}).pop("at_start", None)  # may be switched off by share_start_eval
    return d


def start_eval_key(cfg: TrainConfig) -> str:
    """What the step-0 held-out evaluation depends on."""
    d = cfg.model_dump(mode="json")
    return json.dumps({k: d[k] for k in ("seed", "model", "task", "eval", "engine")}, sort_keys=True)


def _with_study_settings(cc: CompareConfig, tree: dict[str, Any], lag: int) -> dict[str, Any]:
    """Checkpoints at sync boundaries (resumable), and a final checkpoint for the final evaluation."""
    ckpt = dict(tree.get("checkpoint") or {})
    if cc.checkpoint_every:
        ckpt["every"] = lag * -(-cc.checkpoint_every // lag)
        ckpt.setdefault("keep", 1)
    if cc.final_eval.enabled:
        ckpt["save_final"] = True
    return _deep_merge(tree, {"checkpoint": ckpt})


def plan_runs(cc: CompareConfig, only: str = "all") -> list[PlannedRun]:
    """The runs of the study, in execution order: per seed the algorithms, then the lag sweep; then
    the beta2 sweep."""
    if only not in ("all", "algorithms", "lag", "beta2"):
        raise ValueError(f"only must be all, algorithms, lag or beta2; got {only!r}")
    out_root = Path(cc.output_dir)
    base = copy.deepcopy(cc.base)
    base_cfg = _train_config(_deep_merge(base, {"output_dir": str(out_root / "_base")}), "base")
    runs: list[PlannedRun] = []
    for seed in cc.seeds:
        algo_runs = _algorithm_runs(cc, base, seed)
        if only in ("all", "algorithms"):
            runs.extend(algo_runs)
        lag_seeds = cc.seeds if cc.lag_sweep.seeds is None else cc.lag_sweep.seeds
        if cc.lag_sweep.enabled and only in ("all", "lag") and seed in lag_seeds:
            runs.extend(_lag_sweep_runs(cc, base, base_cfg, seed, algo_runs))
    if cc.beta2_sweep.enabled and only in ("all", "beta2"):
        runs.extend(_beta2_sweep_runs(cc, base, base_cfg))
    return runs


def _algorithm_runs(cc: CompareConfig, base: dict[str, Any], seed: int) -> list[PlannedRun]:
    """The head-to-head runs of one seed (planned whatever ``only`` says: the lag sweep reuses them)."""
    algo_runs: list[PlannedRun] = []
    for name, over in cc.algorithms.items():
        if over is None:  # left out (e.g. by the quick section)
            continue
        if "/" in name or not name:
            raise ConfigError(f"algorithms: bad run name {name!r}")
        run_dir = Path(cc.output_dir) / f"{name}" / f"seed{seed}"
        tree = _deep_merge(base, over)
        tree = _deep_merge(tree, {"seed": seed, "output_dir": str(run_dir)})
        lag = _train_config(tree, f"algorithms.{name}").rollout.sync_interval
        cfg = _train_config(_with_study_settings(cc, tree, lag), f"algorithms.{name}")
        algo_runs.append(
            PlannedRun(
                name,
                "algorithms",
                seed,
                cfg,
                _algo_label(cfg),
                lag,
                run_dir=run_dir,
                beta2=cfg.algorithm.beta2 if cfg.algorithm.name == "oapl" else None,
            )
        )
    return algo_runs


def _lag_sweep_runs(
    cc: CompareConfig, base: dict[str, Any], base_cfg: TrainConfig, seed: int, algo_runs: list[PlannedRun]
) -> list[PlannedRun]:
    """OAPL at each lag ``L`` for one seed; a point identical to an algorithm run reuses that run."""
    runs: list[PlannedRun] = []
    sweep_steps = cc.lag_sweep.steps or max(base_cfg.steps, cc.lag_sweep.min_syncs * max(cc.lag_sweep.intervals))
    for L in cc.lag_sweep.intervals:
        name = f"oapl_L{L}"
        run_dir = Path(cc.output_dir) / name / f"seed{seed}"
        tree = _deep_merge(base, cc.lag_sweep.overrides)
        tree = _deep_merge(
            tree,
            {
                "seed": seed,
                "steps": sweep_steps,
                "output_dir": str(run_dir),
                "algorithm": {"name": "oapl"},
                "rollout": {"sync_interval": L, "max_staleness": 0},
            },
        )
        cfg = _train_config(_with_study_settings(cc, tree, L), f"lag_sweep (L={L})")
        same = next((r for r in algo_runs if comparable(r.cfg) == comparable(cfg)), None)
        if same is not None:
            runs.append(
                PlannedRun(
                    name,
                    "lag_sweep",
                    seed,
                    same.cfg,
                    f"OAPL L={L}",
                    L,
                    same_as=same.name,
                    run_dir=same.run_dir,
                    beta2=same.beta2,
                )
            )
        else:
            runs.append(
                PlannedRun(name, "lag_sweep", seed, cfg, f"OAPL L={L}", L, run_dir=run_dir, beta2=cfg.algorithm.beta2)
            )
    return runs


def _beta2_sweep_runs(cc: CompareConfig, base: dict[str, Any], base_cfg: TrainConfig) -> list[PlannedRun]:
    """OAPL at each beta2 value, on the beta2 sweep's own seeds."""
    b2 = cc.beta2_sweep
    runs: list[PlannedRun] = []
    for seed in b2.seeds:
        for value in b2.values:
            name = f"oapl_b2_{value:g}"
            run_dir = Path(cc.output_dir) / name / f"seed{seed}"
            tree = _deep_merge(base, b2.overrides)
            tree = _deep_merge(
                tree,
                {
                    "seed": seed,
                    "steps": b2.steps or base_cfg.steps,
                    "output_dir": str(run_dir),
                    "algorithm": {"name": "oapl", "beta2": value},
                },
            )
            lag = _train_config(tree, f"beta2_sweep (beta2={value:g})").rollout.sync_interval
            cfg = _train_config(_with_study_settings(cc, tree, lag), f"beta2_sweep (beta2={value:g})")
            runs.append(
                PlannedRun(
                    name, "beta2_sweep", seed, cfg, f"OAPL beta2={value:g} (L={lag})", lag, run_dir=run_dir, beta2=value
                )
            )
    return runs


def _algo_label(cfg: TrainConfig) -> str:
    a, r = cfg.algorithm, cfg.rollout
    if a.name == "oapl":
        return f"OAPL (L={r.sync_interval})"
    corr = f"IS cap {a.is_cap:g}" if a.is_cap is not None else "no IS"
    asyn = ""
    if r.asynchronous and r.max_staleness == 1:
        asyn = ", off-by-one async"
    elif r.asynchronous and r.max_staleness > 1:
        asyn = f", async, max staleness {r.max_staleness}"
    mb = f", {a.mini_batches} mini-batches" if a.mini_batches > 1 else ""
    near = ", near on-policy" if r.sync_interval == 1 and r.max_staleness <= 1 else ""
    return f"GRPO ({corr}, L={r.sync_interval}{near}{asyn}{mb})"


def final_eval_settings(cc: CompareConfig) -> dict[str, Any]:
    fe = cc.final_eval
    return {
        "n": fe.n,
        "temperature": fe.temperature,
        "top_p": fe.top_p,
        "entropy": fe.entropy,
        "batch_prompts": fe.batch_prompts,
        "max_prompts": fe.max_prompts,
        "entropy_samples": fe.entropy_samples,
        "engine": fe.engine,
    }


def base_eval_dir(cc: CompareConfig) -> Path:
    return Path(cc.output_dir) / "_base_eval"


def eval_seed(seed: int) -> int:
    """The sampler seed of a seed's final evaluations: shared by every configuration of that seed
    (common random numbers make the paired differences less noisy)."""
    return 10_000 + seed
