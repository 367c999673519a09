"""oapl: off-policy RL post-training of LLMs with OAPL and a lagged inference policy.

The public API (everything else may change):

* :class:`OAPLTrainer` and :class:`OAPLConfig`: TRL's ``GRPOTrainer`` / ``GRPOConfig`` shape;
* :func:`train` and :func:`load_config`: run a configuration (as ``oapl train``), read one from YAML;
* :mod:`oapl.rewards`: ``math_reward`` and ``code_reward``, usable by TRL too.

They are imported on first use, so ``import oapl`` stays cheap (no torch).
"""

from __future__ import annotations

from oapl._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["OAPLTrainer", "OAPLConfig", "TrainConfig", "train", "load_config", "rewards", "__version__"]

_LAZY = {
    "OAPLTrainer": "oapl.api",
    "OAPLConfig": "oapl.trl_config",
    "TrainConfig": "oapl.config",
    "train": "oapl.api",
    "load_config": "oapl.api",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), {**_LAZY, "rewards": "oapl.rewards"}, __all__)
