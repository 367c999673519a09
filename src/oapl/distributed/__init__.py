"""Ray backend (``distributed.backend: ray``): engine actors, DDP/FSDP2 trainer ranks, weight sync, faults.

``import oapl.distributed`` does not import Ray; building a :class:`~oapl.distributed.backend.RayBackend`
does (``pip install -e ".[ray]"``). Runs start from :func:`oapl.loop.train`, which picks this backend
for ``distributed.backend: ray``. See ``docs/scaling.md``.
"""
