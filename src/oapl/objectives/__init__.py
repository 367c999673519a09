"""Objectives: pure tensor functions, one module per algorithm, formula in each docstring.

:func:`build_objective` turns ``cfg.algorithm`` into an :class:`Objective`, the one place where the
algorithm's name is read: the trainer asks it for advantages (from each group's rewards) and for
the loss of a micro-batch, and never switches on the name itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from oapl.objectives.grpo import GRPOObjective, group_normalized_advantage, grpo_loss
from oapl.objectives.oapl import OAPLObjective, optimal_advantage, optimal_value, oapl_loss, sequence_log_ratio

if TYPE_CHECKING:
    from oapl.config import AlgorithmConfig


class Objective(Protocol):
    """What the train step needs from an algorithm.

    ``value_key`` names the per-group baseline in metrics (``v_star_mean`` for OAPL).
    ``needs_old_logprobs``: the loss uses pi_old, the trainer's log-probs at the start of the batch
    (computed once, without gradient, before the first optimiser step of the batch).
    """

    name: str
    value_key: str
    needs_old_logprobs: bool

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G,)`` rewards of one group -> ``((G,) advantages, () baseline)``, float64."""
        ...

    def loss(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        num_sequences: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, stats)``: the micro-batch's share of the mini-batch loss (``num_sequences`` = its N);
        ``stats`` are token sums (``*_sum``) and counts (``tokens``) that add over micro-batches."""
        ...


def build_objective(algo: AlgorithmConfig) -> Objective:
    """The objective for ``cfg.algorithm``."""
    if algo.name == "oapl":
        return OAPLObjective(beta1=algo.beta1, beta2=algo.beta2)
    if algo.name == "grpo":
        return GRPOObjective(
            clip_eps=algo.clip_eps, is_cap=algo.is_cap, scale=algo.scale_advantages, mini_batches=algo.mini_batches
        )
    raise ValueError(f"algorithm.name: unknown algorithm {algo.name!r} (oapl, grpo)")


__all__ = [
    "GRPOObjective",
    "OAPLObjective",
    "Objective",
    "build_objective",
    "group_normalized_advantage",
    "grpo_loss",
    "oapl_loss",
    "optimal_advantage",
    "optimal_value",
    "sequence_log_ratio",
]
