"""What :class:`~oapl.engines.vllm_engine.VLLMEngine` does against vLLM's internals.

Each function here works around one behaviour of the in-process engine core or its worker, and is
called by the engine (the ``worker`` ones through ``LLM.collective_rpc``, which runs them in this
process): shutting one engine down without destroying the parallel groups others share, seeing
whether the LM head is tied, re-packing the CPU GEMM copies of tied weights after a reload, and
restoring the layers a failed reload left on the meta device. Kept apart so that the engine reads as
its public contract, and a vLLM upgrade that moves these internals is a change in one file.
"""

from __future__ import annotations

import torch


def shutdown_engine_core(llm, keep_distributed: bool) -> None:
    """Shut an in-process vLLM engine core down.

    ``EngineCore.shutdown()`` ends with ``cleanup_dist_env_and_memory()``, which destroys the
    process-global parallel groups every other in-process engine still uses. When others are open,
    release this engine's executor and scheduler only (and disarm the client's finalizer, which
    would run the full shutdown when the ``LLM`` is collected).
    """
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    finalizer = getattr(client, "_finalizer", None)
    if not keep_distributed or core is None or finalizer is None:
        client.shutdown()
        return
    if finalizer.detach() is None:
        return  # already shut down
    core.model_executor.shutdown()
    core.scheduler.shutdown()


def ties_embeddings(llm) -> bool:
    """Whether the served model's LM head is its input embedding (``tie_word_embeddings``)."""
    try:
        cfg = llm.llm_engine.model_config
        text = getattr(cfg, "hf_text_config", None) or cfg.hf_config
        return bool(getattr(text, "tie_word_embeddings", False) or getattr(cfg.hf_config, "tie_word_embeddings", False))
    except AttributeError:
        return False


def refresh_shared_cpu_gemms(worker) -> int:
    """Worker-side, CPU only: re-pack the GEMM weights of modules that share their weight.

    vLLM-CPU multiplies with a packed copy of each weight (oneDNN / SGL kernels) made when the
    weight is processed. ``reload_weights`` re-processes the layers it loads, but a tied LM head
    (``tie_word_embeddings``: SmolLM2, Qwen2.5-0.5B, ...) is never loaded by name, so its packed
    copy would keep the old embedding and the logits would lag the sync. Returns modules re-packed.
    """
    model = worker.model_runner.get_model()
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() and hasattr(module, "cpu_linear"):
            owners.setdefault(weight.data_ptr(), []).append(module)
    refreshed = 0
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


def finish_failed_reload(worker) -> None:
    """Worker-side (in this process): put back the old tensors of layers a failed
    ``reload_weights`` had moved to the meta device, so that the next reload can run."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)
