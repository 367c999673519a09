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
import marshal
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from oapl.rewards.sandbox.host import (
    acquire_slot,
    cleanup_stale_sandboxes_once,
    create_cgroups,
    release_slot,
    remove_cgroups,
    rmtree_quiet,
    sandbox_uid,
)
from oapl.rewards.sandbox.types import (
    STATUSES,
    ProgramJob,
    ProgramResult,
    SandboxConfig,
    SandboxUnavailableError,
    TestRun,
)

logger = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("_launcher.py")

# --------------------------------------------------------------------------- launching


def _launcher_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


# The launcher runs from its source on an inherited descriptor, with the spec on another: the command
# line every sandboxed process inherits (/proc/<pid>/cmdline) then names no file of the host.
# The source stays open (from offset 0) for the sandbox's init, which starts this code again.
# The descriptor holds the source, or b"\0" + the marshalled code object when the launcher runs on
# this very interpreter binary (no compiling per program).
BOOTSTRAP = (
    "import os, sys, marshal\n"
    "_f = os.fdopen(int(sys.argv[1]), 'rb', closefd=False)\n"
    "_f.seek(0)\n"
    "_b = _f.read()\n"
    "_c = marshal.loads(_b[1:]) if _b[:1] == b'\\0' else compile(_b, 'oapl-sandbox-launcher', 'exec')\n"
    "del _b\n"
    "exec(_c)\n"
)
_source_cache: dict[bool, bytes] = {}


def _launcher_source(python: str) -> bytes:
    same = os.path.realpath(python) == os.path.realpath(sys.executable)
    if same not in _source_cache:
        source = LAUNCHER.read_bytes()
        if same:
            source = b"\0" + marshal.dumps(compile(source, "oapl-sandbox-launcher", "exec"))
        _source_cache[same] = source
    return _source_cache[same]


def _data_fd(data: bytes, tmp: str) -> int:
    """A read-only-at-offset-0 descriptor holding ``data`` (a memfd, or an unlinked file in ``tmp``)."""
    try:
        fd = os.memfd_create("oapl-sandbox", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(dir=tmp)
        os.unlink(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _site_flags(python: str) -> list[str]:
    """``-s`` (no user site-packages) unless the trainer's own interpreter imports from one, so that
    a program sees the packages the trainer sees (``pip install --user`` included)."""
    import site

    same = os.path.realpath(python) == os.path.realpath(sys.executable)
    user_site = (
        getattr(site, "ENABLE_USER_SITE", False)
        and same
        and any(os.path.realpath(p) == os.path.realpath(site.getusersitepackages()) for p in sys.path if p)
    )
    return [] if user_site else ["-s"]


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
    slot = acquire_slot()
    tmp = tempfile.mkdtemp(prefix=f"oapl-sbx-{os.getpid()}-")  # the pid lets a later run clean up after a kill
    cgroups = create_cgroups(config, f"oapl-sbx-{os.getpid()}-{slot}")
    spec = _launcher_spec(config, job, isolation, tmp, slot, cgroups, extra_spec)
    frames = _Frames(on_run, max_frame=6 * config.max_output_bytes * 2 + (1 << 16))
    proc: subprocess.Popen | None = None
    try:
        proc = _start_launcher(config.python or sys.executable, spec, tmp)
        _read_launcher(proc, frames, deadline=time.monotonic() + config.total_deadline_s + config.startup_grace_s)
    except OSError as exc:
        frames.error = f"launch failed: {exc}"
    finally:
        if proc is not None:
            _reap_launcher(proc, clean_exit=frames.done and frames.error is None)
        rmtree_quiet(tmp)
        remove_cgroups(cgroups)
        release_slot(slot)
    error = frames.error
    if error and frames.stderr:
        error += " | launcher stderr: " + frames.stderr.decode("utf-8", "replace")[-2000:]
    return frames.runs, frames.ready, error, frames.others


def _launcher_spec(
    config: SandboxConfig,
    job: ProgramJob,
    isolation: str,
    tmp: str,
    slot: int,
    cgroups: list[str],
    extra_spec: dict | None,
) -> dict:
    """What the launcher reads on its spec descriptor: the program, its tests and every limit."""
    root_uid = os.geteuid() == 0
    spec = {
        "code": job.code,
        "mode": job.mode,
        "func_name": job.func_name,
        "inputs": list(job.inputs),
        "timeout_s": config.timeout_s,
        "deadline_s": config.total_deadline_s,
        "memory_bytes": config.memory_mb << 20,
        "max_output_bytes": config.max_output_bytes,
        "max_file_bytes": config.max_file_bytes,
        # In a user namespace the launcher and init share the program's uid and
        # count against RLIMIT_NPROC; as root the program has a uid of its own.
        "nproc_limit": config.max_processes + (0 if root_uid else 2),
        "max_open_files": config.max_open_files,
        "tmpfs_bytes": config.tmpfs_mb << 20,
        "isolation": isolation,
        "workdir": tmp,
        "uid": sandbox_uid(config, slot) if root_uid else None,
        "trainer_uid": os.getuid(),
        "stop_on_error": config.stop_on_error,
        "cgroup_procs": cgroups,
    }
    if (config.python or sys.executable) in _NO_REEXEC:
        spec["no_reexec"] = True
    spec.update(extra_spec or {})
    return spec


def _start_launcher(python: str, spec: dict, tmp: str) -> subprocess.Popen:
    """Start the launcher in a new session, its source and ``spec`` on inherited descriptors
    (closed here once the child holds them)."""
    fds: list[int] = []
    try:
        fds.append(_data_fd(_launcher_source(python), tmp))
        fds.append(_data_fd(json.dumps(spec).encode("utf-8"), tmp))
        return subprocess.Popen(
            [python, *_site_flags(python), "-P", "-B", "-c", BOOTSTRAP, *map(str, fds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_launcher_env(),
            cwd="/",
            start_new_session=True,
            close_fds=True,
            pass_fds=fds,
        )
    finally:
        for fd in fds:
            os.close(fd)


class _Frames:
    """What the launcher reported so far (length-prefixed JSON frames on its stdout, the first 8 KiB
    of its stderr), and whether the run is over (``done``, with ``error`` when it failed)."""

    def __init__(self, on_run: Callable[[TestRun], bool] | None, max_frame: int) -> None:
        self.on_run, self.max_frame = on_run, max_frame
        self.runs: list[TestRun] = []
        self.ready: dict = {}
        self.others: list[dict] = []
        self.error: str | None = None
        self.done = False
        self.stderr = bytearray()
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Take the complete frames out of what has arrived on stdout, until the run is over."""
        buf = self._buf
        buf += data
        while len(buf) >= 4 and not self.done:
            (n,) = struct.unpack(">I", bytes(buf[:4]))
            if n > self.max_frame:
                self.error, self.done = "protocol: oversized frame", True
                break
            if len(buf) < 4 + n:
                break
            try:
                frame = json.loads(bytes(buf[4 : 4 + n]))
            except ValueError:
                self.error, self.done = "protocol: bad frame", True
                break
            del buf[: 4 + n]
            self._take(frame)

    def _take(self, frame: Any) -> None:
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "ready":
            self.ready = frame
            if frame.get("error"):
                self.error, self.done = "isolation: " + str(frame["error"]), True
        elif kind == "result":
            run = _to_run(frame)
            self.runs.append(run)
            if self.on_run is not None and not self.on_run(run):
                self.done = True
        elif kind == "done":
            self.done = True
        elif kind == "error":
            self.error, self.done = "launcher: " + str(frame.get("error")), True
        else:
            self.others.append(frame)


def _read_launcher(proc: subprocess.Popen, frames: _Frames, deadline: float) -> None:
    """Read the launcher's stdout and stderr into ``frames`` until the run is over, stdout closes
    (``launcher exited early``) or ``deadline`` (monotonic) passes."""
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None  # stdout=stderr=PIPE
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    stdout_open = True
    while not frames.done and stdout_open:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            frames.error = "deadline"
            break
        for key, _ in sel.select(min(remaining, 1.0)):
            data = os.read(key.fd, 1 << 16)
            if key.fileobj is proc.stderr:
                if not data:
                    sel.unregister(proc.stderr)
                elif len(frames.stderr) < 8192:
                    frames.stderr += data[: 8192 - len(frames.stderr)]
                continue
            if not data:
                sel.unregister(proc.stdout)
                stdout_open = False
                continue
            frames.feed(data)
    if not frames.done and frames.error is None:
        frames.error = "launcher exited early"


def _reap_launcher(proc: subprocess.Popen, clean_exit: bool) -> None:
    """Wait for a launcher that finished cleanly; otherwise kill its group first, then reap it."""
    # Never reap the launcher before killing its group: while it is
    # unreaped its pid (= process group id) cannot be reused.
    reaped = False
    if clean_exit:
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


def _to_run(frame: dict) -> TestRun:
    status = frame.get("status")
    return TestRun(
        index=int(frame.get("index", -1)),
        status=status if status in STATUSES else "harness_error",
        exit_code=frame.get("exit_code") if isinstance(frame.get("exit_code"), int) else None,
        cpu_s=float(frame.get("cpu_s") or 0.0),
        wall_s=float(frame.get("wall_s") or 0.0),
        stdout=_text(frame.get("stdout")),
        result=frame.get("result") if isinstance(frame.get("result"), str) else None,
        stderr_tail=_text(frame.get("stderr_tail")),
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


# --------------------------------------------------------------------------- probing

_probe_lock = threading.Lock()
_PROBE_CACHE: dict[tuple, dict] = {}
_NO_REEXEC: set[str] = set()  # interpreters that cannot be re-executed inside the sandbox


def probe_namespaces(
    config: SandboxConfig, *, _simulate_failure: bool = False, _extra_spec: dict | None = None
) -> dict:
    """Check (once per interpreter/uid) that namespace isolation works here.

    Runs a tiny program in a namespace sandbox and returns the launcher's
    isolation facts plus ``ok``/``error``.  ``ok`` requires that the sandbox
    sees no network interface other than loopback.  If the interpreter cannot
    be started again inside the sandbox (see ``_launcher._reexec``), that
    interpreter's sandboxes keep the one they were launched with from then on
    (``/proc`` then shows its host paths; a warning says so).
    """
    python = config.python or sys.executable
    key = (python, os.geteuid(), _simulate_failure, json.dumps(_extra_spec, sort_keys=True))
    with _probe_lock:
        if key in _PROBE_CACHE:
            return _PROBE_CACHE[key]
        probe_cfg = SandboxConfig(timeout_s=10, total_deadline_s=20, python=config.python, uid_base=config.uid_base)
        job = ProgramJob(code="print(6 * 7)", mode="stdin", inputs=[""])
        extra = {"probe": True, **(_extra_spec or {})}
        if _simulate_failure:
            extra["_test_fail_unshare"] = True
        runs, ready, error, others = launch(probe_cfg, job, "namespaces", extra_spec=extra)
        if error is not None and not ready and any(f.get("type") == "reexec" for f in others):
            first = error
            extra["no_reexec"] = True
            runs, ready, error, others = launch(probe_cfg, job, "namespaces", extra_spec=extra)
            if error is None:
                _NO_REEXEC.add(python)
                logger.warning(
                    "oapl code sandbox: %s could not be started again inside the sandbox (%s); "
                    "programs run in the interpreter the sandbox was launched with, so /proc "
                    "inside shows its host paths",
                    python,
                    first[:300],
                )
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
                    "programs have network access and only rlimits/process-group/uid isolation."
                )
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
                "Install Python in a world-readable location to fix this.",
                sys.base_prefix,
            )
        if error and error.startswith("isolation:") and mode == "namespaces":
            # The probe succeeded earlier; a repeated failure is an environment problem.
            raise SandboxUnavailableError(f"oapl code sandbox: {error}")
        passed = error is None and not failed and len(runs) == len(job.inputs) and all(r.status == "ok" for r in runs)
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
        return [r if r is not None else ProgramResult(passed=False, error="internal") for r in results]
