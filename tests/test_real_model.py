"""The embedded SmolLM2-135M-Instruct: conversion, sampling, and one real training step (slow)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_embedded_model_converts_once_and_loads():
    from oapl.trainer.model import DEFAULT_MODEL, load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(DEFAULT_MODEL)
    assert resolve_model_path(DEFAULT_MODEL) == path  # cached
    tok = load_tokenizer(path)
    model = load_causal_lm(path, torch.float32, torch.device("cpu"))
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"


def test_trainer_and_engine_agree_on_real_model_logprobs(tmp_path):
    """At lag 0 the trainer's log-probs of sampled tokens equal the engine's: the KL reference is right."""
    from oapl.config import load_config
    from oapl.loop import Run

    cfg = load_config(
        "configs/arithmetic_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            "model.compute_dtype=float32",  # the exact agreement is fp32's (the main job computes in bf16)
            "engine.kind=transformers",
            "rollout.asynchronous=false",
            "steps=1",
            "rollout.prompts_per_step=2",
            "rollout.prompts_per_generate=2",
            "rollout.group_size=4",
            "eval.at_start=false",
            "eval.at_end=false",
            "logging.progress=false",
            "checkpoint.save_final=false",
        ],
    )
    trainer = Run.for_config(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lag"] == 0
    assert row["logprob_absdiff_mean"] < 1e-3, row
    assert abs(row["kl"]) < 1e-4
    assert row["grad_norm"] > 0 and row["skipped"] == 0.0
