"""Trainer side of the code sandbox: configuration, isolation probe, parallel runs.

The untrusted program never runs in the trainer's process.  For every program
the runner starts ``_launcher.py`` (a small stdlib-only script) in a new
session with a clean environment; the launcher creates the namespaces, builds
a read-only file-system view and executes the program once per test case in a
fresh, unprivileged, resource-limited process (see ``_launcher.py`` for the
process tree).  Results stream back as length-prefixed JSON frames on a pipe;
the trainer compares them with the expected outputs, which never leave the
trainer.

The trainer enforces its own wall-clock deadline on top of the launcher's, and
kills the launcher's whole process group (which tears the pid namespace and
everything in it down) when the deadline passes or the first test fails, so a
program can neither hang nor crash the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("_launcher.py")

#: Statuses a test run can have (``ok`` = exited 0 in time within all limits).
STATUSES = ("ok", "timeout", "runtime_error", "signal", "output_limit", "no_result",
            "deadline", "harness_error")


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


# --------------------------------------------------------------------------- uid slots

_slot_lock = threading.Lock()
_slots_in_use: set[int] = set()


def _acquire_slot() -> int:
    with _slot_lock:
        slot = 0
        while slot in _slots_in_use:
            slot += 1
        _slots_in_use.add(slot)
        return slot


def _release_slot(slot: int) -> None:
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
        _rmtree(path)
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


# --------------------------------------------------------------------------- launching


def _launcher_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
    }


def _rmtree(path: str) -> None:
    def onerror(func, p, _exc):  # read-only dirs left by a degraded-mode program
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (launcher + init => whole pid namespace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch(
    config: SandboxConfig,
    job: ProgramJob,
    isolation: str,
    on_run: Callable[[TestRun], bool] | None = None,
    extra_spec: dict | None = None,
) -> tuple[list[TestRun], dict, str | None, list[dict]]:
    """Run ``job`` in a fresh sandbox; return (runs, ready-frame, error, other frames).

    ``on_run`` is called for each finished test; returning ``False`` stops the
    program (the sandbox is killed immediately).  Never raises for anything
    the program does.
    """
    slot = _acquire_slot()
    tmp = tempfile.mkdtemp(prefix=f"oapl-sbx-{os.getpid()}-")  # the pid lets a later run clean up after a kill
    cgroups = create_cgroups(config, f"oapl-sbx-{os.getpid()}-{slot}")
    root_uid = os.geteuid() == 0
    spec = {
        "code": job.code, "mode": job.mode, "func_name": job.func_name,
        "inputs": list(job.inputs), "timeout_s": config.timeout_s,
        "deadline_s": config.total_deadline_s, "memory_bytes": config.memory_mb << 20,
        "max_output_bytes": config.max_output_bytes, "max_file_bytes": config.max_file_bytes,
        # In a user namespace the launcher and init share the program's uid and
        # count against RLIMIT_NPROC; as root the program has a uid of its own.
        "nproc_limit": config.max_processes + (0 if root_uid else 2),
        "max_open_files": config.max_open_files, "tmpfs_bytes": config.tmpfs_mb << 20,
        "isolation": isolation, "workdir": tmp,
        "uid": sandbox_uid(config, slot) if root_uid else None,
        "trainer_uid": os.getuid(), "stop_on_error": config.stop_on_error,
        "cgroup_procs": cgroups,
    }
    spec.update(extra_spec or {})
    spec_path = os.path.join(tmp, "spec.json")
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(spec, f)

    runs: list[TestRun] = []
    ready: dict = {}
    others: list[dict] = []
    error: str | None = None
    stderr_buf = bytearray()
    max_frame = 6 * config.max_output_bytes * 2 + (1 << 16)
    proc: subprocess.Popen | None = None
    done = False
    try:
        proc = subprocess.Popen(
            [config.python or sys.executable, "-s", "-P", "-B", str(LAUNCHER), spec_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_launcher_env(), cwd="/", start_new_session=True, close_fds=True,
        )
        deadline = time.monotonic() + config.total_deadline_s + config.startup_grace_s
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        buf = bytearray()
        done, stdout_open = False, True
        while not done and stdout_open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = "deadline"
                break
            for key, _ in sel.select(min(remaining, 1.0)):
                data = os.read(key.fd, 1 << 16)
                if key.fileobj is proc.stderr:
                    if not data:
                        sel.unregister(proc.stderr)
                    elif len(stderr_buf) < 8192:
                        stderr_buf += data[: 8192 - len(stderr_buf)]
                    continue
                if not data:
                    sel.unregister(proc.stdout)
                    stdout_open = False
                    continue
                buf += data
                while len(buf) >= 4 and not done:
                    (n,) = struct.unpack(">I", bytes(buf[:4]))
                    if n > max_frame:
                        error = "protocol: oversized frame"
                        done = True
                        break
                    if len(buf) < 4 + n:
                        break
                    try:
                        frame = json.loads(bytes(buf[4: 4 + n]))
                    except ValueError:
                        error = "protocol: bad frame"
                        done = True
                        break
                    del buf[: 4 + n]
                    kind = frame.get("type") if isinstance(frame, dict) else None
                    if kind == "ready":
                        ready = frame
                        if frame.get("error"):
                            error = "isolation: " + str(frame["error"])
                            done = True
                    elif kind == "result":
                        run = _to_run(frame)
                        runs.append(run)
                        if on_run is not None and not on_run(run):
                            done = True
                    elif kind == "done":
                        done = True
                    elif kind == "error":
                        error = "launcher: " + str(frame.get("error"))
                        done = True
                    else:
                        others.append(frame)
        if not done and error is None:
            error = "launcher exited early"
    except OSError as exc:
        error = f"launch failed: {exc}"
    finally:
        if proc is not None:
            # Never reap the launcher before killing its group: while it is
            # unreaped its pid (= process group id) cannot be reused.
            reaped = False
            if done and error is None:
                try:
                    proc.wait(timeout=2)
                    reaped = True
                except subprocess.TimeoutExpired:
                    pass
            if not reaped:
                _kill_group(proc)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                    logger.error("sandbox launcher %d did not die", proc.pid)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        _rmtree(tmp)
        remove_cgroups(cgroups)
        _release_slot(slot)
    if error and stderr_buf:
        error += " | launcher stderr: " + stderr_buf.decode("utf-8", "replace")[-2000:]
    return runs, ready, error, others


def _to_run(frame: dict) -> TestRun:
    status = frame.get("status")
    return TestRun(
        index=int(frame.get("index", -1)),
        status=status if status in STATUSES else "harness_error",
        exit_code=frame.get("exit_code") if isinstance(frame.get("exit_code"), int) else None,
        cpu_s=float(frame.get("cpu_s") or 0.0),
        wall_s=float(frame.get("wall_s") or 0.0),
        stdout=frame.get("stdout") if isinstance(frame.get("stdout"), str) else "",
        result=frame.get("result") if isinstance(frame.get("result"), str) else None,
        stderr_tail=frame.get("stderr_tail") if isinstance(frame.get("stderr_tail"), str) else "",
    )


# --------------------------------------------------------------------------- probing

_probe_lock = threading.Lock()
_PROBE_CACHE: dict[tuple, dict] = {}


def probe_namespaces(config: SandboxConfig, *, _simulate_failure: bool = False) -> dict:
    """Check (once per interpreter/uid) that namespace isolation works here.

    Runs a tiny program in a namespace sandbox and returns the launcher's
    isolation facts plus ``ok``/``error``.  ``ok`` requires that the sandbox
    sees no network interface other than loopback.
    """
    key = (config.python or sys.executable, os.geteuid(), _simulate_failure)
    with _probe_lock:
        if key in _PROBE_CACHE:
            return _PROBE_CACHE[key]
        probe_cfg = SandboxConfig(timeout_s=10, total_deadline_s=20, python=config.python,
                                  uid_base=config.uid_base)
        job = ProgramJob(code="print(6 * 7)", mode="stdin", inputs=[""])
        extra = {"probe": True}
        if _simulate_failure:
            extra["_test_fail_unshare"] = True
        runs, ready, error, others = launch(probe_cfg, job, "namespaces", extra_spec=extra)
        interfaces = next((f.get("interfaces") for f in others if f.get("type") == "probe"), None)
        facts = dict(ready)
        facts.pop("type", None)
        if error is None and interfaces is not None:
            non_lo = [i for i in interfaces if i != "lo"]
            if non_lo:
                error = f"network namespace still shows interfaces {non_lo}"
        if error is None and not (runs and runs[0].status == "ok" and runs[0].stdout == "42\n"):
            error = f"probe program did not run correctly: {runs[0] if runs else 'no result'}"
        facts.update(ok=error is None, error=error, interfaces=interfaces)
        if not _simulate_failure:
            _PROBE_CACHE[key] = facts
        return facts


_warned_degraded = False
_warned_stdlib = False


class SandboxRunner:
    """Runs :class:`ProgramJob` s in isolated sandboxes, in parallel.

    The isolation mode is decided once, lazily, by :meth:`isolation_mode`.
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        cleanup_stale_sandboxes_once()  # temp dirs / cgroups of a killed earlier run
        self._mode: str | None = None
        self._facts: dict = {}
        self._lock = threading.Lock()

    def isolation_mode(self) -> str:
        """``"namespaces"`` or ``"none"``; raises :class:`SandboxUnavailableError`."""
        global _warned_degraded
        with self._lock:
            if self._mode is not None:
                return self._mode
            cfg = self.config
            if cfg.isolation == "none":
                mode = "none"
            else:
                facts = self._probe()
                self._facts = facts
                if facts.get("ok"):
                    mode = "namespaces"
                elif cfg.isolation == "auto" and cfg.allow_no_netns:
                    mode = "none"
                else:
                    raise SandboxUnavailableError(
                        "oapl code sandbox: cannot isolate untrusted programs on this host "
                        f"({facts.get('error')}). Programs would have network access and could "
                        "see the trainer's files and processes, so nothing is run (fail closed). "
                        "Fix: run as root, or enable unprivileged user namespaces "
                        "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0, "
                        "kernel.apparmor_restrict_unprivileged_userns=0), or use a container that "
                        "allows unshare(CLONE_NEWUSER|CLONE_NEWNET). To run WITHOUT network/pid/"
                        "file-system isolation anyway, set SandboxConfig(allow_no_netns=True)."
                    )
            if mode == "none" and not _warned_degraded:
                _warned_degraded = True
                logger.warning(
                    "oapl code sandbox running WITHOUT namespaces (allow_no_netns=True): "
                    "programs have network access and only rlimits/process-group/uid isolation.")
            self._mode = mode
            return mode

    def _probe(self) -> dict:
        return probe_namespaces(self.config)

    @property
    def facts(self) -> dict:
        """Isolation facts reported by the probe (after :meth:`isolation_mode`)."""
        return dict(self._facts)

    def run(self, job: ProgramJob) -> ProgramResult:
        """Run one job; ``passed`` iff every test ran, exited 0 and passed ``check``."""
        mode = self.isolation_mode()
        failed = []

        def on_run(run: TestRun) -> bool:
            ok = run.status == "ok"
            if ok and job.check is not None:
                try:
                    ok = bool(job.check(run))
                except Exception:  # a checker bug must not crash the trainer
                    logger.exception("code checker raised")
                    ok = False
            if not ok:
                failed.append(run.index)
            return ok or not self.config.stop_on_error

        if not job.inputs:
            return ProgramResult(passed=False, error="no tests")
        runs, ready, error, _ = launch(self.config, job, mode, on_run=on_run)
        if error and error.startswith("isolation:") and mode == "namespaces":
            logger.warning("sandbox isolation failed (%s); retrying once", error)
            failed.clear()
            runs, ready, error, _ = launch(self.config, job, mode, on_run=on_run)
        global _warned_stdlib
        if ready.get("stdlib_readable") is False and not _warned_stdlib:
            _warned_stdlib = True
            logger.warning(
                "oapl code sandbox (no namespaces): the sandbox uid cannot read the Python "
                "installation (%s), so programs can only import modules the launcher preloads. "
                "Install Python in a world-readable location to fix this.", sys.base_prefix)
        if error and error.startswith("isolation:") and mode == "namespaces":
            # The probe succeeded earlier; a repeated failure is an environment problem.
            raise SandboxUnavailableError(f"oapl code sandbox: {error}")
        passed = (error is None and not failed and len(runs) == len(job.inputs)
                  and all(r.status == "ok" for r in runs))
        facts = {k: v for k, v in ready.items() if k != "type"}
        return ProgramResult(passed=passed, runs=runs, error=error, isolation=facts)

    def run_many(self, jobs: Sequence[ProgramJob | None]) -> list[ProgramResult]:
        """Run jobs in parallel (``config.workers``); ``None`` entries fail."""
        self.isolation_mode()  # fail closed before starting anything
        results: list[ProgramResult | None] = [None] * len(jobs)
        todo = [i for i, j in enumerate(jobs) if j is not None]
        for i, j in enumerate(jobs):
            if j is None:
                results[i] = ProgramResult(passed=False, error="no program")

        def work(i: int) -> None:
            try:
                results[i] = self.run(jobs[i])  # type: ignore[arg-type]
            except SandboxUnavailableError:
                raise
            except Exception as exc:  # never let one program break the batch
                logger.exception("sandbox run failed")
                results[i] = ProgramResult(passed=False, error=f"internal: {exc!r}")

        workers = min(self.config.n_workers, max(1, len(todo)))
        if workers <= 1:
            for i in todo:
                work(i)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oapl-sbx") as ex:
                for fut in [ex.submit(work, i) for i in todo]:
                    fut.result()
        return [r if r is not None else ProgramResult(passed=False, error="internal")
                for r in results]


def cpu_time_limit(config: SandboxConfig) -> int:
    """Soft ``RLIMIT_CPU`` (seconds) a test process gets under ``config``."""
    return max(1, math.ceil(config.timeout_s)) + 1
