"""Held-out evaluation with an inference engine: n samples per prompt, scored, Pass@k."""

from __future__ import annotations

import time
from typing import Any

from oapl.data.budget import check_prompt_budget, engine_max_model_len
from oapl.engines.base import InferenceEngine, SamplingParams, sampling_dict
from oapl.rewards.base import SafeReward
from oapl.rollout.group import RolloutGroup, score_groups


def generate_groups(
    engine: InferenceEngine,
    task,
    tokenizer,
    examples: list[dict[str, Any]],
    params: SamplingParams,
    reward: SafeReward | None = None,
    batch_prompts: int = 64,
    weights_id: str = "",
    benchmark: str = "",
    split: str = "eval",
    max_tokens_field: str = "eval.max_tokens",
    max_model_len: int | None = None,
) -> list[RolloutGroup]:
    """Generate ``params.n`` responses for each example and score them with the task's reward.

    Every prompt is checked against the engine's ``max_model_len`` (or ``max_model_len`` when
    given) before it is sent: a prompt whose tokens plus ``params.max_tokens`` do not fit raises
    :class:`oapl.data.budget.TokenBudgetError` naming ``split``, the row and ``max_tokens_field``.
    A row's own ``benchmark`` column, when it has one, labels its group instead of ``benchmark``.
    """
    reward = reward or SafeReward(task.reward_fn)
    limit = max_model_len if max_model_len is not None else engine_max_model_len(engine)
    groups: list[RolloutGroup] = []
    for start in range(0, len(examples), batch_prompts):
        chunk = examples[start : start + batch_prompts]
        texts = [task.render(ex, tokenizer) for ex in chunk]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        for j, (ex, i) in enumerate(zip(chunk, ids)):
            check_prompt_budget(
                len(i),
                params.max_tokens,
                limit,
                split=split,
                row=start + j,
                prompt_id=str(ex.get("prompt_id", start + j)),
                max_tokens_field=max_tokens_field,
            )
        outputs = engine.generate(ids, params)
        groups.extend(
            score_groups(
                reward,
                task,
                list(zip(texts, ids)),
                chunk,
                outputs,
                n=params.n,
                weights_id=weights_id,
                sampling=sampling_dict(params),
                default_ids=range(start, start + len(chunk)),
                benchmark=benchmark,
            )
        )
    return groups


def passk_summary(groups: list[RolloutGroup], threshold: float = 0.5) -> dict[str, float]:
    """``pass@k`` (unbiased estimator, mean over prompts) for k = 1, 2, 4, ... n, and the mean reward.

    When the groups come from several benchmarks (``task.eval_benchmarks``), also ``<benchmark>/pass@k``
    for each and ``benchmark_mean/pass@k``, the unweighted mean over benchmarks (the paper's
    checkpoint-selection metric for math is the mean pass@1 over its benchmarks).
    """
    from oapl.rollout.group import is_correct
    from oapl.evaluation.passk import default_ks, pass_at_k

    if not groups:
        return {}
    n = min(g.n for g in groups)
    ks = default_ks(n)
    per_group = {k: [pass_at_k(g.n, sum(is_correct(r, threshold) for r in g.rewards), k) for g in groups] for k in ks}
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass@{k}"] = sum(per_group[k]) / len(groups)
    out["reward_mean"] = sum(sum(g.rewards) for g in groups) / sum(g.n for g in groups)
    names = sorted({g.benchmark for g in groups})
    if len(names) > 1:
        for k in ks:
            means = []
            for name in names:
                vals = [v for v, g in zip(per_group[k], groups) if g.benchmark == name]
                out[f"{name}/pass@{k}"] = sum(vals) / len(vals)
                means.append(out[f"{name}/pass@{k}"])
            out[f"benchmark_mean/pass@{k}"] = sum(means) / len(means)
    return out


def evaluate(
    engine: InferenceEngine, task, tokenizer, params: SamplingParams
) -> tuple[dict[str, float], list[RolloutGroup]]:
    """Evaluate on ``task.eval``; returns (summary, groups)."""
    if not task.eval:
        raise ValueError(f"task {task.name!r} has no held-out prompts (set task.eval_dataset)")
    t0 = time.perf_counter()
    groups = generate_groups(engine, task, tokenizer, task.eval, params)
    summary = passk_summary(groups)
    summary["eval_seconds"] = time.perf_counter() - t0
    summary["eval_prompts"] = float(len(groups))
    return summary, groups
