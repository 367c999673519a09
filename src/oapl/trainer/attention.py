"""Attention over packed rows: every sequence attends only to itself, with no ``T x T`` mask.

A packed micro-batch is one row of concatenated sequences with cumulative lengths ``cu_seqlens``.
:func:`enable_varlen` registers an attention implementation named ``oapl_varlen`` with
transformers' ``AttentionInterface`` and switches the model to it. It dispatches on what the call
carries:

* ``cu_seq_lens_q`` present (a packed forward from :func:`oapl.trainer.logprobs.token_logprobs`):
  variable-length causal attention, by the first backend available:

  - ``torch``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 varlen inside PyTorch,
    CUDA, bf16/fp16);
  - ``flash_attn``: ``flash_attn_varlen_func`` from the ``flash-attn`` package (CUDA, bf16/fp16);
  - ``sdpa``: ``scaled_dot_product_attention`` once per sequence with ``is_causal`` (any device
    and dtype; the FLOPs are exactly ``sum_i t_i^2``, never ``(sum_i t_i)^2``).

* anything else (generation with a KV cache, padded batches): transformers' own SDPA path with the
  usual mask, so the same model object still serves the in-process transformers engine.

The mask builder registered for ``oapl_varlen`` returns ``None`` inside :func:`packed_forward`
(the decoder would otherwise detect the packed ``position_ids`` and build a dense block-diagonal
mask: 1 GiB of bools at 32K tokens) and transformers' SDPA mask otherwise. Gradient checkpointing
recomputes a layer with the keyword arguments it was first called with, so recomputation takes
the varlen path too.

Sliding-window attention layers are not packed (``supports_packing`` says so): those models train
padded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import torch

log = logging.getLogger(__name__)

NAME = "oapl_varlen"
_PACKED = contextvars.ContextVar("oapl_packed", default=False)
_BACKEND = {"name": "auto"}


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Varlen backends usable for ``device``/``dtype``, fastest first."""
    out = []
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            out.append("torch")
        except ImportError:
            pass
        try:
            from flash_attn import flash_attn_varlen_func  # noqa: F401

            out.append("flash_attn")
        except ImportError:
            pass
    out.append("sdpa")
    return out


def _varlen_sdpa(q, k, v, cu, scaling, groups):
    # q: (1, Hq, T, D); k, v: (1, Hkv, T, D)
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs, ks, vs = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=1)
            vs = vs.repeat_interleave(groups, dim=1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, T, Hq, D)


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("packed attention does not support attention dropout (set it to 0 for RL training)")
    max_len = int(kwargs.get("max_length_q") or 0)
    groups = query.shape[1] // key.shape[1]
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # RoPE in fp32 (cos/sin follow the fp32 residual stream) leaves q, k in fp32 and v in the
        # autocast dtype; the varlen kernels are not autocast ops, so cast here as SDPA's autocast would
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    backend = _BACKEND["name"]
    if backend == "auto":
        backend = available_backends(query.device, query.dtype)[0]
    if backend == "torch":
        from torch.nn.attention.varlen import varlen_attn

        q = query[0].transpose(0, 1)  # (T, Hq, D)
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **_torch_causal_kwarg())
        return out.unsqueeze(0), None
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        q = query[0].transpose(0, 1)
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True)
        return out.unsqueeze(0), None
    return _varlen_sdpa(query, key, value, cu, scaling, groups), None


@functools.cache
def _torch_causal_kwarg() -> dict:
    """``varlen_attn`` says "causal" as ``is_causal=True`` (torch 2.9-2.11) or ``window_size=(-1, 0)``."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def _mask(*args, **kwargs):
    if _PACKED.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    _registered = True


def supports_packing(model) -> tuple[bool, str]:
    """Whether ``model`` can run packed rows, and why not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager", NAME):
        return False, f"attn_implementation={impl!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is None or any("sliding" in t for t in layer_types):
            return False, "sliding-window attention layers"
    return True, ""


def enable_varlen(model, backend: str = "auto") -> bool:
    """Switch ``model`` to packed-capable attention; False (model unchanged) when it cannot pack."""
    ok, why = supports_packing(model)
    if not ok:
        log.warning("sequence packing is off for this model (%s): micro-batches are padded", why)
        return False
    if backend not in ("auto", "torch", "flash_attn", "sdpa"):
        raise ValueError(f"model.varlen_backend: unknown backend {backend!r} (auto, torch, flash_attn, sdpa)")
    _register()
    _BACKEND["name"] = backend
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(NAME)
    else:  # older transformers
        base.config._attn_implementation = NAME
    return True


@contextlib.contextmanager
def packed_forward():
    """Inside: the decoder builds no attention mask (packed rows carry ``cu_seqlens`` instead)."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)
