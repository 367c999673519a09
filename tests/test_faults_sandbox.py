"""Sandbox faults of issue 27: a Python environment under /tmp, and host paths in /proc.

* A program that imports numpy scores 1 when the interpreter and its site-packages live under
  ``/tmp`` (which every test case covers with a fresh tmpfs), also reached through a symlink, and a
  ``.pth`` (editable install) folder elsewhere is importable and read-only.
* Nothing a program can read under ``/proc`` names the trainer's source, its temporary folders, its
  pid, the test's own folder or (when Python does not live there) the home directory.

Run: ``python -m pytest tests/test_faults_sandbox.py -q`` (builds a small venv; marked slow).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import oapl
from oapl.rewards.code import make_code_reward
from oapl.rewards.sandbox import ProgramJob, SandboxConfig, SandboxRunner, probe_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CFG = dict(timeout_s=20.0, total_deadline_s=60.0, memory_mb=1024, max_output_bytes=1 << 20, workers=1)


def _namespaces_ok() -> bool:
    return bool(probe_namespaces(SandboxConfig())["ok"])


requires_ns = pytest.mark.skipif(not _namespaces_ok(), reason="namespaces unavailable on this host")


def _numpy_dirs() -> list[Path]:
    np = pytest.importorskip("numpy")
    site = Path(np.__file__).resolve().parents[1]
    return [p for p in (site / "numpy", site / "numpy.libs") if p.is_dir()]


def _copy_tree(src: Path, dst: Path) -> None:
    """Hard links where /tmp shares the file system (cheap), copies otherwise: real files under /tmp."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)


@pytest.fixture(scope="module")
def tmp_venv():
    """A venv under /tmp holding its own numpy, plus a .pth naming a folder outside it."""
    dirs = _numpy_dirs()
    root = Path(tempfile.mkdtemp(prefix="oapl-tmpvenv-", dir="/tmp"))
    try:
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                       capture_output=True, timeout=120)
        python = venv / "bin" / "python"
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True, timeout=60).stdout.strip())
        assert str(site).startswith(str(venv))
        for d in dirs:
            _copy_tree(d, site / d.name)
        editable = root / "editable_src"
        editable.mkdir()
        (editable / "oapl_helper_mod.py").write_text("def triple(x):\n    return 3 * x\n")
        (site / "_oapl_editable.pth").write_text(f"{editable}\n")
        (root / "link").symlink_to(venv)
        yield {"root": root, "venv": venv, "python": python, "site": site, "editable": editable,
               "link_python": root / "link" / "bin" / "python"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


NUMPY_PROGRAM = (
    "import numpy as np, sys\n"
    "assert np.__file__.startswith({venv!r}), np.__file__  # numpy of the venv under /tmp\n"
    "n = int(input())\n"
    "print(int(np.arange(n).sum()))\n"
)


def _reward(python: Path, code: str, tests: list[dict]) -> float:
    reward = make_code_reward(SandboxConfig(python=str(python), **CFG))
    return reward(prompts=["p"], completions=[f"```python\n{code}\n```"], tests=[tests])[0]


@requires_ns
def test_numpy_program_scores_one_from_a_venv_under_tmp(tmp_venv):
    tests = [{"input": "10\n", "output": "45\n", "testtype": "stdin"},
             {"input": "1000\n", "output": "499500\n", "testtype": "stdin"}]  # two tests: two fresh /tmp
    code = NUMPY_PROGRAM.format(venv=str(tmp_venv["venv"]))
    assert _reward(tmp_venv["python"], code, tests) == 1.0
    # a wrong answer still scores 0 (the reward is not 1 for any numpy program)
    assert _reward(tmp_venv["python"], code, [{"input": "10\n", "output": "46\n", "testtype": "stdin"}]) == 0.0


@requires_ns
def test_numpy_from_a_venv_under_tmp_reached_through_a_symlink(tmp_venv):
    tests = [{"input": "4\n", "output": "6\n", "testtype": "stdin"}]
    # np.__file__ then starts with the link's path or the venv's: accept the common root
    code = NUMPY_PROGRAM.format(venv=str(tmp_venv["root"]))
    assert _reward(tmp_venv["link_python"], code, tests) == 1.0


@requires_ns
def test_pth_folders_are_importable_and_python_paths_read_only(tmp_venv):
    targets = [str(tmp_venv["editable"] / "x"), str(tmp_venv["site"] / "x"), str(tmp_venv["venv"] / "x")]
    code = ("import oapl_helper_mod\nwritten = []\n"
            f"for p in {targets!r}:\n"
            "    try:\n        open(p, 'w').write('x'); written.append(p)\n    except OSError:\n        pass\n"
            "open('scratch.txt', 'w').write('the working directory stays writable')\n"
            "print(oapl_helper_mod.triple(int(input())) if not written else written)\n")
    assert _reward(tmp_venv["python"], code, [{"input": "14\n", "output": "42\n", "testtype": "stdin"}]) == 1.0
    assert not any(Path(p).exists() for p in targets)


# --------------------------------------------------------------------------- /proc

PROC_SCAN = r'''
import os, sys
needles = {needles!r}
skip = {{"kmsg", "kcore", "pagemap", "mem", "clear_refs", "kpagecount", "kpageflags", "kpagecgroup",
        "sysrq-trigger", "oom_score_adj", "oom_adj", "coredump_filter", "attr"}}
hits, checked = [], 0
def check(label, blob):
    global checked
    checked += 1
    for n in needles:
        if n.encode() in blob:
            hits.append((label, n))
for top in ("/proc", "/proc/self", "/proc/1", "/proc/thread-self"):
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in skip and not (dirpath == "/proc" and d in ("sys", "bus", "irq", "tty"))]
        for name in files + [d for d in os.listdir(dirpath) if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            if name in skip:
                continue
            try:
                if os.path.islink(path):
                    check(path, os.readlink(path).encode())
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    check(path, os.read(fd, 1 << 20))
                finally:
                    os.close(fd)
            except OSError:
                pass
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for name in ("cwd", "root", "exe"):
        try:
            check(f"/proc/{{pid}}/{{name}}", os.readlink(f"/proc/{{pid}}/{{name}}").encode())
        except OSError:
            pass
check("sys.path", repr(sys.path).encode())
print("CHECKED", checked)
for h in hits:
    print("HIT", *h)
'''


def _host_needles(extra: list[str], python_paths: list[str]) -> list[str]:
    """Host paths a program must not learn: the trainer's package folder, its temp folders and pid,
    the test's secret folder, and the home directory unless Python itself lives under it."""
    needles = [str(Path(oapl.__file__).resolve().parent), str(Path(oapl.__file__).parent.parent),
               os.path.join(tempfile.gettempdir(), "oapl-sbx"), f"oapl-sbx-{os.getpid()}", *extra]
    home = os.path.expanduser("~")
    if home not in ("", "/") and not any(p == home or p.startswith(home.rstrip("/") + "/") for p in python_paths):
        needles.append(home)
    return needles


def _scan(python: str, needles: list[str]) -> tuple[int, list[str]]:
    runner = SandboxRunner(SandboxConfig(python=python, **CFG))
    res = runner.run(ProgramJob(code=PROC_SCAN.format(needles=needles), mode="stdin", inputs=[""]))
    assert res.runs and res.runs[0].status == "ok", (res.error, res.runs and res.runs[0].stderr_tail)
    lines = res.runs[0].stdout.splitlines()
    checked = int(lines[0].split()[1])
    return checked, [ln for ln in lines[1:] if ln.startswith("HIT")]


@requires_ns
def test_proc_shows_no_host_paths(tmp_path):
    secret = tmp_path / "run-dir-secret"
    secret.mkdir()
    python_paths = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)] + [sys.prefix, sys.base_prefix]
    needles = _host_needles([str(secret), str(tmp_path)], python_paths)
    assert not any(n in p for n in needles for p in python_paths), "a needle is part of Python's own path"
    checked, hits = _scan(sys.executable, needles)
    assert checked > 200  # the scan really read /proc (cmdline, mountinfo, mounts, cgroup, environ, ...)
    assert hits == []


@requires_ns
def test_proc_shows_no_host_paths_with_python_under_tmp(tmp_venv, tmp_path):
    venv = str(tmp_venv["venv"])
    python_paths = [venv, str(tmp_venv["root"]), sys.base_prefix, os.path.realpath(sys.base_prefix)]
    needles = _host_needles([str(tmp_path)], python_paths)
    checked, hits = _scan(str(tmp_venv["python"]), needles)
    assert checked > 200 and hits == []


@requires_ns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_trainer_with_a_venv_under_tmp(tmp_path_factory):
    """The user-namespace path (non-root trainer): a venv under /tmp, direct and through a symlink."""
    python3, setpriv = shutil.which("python3", path="/usr/bin:/bin"), shutil.which("setpriv")
    src = Path(oapl.__file__).resolve().parents[1]
    if not python3 or not setpriv:
        pytest.skip("needs /usr/bin/python3 and setpriv to run as an unprivileged user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    if subprocess.run(as_nobody + [python3, "-c", f"import os, sys; sys.exit(not os.access({str(src / 'oapl')!r}, os.R_OK))"],
                      env=env, cwd="/", timeout=60).returncode != 0:
        pytest.skip(f"an unprivileged user cannot read {src} here")
    root = Path(tempfile.mkdtemp(prefix="oapl-tmpvenv-", dir="/tmp"))
    try:
        subprocess.run([python3, "-m", "venv", "--without-pip", str(root / "venv")], check=True, capture_output=True,
                       timeout=120)
        python = root / "venv" / "bin" / "python"
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        Path(site, "oapl_tmp_mod.py").write_text("ANSWER = 42\n")
        (root / "link").symlink_to("venv")
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        script = (f"import sys\nsys.path.insert(0, {str(src)!r})\n"
                  "from oapl.rewards.sandbox.runner import SandboxConfig, SandboxRunner, ProgramJob\n"
                  "try:\n    SandboxRunner(SandboxConfig()).isolation_mode()\n"
                  "except Exception:\n    print('UNAVAILABLE'); sys.exit(0)\n"
                  f"for py in ({str(python)!r}, {str(root / 'link' / 'bin' / 'python')!r}):\n"
                  "    res = SandboxRunner(SandboxConfig(timeout_s=10, python=py)).run(ProgramJob(\n"
                  "        code='import oapl_tmp_mod\\nprint(oapl_tmp_mod.ANSWER)', mode='stdin', inputs=['', '']))\n"
                  "    print(res.isolation.get('userns'), [(r.status, r.stdout.strip()) for r in res.runs], res.error)\n")
        proc = subprocess.run(as_nobody + [python3, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd="/", env=env)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        if lines == ["UNAVAILABLE"]:
            pytest.skip("no user namespace for the unprivileged user here")
        assert lines == ["True [('ok', '42'), ('ok', '42')] None"] * 2
    finally:
        shutil.rmtree(root, ignore_errors=True)
