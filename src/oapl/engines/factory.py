"""Pick and build the inference engine named in the config."""

from __future__ import annotations

import copy
import importlib.util
import logging

from oapl.config import TrainConfig

log = logging.getLogger(__name__)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(cfg: TrainConfig, policy, weights_path: str):
    """Build the engine with the trainer's current weights.

    ``weights_path`` is an HF folder holding those weights (vLLM loads from disk); the transformers
    engine copies the trainer's model in memory instead.
    """
    kind = cfg.engine.kind
    if kind == "auto":
        kind = "vllm" if vllm_installed() else "transformers"
    if kind == "vllm":
        from oapl.engines.vllm_engine import VLLMEngine

        max_len = cfg.engine.max_model_len
        return VLLMEngine(weights_path, seed=cfg.seed, dtype=str(policy.dtype).replace("torch.", ""),
                          gpu_memory_utilization=cfg.engine.gpu_memory_utilization, max_model_len=max_len,
                          enable_sleep_mode=cfg.engine.enable_sleep_mode, **cfg.engine.extra)
    from oapl.engines.transformers_engine import TransformersEngine

    model = copy.deepcopy(policy.hf_model())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model.config, "use_cache", True) is False:
        model.config.use_cache = True
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    return TransformersEngine(model, policy.tokenizer, max_batch_size=cfg.engine.max_batch_size, seed=cfg.seed)
