"""Ray backend (``distributed.backend: ray``): engine actors, DDP/FSDP2 trainer ranks, weight sync, faults.

``import oapl.distributed`` does not import Ray; :func:`train` does (``pip install -e ".[ray]"``).
See ``docs/scaling.md``.
"""

from __future__ import annotations


def train(cfg, resume: bool = False, **kwargs):
    """Run ``cfg`` on Ray (see :func:`oapl.distributed.ray_loop.train`)."""
    from oapl.distributed.ray_loop import train as _train

    return _train(cfg, resume=resume, **kwargs)


__all__ = ["train"]
