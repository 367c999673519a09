"""The rollout buffer D of Algorithm 1: groups of G responses, all of one weight version.

With ``max_staleness=0`` (OAPL) the buffer holds only groups sampled by the engine's *current* weights: ``clear(new_version)`` at
every sync empties it and from then on refuses groups tagged with an older version (a generation
that was in flight during the sync), so a batch never mixes weight versions and V* is always
estimated from one sampling distribution.

Such a buffer is emptied at every sync, so a group generated beyond what the trainer takes before the
next sync is thrown away unused: on a machine where the engine and the trainer share the cores, that
generation slows the trainer for nothing. The loop therefore tells the buffer its *demand*, the groups
the trainer will take at the current version (``L x prompts_per_step`` per window), and a background
worker reserves its groups (:meth:`~RolloutBuffer.reserve`) before generating them: once the version's
groups are all produced or in flight, it waits for the sync instead of generating groups that would
be cleared.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from oapl.rollout.group import RolloutGroup

__all__ = ["BufferClosed", "RolloutBuffer", "RolloutGroup"]


class BufferClosed(RuntimeError):
    """The buffer was closed while waiting."""


class RolloutBuffer:
    """Bounded, thread-safe FIFO of :class:`RolloutGroup` tagged with one weight version."""

    def __init__(self, capacity: int, version: int = 0, max_staleness: int | None = 0) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError("max_staleness must be >= 0 (or None: any version, for stored data)")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self._version = version
        self._groups: deque[RolloutGroup] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.discarded_stale = 0
        self.cleared = 0
        self._demand: int | None = None  # groups the trainer takes at this version (None: no limit)
        self._accepted = 0  # groups of this version put so far
        self._pending = 0  # groups of this version reserved by a generation in flight

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        with self._cond:
            return len(self._groups)

    def put(self, group: RolloutGroup, timeout: float | None = None) -> bool:
        """Add a group; waits while full. Returns False (group dropped) if its version is stale."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise BufferClosed("buffer closed")
                if not self._fresh(group.version):
                    self.discarded_stale += 1
                    return False
                if len(self._groups) < self.capacity:
                    self._groups.append(group)
                    if group.version == self._version:
                        self._accepted += 1
                    self._cond.notify_all()
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("buffer full")
                self._cond.wait(remaining)

    def _fresh(self, version: int) -> bool:
        if self.max_staleness is None:
            return True
        return self._version - self.max_staleness <= version <= self._version

    def take(self, k: int, timeout: float | None = None) -> list[RolloutGroup]:
        """Remove and return the ``k`` oldest groups, waiting until there are ``k``."""
        if k > self.capacity:
            raise ValueError(f"cannot take {k} groups from a buffer of capacity {self.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._groups) < k:
                if self._closed:
                    raise BufferClosed("buffer closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"waited {timeout}s for {k} groups; buffer has {len(self._groups)}")
                self._cond.wait(remaining)
            out = [self._groups.popleft() for _ in range(k)]
            self._cond.notify_all()
            return out

    def clear(self, new_version: int, demand: int | None = None) -> int:
        """Move to ``new_version``: drop groups more than ``max_staleness`` versions old (everything,
        for OAPL's ``max_staleness=0``) and refuse them from now on; returns groups dropped.
        ``demand``: the groups the trainer will take at the new version (:meth:`set_demand`)."""
        with self._cond:
            self._version = new_version
            kept = [g for g in self._groups if self._fresh(g.version)]
            dropped = len(self._groups) - len(kept)
            self._groups = deque(kept)
            self.cleared += dropped
            self._demand, self._accepted, self._pending = demand, 0, 0
            self._cond.notify_all()
            return dropped

    def set_demand(self, demand: int | None) -> None:
        """The trainer will take ``demand`` groups of the current version before the next sync (``None``:
        no limit, e.g. when groups outlive a sync). :meth:`reserve` holds a worker back beyond it."""
        if demand is not None and demand < 0:
            raise ValueError(f"demand must be >= 0 (or None), got {demand}")
        with self._cond:
            self._demand = demand
            self._cond.notify_all()

    def reserve(self, k: int) -> int:
        """Reserve ``k`` groups of the current version before generating them; waits while the version's
        demand is already met by groups put or in flight (more would be cleared at the sync unused).
        Returns the version reserved for; pass it to :meth:`release` once the groups are put (or not)."""
        with self._cond:
            while not self._closed and self._demand is not None and self._accepted + self._pending >= self._demand:
                self._cond.wait()
            if self._closed:
                raise BufferClosed("buffer closed")
            self._pending += k
            return self._version

    def release(self, k: int, version: int) -> None:
        """The generation that reserved ``k`` groups at ``version`` is over: the groups it put count as
        accepted, and any it did not (dropped, failed) may be generated again."""
        with self._cond:
            if version == self._version:
                self._pending = max(0, self._pending - k)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
