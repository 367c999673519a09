"""Reward functions in TRL's convention: ``fn(prompts, completions, **columns) -> list[float]``.

Public API (stable):

* :func:`math_reward`: 1.0 when the last ``\\boxed{}`` equals the ``answer`` column (math-verify, in
  worker processes, so its timeouts work from any thread);
* :func:`code_reward`: 1.0 when the last fenced code block passes every test of the ``tests`` column,
  run in a sandbox.

Both work as ``reward_funcs`` of :class:`oapl.OAPLTrainer` and of TRL's ``GRPOTrainer``. They are
imported on first use: ``import oapl.rewards`` loads neither math-verify nor the sandbox.
"""

from __future__ import annotations

from oapl._lazy import lazy_exports

__all__ = ["math_reward", "code_reward"]

_LAZY = {
    "math_reward": "oapl.rewards.math",
    "code_reward": "oapl.rewards.code",
    "MathVerifier": "oapl.rewards.math",
    "make_code_reward": "oapl.rewards.code",
    "arithmetic_reward": "oapl.rewards.arithmetic",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
