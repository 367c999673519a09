"""GRPO baseline with truncated importance-sampling correction (the paper's comparison).

Pure tensor functions; shapes: ``N`` sequences, ``T`` tokens, groups of ``G`` responses.
"""

from __future__ import annotations

import math

import torch

# The IS weights' p1 / p99 come from a histogram of log w (bins of width IS_LOGW_BIN centred on 0, so w = 1
# falls in the centre bin; clamped to +-IS_LOGW_BINS bins): counts add over micro-batches and ranks like the
# other ``*_sum`` statistics, and a quantile is read back to ~1% of w.
IS_LOGW_BIN = 0.01
IS_LOGW_BINS = 300
IS_HIST_PREFIX = "is_logw_bin"


def is_weight_histogram(w: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Counts of the masked weights ``w`` per log-bin, as ``{"is_logw_bin<k>": count}`` (non-empty bins)."""
    lw = torch.log(w.detach().double().clamp(min=1e-300))[mask.bool()]
    k = torch.round(lw / IS_LOGW_BIN).clamp(-IS_LOGW_BINS, IS_LOGW_BINS).long()
    bins, counts = torch.unique(k, return_counts=True)
    return {f"{IS_HIST_PREFIX}{int(b):+d}": c.to(torch.float64) for b, c in zip(bins, counts)}


def is_weight_quantile(stats: dict[str, float], q: float) -> float | None:
    """The ``q`` quantile of the weights counted by :func:`is_weight_histogram` (summed over micro-batches),
    as the centre ``exp(k * IS_LOGW_BIN)`` of its bin; None without counts."""
    hist = sorted((int(k[len(IS_HIST_PREFIX) :]), float(v)) for k, v in stats.items() if k.startswith(IS_HIST_PREFIX))
    total = sum(c for _, c in hist)
    if total <= 0:
        return None
    cum = 0.0
    for k, c in hist:
        cum += c
        if cum >= q * total:
            return math.exp(k * IS_LOGW_BIN)
    return math.exp(hist[-1][0] * IS_LOGW_BIN)


def group_normalized_advantage(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    r"""``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the last dimension (the group of G responses).

    ``std`` is the population standard deviation. With ``scale=False`` only the mean is subtracted
    (Dr. GRPO). A group whose rewards are all equal gets advantage 0.
    """
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    inf_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    is_cap: float | None = 2.0,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped GRPO surrogate with token-level truncated importance sampling.

    .. math::

        \rho_{i,t} = \exp(\log\pi(y_{i,t}) - \log\pi_{old}(y_{i,t}))

        w_{i,t} = \min\big(\exp(\log\pi_{old}(y_{i,t}) - \log\pi_{inf}(y_{i,t})),\ C\big)

        \ell_{i,t} = -\,w_{i,t}\,\min\big(\rho_{i,t} A_i,\ \operatorname{clip}(\rho_{i,t}, 1-\epsilon, 1+\epsilon) A_i\big)

        \mathcal{L} = \frac{1}{N}\sum_i \frac{\sum_t m_{i,t}\,\ell_{i,t}}{\sum_t m_{i,t}}

    Per-sequence length normalisation, then the mean over sequences. ``w`` corrects the mismatch
    between the engine that sampled (``pi_inf``) and the trainer's behaviour policy ``pi_old``;
    pass ``inf_logprobs=None`` (or ``is_cap=None``) for plain on-policy GRPO without correction.

    Args:
        logprobs: ``(N, T)`` current trainer log-probs (differentiable).
        old_logprobs: ``(N, T)`` trainer log-probs before the update (no gradient).
        inf_logprobs: ``(N, T)`` engine log-probs of the sampled tokens, or ``None``.
        mask: ``(N, T)`` response-token mask.
        advantages: ``(N,)`` group-normalised advantages.
        clip_eps: PPO clip range.
        is_cap: truncation ``C`` of the importance weight.
        num_sequences: whole-batch ``N`` when ``logprobs`` is a micro-batch (exact accumulation).

    Returns:
        ``(loss, stats)`` where stats holds the clip fraction and mean importance weight (detached).
    """
    mask = mask.to(logprobs.dtype)
    n = logprobs.shape[0] if num_sequences is None else num_sequences
    log_ratio = logprobs - old_logprobs.to(logprobs.dtype)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    token_obj = torch.minimum(unclipped, clipped)
    if inf_logprobs is not None and is_cap is not None:
        w = torch.exp(old_logprobs.to(logprobs.dtype) - inf_logprobs.to(logprobs.dtype)).clamp(max=is_cap)
    else:
        w = torch.ones_like(token_obj)
    token_loss = -(w.detach() * token_obj)
    lengths = mask.sum(dim=-1).clamp(min=1.0)
    seq_loss = (token_loss * mask).sum(dim=-1) / lengths
    loss = seq_loss.sum() / n
    with torch.no_grad():
        denom = mask.sum().clamp(min=1.0)
        stats = {
            "clip_frac": ((clipped < unclipped).to(mask.dtype) * mask).sum() / denom,
            "is_weight_mean": (w * mask).sum() / denom,
        }
    return loss, stats


class GRPOObjective:
    """GRPO with truncated IS for the train step (the paper's baseline).

    Advantages are group-normalised rewards. pi_old is the trainer at the start of the batch: with
    one mini-batch it equals the current log-probs (ratio 1, the clip never acts); with
    ``mini_batches > 1`` it is computed once before the first update, so later mini-batches clip.
    The IS weight ``min(pi_old / pi_inf, C)`` uses the engine's log-probs as pi_inf.
    """

    name = "grpo"
    value_key = "baseline_mean"

    def __init__(
        self, clip_eps: float = 0.2, is_cap: float | None = 2.0, scale: bool = True, mini_batches: int = 1
    ) -> None:
        self.clip_eps, self.is_cap, self.scale = clip_eps, is_cap, scale
        self.needs_old_logprobs = mini_batches > 1

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = rewards.to(torch.float64)
        return group_normalized_advantage(r, scale=self.scale), r.mean()

    def loss(self, logprobs, ref_logprobs, old_logprobs, mask, advantages, num_sequences):
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        inf = ref_logprobs if self.is_cap is not None else None
        loss, st = grpo_loss(
            logprobs, old, inf, mask, advantages, self.clip_eps, self.is_cap, num_sequences=num_sequences
        )
        with torch.no_grad():
            m = mask.to(logprobs.dtype)
            ratio = torch.exp(logprobs.detach() - old.to(logprobs.dtype))
            tokens = m.sum()
            stats = {
                "clip_frac_sum": st["clip_frac"] * tokens.clamp(min=1.0),
                "is_weight_sum": st["is_weight_mean"] * tokens.clamp(min=1.0),
                "ratio_sum": (ratio * m).sum(),
                "ratio_max": (ratio * m).max() if m.numel() else ratio.new_zeros(()),
                "tokens": tokens,
            }
            if inf is not None:  # the truncated weight min(pi_old/pi_inf, C) the loss applied, per token
                w = torch.exp(old.double() - inf.double()).clamp(max=self.is_cap)
                stats.update(is_weight_histogram(w, m))
        return loss, stats
