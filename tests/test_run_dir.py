"""No command line loses data an earlier run wrote (issue 13).

A non-empty output_dir needs --resume or --overwrite; --overwrite deletes the old run only once the
new one has started; pruning never deletes the checkpoint just written; leftovers of killed runs
(.tmp-step-* checkpoint writes, sandbox temp dirs and cgroups) are removed at the next start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oapl.cli.main import main
from oapl.errors import RunDirError
from oapl.metrics import MetricsLogger
from oapl.rundir import begin_run, check_run_dir
from oapl.trainer.checkpoint import list_checkpoints, prune_checkpoints

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _toy_rewards_and_clean_env(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)


def train_argv(tiny_model_dir, prompts_file, out, *extra):
    return [
        "train",
        f"output_dir={out}",
        f"model.name={tiny_model_dir}",
        "task.name=dataset",
        f"task.dataset={prompts_file}",
        "task.columns={prompt: question, prompt_id: id}",
        "task.reward=toy_rewards:digit_fraction",
        "engine.kind=transformers",
        "steps=2",
        "threads=2",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "rollout.prompts_per_generate=2",
        "rollout.asynchronous=false",
        "sampling.max_tokens=4",
        "eval.at_start=false",
        "eval.at_end=false",
        "logging.progress=false",
        "checkpoint.every=1",
        "checkpoint.keep=5",
        *extra,
    ]


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run`` with its bytes and mtime."""
    return {
        str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()
    }


def old_run(path: Path) -> Path:
    """A finished earlier run: config, metrics and a checkpoint at a higher step than the new run's."""
    (path / "checkpoints" / "step-00000100").mkdir(parents=True)
    (path / "checkpoints" / "step-00000100" / "trainer_state.pt").write_bytes(b"old state")
    (path / "config.yaml").write_text("steps: 100\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 101)))
    return path


def test_non_empty_output_dir_is_refused_and_left_untouched(capsys, tmp_path, tiny_model_dir, prompts_file):
    run = old_run(tmp_path / "run")
    before = snapshot(run)
    rc = main(train_argv(tiny_model_dir, prompts_file, run))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("oapl: ")]
    assert "output_dir" in line and "not empty" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(run) == before


def test_library_train_refuses_too(tmp_path, tiny_model_dir, prompts_file):
    from oapl.config import load_config
    from oapl.loop import train

    run = old_run(tmp_path / "run")
    cfg = load_config(None, train_argv(tiny_model_dir, prompts_file, run)[1:])
    with pytest.raises(RunDirError, match="not empty"):
        train(cfg)


def test_overwrite_that_fails_at_startup_keeps_the_old_run(capsys, tmp_path, tiny_model_dir, prompts_file):
    run = old_run(tmp_path / "run")
    before = snapshot(run)
    rc = main(train_argv(tiny_model_dir, prompts_file, run, "task.reward=toy_rewards:missing_fn", "--overwrite"))
    assert rc == 2 and "task.reward" in capsys.readouterr().err
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_once_it_started(tmp_path, tiny_model_dir, prompts_file):
    run = old_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    assert main(train_argv(tiny_model_dir, prompts_file, run, "--overwrite")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert (run / "notes.txt").read_text() == "mine"
    assert "steps: 2" in (run / "config.yaml").read_text()


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    rc = main(["train", f"output_dir={tmp_path}", "--resume", "--overwrite"])
    assert rc == 2 and "--resume" in capsys.readouterr().err


def test_resume_removes_unfinished_checkpoint_writes(tmp_path, tiny_model_dir, prompts_file):
    run = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, prompts_file, run)) == 0
    stale = run / "checkpoints" / ".tmp-step-00000003-k1ll3d"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"\0" * 1024)
    (run / "metrics.jsonl.tmp").write_text("half")
    assert main(train_argv(tiny_model_dir, prompts_file, run, "steps=4", "--resume")) == 0
    assert not stale.exists() and not (run / "metrics.jsonl.tmp").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _fake_checkpoint(root: Path, step: int) -> Path:
    p = root / "checkpoints" / f"step-{step:08d}"
    p.mkdir(parents=True)
    (p / "trainer_state.pt").write_bytes(b"x")
    return p


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    later = [_fake_checkpoint(tmp_path, s) for s in (50, 100)]  # another run's, higher step numbers
    newest = _fake_checkpoint(tmp_path, 8)
    removed = prune_checkpoints(tmp_path, newest, keep=2)
    assert newest.exists()
    assert sorted(p.name for p in removed) == ["step-00000002", "step-00000004"]
    assert (tmp_path / "checkpoints" / "step-00000006").exists()
    assert all(p.exists() for p in later)  # not this run's: left alone
    prune_checkpoints(tmp_path, newest, keep=1)
    assert newest.exists() and not (tmp_path / "checkpoints" / "step-00000006").exists()


def test_check_run_dir_writes_nothing_and_begin_run_overwrites_only_run_files(tmp_path):
    run = old_run(tmp_path / "run")
    (run / "mine.txt").write_text("keep")
    before = snapshot(run)
    with pytest.raises(RunDirError):
        check_run_dir(run)
    check_run_dir(run, overwrite=True)
    assert snapshot(run) == before  # the overwrite happens in begin_run, once the run starts
    begin_run(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".oapl-starting", "mine.txt"]  # the new run is starting
    check_run_dir(tmp_path / "new" / "deeper")  # created when missing
    assert (tmp_path / "new" / "deeper").is_dir() and not any((tmp_path / "new" / "deeper").iterdir())


def test_truncate_after_resume_keeps_rows_unique(tmp_path):
    rows = [{"step": 0, "eval/pass@1": 0.1}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    rows += [{"step": 6, "eval/pass@1": 0.9}]  # the final evaluation, logged before the final checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)))
    m = MetricsLogger(tmp_path, resume=True)
    m.truncate_after(6)
    m.log({"step": 6, "eval/pass@1": 0.95})
    m.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert kept[-1]["eval/pass@1"] == 0.95 and sum("eval/pass@1" in r for r in kept) == 2
    m = MetricsLogger(tmp_path, resume=True)
    m.truncate_after(4)
    m.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 4]
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- sandbox leftovers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_sandbox_dirs_and_cgroups_are_removed(tmp_path):
    from oapl.rewards.sandbox.host import cleanup_stale_sandboxes

    dead = _dead_pid()
    stale = tmp_path / f"oapl-sbx-{dead}-abc123"
    (stale / "t0").mkdir(parents=True)
    (stale / "t0" / "x").write_text("left by a killed run")
    alive = tmp_path / f"oapl-sbx-{os.getppid()}-def456"  # a running process's sandbox: not touched
    alive.mkdir()
    mine = tmp_path / f"oapl-sbx-{os.getpid()}-ghi789"
    mine.mkdir()
    other = tmp_path / "oapl-sbx-notapid"
    other.mkdir()
    cg_root = tmp_path / "cgroup"
    cg_stale = cg_root / f"oapl-sbx-{dead}-0"
    cg_stale.mkdir(parents=True)
    (cg_stale / "cgroup.procs").write_text("")
    removed = cleanup_stale_sandboxes(str(tmp_path), cgroup_dirs=[str(cg_root)])
    assert not stale.exists() and alive.exists() and mine.exists() and other.exists()
    assert str(stale) in removed
    # a real cgroup directory disappears with rmdir; the stand-in here has a file, so it stays
    assert cg_stale.exists() or str(cg_stale) in removed


@pytest.mark.timeout(180)
def test_sandbox_of_a_killed_trainer_is_cleaned_at_the_next_start(tmp_path):
    """kill -9 a process while its sandbox runs a program; the next SandboxRunner cleans up."""
    import signal
    import time

    from oapl.rewards.sandbox import SandboxConfig, probe_namespaces

    if not probe_namespaces(SandboxConfig())["ok"]:
        pytest.skip("namespaces unavailable on this host")
    script = (
        "import sys\nfrom oapl.rewards.sandbox import SandboxRunner, SandboxConfig, ProgramJob\n"
        "r = SandboxRunner(SandboxConfig(timeout_s=60, total_deadline_s=60, workers=1))\n"
        "print('go', flush=True)\n"
        "r.run(ProgramJob(code='import time\\ntime.sleep(60)', mode='stdin', inputs=['']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    pattern = f"oapl-sbx-{proc.pid}-*"
    import tempfile

    tmp_root = Path(tempfile.gettempdir())
    deadline = time.monotonic() + 60
    while not list(tmp_root.glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the program is running now
    left_dirs = list(tmp_root.glob(pattern))
    assert left_dirs, "the sandbox never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    cg = (
        [
            p
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids")
            for p in Path(root).glob(f"oapl-sbx-{proc.pid}-*")
        ]
        if Path("/sys/fs/cgroup").is_dir()
        else []
    )
    assert all(p.exists() for p in left_dirs)  # what a kill -9 leaves behind
    out = subprocess.run(
        [sys.executable, "-c", "from oapl.rewards.sandbox import SandboxRunner\nSandboxRunner()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not list(tmp_root.glob(pattern))
    assert not any(p.exists() for p in cg)
