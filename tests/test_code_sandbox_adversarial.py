"""Adversarial programs: each must score 0 and leave the host intact.

Most attack programs print the *correct* answer only if their attack worked,
so a reward of 0 shows the attack failed (not merely that the program was
wrong).  An autouse fixture checks the host after every case: no sandbox
process survives, no sandbox temp dir is left, no SysV shared memory leaked,
no canary file appeared, and the trainer's own environment is unchanged.

Run: ``python -m pytest tests/test_code_sandbox_adversarial.py -q``
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oapl.rewards.code import evaluate_completions, make_code_reward
from oapl.rewards.sandbox import ProgramJob, SandboxConfig, SandboxRunner, probe_namespaces

CFG = SandboxConfig(
    timeout_s=1.0,
    total_deadline_s=6.0,
    memory_mb=384,
    max_output_bytes=64 << 10,
    max_processes=16,
    max_file_bytes=1 << 20,
    tmpfs_mb=8,
    workers=2,
)
STDIN_TESTS = [{"input": "21\n", "output": "42\n", "testtype": "stdin"}]
FUNC_TESTS = [{"input": "21", "output": "42", "testtype": "functional"}]
FUNC_META = {"func_name": "double"}
REPO = Path(__file__).resolve().parents[1]
CANARIES = [
    Path("/etc/oapl_canary"),
    Path("/tmp/oapl_canary"),
    Path("/dev/shm/oapl_canary"),
    Path("/var/tmp/oapl_canary"),
    Path("/root/oapl_canary"),
    REPO / "oapl_canary",
    REPO / "src" / "oapl" / "oapl_canary",
]

pytestmark = pytest.mark.timeout(120)  # pytest-timeout (dev extra); each case takes seconds


def _namespaces_ok() -> bool:
    return bool(probe_namespaces(SandboxConfig())["ok"])


requires_ns = pytest.mark.skipif(
    not _namespaces_ok(),
    reason="namespaces unavailable on this host (the fail-closed path is tested in test_code_reward.py)",
)


@pytest.fixture(scope="module")
def runner():
    return SandboxRunner(CFG)


def score(runner, code: str, functional: bool = False) -> tuple[float, object]:
    completion = f"Sure.\n```python\n{code}\n```\n"
    tests = FUNC_TESTS if functional else STDIN_TESTS
    meta = FUNC_META if functional else None
    (ev,) = evaluate_completions([completion], [tests], [meta], runner=runner)
    return ev.reward, ev


def sandbox_processes() -> list[tuple[int, int]]:
    """(pid, uid) of live processes running as one of the sandbox uids."""
    lo, hi = CFG.uid_base, CFG.uid_base + (1 << 30)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                        if lo <= uid < hi:
                            found.append((int(name), uid))
                        break
        except (OSError, ValueError):
            continue
    return found


def sandbox_cgroups() -> list[str]:
    found = []
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"):
        try:
            found += [f"{root}/{n}" for n in os.listdir(root) if n.startswith(f"oapl-sbx-{os.getpid()}-")]
        except OSError:
            pass
    return found


def _ancestors(pid: int) -> set[int]:
    """The pids from ``pid`` up to init (empty when ``pid`` is not running)."""
    chain: set[int] = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def sandbox_dirs() -> set[Path]:
    """``/tmp/oapl-sbx-<pid>-*`` folders, less those of a live process outside this test run (a second
    test run or training beside this one): a folder of this process, of a child, or of a process that
    has died counts."""
    me = os.getpid()
    out = set()
    for p in Path("/tmp").glob("oapl-sbx-*"):
        pid = p.name.split("-")[2]
        if pid.isdigit() and int(pid) != me and _ancestors(int(pid)) and me not in _ancestors(int(pid)):
            continue
        out.add(p)
    return out


def shm_segments() -> int:
    try:
        with open("/proc/sysvipc/shm") as f:
            return len(f.readlines())
    except OSError:
        return 0


@pytest.fixture(autouse=True)
def host_intact():
    env_before = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    dirs_before = sandbox_dirs()
    shm_before = shm_segments()
    yield
    deadline = time.monotonic() + 10  # a grace for reaping on a loaded machine, not a bound under test
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == [], "a sandboxed process survived"
    assert sandbox_dirs() <= dirs_before, "sandbox temp dir left behind"
    assert shm_segments() <= shm_before, "SysV shared memory leaked to the host"
    assert sandbox_cgroups() == [], "sandbox cgroup left behind"
    for canary in CANARIES:
        assert not canary.exists(), f"program wrote {canary}"
    assert {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"} == env_before


# --------------------------------------------------------------------------- resources


@requires_ns
@pytest.mark.parametrize(
    "code",
    [
        "print(42, flush=True)\nwhile True:\n    pass",
        "import time\nprint(42, flush=True)\ntime.sleep(1000)",
        "import os, signal\nprint(42, flush=True)\nos.kill(os.getpid(), signal.SIGSTOP)",
        "import threading\nprint(42, flush=True)\nthreading.Event().wait()",
    ],
    ids=["busy-loop", "sleep", "sigstop-self", "block-forever"],
)
def test_hangs_time_out(runner, code):
    reward, ev = score(runner, code)
    (run,) = ev.results[0].runs
    # cut by the sandbox's per-case limit: the launcher says "timeout" only when it stopped the case at
    # timeout_s (a hang the limit missed would run into this file's pytest timeout instead), and the
    # program did not end on its own but was killed; host_intact checks that no process of it is left
    assert reward == 0.0 and run.status == "timeout"
    assert run.exit_code is not None and run.exit_code < 0, run  # ended by a signal from the sandbox
    assert run.stdout == ""  # the 42 printed before the hang does not count


@requires_ns
def test_fork_bomb_is_contained(runner):
    code = (
        "import os\nn = 0\nfor _ in range(10000):\n    try:\n        if os.fork() == 0:\n"
        "            n = 0\n        else:\n            n += 1\n    except OSError:\n        break\n"
        "print(42 if n > 100 else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0


@requires_ns
def test_thread_bomb_hits_process_limit(runner):
    code = (
        "import threading, time\nn = 0\ntry:\n    for _ in range(1000):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n += 1\n"
        "except RuntimeError:\n    pass\nprint(42 if n >= 100 else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"


@requires_ns
@pytest.mark.parametrize(
    "code",
    [
        "try:\n    x = bytearray(3 << 30)\n    print(42)\nexcept MemoryError:\n    print(0)",
        "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))",
        "import mmap\nm = mmap.mmap(-1, 2 << 30)\nm[-1:] = b'x'\nprint(42)",
    ],
    ids=["huge-alloc", "grow-until-death", "mmap"],
)
def test_memory_bombs_fail(runner, code):
    reward, _ = score(runner, code)
    assert reward == 0.0


@requires_ns
def test_forked_memory_bomb_is_bounded_as_a_whole(runner):
    """rlimits are per process; the sandbox's cgroup bounds the sum (root hosts)."""
    if not runner.run(ProgramJob(code="print(1)", mode="stdin", inputs=[""])).isolation.get("cgroups"):
        pytest.skip("cgroups are not writable here: only per-process limits apply")
    code = (
        "import os\nkids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n"
        "        try:\n            b = bytearray(300 << 20)\n            b[::4096] = b'x' * len(b[::4096])\n"
        "        except MemoryError:\n            os._exit(3)\n        import time; time.sleep(0.5)\n"
        "        os._exit(0)\n    kids.append(pid)\n"
        "ok = sum(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) == 0 for k in kids)\n"
        "print(42 if ok == 8 else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0


@requires_ns
def test_huge_output_is_cut_off(runner):
    reward, ev = score(runner, "import sys\nprint(42)\nwhile True:\n    sys.stdout.write('x' * 65536)")
    (run,) = ev.results[0].runs
    # stopped by the output cap, not by the 1 s timeout (that status would be "timeout"), and killed
    assert reward == 0.0 and run.status == "output_limit" and run.stdout == ""
    assert run.exit_code is not None and run.exit_code < 0, run


@requires_ns
def test_stderr_flood_is_bounded(runner):
    code = "import sys\nfor _ in range(2000):\n    sys.stderr.write('e' * 65536)\nprint(0)"
    reward, ev = score(runner, code)
    assert reward == 0.0 and len(ev.results[0].runs[0].stderr_tail) <= 4096


@requires_ns
def test_disk_filling_is_limited(runner):
    code = (
        "n = 0\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(64):\n"
        "            f.write(b'x' * (1 << 20)); f.flush(); n += 1\nexcept OSError:\n    pass\n"
        "import os\nfiles = 0\ntry:\n    for i in range(100000):\n        open(f'f{i}', 'w').close(); files += 1\n"
        "except OSError:\n    pass\nprint(42 if n >= 32 or files >= 100000 else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0


@requires_ns
def test_file_descriptor_exhaustion(runner):
    code = (
        "fs = []\ntry:\n    while True:\n        fs.append(open('/dev/null'))\nexcept OSError:\n    pass\n"
        "print(42 if len(fs) > 1000 else 0)"
    )
    reward, _ = score(runner, code)
    assert reward == 0.0


# --------------------------------------------------------------------------- file system


@requires_ns
def test_writes_outside_the_sandbox_fail(runner, tmp_path):
    targets = [str(c) for c in CANARIES] + [str(tmp_path / "canary"), os.path.expanduser("~/.bashrc_oapl")]
    code = (
        f"import os\nok = 0\nfor p in {targets!r}:\n    try:\n        with open(p, 'w') as f:\n"
        "            f.write('pwned')\n        ok += 1 if not p.startswith(('/tmp', '/dev/shm', '/var/tmp')) else 0\n"
        "    except OSError:\n        pass\n"
        f"try:\n    os.remove({str(REPO / 'pyproject.toml')!r}); ok += 1\nexcept OSError:\n    pass\n"
        "print(42 if ok else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"
    assert not (tmp_path / "canary").exists() and (REPO / "pyproject.toml").exists()


@requires_ns
def test_home_and_project_files_are_invisible(runner, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("BEGIN PRIVATE KEY oapl-test")
    paths = [
        str(secret),
        "/root/.bash_history",
        "/root/.ssh/id_rsa",
        str(REPO / "pyproject.toml"),
        "/etc/shadow",
        "/proc/1/environ",
    ]
    code = (
        f"found = []\nfor p in {paths!r}:\n    try:\n        found.append(open(p).read(10))\n"
        "    except OSError:\n        pass\nprint(42 if found else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"


@requires_ns
def test_environment_secrets_do_not_leak(runner, monkeypatch):
    monkeypatch.setenv("OAPL_SECRET_TOKEN", "hunter2-oapl")
    code = (
        "import os, glob\nblobs = [repr(dict(os.environ))]\n"
        "for p in glob.glob('/proc/*/environ'):\n    try:\n        blobs.append(open(p, 'rb').read().decode('latin-1'))\n"
        "    except OSError:\n        pass\nprint(42 if any('hunter2-oapl' in b for b in blobs) else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"


@requires_ns
def test_expected_output_is_not_reachable(runner):
    # The answer exists only in the trainer; search everything the program can see.
    tests = [{"input": "x\n", "output": "918273645501\n", "testtype": "stdin"}]
    code = (
        "import os\nneedle = b'918273645501'\nhit = None\n"
        "for root in ('/tmp', '/proc/self', '/dev/fd', '/var/tmp'):\n"
        "    for dirpath, dirs, files in os.walk(root):\n        for f in files:\n"
        "            try:\n                if needle in open(os.path.join(dirpath, f), 'rb').read(1 << 20):\n"
        "                    hit = needle\n            except OSError:\n                pass\n"
        "for fd in range(256):\n    try:\n        if needle in os.pread(fd, 1 << 20, 0):\n            hit = needle\n"
        "    except OSError:\n        pass\nprint(hit.decode() if hit else 0)"
    )
    (ev,) = evaluate_completions([f"```python\n{code}\n```"], [tests], runner=runner)
    assert ev.reward == 0.0


# --------------------------------------------------------------------------- network


@requires_ns
def test_loopback_connection_to_the_host_fails(runner):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    # sanity: the listener is reachable from the host itself
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    srv.accept()[0].close()
    code = (
        f"import socket\nok = False\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
        "    s.sendall(b'exfiltrate'); ok = True\nexcept OSError:\n    pass\n"
        f"try:\n    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b'x', ('127.0.0.1', {port})); ok = True\n"
        "except OSError:\n    pass\nprint(42 if ok else 0)"
    )
    try:
        reward, ev = score(runner, code)
        assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing from the sandbox reached the host
    finally:
        srv.close()


@requires_ns
def test_abstract_unix_socket_and_interfaces(runner):
    name = f"\0oapl-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(name)
    srv.listen(1)
    srv.settimeout(0.2)
    code = (
        f"import socket\nok = False\ntry:\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({name!r}); ok = True\n"
        "except OSError:\n    pass\nnames = [n for _, n in socket.if_nameindex()]\n"
        "print(42 if ok or names != ['lo'] else 0)"
    )
    try:
        reward, ev = score(runner, code)
        assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()


# --------------------------------------------------------------------------- processes


@requires_ns
def test_cannot_signal_the_trainer_or_other_processes(runner):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = (
            "import os, signal\nhits = 0\n"
            f"for pid in ({victim.pid}, {os.getpid()}, os.getppid(), 1, -1, 0):\n"
            "    if pid in (0,):\n        continue\n    try:\n        os.kill(pid, signal.SIGKILL); hits += 1\n"
            "    except OSError:\n        pass\n"
            f"try:\n    os.killpg({os.getpgid(0)}, signal.SIGKILL); hits += 1\nexcept OSError:\n    pass\n"
            "print(42 if hits else 0)"
        )
        reward, ev = score(runner, code)
        assert reward == 0.0
        assert victim.poll() is None, "the sandbox killed a host process"
    finally:
        victim.kill()
        victim.wait()


@requires_ns
def test_supervisor_survives_signals_from_the_program(runner):
    """Signals aimed at the sandbox's init must not stop the remaining tests.

    The program answers correctly, so the reward is 1 exactly when the
    supervisor kept running both test cases after being attacked.
    """
    code = (
        "import os, signal\nfor sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,\n"
        "            signal.SIGSTOP, signal.SIGKILL):\n    for pid in (1, os.getppid(), -1):\n"
        "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
        "print(int(input()) * 2)"
    )
    tests = STDIN_TESTS + [{"input": "5\n", "output": "10\n", "testtype": "stdin"}]
    (ev,) = evaluate_completions([f"```python\n{code}\n```"], [tests], runner=runner)
    assert [r.status for r in ev.results[0].runs] == ["ok", "ok"] and ev.reward == 1.0


@requires_ns
def test_daemonized_children_die_with_the_program(runner):
    code = (
        "import os, time, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(0.3)\n        print(42, flush=True)\n        time.sleep(30)\n    os._exit(0)\n"
        "os.wait()\nsys.exit(0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0 and ev.results[0].runs[0].stdout == ""


@requires_ns
def test_privilege_escalation_attempts_fail(runner):
    code = (
        "import os, ctypes\nwins = []\n"
        "for f in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.chroot('/tmp'),\n"
        "          lambda: os.mknod('/tmp/n', 0o600 | 0o020000, os.makedev(1, 3))):\n"
        "    try:\n        f(); wins.append(1)\n    except OSError:\n        pass\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0:\n    wins.append('mount')\n"
        "if libc.ptrace(16, 1, None, None) == 0:\n    wins.append('ptrace')\n"
        "print(42 if wins else 0)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0 and ev.results[0].runs[0].stdout.strip() == "0"


@requires_ns
def test_sysv_shared_memory_stays_inside(runner):
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "ids = [libc.shmget(0, 1 << 20, 0o1000 | 0o666) for _ in range(8)]\n"
        "print(0 if all(i >= 0 for i in ids) else 1)"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0  # segments are created, but in the sandbox's own IPC namespace


@requires_ns
def test_sysv_ipc_does_not_reach_the_next_test_case(runner):
    """Test case 1 leaves a segment, a semaphore set and a message queue; test case 2 looks for them."""
    code = (
        "import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\nKEY = 0x0A9113\n"
        "if input().strip() == 'make':\n"
        "    made = [libc.shmget(KEY, 4096, 0o1000 | 0o666), libc.semget(KEY, 1, 0o1000 | 0o666),\n"
        "            libc.msgget(KEY, 0o1000 | 0o666)]\n"
        "    print('ok' if min(made) >= 0 else 'fail')\n"
        "else:\n"
        "    found = [libc.shmget(KEY, 0, 0), libc.semget(KEY, 0, 0), libc.msgget(KEY, 0)]\n"
        "    print(42 if max(found) >= 0 else 0)"
    )
    tests = [
        {"input": "make\n", "output": "ok\n", "testtype": "stdin"},
        {"input": "look\n", "output": "42\n", "testtype": "stdin"},
    ]
    (ev,) = evaluate_completions([f"```python\n{code}\n```"], [tests], [None], runner=runner)
    runs = ev.results[0].runs
    assert [r.status for r in runs] == ["ok", "ok"] and runs[0].stdout.strip() == "ok"
    assert runs[1].stdout.strip() == "0" and ev.reward == 0.0


_CLONE_NR = {"x86_64": 56, "aarch64": 220, "riscv64": 220}


@requires_ns
@pytest.mark.skipif(os.uname().machine not in _CLONE_NR, reason="syscall numbers for this architecture")
def test_no_user_namespace_by_any_route(runner):
    """unshare(CLONE_NEWUSER), clone(CLONE_NEWUSER), clone3 and the unshare tool all fail."""
    nr_clone = _CLONE_NR[os.uname().machine]
    code = (
        "import ctypes, os, shutil, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\nwins = []\n"
        "if libc.unshare(0x10000000) == 0:\n    wins.append('unshare')\n"
        "class A(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_uint64) for n in ('flags', 'pidfd', 'child_tid', 'parent_tid',\n"
        "                'exit_signal', 'stack', 'stack_size', 'tls')]\n"
        "a = A(flags=0x10000000, exit_signal=17)\n"
        "pid = libc.syscall(435, ctypes.byref(a), ctypes.sizeof(a))\n"
        "if pid == 0:\n    os._exit(0)\n"
        "if pid > 0:\n    wins.append('clone3'); os.waitpid(pid, 0)\n"
        f"pid = libc.syscall({nr_clone}, 0x10000000 | 17, 0, 0, 0, 0)\n"
        "if pid == 0:\n    os._exit(0)\n"
        "if pid > 0:\n    wins.append('clone'); os.waitpid(pid, 0)\n"
        "tool = shutil.which('unshare')\n"
        "if tool and subprocess.run([tool, '-U', 'true'], capture_output=True).returncode == 0:\n"
        "    wins.append('unshare -U')\n"
        "print(42 if wins else 0, wins)"
    )
    reward, ev = score(runner, code)
    run = ev.results[0].runs[0]
    assert reward == 0.0 and run.status == "ok" and run.stdout.startswith("0 []"), run


@requires_ns
def test_threads_processes_and_subprocesses_still_work(runner):
    """The seccomp filter (clone3 -> ENOSYS) leaves threads, fork, multiprocessing and exec working."""
    code = (
        "import os, subprocess, threading, multiprocessing as mp\n"
        "out = []\nt = threading.Thread(target=lambda: out.append(1)); t.start(); t.join()\n"
        "pid = os.fork()\nif pid == 0:\n    os._exit(3)\n"
        "assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3\n"
        "assert subprocess.run(['/bin/sh', '-c', 'exit 4']).returncode == 4\n"
        "with mp.get_context('fork').Pool(2) as pool:\n    assert pool.map(abs, [-1, -2]) == [1, 2]\n"
        "print(int(input()) * 2 * out[0])"
    )
    reward, ev = score(runner, code)
    assert reward == 1.0, ev.results[0].runs[0].stderr_tail


@requires_ns
def test_isolation_facts_report_ipc_and_userns():
    facts = probe_namespaces(SandboxConfig())
    assert facts["ipcns"] == "per test" and facts["no_userns"] == "seccomp"


# --------------------------------------------------------------------------- exit-code tricks


@requires_ns
@pytest.mark.parametrize(
    "code",
    [
        "print(42, flush=True)\nimport os\nos._exit(1)",
        "print(42)\nraise SystemExit(3)",
        "print(42)\nimport sys\nsys.exit('bye')",
        "print(42)\nraise ValueError('after the answer')",
        "import os, signal, sys\nprint(42)\nsys.stdout.flush()\nos.kill(os.getpid(), signal.SIGKILL)",
        "print(42, flush=True)\nimport os\nos.abort()",
        "print(42, flush=True)\nimport ctypes\nctypes.string_at(0)",
        "import sys\nprint(42)\nsys.exit(256)",
        "import atexit, os\natexit.register(lambda: os._exit(7))\nprint(42)",
        "import sys\nsys.setrecursionlimit(10**6)\nprint(42, flush=True)\ndef f(n): return f(n + 1) + 1\nf(0)",
    ],
    ids=[
        "os-exit-1",
        "systemexit-3",
        "exit-message",
        "raise",
        "sigkill-self",
        "abort",
        "segfault",
        "exit-256",
        "atexit-exit",
        "deep-recursion",
    ],
)
def test_correct_output_then_crash_scores_zero(runner, code):
    reward, ev = score(runner, code)
    run = ev.results[0].runs[0]
    assert reward == 0.0 and run.status != "ok"


@requires_ns
def test_functional_correct_value_then_crash_scores_zero(runner):
    code = "import atexit, os\natexit.register(lambda: os._exit(9))\ndef double(x):\n    return 2 * x"
    reward, ev = score(runner, code, functional=True)
    assert reward == 0.0 and ev.results[0].runs[0].status == "runtime_error"


# --------------------------------------------------------------------------- checker tampering


@requires_ns
def test_patching_the_checker_has_no_effect(runner):
    code = (
        "import sys, os, builtins, json\n"
        "try:\n    import oapl.rewards.code as c\n    c.compare_stdout = lambda *a, **k: True\nexcept Exception:\n    pass\n"
        "builtins.print = lambda *a, **k: None\njson.loads = lambda *a, **k: 42\n"
        'frame = b\'{"type": "result", "index": 0, "status": "ok", "stdout": "42\\\\n"}\'\n'
        "import struct\nfor fd in range(3, 256):\n    try:\n        os.write(fd, struct.pack('>I', len(frame)) + frame)\n"
        "    except OSError:\n        pass\n"
        "for path in ('/proc/1/fd/1', '/proc/1/mem'):\n    try:\n        open(path, 'wb').write(frame)\n    except OSError:\n        pass\n"
        "sys.stdout.write(struct.pack('>I', len(frame)).decode('latin-1') + frame.decode() + '\\n')"
    )
    reward, ev = score(runner, code)
    assert reward == 0.0
    from oapl.rewards import code as code_mod

    assert code_mod.compare_stdout("1", "2") is False  # trainer's checker untouched


@requires_ns
@pytest.mark.parametrize(
    "code",
    [
        "class Liar(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def double(x):\n    return Liar(0)",
        "class Liar(list):\n    def __eq__(self, other):\n        return True\ndef double(x):\n    return Liar()",
        "class Liar:\n    def __eq__(self, other):\n        return True\ndef double(x):\n    return Liar()",
        "import os\ndef double(x):\n    os.write(3, b'42')\n    return 0",
        "import sys\ndef double(x):\n    sys.exit(0)",
        "import json, os\njson.dumps = lambda *a, **k: '42'\nos.write = lambda fd, b: len(b)\n"
        "def double(x):\n    return 0",
    ],
    ids=["eq-int", "eq-list", "eq-object", "forge-result-fd", "exit-before-return", "patch-json-dumps"],
)
def test_functional_result_forgery_fails(runner, code):
    reward, _ = score(runner, code, functional=True)
    assert reward == 0.0


@requires_ns
def test_reference_still_scores_one_after_attacks(runner):
    """The sandbox keeps working (and stays deterministic) after all of the above."""
    reward, _ = score(runner, "print(int(input()) * 2)")
    freward, _ = score(runner, "def double(x):\n    return 2 * x", functional=True)
    assert (reward, freward) == (1.0, 1.0)


@requires_ns
def test_adversarial_batch_in_parallel_scores_zero(monkeypatch):
    """Many attacks in one reward call: all 0, honest answers 1, trainer unaffected."""
    reward_fn = make_code_reward(CFG)
    results = []  # what the sandbox reported for each program of the reward call
    run_many = reward_fn.runner.run_many
    monkeypatch.setattr(reward_fn.runner, "run_many", lambda jobs: results.extend(run_many(jobs)) or results)
    attacks = [
        "while True:\n    pass",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        # bytes(n) is calloc'ed: address space grows without touching pages, so the memory limit (not
        # the 1 s timeout on a loaded host) is what stops it
        "a = []\nwhile True:\n    a.append(bytes(10 ** 7))",
        "while True:\n    print('x' * 10000)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint(42)\nos._exit(1)",
    ]
    honest = "print(int(input()) * 2)"
    completions = [f"```python\n{c}\n```" for c in attacks + [honest]]
    scores = reward_fn(prompts=[""] * len(completions), completions=completions, tests=[STDIN_TESTS] * len(completions))
    assert scores == [0.0] * len(attacks) + [1.0]
    # each attack was stopped by the limit aimed at it (one run each: a program stops at its first
    # failure); host_intact checks that none of their processes is left
    assert [len(r.runs) for r in results] == [1] * len(completions)
    statuses = [r.runs[0].status for r in results]
    assert statuses[0] == "timeout" and statuses[1] == "timeout", statuses  # busy loop, fork loop
    assert statuses[2] in ("runtime_error", "signal"), statuses  # MemoryError, or killed by the cgroup
    assert statuses[3] == "output_limit", statuses
    assert statuses[4] == "runtime_error", statuses  # kill(-1) reached nothing; os._exit(1)
    assert statuses[5] == "ok", statuses


# --------------------------------------------------------------------------- opt-out mode

DEGRADED = SandboxConfig(
    timeout_s=1.0,
    total_deadline_s=6.0,
    memory_mb=384,
    max_output_bytes=64 << 10,
    max_processes=16,
    max_file_bytes=1 << 20,
    workers=2,
    isolation="none",
    allow_no_netns=True,
)


@pytest.mark.parametrize(
    "code",
    [
        "print(42, flush=True)\nwhile True:\n    pass",
        "import os\nprint(42, flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))",
        "import sys\nprint(42)\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(0.3)\n    print(42, flush=True)\n"
        "    time.sleep(30)\nos._exit(0)",
        "print(42)\nraise SystemExit(3)",
    ],
    ids=["loop", "fork-bomb", "memory", "output", "escaped-daemon", "exit-code"],
)
def test_resource_guards_hold_without_namespaces(code):
    """Opt-out mode keeps rlimits, timeouts and process clean-up (host-intact fixture)."""
    reward, _ = score(SandboxRunner(DEGRADED), code)
    assert reward == 0.0


@pytest.mark.skipif(os.geteuid() != 0, reason="the dedicated sandbox uid needs root")
def test_opt_out_cannot_signal_host_processes_as_root():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = f"import os\ntry:\n    os.kill({victim.pid}, 9); print(42)\nexcept OSError:\n    print(0)"
        reward, _ = score(SandboxRunner(DEGRADED), code)
        assert reward == 0.0 and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_opt_out_really_has_no_network_isolation():
    """Documents the cost of allow_no_netns=True (and proves the network attack is real)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = (
        f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    print(42)\nexcept OSError:\n    print(0)"
    )
    try:
        reward, _ = score(SandboxRunner(DEGRADED), code)
    finally:
        srv.close()
    assert reward == 1.0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
