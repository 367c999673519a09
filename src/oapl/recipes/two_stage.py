"""The paper's offline two-stage recipe (its code experiment), as one function.

1. generate G responses per training prompt with the base model; drop prompts with no correct one;
2. train one epoch offline on it (no sync: L = one epoch);
3. generate again with the result on a random subset of the prompts; filter the same way;
4. train more epochs from the stage-1 model, a checkpoint per epoch;
5. evaluate every epoch's checkpoint (and the base model) on the held-out set; report the best.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from oapl.config import TrainConfig
from oapl.engines.base import SamplingParams
from oapl.evaluation.passk import OVERALL, evaluate_groups, write_report
from oapl.generate import generate_dataset
from oapl.offline import train_offline

log = logging.getLogger(__name__)


def _stage_cfg(cfg: TrainConfig, **updates: Any) -> TrainConfig:
    data = cfg.model_dump()
    for dotted, value in updates.items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return TrainConfig.model_validate(data)


def pass1(result: dict[str, Any]) -> float:
    """Overall pass@1 of an :func:`evaluate_groups` result."""
    return next(row["mean"] for row in result[OVERALL]["pass_at_k"] if row["k"] == 1)


def _evaluate(cfg: TrainConfig, model: str, out: Path) -> dict[str, Any]:
    e = cfg.eval
    params = SamplingParams(e.temperature, e.top_p, e.max_tokens or cfg.sampling.max_tokens, tuple(cfg.sampling.stop), n=e.n)
    generate_dataset(cfg, out / "rollouts", split="eval", model=model, params=params, benchmark=cfg.task.name)
    from oapl.data.rollouts import read_rollouts

    result = evaluate_groups(read_rollouts(out / "rollouts", with_tokens=False))
    write_report(result, out / "passk")
    return result


def run_two_stage(cfg: TrainConfig, stage2_prompts: int = 4000, stage2_epochs: int = 4,
                  evaluate_base: bool = True) -> dict[str, Any]:
    """Run the recipe under ``cfg.output_dir``; returns (and writes ``report.json``) the summary."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = cfg.model.name
    report: dict[str, Any] = {"base_model": base, "stages": {}}

    log.info("stage 1: generate with the base model")
    report["stages"]["generate1"] = generate_dataset(cfg, root / "stage1_data", split="train")
    log.info("stage 1: train one epoch offline")
    s1 = _stage_cfg(cfg, output_dir=str(root / "stage1"), **{"offline.data": str(root / "stage1_data"),
                                                            "offline.epochs": 1})
    report["stages"]["train1"] = train_offline(s1, resume=True)
    stage1_model = report["stages"]["train1"]["checkpoints"][-1] + "/model"

    log.info("stage 2: generate with the stage-1 model on %d random prompts", stage2_prompts)
    report["stages"]["generate2"] = generate_dataset(cfg, root / "stage2_data", split="train", model=stage1_model,
                                                     subset=stage2_prompts, subset_seed=cfg.seed)
    s2 = _stage_cfg(cfg, output_dir=str(root / "stage2"), **{"model.name": stage1_model,
                                                            "offline.data": str(root / "stage2_data"),
                                                            "offline.epochs": stage2_epochs})
    log.info("stage 2: train %d epochs", stage2_epochs)
    report["stages"]["train2"] = train_offline(s2, resume=True)

    evals: dict[str, Any] = {}
    candidates = ([("base", base)] if evaluate_base else []) + [("stage1", stage1_model)] + [
        (f"stage2-epoch{i + 1}", c + "/model") for i, c in enumerate(report["stages"]["train2"]["checkpoints"])]
    for label, model in candidates:
        log.info("evaluating %s (%s)", label, model)
        result = _evaluate(cfg, model, root / "eval" / label)
        evals[label] = {"model": model, "pass@1": pass1(result), "result": result}
    trained = {k: v for k, v in evals.items() if k != "base"}
    best = max(trained, key=lambda k: trained[k]["pass@1"])
    report["eval"] = {k: {"model": v["model"], "pass@1": v["pass@1"]} for k, v in evals.items()}
    report["best"] = {"label": best, **report["eval"][best]}
    try:
        from oapl.evaluation.plots import plot_passk

        plot_passk({k: v["result"] for k, v in evals.items()}, root / "passk.png")
    except Exception as e:  # noqa: BLE001 - the report matters more than the picture
        log.warning("could not plot Pass@k: %s", e)
    (root / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
