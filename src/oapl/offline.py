"""Offline OAPL: train on a stored rollout dataset, with no inference engine.

This is the paper's code experiment: the data was sampled once by a fixed policy (the "lagged
inference policy"), V* comes from the stored group rewards, the KL reference is the stored engine
log-probs (or a frozen copy of the sampling weights recomputing them), and the trainer makes several
passes over it without any weight sync (L = the whole run). It is :class:`oapl.loop.Run` over
:class:`oapl.backends.offline.OfflineBackend`.
"""

from __future__ import annotations

from typing import Any

from oapl.config import TrainConfig
from oapl.config_views import is_offline

__all__ = ["train_offline"]


def train_offline(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.offline.data`` for ``cfg.offline.epochs`` epochs; the run's summary.

    ``output_dir`` rules as in :func:`oapl.loop.train`: a non-empty one needs ``resume`` or ``overwrite``.
    """
    from oapl.loop import train

    if not is_offline(cfg):
        raise ValueError("offline.data is required for offline training")
    return train(cfg, resume=resume, overwrite=overwrite).summary
