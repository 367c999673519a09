"""``oapl generate``: n responses per prompt, scored, written as a resumable rollout dataset."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from oapl.config import TrainConfig
from oapl.config_views import load_config_tokenizer, sampling_params
from oapl.data.rollouts import RolloutWriter
from oapl.data.tasks import build_task
from oapl.engines.base import SamplingParams, sampling_dict
from oapl.engines.factory import make_engine
from oapl.evaluation.heldout import generate_groups
from oapl.rewards.base import SafeReward
from oapl.trainer.model import resolve_model_path

log = logging.getLogger(__name__)


def select_examples(
    examples: list[dict[str, Any]], max_prompts: int | None = None, subset: int | None = None, subset_seed: int = 0
) -> list[dict[str, Any]]:
    """The first ``max_prompts`` examples, or a seeded random ``subset`` of them (same every call)."""
    if subset is not None and subset < len(examples):
        idx = sorted(random.Random(subset_seed).sample(range(len(examples)), subset))
        examples = [examples[i] for i in idx]
    return examples[:max_prompts] if max_prompts else examples


def generate_dataset(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    split: str = "train",
    n: int | None = None,
    model: str | None = None,
    max_prompts: int | None = None,
    subset: int | None = None,
    subset_seed: int = 0,
    params: SamplingParams | None = None,
    benchmark: str = "",
    batch_prompts: int = 32,
    engine=None,
) -> dict[str, Any]:
    """Generate ``n`` scored responses for every selected prompt into ``out_dir``.

    Killed midway, the same call continues where it stopped: prompts already on disk are skipped,
    so there is neither loss nor duplication (the writer keeps whole groups per atomic shard).
    """
    task = build_task(cfg.task, cfg.seed)
    examples = _split_examples(task, split, max_prompts, subset, subset_seed)
    model_name = model or cfg.model.name
    model_path = resolve_model_path(model_name)
    tokenizer = load_config_tokenizer(cfg, model_path if model else None)
    max_tokens_field = "eval.max_tokens" if params is not None else "sampling.max_tokens"
    if params is None:
        params = sampling_params(cfg, n=n or cfg.rollout.group_size)
    reward = SafeReward(task.reward_fn)
    t0 = time.perf_counter()
    written = 0
    with RolloutWriter(
        out_dir,
        sampling=sampling_dict(params),
        weights_id=model_name,
        task=task.name,
        shard_size=max(params.n * batch_prompts, 1),
    ) as writer:
        done = writer.done_prompt_ids()
        todo = [ex for ex in examples if str(ex["prompt_id"]) not in done]
        log.info(
            "generate: %d prompts (%d already done) x %d responses -> %s",
            len(todo),
            len(examples) - len(todo),
            params.n,
            out_dir,
        )
        if todo:
            own_engine = engine is None
            engine = engine or make_engine(cfg, model_path, tokenizer)
            try:
                _refuse_over_budget(cfg, engine, task, examples, tokenizer, params, split, max_tokens_field)
                written = _write_groups(
                    writer,
                    engine,
                    task,
                    tokenizer,
                    todo,
                    params,
                    reward,
                    batch_prompts=batch_prompts,
                    weights_id=model_name,
                    benchmark=benchmark,
                    split=split,
                    max_tokens_field=max_tokens_field,
                )
            finally:
                if own_engine:
                    engine.close()
    return {
        "out_dir": str(out_dir),
        "prompts": len(examples),
        "generated": written,
        "skipped_done": len(examples) - len(todo),
        "seconds": time.perf_counter() - t0,
        "reward_errors": reward.stats.errors,
    }


def _split_examples(
    task, split: str, max_prompts: int | None, subset: int | None, subset_seed: int
) -> list[dict[str, Any]]:
    """The selected prompts of ``split`` (``train`` or ``eval``) of ``task``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    examples = task.train if split == "train" else task.eval
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} prompts")
    return select_examples(examples, max_prompts, subset, subset_seed)


def _refuse_over_budget(
    cfg: TrainConfig,
    engine,
    task,
    examples: list[dict[str, Any]],
    tokenizer,
    params: SamplingParams,
    split: str,
    max_tokens_field: str,
) -> None:
    """Every prompt fits the engine, checked before the first is generated (rows of the selected split)."""
    from oapl.data.budget import TokenBudgetError, engine_max_model_len, split_problems

    limit = cfg.engine.max_model_len or engine_max_model_len(engine)
    problems, _ = split_problems(
        task, examples, tokenizer, params.max_tokens, limit, split=split, max_tokens_field=max_tokens_field
    )
    if problems:
        raise TokenBudgetError(problems[0])


def _write_groups(
    writer: RolloutWriter,
    engine,
    task,
    tokenizer,
    todo: list[dict[str, Any]],
    params: SamplingParams,
    reward: SafeReward,
    *,
    batch_prompts: int,
    **generate_kw: Any,
) -> int:
    """Generate and write the groups of ``todo``, ``batch_prompts`` prompts at a time; the number written."""
    written = 0
    for start in range(0, len(todo), batch_prompts):
        chunk = todo[start : start + batch_prompts]
        groups = generate_groups(
            engine, task, tokenizer, chunk, params, reward, batch_prompts=batch_prompts, **generate_kw
        )
        for g in groups:
            writer.write(g)
        written += len(groups)
        log.info("generate: %d/%d prompts", written, len(todo))
    return written
