"""Pick and build the inference engine named in the config."""

from __future__ import annotations

import copy
import importlib.util
import logging

from oapl.config import TrainConfig

log = logging.getLogger(__name__)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_kind(cfg: TrainConfig) -> str:
    """``engine.kind``, with ``auto`` resolved: vLLM when it imports cleanly, else transformers."""
    if cfg.engine.kind == "auto":
        if not vllm_installed():
            return "transformers"
        from oapl.engines.vllm_engine import vllm_import_error

        err = vllm_import_error()
        if err is not None:
            log.warning("engine.kind=auto: %s; using the transformers engine", err)
            return "transformers"
        return "vllm"
    return cfg.engine.kind


def make_engine(cfg: TrainConfig, weights_path: str, tokenizer, hf_model=None):
    """Build the engine holding the weights at ``weights_path`` (an HF folder or Hub name).

    The transformers engine takes its own copy of ``hf_model`` when given (the trainer's model, so
    no second load from disk), else loads ``weights_path``; vLLM always loads from ``weights_path``.
    """
    kind = engine_kind(cfg)
    if kind == "vllm":
        from oapl.engines.vllm_engine import VLLMEngine
        from oapl.trainer.model import pick_device
        from oapl.trainer.precision import dtype_name, resolve_precision

        dtype = resolve_precision(cfg.model, pick_device(cfg.model.device)).engine_dtype
        return VLLMEngine(weights_path, seed=cfg.seed, dtype=dtype_name(dtype),
                          gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
                          max_model_len=cfg.engine.max_model_len, enable_sleep_mode=cfg.engine.enable_sleep_mode,
                          **cfg.engine.extra)
    from oapl.engines.transformers_engine import TransformersEngine
    from oapl.trainer.model import load_causal_lm, pick_device
    from oapl.trainer.precision import resolve_precision

    device = pick_device(cfg.model.device)
    dtype = resolve_precision(cfg.model, device).engine_dtype  # the engine runs in the compute dtype
    if hf_model is not None:
        model = copy.deepcopy(hf_model).to(dtype)
    else:
        model = load_causal_lm(weights_path, dtype, device, cfg.model.trust_remote_code)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "gradient_checkpointing_disable") and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    return TransformersEngine(model, tokenizer, max_batch_size=cfg.engine.max_batch_size, seed=cfg.seed)
