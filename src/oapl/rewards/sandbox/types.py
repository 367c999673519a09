"""The code sandbox's value types: its configuration, a program and its test cases, their results."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable, Sequence

#: Statuses a test run can have (``ok`` = exited 0 in time within all limits).
STATUSES = ("ok", "timeout", "runtime_error", "signal", "output_limit", "no_result", "deadline", "harness_error")


class SandboxUnavailableError(RuntimeError):
    """Raised (fail-closed) when the required isolation cannot be set up."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and policy for running untrusted programs.

    Attributes:
        timeout_s: wall-clock (and CPU-time) limit per test case.
        total_deadline_s: wall-clock limit for all test cases of one program.
        memory_mb: address-space limit (``RLIMIT_AS``) of the program, in MiB.
        max_output_bytes: stdout (and functional result) limit per test case.
        max_processes: processes/threads the program may have (``RLIMIT_NPROC``).
        workers: programs run in parallel (default: number of usable CPUs).
        allow_no_netns: if namespaces cannot be created, run anyway with only
            rlimits, a process group and (as root) a dedicated uid, i.e. WITHOUT
            network, pid and file-system isolation.  Off by default: the
            sandbox fails closed with :class:`SandboxUnavailableError`.
        max_file_bytes: largest file the program may write (``RLIMIT_FSIZE``).
        tmpfs_mb: size of the program's private in-memory ``/tmp`` (its cwd).
        max_open_files: ``RLIMIT_NOFILE`` of the program.
        isolation: ``"auto"`` (namespaces, else fail closed / degrade if
            ``allow_no_netns``), ``"namespaces"`` (always required) or ``"none"``
            (requires ``allow_no_netns=True``; for hosts where namespaces are
            known to be forbidden).
        uid_base: as root, each concurrently running program gets its own uid
            ``uid_base + (pid mod 2**22) * 256 + slot`` (no such user exists).
        python: interpreter that runs the programs (default: ``sys.executable``).
        stop_on_error: stop a program at its first failing test case.
        startup_grace_s: extra trainer-side slack on top of ``total_deadline_s``.
    """

    timeout_s: float = 6.0
    total_deadline_s: float = 60.0
    memory_mb: int = 1024
    max_output_bytes: int = 4 << 20
    max_processes: int = 16
    workers: int = 0
    allow_no_netns: bool = False
    max_file_bytes: int = 16 << 20
    tmpfs_mb: int = 64
    max_open_files: int = 64
    isolation: str = "auto"
    uid_base: int = 1_000_000_000
    python: str = ""
    stop_on_error: bool = True
    startup_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.total_deadline_s <= 0:
            raise ValueError("timeout_s and total_deadline_s must be positive")
        if self.memory_mb < 64:
            raise ValueError("memory_mb must be at least 64 (the interpreter needs it)")
        if self.max_output_bytes < 1 or self.max_file_bytes < 0 or self.tmpfs_mb < 1:
            raise ValueError("output/file/tmpfs limits must be positive")
        if self.max_processes < 1 or self.max_open_files < 8:
            raise ValueError("max_processes >= 1 and max_open_files >= 8 required")
        if self.isolation not in ("auto", "namespaces", "none"):
            raise ValueError("isolation must be 'auto', 'namespaces' or 'none'")
        if self.isolation == "none" and not self.allow_no_netns:
            raise ValueError("isolation='none' requires allow_no_netns=True")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = number of CPUs)")
        if not 0 < self.uid_base < 2**30:
            raise ValueError("uid_base must be in (0, 2**30)")

    @property
    def n_workers(self) -> int:
        """Effective number of parallel programs."""
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - non-Linux
            return max(1, os.cpu_count() or 1)


@dataclass
class TestRun:
    """What one execution of the program on one test input produced."""

    index: int
    status: str
    exit_code: int | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    stdout: str = ""
    result: str | None = None  # JSON of the return value (functional tests)
    stderr_tail: str = ""


@dataclass
class ProgramJob:
    """A program and the inputs to run it on.

    ``inputs`` are stdin strings (``mode="stdin"``) or argument lists
    (``mode="functional"``, calling ``func_name``).  ``check(run)`` is called in
    the trainer for every finished test and decides whether it passed; the
    program is stopped at the first failure.
    """

    code: str
    mode: str
    inputs: Sequence[Any]
    func_name: str | None = None
    check: Callable[[TestRun], bool] | None = None


@dataclass
class ProgramResult:
    """Outcome of a :class:`ProgramJob`: ``passed`` iff every test ran and passed."""

    passed: bool
    runs: list[TestRun] = field(default_factory=list)
    error: str | None = None
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
