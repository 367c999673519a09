"""Storage and compute precision of the trainer: fp32 master weights under bf16 compute.

An AdamW update is about ``lr`` in size. A bf16 weight ``w`` has 8 significant bits, so its
spacing is ``2**(floor(log2|w|) - 7)``: about ``1.2e-4`` at ``|w| = 0.02``. An update smaller than
half that spacing rounds away, so at the paper's ``lr = 1e-6`` a model *stored* in bf16 keeps
almost none of its updates. Hence the default here, as in every mixed-precision trainer:

* **storage** (``model.param_dtype``): the trainable weights and the AdamW state are fp32 (the
  "master" weights); frozen base weights under LoRA are kept in the compute dtype (they never
  change, and peft keeps the adapters in fp32);
* **compute** (``model.compute_dtype``): the forward and backward matmuls run in bf16 on CUDA
  (``torch.autocast``, which casts each weight once per forward region), fp32 on CPU; log-probs,
  the loss and its reductions are fp32 whatever the compute dtype (:mod:`oapl.trainer.logprobs`);
* the engine receives the weights cast to the compute dtype at every sync; checkpoints keep the
  fp32 masters and optimiser state; exported models are written in the compute dtype.

Memory per trained parameter: fp32 master 4 B + fp32 gradient 4 B + AdamW moments 8 B = 16 B
(pure bf16 storage: 2 + 2 + 4 = 8 B, and it loses the updates). Activations are in the compute
dtype. See docs/configuration.md#precision for what fits on one GPU and how FSDP2 shards it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str, field: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{field}: unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (x86: AVX512-BF16 or AMX), where bf16 matmuls run about
    2.5x faster than fp32 (measured on an AMD EPYC with AVX512-BF16); ``None`` where torch cannot tell."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(checks):
        return None
    return any(bool(check()) for check in checks if check is not None)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA when supported, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class Precision:
    """Resolved ``(param_dtype, compute_dtype, export_dtype)`` of a trainer on ``device``."""

    device: torch.device
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    export_dtype: torch.dtype
    lora: bool = False
    offload: bool = False  # model.activation_offload: saved tensors to host memory during the forward

    @property
    def mixed(self) -> bool:
        """Compute in a lower precision than storage (autocast on)."""
        return self.compute_dtype != self.param_dtype

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype the model is loaded in: frozen LoRA bases in the compute dtype, else the storage one."""
        return self.compute_dtype if self.lora else self.param_dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: autocast to the compute dtype where some weights (masters, LoRA adapters)
        are wider, and with ``offload`` the saved tensors kept in host memory. Reusable: the log-prob
        path enters it once for the decoder and once per LM-head chunk."""
        amp: contextlib.AbstractContextManager = contextlib.nullcontext()
        if not (self.compute_dtype == torch.float32 or (self.param_dtype == self.compute_dtype and not self.lora)):
            amp = torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)
        if not self.offload:
            return amp
        return _Both(amp, torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda"))

    @property
    def engine_dtype(self) -> torch.dtype:
        return self.compute_dtype


def resolve_precision(model_cfg, device: torch.device) -> Precision:
    """Read ``model.param_dtype``/``compute_dtype``/``export_dtype`` (``auto`` resolved for ``device``)."""
    compute = (
        default_compute_dtype(device)
        if model_cfg.compute_dtype == "auto"
        else parse_dtype(model_cfg.compute_dtype, "model.compute_dtype")
    )
    param = (
        torch.float32 if model_cfg.param_dtype == "auto" else parse_dtype(model_cfg.param_dtype, "model.param_dtype")
    )
    export = compute if model_cfg.export_dtype == "auto" else parse_dtype(model_cfg.export_dtype, "model.export_dtype")
    if param.itemsize < compute.itemsize:
        raise ValueError(
            f"model.param_dtype={dtype_name(param)} is narrower than model.compute_dtype="
            f"{dtype_name(compute)}: storage must be at least as precise as compute"
        )
    if compute == torch.float16 and param != torch.float16:
        raise ValueError(
            "model.compute_dtype=float16 under fp32 storage needs loss scaling, which oapl does not do: "
            "use model.compute_dtype=bfloat16"
        )
    if device.type == "cpu" and compute == torch.bfloat16 and cpu_has_native_bf16() is False:
        log.warning(
            "model.compute_dtype=bfloat16 on a CPU without native bf16 matmuls (AVX512-BF16 or AMX): "
            "likely slower than float32 here; set model.compute_dtype=float32"
        )
    return Precision(
        device, param, compute, export, lora=bool(model_cfg.lora.enabled), offload=model_cfg.activation_offload
    )


class _Both(contextlib.AbstractContextManager):
    """Two reusable context managers entered together (``ExitStack`` cannot be re-entered)."""

    def __init__(self, outer: contextlib.AbstractContextManager, inner: contextlib.AbstractContextManager) -> None:
        self.outer, self.inner = outer, inner

    def __enter__(self):
        self.outer.__enter__()
        try:
            self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)
        return False


def dropped_update_fraction(params, lr: float, dtype: torch.dtype, sample: int = 1_000_000) -> float:
    """Share of weights whose ``lr``-sized AdamW update rounds away when stored in ``dtype``.

    An update ``u`` survives ``w + u`` when ``|u| >= spacing(w) / 2``, with ``spacing(w) =
    2**(floor(log2|w|) - mantissa_bits)``. Estimated on up to ``sample`` weights (strided).
    """
    if dtype == torch.float32:
        return 0.0
    mant = {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23)
    ws = [p.detach().flatten() for p in params if p.requires_grad and p.numel()]
    if not ws:
        return 0.0
    total = sum(w.numel() for w in ws)
    stride = max(1, total // sample)
    w = torch.cat([x[::stride].float().cpu() for x in ws]).abs()
    w = w[w > 0]
    if w.numel() == 0:
        return 0.0
    half_spacing = torch.exp2(torch.floor(torch.log2(w)) - mant - 1)
    return float((half_spacing > lr).float().mean())


def warn_if_updates_drop(params, lr: float, dtype: torch.dtype, threshold: float = 0.01) -> float:
    """Warn when pure low-precision storage would round away more than ``threshold`` of the updates."""
    frac = dropped_update_fraction(params, lr, dtype)
    if frac > threshold:
        log.warning(
            "model.param_dtype=%s at optim.lr=%.3g: an AdamW update of ~lr rounds away on %.0f%% of the "
            "weights (bf16 spacing at |w|=0.02 is %.1e). Use model.param_dtype=float32 (the default) to keep "
            "every update.",
            dtype_name(dtype),
            lr,
            100 * frac,
            2 ** (math.floor(math.log2(0.02)) - 7),
        )
    return frac
