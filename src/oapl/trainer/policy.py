"""The trainer: a Hugging Face causal LM minimising the OAPL (or GRPO) loss on buffer data."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from oapl.config import TrainConfig
from oapl.config_views import load_config_tokenizer
from oapl.objectives import build_objective
from oapl.trainer.model import load_causal_lm, pick_device, resolve_model_path
from oapl.trainer.optim import build_optimizer, build_scheduler
from oapl.trainer.precision import resolve_precision, warn_if_updates_drop

log = logging.getLogger(__name__)


class Policy:
    """Model + optimiser + schedule, and one method per thing Algorithm 1 asks of the trainer.

    Weights are stored in ``precision.param_dtype`` (fp32 masters by default) and computed in
    ``precision.compute_dtype`` (bf16 on CUDA); see :mod:`oapl.trainer.precision`.
    """

    def __init__(self, cfg: TrainConfig, total_steps: int, model=None, tokenizer=None) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.model.device)
        self.precision = resolve_precision(cfg.model, self.device)
        self.objective = build_objective(cfg.algorithm)
        self.temperature = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
        self.model_path = resolve_model_path(cfg.model.name)
        self.tokenizer = tokenizer or load_config_tokenizer(cfg)
        base = (
            model
            if model is not None
            else load_causal_lm(self.model_path, self.precision.load_dtype, self.device, cfg.model.trust_remote_code)
        )
        base = base.to(device=self.device, dtype=self.precision.load_dtype)
        if cfg.model.liger:
            apply_liger(base, self.device)
        if cfg.model.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        self.packing = False
        if cfg.optim.packing:
            from oapl.trainer.attention import enable_varlen

            self.packing = enable_varlen(base, cfg.model.varlen_backend)
        self.share_prompts = shared_prompt_mode(cfg, base)
        self.lora = cfg.model.lora.enabled
        if self.lora:
            from peft import LoraConfig, get_peft_model

            lc = cfg.model.lora
            # peft keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype)
            try:
                base = get_peft_model(
                    base,
                    LoraConfig(
                        r=lc.r,
                        lora_alpha=lc.alpha,
                        lora_dropout=lc.dropout,
                        target_modules=lc.target_modules,
                        task_type="CAUSAL_LM",
                    ),
                )
            except ValueError as e:
                if "target" not in str(e).lower():
                    raise
                raise lora_targets_error(base, lc.target_modules, e) from e
        self.model = base
        if cfg.model.compile:
            self._compile_layers()
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.precision.param_dtype != torch.float32:
            warn_if_updates_drop(trainable, cfg.optim.lr, self.precision.param_dtype)
        self.total_steps = total_steps
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, self.device)
        # one scheduler step per optimiser step: mini_batches of them per trainer step
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps * cfg.algorithm.mini_batches)
        self.reference = None  # frozen copy of the sampling weights (reference_logprobs=recompute)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _compile_layers(self) -> None:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        names = set(getattr(base, "_no_split_modules", None) or [])
        layers = [m for m in base.modules() if type(m).__name__ in names]
        for layer in layers:
            layer.compile(dynamic=True)
        log.info("torch.compile: %d decoder layers", len(layers))

    # ----------------------------------------------------------------------------------------
    def engine_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current weights under Hugging Face names (LoRA merged), cast to the engine's (compute) dtype.

        With LoRA the merged weights are computed out of place (:mod:`oapl.trainer.lora_sync`), one
        tensor at a time: the frozen base is never written, so it stays bit-identical over any
        number of syncs.
        """
        dtype = self.precision.engine_dtype
        if not self.lora:
            for name, p in self.model.named_parameters():
                yield name, p.detach().to(dtype)
            return
        from oapl.trainer.lora_sync import merged_weights

        for name, t in merged_weights(self.model):
            yield name, t.to(dtype, copy=True)

    def hf_model(self):
        """A plain transformers model with the current weights (merged copy when LoRA is on).

        With LoRA: a copy of the model without the adapters (peft's ``unload``), whose weights are
        then set to the out-of-place merge -- the same tensors the engine gets, in the base dtype.
        """
        if not self.lora:
            return self.model
        from oapl.trainer.lora_sync import merged_weights

        model = copy.deepcopy(self.model).unload()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in merged_weights(self.model):
                params[name].copy_(t)
        return model

    def export(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Save a Hugging Face model (+ tokenizer) in ``dtype`` (default ``model.export_dtype``)."""
        dtype = dtype or self.precision.export_dtype
        path = Path(path)
        model = self.hf_model()
        state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(path, state_dict=state, safe_serialization=True)
        cfg_file = path / "config.json"
        if cfg_file.exists():  # say the dtype the file holds
            import json

            conf = json.loads(cfg_file.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in conf:
                    conf[key] = str(dtype).replace("torch.", "")
            cfg_file.write_text(json.dumps(conf, indent=2))
        self.tokenizer.save_pretrained(path)
        return path

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current weights as pi_inf (``reference_logprobs: recompute``)."""
        ref = self.hf_model() if self.lora else copy.deepcopy(self.model)  # hf_model: already a copy
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self.reference = ref

    # ----------------------------------------------------------------------------------------
    def train_step(self, groups) -> dict[str, float]:
        """One trainer step on the batch (``algorithm.mini_batches`` optimiser steps); returns metrics.

        A non-finite loss or gradient skips that optimiser step (weights untouched).
        """
        from oapl.trainer.stats import StepStats, metrics_row
        from oapl.trainer.step import Parallel, plan_step, run_step

        works, batch = plan_step(groups, self.objective, self.cfg.optim, self.cfg.algorithm.mini_batches)
        out = run_step(self, works[0], Parallel(self))
        return metrics_row(
            batch,
            StepStats(**out["stats"]),
            finite=out["finite"],
            grad_norm=out["grad_norm"],
            lr=out["lr"],
            seconds=out["seconds"],
            mini_batches=out["mini_batches"],
        )

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimiser and schedule; restored by :func:`oapl.distributed.sharded.load_policy_state`."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}


def shared_prompt_mode(cfg: TrainConfig, model) -> str:
    """``optim.share_prompts`` as this model can run it: ``off`` under gradient checkpointing (auto) or
    for attention the shared KV cache is not known to serve (sliding windows, other kernels)."""
    from oapl.trainer.attention import supports_packing

    mode = cfg.optim.share_prompts
    if mode == "off":
        return mode
    ok, why = supports_packing(model)
    if cfg.model.gradient_checkpointing:
        ok, why = False, "model.gradient_checkpointing=true"
    if not ok:
        if mode == "on":
            raise ValueError(f"optim.share_prompts=on is not supported for this model ({why}); use auto or off")
        log.info("shared-prompt micro-batches are off for this model (%s)", why)
        return "off"
    return mode


def apply_liger(model, device: torch.device) -> None:
    """Patch liger-kernel's fused RMSNorm, SwiGLU and RoPE into ``model`` (the LM head stays ours:
    the chunked fp32 log-probs already never hold ``B x T x V`` logits)."""
    if device.type != "cuda":
        raise ValueError("model.liger needs a CUDA device (liger-kernel's kernels are Triton): set model.liger=false")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ValueError("model.liger=true needs liger-kernel: pip install 'oapl[liger]'") from e
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    log.info("liger-kernel: fused RMSNorm, SwiGLU and RoPE patched into %s", type(model).__name__)


def lora_targets_error(model, targets, exc: BaseException):
    """The :class:`~oapl.errors.UserError` for ``model.lora.target_modules`` that peft refused: what the
    model's adaptable layers are called, so the field can be fixed."""
    from oapl.errors import UserError

    names: dict[str, None] = {}
    for full, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__ == "Conv1D":
            leaf = full.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.setdefault(leaf, None)
    first = " ".join(str(exc).split())[:200].rstrip(".")
    return UserError(
        f"model.lora.target_modules={targets!r}: {first}; {type(model).__name__}'s adaptable layers are "
        f"named {', '.join(list(names)[:12])} (or use all-linear)"
    )


def check_lora_targets(model_path: str, targets, trust_remote_code: bool = False) -> None:
    """``model.lora.target_modules`` match a module of the model at ``model_path``, else the
    :class:`~oapl.errors.UserError` of :func:`lora_targets_error`. The model is built on the meta
    device (no weights read), and matched with peft's own rule."""
    if targets == "all-linear":
        return
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    lc = LoraConfig(target_modules=targets, task_type="CAUSAL_LM")
    if not any(check_target_module_exists(lc, name) for name, _ in model.named_modules()):
        raise lora_targets_error(model, targets, ValueError(f"Target modules {targets} not found in the base model"))


def load_policy(
    cfg: TrainConfig, total_steps: int, checkpoint: str | Path | None = None, model=None, load_optimizer: bool = True
) -> tuple[Policy, dict[str, Any]]:
    """The policy of a run, fresh or restored from ``checkpoint``; also the checkpoint's trainer state.

    Restoring takes the fp32 master weights from ``checkpoint/model`` (or the LoRA adapters from
    ``checkpoint/adapter_model.safetensors`` over the configured base model), then the optimiser and
    schedule state.
    The one restore path for the local loop, the Ray trainer ranks and offline training.
    """
    from oapl.trainer.checkpoint import load_trainer_state

    state: dict[str, Any] = {}
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        state = load_trainer_state(ckpt)
        if not cfg.model.lora.enabled and model is None:
            if not (ckpt / "model" / "config.json").is_file():  # a local folder, never a Hub name
                from oapl.trainer.checkpoint import CheckpointError

                raise CheckpointError(f"{ckpt}: damaged checkpoint (model/ is missing); resume from another one")
            dev = pick_device(cfg.model.device)
            model = load_causal_lm(
                str(ckpt / "model"), resolve_precision(cfg.model, dev).load_dtype, dev, cfg.model.trust_remote_code
            )
    policy = Policy(cfg, total_steps=total_steps, model=model)
    if checkpoint is not None and cfg.model.lora.enabled:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from oapl.trainer.checkpoint import CheckpointError, adapter_file

        adapter = adapter_file(checkpoint)
        if adapter is None:
            raise CheckpointError(
                f"{checkpoint}: the checkpoint has no LoRA adapters (adapter_model.safetensors; was it written "
                f"with model.lora.enabled=false?)"
            )
        set_peft_model_state_dict(policy.model, load_file(str(adapter)))
    if state and load_optimizer and "policy" in state:
        from oapl.distributed.sharded import load_policy_state

        assert checkpoint is not None  # a trainer state comes from a checkpoint
        load_policy_state(policy, state["policy"], checkpoint)  # either format: one process or sharded
    return policy, state
