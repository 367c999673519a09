"""Objectives: pure tensor functions, one module per algorithm, formula in each docstring."""

from oapl.objectives.grpo import group_normalized_advantage, grpo_loss
from oapl.objectives.oapl import optimal_advantage, optimal_value, oapl_loss, sequence_log_ratio

__all__ = [
    "group_normalized_advantage",
    "grpo_loss",
    "oapl_loss",
    "optimal_advantage",
    "optimal_value",
    "sequence_log_ratio",
]
