"""Held-out evaluation of a run's weights, kept per prompt: Pass@k for every k, and the entropy.

:func:`evaluate_policy` loads a policy (a run's checkpoint, or the base model), samples ``n``
responses for every held-out prompt at the given temperature, scores them with the task's verifier,
writes them as a rollout dataset (the same Parquet data product as ``oapl generate``, so ``oapl
eval --rollouts`` and ``oapl plot`` read it), then scores those samples with the same weights for
the policy's token and sequence entropy (:mod:`oapl.evaluation.entropy`). Everything is written
under ``out_dir``; an interrupted evaluation continues where it stopped (the rollout writer skips
prompts already on disk), a finished one is read back.

``out_dir/result.json`` holds, per prompt (in held-out order): the number of correct samples out of
``n``, and the prompt's mean token entropy, sequence entropy and response length. The comparison
report builds its paired intervals from these per-prompt values.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from oapl.atomic import atomic_write_text
from oapl.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["EVAL_VERSION", "evaluate_policy", "load_result"]

#: Bumped when the meaning of ``result.json`` changes (an older result is then recomputed).
EVAL_VERSION = 1


def load_result(out_dir: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``out_dir/result.json`` if it exists, is complete and was made with the settings ``expect``."""
    path = Path(out_dir) / "result.json"
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if res.get("version") != EVAL_VERSION:
        return None
    if expect is not None and res.get("settings") != expect:
        return None
    return res


def evaluate_policy(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    n: int = 16,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    entropy: bool = True,
    seed: int | None = None,
    batch_prompts: int = 32,
    max_prompts: int | None = None,
    entropy_samples: int | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """Evaluate the weights of ``checkpoint`` (``None``: the configured base model) on the held-out split.

    Sampling defaults to the training distribution (``sampling.temperature``/``top_p``/``max_tokens``):
    Pass@k and entropy are then properties of the policy that was trained. ``seed`` seeds the sampler
    (default ``cfg.seed``). The entropy is scored on the first ``entropy_samples`` responses of every
    prompt (default: all ``n``; it is a mean over tokens, and a few responses per prompt estimate it
    well at a fraction of the cost). ``engine`` (``transformers``, ``vllm``, ``auto``; default
    ``engine.kind``) samples the responses: vLLM gets an export of the weights. Returns the
    ``result.json`` dict.
    """
    from oapl.config_views import sampling_params

    out_dir = Path(out_dir)
    temperature = cfg.sampling.temperature if temperature is None else temperature
    if temperature <= 0:
        raise ValueError("evaluate_policy samples n responses per prompt: temperature must be > 0")
    params = sampling_params(cfg, n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    settings = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "n": n,
        "temperature": temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "entropy": entropy,
        "seed": cfg.seed if seed is None else seed,
        "max_prompts": max_prompts,
        "model": cfg.model.name,
        "task": cfg.task.model_dump(mode="json"),
        "entropy_samples": entropy_samples if entropy else None,
        "engine": engine,
    }
    done = load_result(out_dir, settings)
    if done is not None:
        return done
    t0 = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:  # as a training run of this config would (oversubscribed OpenMP threads crawl)
        torch.set_num_threads(cfg.threads)
    try:
        return _evaluate(
            cfg, out_dir, checkpoint, params, settings, entropy, entropy_samples, engine, batch_prompts, max_prompts, t0
        )
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    cfg, out_dir, checkpoint, params, settings, entropy, entropy_samples, engine, batch_prompts, max_prompts, t0
) -> dict[str, Any]:
    from oapl.data.rollouts import read_rollouts
    from oapl.data.tasks import build_task
    from oapl.evaluation.entropy import policy_entropy
    from oapl.generate import generate_dataset
    from oapl.rollout.group import is_correct
    from oapl.trainer.policy import load_policy

    task = build_task(cfg.task, cfg.seed)
    if not task.eval:
        raise ValueError(f"task {task.name!r} has no held-out prompts (set task.eval_dataset)")
    examples = task.eval[:max_prompts] if max_prompts else task.eval
    policy, _ = load_policy(cfg, max(cfg.steps, 1), checkpoint, load_optimizer=False)
    model = policy.hf_model()
    model.eval()
    rollouts = out_dir / "rollouts"
    _start_fresh_if_changed(out_dir, settings)
    if engine is not None:
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"kind": engine})})
    engine = _engine(cfg, policy, model, out_dir, settings["seed"])
    try:
        generate_dataset(
            cfg,
            rollouts,
            split="eval",
            params=params,
            engine=engine,
            batch_prompts=batch_prompts,
            max_prompts=max_prompts,
            benchmark=task.name,
        )
    finally:
        engine.close()
    groups = {g.prompt_id: g for g in read_rollouts(rollouts)}
    order = [str(ex["prompt_id"]) for ex in examples]
    missing = [pid for pid in order if pid not in groups]
    if missing:
        raise RuntimeError(f"{rollouts}: no samples for held-out prompt(s) {missing[:3]} after generation")
    ent: dict[str, dict[str, float]] = {}
    if entropy:
        t1 = time.perf_counter()
        scored = [_first(groups[p], entropy_samples) for p in order]
        ent = policy_entropy(
            model,
            scored,
            params.temperature,
            packed=policy.packing,
            pad_token_id=policy.pad_token_id,
            max_tokens=cfg.optim.max_tokens_per_micro_batch or 4096,
            chunk_size=cfg.model.logprob_chunk_size,
            autocast=policy.precision.autocast(),
        )
        log.info("entropy of %d held-out groups: %.1f s", len(order), time.perf_counter() - t1)
    res = {
        "version": EVAL_VERSION,
        "settings": settings,
        "prompt_ids": order,
        "n": params.n,
        "correct": [sum(is_correct(r) for r in groups[p].rewards) for p in order],
        "token_entropy": [ent[p]["token_entropy"] for p in order] if ent else None,
        "seq_entropy": [ent[p]["seq_entropy"] for p in order] if ent else None,
        "response_tokens": [sum(map(len, groups[p].response_token_ids)) / groups[p].n for p in order],
        "seconds": time.perf_counter() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "result.json", json.dumps(res))
    return res


def _first(group, k: int | None):
    """The group with only its first ``k`` responses (all when ``k`` is None)."""
    if k is None or k >= group.n:
        return group
    import dataclasses

    return dataclasses.replace(
        group,
        responses=group.responses[:k],
        response_token_ids=group.response_token_ids[:k],
        response_logprobs=group.response_logprobs[:k],
        rewards=group.rewards[:k],
        finish_reasons=group.finish_reasons[:k],
    )


def _start_fresh_if_changed(out_dir: Path, settings: dict[str, Any]) -> None:
    """Samples already in ``out_dir`` are continued only if they were drawn with the same settings."""
    import shutil

    marker = out_dir / "settings.json"
    if marker.exists():
        try:
            same = json.loads(marker.read_text()) == settings
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            log.warning("%s: samples of an evaluation with other settings: discarded", out_dir)
            shutil.rmtree(out_dir / "rollouts", ignore_errors=True)
            (out_dir / "result.json").unlink(missing_ok=True)
    elif (out_dir / "rollouts").exists():
        shutil.rmtree(out_dir / "rollouts")  # of unknown provenance
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(settings))


def _engine(cfg: TrainConfig, policy, model, out_dir: Path, seed: int):
    """The transformers engine on the merged weights in memory; vLLM on an export of them."""
    from oapl.engines.factory import engine_kind, make_engine
    from oapl.engines.transformers_engine import TransformersEngine

    if engine_kind(cfg) == "vllm":
        import shutil

        weights = policy.export(out_dir / "weights")
        try:
            return make_engine(cfg.model_copy(update={"seed": seed}), str(weights), policy.tokenizer)
        finally:
            shutil.rmtree(weights, ignore_errors=True)  # vLLM has read it: no copy of every run's weights stays
    return TransformersEngine(model, policy.tokenizer, cfg.engine.max_batch_size, seed=seed)
