"""Weight transport from trainer rank 0 to the engine actors.

Two transports:

* ``object_store`` (CPU default): rank 0 returns its weights as a ``{name: tensor}`` dict; the
  driver holds the ``ObjectRef`` and every engine loads from it.
* ``collective`` (GPU default, NCCL; gloo on CPU for testing): rank 0 and the N engines form a
  separate process group of N + 1 members (its own ``TCPStore`` hosted by rank 0, not the trainer's
  default group); every parameter is broadcast from rank 0 in a fixed order and streamed into the
  engine's ``load_weights`` one tensor at a time, so no engine holds two copies of the model.

Both keep the ``object_store`` copy of the latest synced weights: it is what a restarted engine
loads (an engine that dies mid-window must come back with version ``v``, which the trainer no
longer holds once it has stepped).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from typing import Any

import torch

GROUP_TIMEOUT_S = 300.0


class WeightGroup:
    """A stand-alone process group (not registered with ``torch.distributed``'s default world)."""

    def __init__(
        self, host: str, port: int, rank: int, world: int, backend: str, epoch: int, timeout_s: float = GROUP_TIMEOUT_S
    ) -> None:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world, self.backend, self.epoch = rank, world, backend, epoch
        # rank 0 hosts the rendezvous store; the others connect to it (retrying until it is up)
        self._store: Any = dist.TCPStore(
            host, port, world_size=world, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
        store = dist.PrefixStore(f"oapl-weights-{epoch}", self._store)
        self.pg: Any  # a ProcessGroupNCCL or ProcessGroupGloo (both have .broadcast)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"unknown weight-group backend {backend!r}")
        # a first collective so that every member has finished connecting before it is used
        self.barrier()

    def barrier(self) -> None:
        t = torch.zeros(1, device=self.device)
        self.broadcast(t)

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()

    def send_all(self, weights: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Rank 0: broadcast every tensor, in order; returns the count."""
        count = 0
        for _, t in weights:
            self.broadcast(t.detach().to(self.device).contiguous())
            count += 1
        return count

    def receive_all(self, meta: list[tuple[str, list[int], str]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Engines: yield ``(name, tensor)`` as each broadcast arrives (drain it fully, even on error)."""
        for name, shape, dtype in meta:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self.broadcast(t)
            yield name, t

    def close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
        self._store = None


def weight_meta(weights: Iterator[tuple[str, torch.Tensor]]) -> list[tuple[str, list[int], str]]:
    """``(name, global shape, dtype)`` in the order rank 0 will broadcast them."""
    return [(n, list(t.shape), str(t.dtype).replace("torch.", "")) for n, t in weights]


def cpu_state(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An owned CPU copy (what goes into the object store)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in weights}
