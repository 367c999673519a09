"""AdamW and learning-rate schedules (constant, cosine or linear decay, all with linear warm-up)."""

from __future__ import annotations

import math

import torch

from oapl.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel on CUDA (``optim.fused``)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    dev = device if device is not None else params[0].device
    fused = cfg.fused == "on" or (cfg.fused == "auto" and torch.device(dev).type == "cuda")
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs
    )


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimiser step ``s`` (0-based)."""
    warmup = max(cfg.warmup_steps, int(round(cfg.warmup_ratio * total_steps)))

    def fn(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "linear":  # transformers' get_linear_schedule_with_warmup: 1 -> 0
            return max(0.0, (total_steps - s) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
