"""The rollout buffer D of Algorithm 1: groups of G responses, all of one weight version.

With ``max_staleness=0`` (OAPL) the buffer holds only groups sampled by the engine's *current* weights: ``clear(new_version)`` at
every sync empties it and from then on refuses groups tagged with an older version (a generation
that was in flight during the sync), so a batch never mixes weight versions and V* is always
estimated from one sampling distribution.
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

    def clear(self, new_version: int) -> int:
        """Move to ``new_version``: drop groups more than ``max_staleness`` versions old (everything,
        for OAPL's ``max_staleness=0``) and refuse them from now on; returns groups dropped."""
        with self._cond:
            self._version = new_version
            kept = [g for g in self._groups if self._fresh(g.version)]
            dropped = len(self._groups) - len(kept)
            self._groups = deque(kept)
            self.cleared += dropped
            self._cond.notify_all()
            return dropped

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
