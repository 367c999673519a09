"""OAPL objective: optimal value estimate and squared-regression loss (arXiv 2602.19362, Eq. 2-3).

Both functions are pure tensor functions: no model, no state. Shapes use

* ``N`` sequences in the batch, each belonging to a prompt group of ``G`` responses,
* ``T`` tokens per (padded) response.
"""

from __future__ import annotations

import math

import torch


def optimal_value(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    r"""Soft-max value estimate of a prompt from the rewards of its group (Eq. 2).

    .. math::

        V^*(x) = \beta_1 \log\Big(\frac{1}{G}\sum_{i=1}^{G} e^{r_i/\beta_1}\Big)
               = \beta_1\big(\operatorname{logsumexp}(r/\beta_1) - \log G\big)

    computed with ``logsumexp`` so that large ``r/beta1`` does not overflow. As ``beta1 -> 0`` it
    tends to ``max_i r_i``; as ``beta1 -> inf`` to ``mean_i r_i``.

    Args:
        rewards: ``(..., G)`` rewards of the G responses of one weight version (the last dimension
            is the group).
        beta1: temperature of the soft-max, ``> 0``.

    Returns:
        ``(...)`` value estimate per group.
    """
    if beta1 <= 0:
        raise ValueError(f"beta1 must be > 0, got {beta1}")
    group = rewards.shape[-1]
    if group == 0:
        raise ValueError("optimal_value needs at least one reward per group")
    r = rewards.to(torch.float64) / beta1
    v = beta1 * (torch.logsumexp(r, dim=-1) - math.log(group))
    return v.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def optimal_advantage(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    r"""``A*_i = r_i - V*(x)`` for every response of every group; ``rewards`` is ``(..., G)``."""
    return rewards - optimal_value(rewards, beta1).unsqueeze(-1)


def sequence_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""``s_i = \sum_t m_{i,t}\,(\log\pi(y_{i,t}) - \log\pi_{inf}(y_{i,t}))``; inputs ``(N, T)``, output ``(N,)``."""
    mask = mask.to(logprobs.dtype)
    return ((logprobs - ref_logprobs.to(logprobs.dtype)) * mask).sum(dim=-1)


def oapl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    beta2: float,
    num_sequences: int | None = None,
) -> torch.Tensor:
    r"""OAPL squared-regression loss (Eq. 3).

    .. math::

        s_i = \sum_t m_{i,t}\big(\log\pi(y_{i,t}\mid x, y_{i,<t}) - \log\pi_{inf}(y_{i,t}\mid x, y_{i,<t})\big)

        \mathcal{L} = \frac{1}{N}\sum_{i=1}^{N}\big(\beta_2\, s_i - A^*_i\big)^2

    No importance ratios and no clipping: the minimiser is the KL-regularised optimum relative to the
    inference policy ``pi_inf`` whose log-probabilities are ``ref_logprobs``.

    Args:
        logprobs: ``(N, T)`` trainer log-probs of the sampled tokens (differentiable).
        ref_logprobs: ``(N, T)`` inference-policy log-probs of the same tokens (no gradient).
        mask: ``(N, T)`` 1 on response tokens, 0 on padding.
        advantages: ``(N,)`` optimal advantages ``A*_i = r_i - V*(x)``.
        beta2: KL-regularisation strength, ``> 0``.
        num_sequences: the denominator ``N``. Pass the number of sequences of the *whole* batch when
            ``logprobs`` is a micro-batch, so that the micro-batch losses add up exactly to the loss of
            the whole batch (gradient accumulation). Defaults to ``logprobs.shape[0]``.

    Returns:
        Scalar loss.
    """
    if beta2 <= 0:
        raise ValueError(f"beta2 must be > 0, got {beta2}")
    n = logprobs.shape[0] if num_sequences is None else num_sequences
    if n <= 0:
        raise ValueError("oapl_loss needs at least one sequence")
    s = sequence_log_ratio(logprobs, ref_logprobs, mask)
    residual = beta2 * s - advantages.to(s.dtype)
    return residual.pow(2).sum() / n


class OAPLObjective:
    """OAPL for the train step: ``A*_i = r_i - V*(x)`` per group (Eq. 2), loss Eq. 3.

    The KL reference is pi_inf (``ref_logprobs``: the engine's log-probs, or a frozen copy's).
    """

    name = "oapl"
    value_key = "v_star_mean"
    needs_old_logprobs = False

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = rewards.to(torch.float64)
        v = optimal_value(r, self.beta1)
        return r - v, v

    def loss(self, logprobs, ref_logprobs, old_logprobs, mask, advantages, num_sequences):
        return oapl_loss(logprobs, ref_logprobs, mask, advantages, self.beta2, num_sequences=num_sequences), {}
