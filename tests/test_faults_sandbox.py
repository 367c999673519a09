"""Sandbox faults of issue 27: a Python environment under /tmp, and host paths in /proc.

* A program that imports numpy scores 1 when the interpreter and its site-packages live under
  ``/tmp`` (which every test case covers with a fresh tmpfs), also reached through a symlink, and a
  ``.pth`` (editable install) folder elsewhere is importable and read-only.
* Nothing a program can read under ``/proc`` names the trainer's source, its temporary folders, its
  pid, the test's own folder or (when Python does not live there) the home directory.

Run: ``python -m pytest tests/test_faults_sandbox.py -q -m "slow or not slow"`` (the tests that build a
small venv under /tmp are marked slow).
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

pytestmark = pytest.mark.timeout(300)

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
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=120
        )
        python = venv / "bin" / "python"
        site = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
        )
        assert str(site).startswith(str(venv))
        for d in dirs:
            _copy_tree(d, site / d.name)
        editable = root / "editable_src"
        editable.mkdir()
        (editable / "oapl_helper_mod.py").write_text("def triple(x):\n    return 3 * x\n")
        (site / "_oapl_editable.pth").write_text(f"{editable}\n")
        (root / "link").symlink_to(venv)
        yield {
            "root": root,
            "venv": venv,
            "python": python,
            "site": site,
            "editable": editable,
            "link_python": root / "link" / "bin" / "python",
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


NUMPY_PROGRAM = (
    "import numpy as np, os, sys\n"
    "assert np.__file__.startswith(sys.prefix), np.__file__  # numpy of the venv\n"
    "# ... which is the one under /tmp: its host path still resolves inside this test's private /tmp\n"
    "assert os.path.realpath({venv!r}) == os.path.realpath(sys.prefix), (sys.prefix, os.listdir('/tmp'))\n"
    "n = int(input())\n"
    "print(int(np.arange(n).sum()))\n"
)


def _reward(python: Path, code: str, tests: list[dict]) -> float:
    reward = make_code_reward(SandboxConfig(python=str(python), **CFG))
    return reward(prompts=["p"], completions=[f"```python\n{code}\n```"], tests=[tests])[0]


@pytest.mark.slow
@requires_ns
def test_numpy_program_scores_one_from_a_venv_under_tmp(tmp_venv):
    tests = [
        {"input": "10\n", "output": "45\n", "testtype": "stdin"},
        {"input": "1000\n", "output": "499500\n", "testtype": "stdin"},
    ]  # two tests: two fresh /tmp
    code = NUMPY_PROGRAM.format(venv=str(tmp_venv["venv"]))
    assert _reward(tmp_venv["python"], code, tests) == 1.0
    # a wrong answer still scores 0 (the reward is not 1 for any numpy program)
    assert _reward(tmp_venv["python"], code, [{"input": "10\n", "output": "46\n", "testtype": "stdin"}]) == 0.0


@pytest.mark.slow
@requires_ns
def test_numpy_from_a_venv_under_tmp_reached_through_a_symlink(tmp_venv):
    tests = [{"input": "4\n", "output": "6\n", "testtype": "stdin"}]
    code = NUMPY_PROGRAM.format(venv=str(tmp_venv["root"] / "link"))
    assert _reward(tmp_venv["link_python"], code, tests) == 1.0


@pytest.mark.slow
@requires_ns
def test_pth_folders_are_importable_and_python_paths_read_only(tmp_venv):
    targets = [str(tmp_venv["editable"] / "x"), str(tmp_venv["site"] / "x"), str(tmp_venv["venv"] / "x")]
    code = (
        "import oapl_helper_mod\nwritten = []\n"
        f"for p in {targets!r}:\n"
        "    try:\n        open(p, 'w').write('x'); written.append(p)\n    except OSError:\n        pass\n"
        "open('scratch.txt', 'w').write('the working directory stays writable')\n"
        "print(oapl_helper_mod.triple(int(input())) if not written else written)\n"
    )
    assert _reward(tmp_venv["python"], code, [{"input": "14\n", "output": "42\n", "testtype": "stdin"}]) == 1.0
    assert not any(Path(p).exists() for p in targets)


# --------------------------------------------------------------------------- /proc

PROC_SCAN = r"""
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
needles = {trainer_needles!r}  # sys.path names Python's own folders, never the trainer's
check("sys.path", repr(sys.path).encode())
print("CHECKED", checked)
for h in hits:
    print("HIT", *h)
"""


def _host_needles(extra: list[str], python_paths: list[str], strong: bool) -> list[str]:
    """Host paths a program must not learn from /proc: the trainer's package folder, its temp folders
    and pid, the test's secret folder; and, where Python is mounted on overlays and re-executed from
    them (``strong``), also Python's own host paths and the home directory.  Otherwise (a bind-mount
    fallback) those may show, and the home directory only counts when Python does not live in it."""
    needles = [
        str(Path(oapl.__file__).resolve().parent),
        str(Path(oapl.__file__).parent.parent),
        os.path.join(tempfile.gettempdir(), "oapl-sbx"),
        f"oapl-sbx-{os.getpid()}",
        *extra,
    ]
    home = os.path.expanduser("~")
    if strong:
        needles += python_paths
    if home not in ("", "/") and (
        strong or not any(p == home or p.startswith(home.rstrip("/") + "/") for p in python_paths)
    ):
        needles.append(home)
    return sorted(set(needles))


def _scan(python: str, needles: list[str]) -> tuple[int, list[str]]:
    runner = SandboxRunner(SandboxConfig(python=python, **CFG))
    trainer = [str(Path(oapl.__file__).resolve().parent), str(Path(oapl.__file__).parent.parent)]
    code = PROC_SCAN.format(needles=needles, trainer_needles=trainer)
    res = runner.run(ProgramJob(code=code, mode="stdin", inputs=[""]))
    assert res.runs and res.runs[0].status == "ok", (res.error, res.runs and res.runs[0].stderr_tail)
    lines = res.runs[0].stdout.splitlines()
    checked = int(lines[0].split()[1])
    return checked, [ln for ln in lines[1:] if ln.startswith("HIT")]


def _strong(python: str) -> bool:
    facts = (
        SandboxRunner(SandboxConfig(python=python, **CFG))
        .run(ProgramJob(code="print(1)", mode="stdin", inputs=[""]))
        .isolation
    )
    return facts.get("python_mounts") == "overlay" and facts.get("interpreter") == "re-executed"


@requires_ns
def test_proc_shows_no_host_paths(tmp_path):
    secret = tmp_path / "run-dir-secret"
    secret.mkdir()
    python_paths = sorted(
        {
            sys.prefix,
            sys.base_prefix,
            os.path.realpath(sys.prefix),
            os.path.realpath(sys.base_prefix),
            os.path.dirname(sys.executable),
        }
    )
    strong = _strong(sys.executable)
    try:  # the kernel's boot line (host-wide; it can name host paths) reads as empty in the sandbox
        boot = [Path("/proc/cmdline").read_text().strip()[:60]]
    except OSError:
        boot = []
    needles = _host_needles([str(secret), str(tmp_path)] + [b for b in boot if len(b) > 8], python_paths, strong)
    checked, hits = _scan(sys.executable, needles)
    assert checked > 200  # the scan really read /proc (cmdline, mountinfo, mounts, cgroup, environ, maps, ...)
    assert hits == []
    if strong:  # mountinfo shows the sandbox's own mount points only
        assert any(n in needles for n in python_paths)


@pytest.mark.slow
@requires_ns
def test_proc_shows_no_host_paths_with_python_under_tmp(tmp_venv, tmp_path):
    python_paths = [str(tmp_venv["venv"]), str(tmp_venv["root"]), sys.base_prefix, os.path.realpath(sys.base_prefix)]
    strong = _strong(str(tmp_venv["python"]))
    needles = _host_needles([str(tmp_path)], python_paths, strong)
    checked, hits = _scan(str(tmp_venv["python"]), needles)
    assert checked > 200 and hits == []


@pytest.mark.slow
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
    if (
        subprocess.run(
            as_nobody + [python3, "-c", f"import os, sys; sys.exit(not os.access({str(src / 'oapl')!r}, os.R_OK))"],
            env=env,
            cwd="/",
            timeout=60,
        ).returncode
        != 0
    ):
        pytest.skip(f"an unprivileged user cannot read {src} here")
    root = Path(tempfile.mkdtemp(prefix="oapl-tmpvenv-", dir="/tmp"))
    try:
        subprocess.run(
            [python3, "-m", "venv", "--without-pip", str(root / "venv")], check=True, capture_output=True, timeout=120
        )
        python = root / "venv" / "bin" / "python"
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        Path(site, "oapl_tmp_mod.py").write_text("ANSWER = 42\n")
        (root / "link").symlink_to("venv")
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        script = (
            f"import sys\nsys.path.insert(0, {str(src)!r})\n"
            "from oapl.rewards.sandbox import SandboxConfig, SandboxRunner, ProgramJob\n"
            "try:\n    SandboxRunner(SandboxConfig()).isolation_mode()\n"
            "except Exception:\n    print('UNAVAILABLE'); sys.exit(0)\n"
            f"for py in ({str(python)!r}, {str(root / 'link' / 'bin' / 'python')!r}):\n"
            "    res = SandboxRunner(SandboxConfig(timeout_s=10, python=py)).run(ProgramJob(\n"
            "        code=CODE, mode='stdin', inputs=['', '']))\n"
            "    f = res.isolation\n"
            "    print(f.get('userns'), [(r.status, r.stdout.strip()) for r in res.runs], res.error,\n"
            "          f.get('python_mounts') == 'overlay' and f.get('interpreter') == 're-executed')\n"
        )
        code = (
            "import oapl_tmp_mod, os\nblob = os.readlink('/proc/self/exe').encode()\n"
            "for p in ('/proc/self/mountinfo', '/proc/1/cmdline', '/proc/self/maps', '/proc/self/environ'):\n"
            "    blob += open(p, 'rb').read()\n"
            f"print(oapl_tmp_mod.ANSWER, {str(root).encode()!r} in blob)\n"
        )
        script = script.replace("for py in", f"CODE = {code!r}\nfor py in", 1)
        proc = subprocess.run(
            as_nobody + [python3, "-c", script], capture_output=True, text=True, timeout=120, cwd="/", env=env
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        if lines == ["UNAVAILABLE"]:
            pytest.skip("no user namespace for the unprivileged user here")
        # the venv's host path shows nowhere in /proc where Python sits on overlays (else: bind fallback)
        assert lines in (
            ["True [('ok', '42 False'), ('ok', '42 False')] None True"] * 2,
            ["True [('ok', '42 True'), ('ok', '42 True')] None False"] * 2,
        ), lines
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@requires_ns
@pytest.mark.parametrize("fallback", ["_test_no_overlay", "no_reexec"])
def test_numpy_under_tmp_without_overlays_or_re_exec(tmp_venv, fallback):
    """Where the kernel refuses overlays (bind mounts instead) or the interpreter cannot be started
    again inside, programs still run from the venv under /tmp, and the trainer's paths stay hidden."""
    from oapl.rewards.sandbox import runner as runner_mod

    cfg = SandboxConfig(python=str(tmp_venv["python"]), **CFG)
    SandboxRunner(cfg).isolation_mode()
    code = NUMPY_PROGRAM.format(venv=str(tmp_venv["venv"])) + (
        "blob = open('/proc/self/mountinfo').read() + open('/proc/1/cmdline').read()\n"
        f"assert not any(n in blob for n in {[str(Path(oapl.__file__).parent), 'oapl-sbx']!r})\n"
    )
    job = ProgramJob(code=code, mode="stdin", inputs=["10\n", "3\n"])
    runs, ready, error, _ = runner_mod.launch(cfg, job, "namespaces", extra_spec={fallback: True})
    assert error is None and [(r.status, r.stdout) for r in runs] == [("ok", "45\n"), ("ok", "3\n")], (error, runs)
    if fallback == "_test_no_overlay":
        assert ready["python_mounts"] == "bind" and ready["interpreter"] == "re-executed"
    else:
        assert ready["python_mounts"] == "overlay" and ready["interpreter"] == "inherited"


def test_python_paths_leave_out_broad_folders_and_the_trainer_source(monkeypatch, tmp_path):
    """.pth folders are exposed, except /, the home directory or a folder above it or above the
    sandbox's own folder, and a folder holding the trainer's oapl package."""
    from oapl.rewards.sandbox import _launcher

    home = tmp_path / "home" / "user"
    (home / "proj" / "src").mkdir(parents=True)
    lib = tmp_path / "libs"
    lib.mkdir()
    trainer_src = tmp_path / "checkout" / "src"
    (trainer_src / "oapl" / "rewards" / "sandbox").mkdir(parents=True)
    (trainer_src / "oapl" / "rewards" / "sandbox" / "_launcher.py").write_text("")
    workdir = tmp_path / "sbx" / "oapl-sbx-1-x"
    workdir.mkdir(parents=True)
    monkeypatch.setattr(_launcher, "_home_dir", lambda: str(home))
    monkeypatch.setattr(
        sys,
        "path",
        [
            "/",
            str(home),
            str(home.parent),
            str(home / "proj" / "src"),
            str(lib),
            str(trainer_src),
            str(tmp_path / "sbx"),
            str(tmp_path / "missing"),
        ],
    )
    got = set(_launcher._python_paths(str(workdir)))
    assert {str(home / "proj" / "src"), str(lib)} <= got
    assert not got & {
        "/",
        str(home),
        str(home.parent),
        str(trainer_src),
        str(tmp_path / "sbx"),
        str(tmp_path / "missing"),
    }
    assert os.path.realpath(sys.prefix) in got  # the interpreter's own prefix is there ...
    monkeypatch.setattr(_launcher, "_home_dir", lambda: os.path.realpath(sys.prefix))
    got = set(_launcher._python_paths(str(workdir)))
    assert os.path.realpath(sys.prefix) not in got  # ... unless it is the home directory itself
    import site

    site_dirs = site.getsitepackages()
    assert site_dirs and all(os.path.realpath(p) in got for p in site_dirs)  # then only its parts


@requires_ns
def test_an_interpreter_that_cannot_restart_inside_falls_back(monkeypatch, caplog):
    """If the re-executed init dies (an interpreter that cannot start from the sandbox's view), the
    probe notices, and that interpreter's sandboxes keep the launched one: programs still score."""
    from oapl.rewards.sandbox import runner as runner_mod

    monkeypatch.setattr(runner_mod, "_NO_REEXEC", set())
    cfg = SandboxConfig(**CFG)
    with caplog.at_level("WARNING", logger="oapl.rewards.sandbox.runner"):
        facts = probe_namespaces(cfg, _extra_spec={"_test_break_reexec": True})
    assert facts["ok"] and facts["interpreter"] == "inherited", facts
    assert runner_mod._NO_REEXEC == {sys.executable}
    assert "could not be started again inside the sandbox" in caplog.text
    runs, ready, error, _ = runner_mod.launch(
        cfg, ProgramJob(code="print(int(input()) * 2)", mode="stdin", inputs=["21\n"]), "namespaces"
    )
    assert error is None and runs[0].stdout == "42\n" and ready["interpreter"] == "inherited"
