"""Host-side resources of the code sandbox: uid slots, cgroups, and the leftovers of killed runs.

Split from :mod:`oapl.rewards.sandbox.runner` (which launches programs); nothing here runs
untrusted code."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence

from oapl.rewards.sandbox.types import SandboxConfig

logger = logging.getLogger("oapl.rewards.sandbox.runner")  # one logger name for the whole sandbox


def rmtree_quiet(path: str) -> None:
    def onerror(func, p, _exc):  # read-only dirs left by a degraded-mode program
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


# --------------------------------------------------------------------------- uid slots

_slot_lock = threading.Lock()
_slots_in_use: set[int] = set()


def acquire_slot() -> int:
    with _slot_lock:
        slot = 0
        while slot in _slots_in_use:
            slot += 1
        _slots_in_use.add(slot)
        return slot


def release_slot(slot: int) -> None:
    with _slot_lock:
        _slots_in_use.discard(slot)


def sandbox_uid(config: SandboxConfig, slot: int) -> int:
    """The dedicated uid of a concurrently running program (root only)."""
    return config.uid_base + (os.getpid() % (1 << 22)) * 256 + (slot % 256)


# --------------------------------------------------------------------------- cgroups

_CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_limits(config: SandboxConfig) -> tuple[int, int]:
    """(memory bytes, pids) for a whole sandbox: program + its tmpfs + launcher overhead."""
    memory = (config.memory_mb + 2 * config.tmpfs_mb + 160) << 20
    return memory, config.max_processes + 8


def create_cgroups(config: SandboxConfig, name: str) -> list[str]:
    """Create memory+pids cgroups for one sandbox (root only, best effort).

    Returns the ``cgroup.procs`` files the launcher must join (empty when
    cgroups are not writable here; rlimits and ``oom_score_adj`` still apply).
    """
    if os.geteuid() != 0 or not os.path.isdir(_CGROUP_ROOT):
        return []
    memory, pids = _cgroup_limits(config)
    procs: list[str] = []
    try:
        if os.path.exists(os.path.join(_CGROUP_ROOT, "cgroup.controllers")):  # cgroup v2
            with open(os.path.join(_CGROUP_ROOT, "cgroup.controllers")) as f:
                available = f.read().split()
            if "memory" not in available:
                return []
            try:
                with open(os.path.join(_CGROUP_ROOT, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory" + (" +pids" if "pids" in available else ""))
            except OSError:
                pass
            path = os.path.join(_CGROUP_ROOT, name)
            os.makedirs(path, exist_ok=True)
            _write(os.path.join(path, "memory.max"), str(memory))
            _write(os.path.join(path, "memory.swap.max"), "0", optional=True)
            _write(os.path.join(path, "pids.max"), str(pids), optional=True)
            return [os.path.join(path, "cgroup.procs")]
        mem_root = os.path.join(_CGROUP_ROOT, "memory")
        if os.path.isdir(mem_root):  # cgroup v1
            path = os.path.join(mem_root, name)
            os.makedirs(path, exist_ok=True)
            procs.append(os.path.join(path, "cgroup.procs"))
            _write(os.path.join(path, "memory.limit_in_bytes"), str(memory))
            _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(memory), optional=True)
        pids_root = os.path.join(_CGROUP_ROOT, "pids")
        if os.path.isdir(pids_root):
            path = os.path.join(pids_root, name)
            os.makedirs(path, exist_ok=True)
            procs.append(os.path.join(path, "cgroup.procs"))
            _write(os.path.join(path, "pids.max"), str(pids))
    except OSError as exc:
        logger.debug("cgroups unavailable for the sandbox: %s", exc)
        remove_cgroups(procs)
        return []
    return procs


def _write(path: str, value: str, optional: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        if not optional:
            raise


def remove_cgroups(procs_files: list[str]) -> None:
    """Remove sandbox cgroups once empty (retrying while exits are accounted)."""
    for procs in procs_files:
        path = os.path.dirname(procs)
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            logger.warning("could not remove sandbox cgroup %s", path)


# --------------------------------------------------------------------------- leftovers of killed runs

_STALE_NAME = re.compile(r"^oapl-sbx-(\d+)-")
_CGROUP_DIRS = (_CGROUP_ROOT, os.path.join(_CGROUP_ROOT, "memory"), os.path.join(_CGROUP_ROOT, "pids"))
_stale_cleaned = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_pid(name: str) -> int | None:
    """The pid in a sandbox dir/cgroup name if that process is gone (never our own)."""
    m = _STALE_NAME.match(name)
    if m is None:
        return None
    pid = int(m.group(1))
    return None if pid == os.getpid() or _pid_alive(pid) else pid


def cleanup_stale_sandboxes(tmp_root: str | None = None, cgroup_dirs: Sequence[str] = _CGROUP_DIRS) -> list[str]:
    """Remove sandbox temp dirs and cgroups left by killed processes; returns what was removed.

    Sandboxes are named ``oapl-sbx-<pid>-...`` after the process that made them; only those of
    processes that no longer exist (and, for directories, that belong to this user) are touched,
    so concurrent runs are safe. Any process still in a stale cgroup is killed first.
    """
    removed: list[str] = []
    root = tmp_root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    for name in names:
        path = os.path.join(root, name)
        if _stale_pid(name) is None:
            continue
        try:
            if os.lstat(path).st_uid != os.geteuid() or not os.path.isdir(path) or os.path.islink(path):
                continue
        except OSError:
            continue
        rmtree_quiet(path)
        if not os.path.exists(path):
            removed.append(path)
    for base in cgroup_dirs:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            path = os.path.join(base, name)
            if _stale_pid(name) is None or not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for line in f:
                        try:
                            os.kill(int(line), signal.SIGKILL)
                        except (ValueError, ProcessLookupError, PermissionError):
                            pass
            except OSError:
                pass
            remove_cgroups([os.path.join(path, "cgroup.procs")])
            if not os.path.exists(path):
                removed.append(path)
    if removed:
        logger.info("removed %d sandbox leftover(s) of killed runs: %s", len(removed), ", ".join(removed))
    return removed


def cleanup_stale_sandboxes_once() -> None:
    """:func:`cleanup_stale_sandboxes` on the first call in this process."""
    global _stale_cleaned
    if not _stale_cleaned:
        _stale_cleaned = True
        try:
            cleanup_stale_sandboxes()
        except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a run
            logger.debug("sandbox leftover cleanup failed: %s", exc)
