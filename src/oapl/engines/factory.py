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


#: VLLMEngine's own keyword arguments that engine.extra may set besides vllm.LLM's.
_VLLM_ENGINE_KWARGS = ("enforce_eager", "cpu_threads", "sync_threads")
#: engine.extra keys oapl sets itself from other fields.
_VLLM_RESERVED = {
    "model": "model.name",
    "logprobs_mode": "(fixed: processed_logprobs)",
    "seed": "seed",
    "dtype": "model.compute_dtype",
    "gpu_memory_utilization": "engine.gpu_memory_utilization",
    "max_model_len": "engine.max_model_len",
    "enable_sleep_mode": "engine.enable_sleep_mode",
}


def vllm_arguments() -> set[str]:
    """The keyword arguments ``vllm.LLM`` accepts: its own and those of ``vllm.EngineArgs``."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    names = {
        n
        for n, p in inspect.signature(LLM.__init__).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"
    }
    return names | {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine_extra(kind: str, extra: dict, configured_kind: str = "vllm") -> None:
    """Refuse ``engine.extra`` keys the engine would refuse (or silently ignore), naming key and engine."""
    from oapl.errors import UserError

    if not extra:
        return
    if kind == "transformers":
        if configured_kind == "transformers":
            raise UserError(
                f"engine.extra={sorted(extra)}: the transformers engine takes no extra arguments "
                f"(engine.extra is passed to vllm.LLM); remove them, or use engine.kind=vllm"
            )
        log.warning(
            "engine.extra %s ignored: the transformers engine is used (engine.kind=auto without vLLM)", sorted(extra)
        )
        return
    reserved = sorted(k for k in extra if k in _VLLM_RESERVED)
    if reserved:
        raise UserError(
            f"engine.extra.{reserved[0]}: set by oapl from {_VLLM_RESERVED[reserved[0]]}; do not "
            f"pass it in engine.extra"
        )
    known = vllm_arguments() | set(_VLLM_ENGINE_KWARGS)
    unknown = sorted(k for k in extra if k not in known)
    if unknown:
        import difflib

        import vllm

        near = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UserError(
            f"engine.extra.{unknown[0]}: vllm.LLM (vLLM {vllm.__version__}) has no argument "
            f"{unknown[0]!r}{hint} (engine.extra holds keyword arguments of vllm.LLM / EngineArgs"
            + (f"; also unknown: {unknown[1:]}" if len(unknown) > 1 else "")
            + ")"
        )


def make_engine(cfg: TrainConfig, weights_path: str, tokenizer, hf_model=None):
    """Build the engine holding the weights at ``weights_path`` (an HF folder or Hub name).

    The transformers engine takes its own copy of ``hf_model`` when given (the trainer's model, so
    no second load from disk), else loads ``weights_path``; vLLM always loads from ``weights_path``.
    """
    kind = engine_kind(cfg)
    check_engine_extra(kind, cfg.engine.extra, cfg.engine.kind)
    if kind == "vllm":
        from oapl.engines.vllm_engine import VLLMEngine
        from oapl.trainer.model import pick_device
        from oapl.trainer.precision import dtype_name, resolve_precision

        dtype = resolve_precision(cfg.model, pick_device(cfg.model.device)).engine_dtype
        return VLLMEngine(
            weights_path,
            seed=cfg.seed,
            dtype=dtype_name(dtype),
            gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
            max_model_len=cfg.engine.max_model_len,
            enable_sleep_mode=cfg.engine.enable_sleep_mode,
            **cfg.engine.extra,
        )
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
