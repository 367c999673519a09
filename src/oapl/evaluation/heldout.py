"""Held-out evaluation with an inference engine: n samples per prompt, scored, Pass@k."""

from __future__ import annotations

import time
from typing import Any

from oapl.engines.base import InferenceEngine, SamplingParams, sampling_dict
from oapl.rewards.base import SafeReward
from oapl.rollout.buffer import RolloutGroup


def generate_groups(engine: InferenceEngine, task, tokenizer, examples: list[dict[str, Any]],
                    params: SamplingParams, reward: SafeReward | None = None,
                    batch_prompts: int = 64, weights_id: str = "", benchmark: str = "") -> list[RolloutGroup]:
    """Generate ``params.n`` responses for each example and score them with the task's reward."""
    reward = reward or SafeReward(task.reward_fn)
    groups: list[RolloutGroup] = []
    for start in range(0, len(examples), batch_prompts):
        chunk = examples[start : start + batch_prompts]
        texts = [task.render(ex, tokenizer) for ex in chunk]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        outputs = engine.generate(ids, params)
        flat_p, flat_c, flat_ex = [], [], []
        for t, ex, out in zip(texts, chunk, outputs):
            for c in out.completions:
                flat_p.append(t)
                flat_c.append(c.text)
                flat_ex.append(ex)
        rewards = reward(flat_p, flat_c, **task.reward_kwargs(flat_ex))
        for j, (t, i, ex, out) in enumerate(zip(texts, ids, chunk, outputs)):
            comps = out.completions
            groups.append(RolloutGroup(
                prompt_id=str(ex.get("prompt_id", start + j)), prompt=t, prompt_token_ids=list(i),
                response_token_ids=[c.token_ids for c in comps], response_logprobs=[c.logprobs for c in comps],
                responses=[c.text for c in comps], rewards=rewards[j * params.n : (j + 1) * params.n],
                finish_reasons=[c.finish_reason for c in comps], version=out.version, weights_id=weights_id,
                sampling=sampling_dict(params), task=task.name, benchmark=benchmark, extra=ex))
    return groups


def passk_summary(groups: list[RolloutGroup], threshold: float = 0.5) -> dict[str, float]:
    """``pass@k`` (unbiased estimator, mean over prompts) for k = 1, 2, 4, ... n, and the mean reward."""
    from oapl.data.rollouts import is_correct
    from oapl.evaluation.passk import default_ks, pass_at_k

    if not groups:
        return {}
    n = min(g.n for g in groups)
    out: dict[str, float] = {}
    for k in default_ks(n):
        vals = [pass_at_k(g.n, sum(is_correct(r, threshold) for r in g.rewards), k) for g in groups]
        out[f"pass@{k}"] = sum(vals) / len(vals)
    out["reward_mean"] = sum(sum(g.rewards) for g in groups) / sum(g.n for g in groups)
    return out


def evaluate(engine: InferenceEngine, task, tokenizer, params: SamplingParams) -> tuple[dict[str, float], list[RolloutGroup]]:
    """Evaluate on ``task.eval``; returns (summary, groups)."""
    if not task.eval:
        raise ValueError(f"task {task.name!r} has no held-out prompts (set task.eval_dataset)")
    t0 = time.perf_counter()
    groups = generate_groups(engine, task, tokenizer, task.eval, params)
    summary = passk_summary(groups)
    summary["eval_seconds"] = time.perf_counter() - t0
    summary["eval_prompts"] = float(len(groups))
    return summary, groups
