"""Fault injection: stop signals, the wall-clock checkpoint cadence, runs that cannot learn, a dead
rollout worker.

SIGTERM (kill, timeout, docker stop, Kubernetes, SLURM) and SIGUSR1 (SLURM ``--signal``) stop a run
as Ctrl-C does: a checkpoint, one line, exit 128 + the signal (143, 138; 130 for Ctrl-C), and
``--resume`` continues. The in-process tests send a real signal to the test process at a chosen moment
of a real tiny run (model loading, mid-step, evaluation, the checkpoint write); the subprocess tests
signal a real ``oapl train`` once its first step row is in metrics.jsonl (an event, not a sleep).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oapl import signals
from oapl.cli.main import main
from oapl.config import ConfigError, load_config
from oapl.loop import CheckpointClock, RolloutFailed, Run, make_backend

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() configures logging for the process: undo it after each test (as test_user_errors)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    before = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    assert {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS} == before  # handlers restored


@pytest.fixture
def toy_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def send_self(sig: int) -> None:
    """Signal this process and return once the main thread has run the handler (between bytecodes),
    which raises, holds or ignores it."""
    before = signals._STATE.received
    os.kill(os.getpid(), sig)
    end = time.monotonic() + 30
    while signals._STATE.received == before:
        assert time.monotonic() < end, "the signal handler did not run"
        time.sleep(0.001)


def train_args(tiny_model_dir, prompts_file, out, *extra):
    return [
        "train",
        f"output_dir={out}",
        f"model.name={tiny_model_dir}",
        "task.name=dataset",
        f"task.dataset={prompts_file}",
        "task.columns={prompt: question, prompt_id: id}",
        "task.reward=toy_rewards:digit_fraction",
        "engine.kind=transformers",
        "steps=4",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "rollout.prompts_per_generate=2",
        "rollout.asynchronous=false",
        "sampling.max_tokens=4",
        "eval.at_start=false",
        "eval.at_end=false",
        "logging.progress=false",
        "checkpoint.save_final=false",
        "threads=1",
        *extra,
    ]


SMALL = {"rollout.group_size": 2, "rollout.prompts_per_step": 2, "rollout.prompts_per_generate": 2, "threads": 1}


def oapl_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("oapl: ")]


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def checkpoints(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------- the signal mechanism


def test_sigterm_and_sigusr1_raise_an_interrupt_with_their_exit_code():
    with signals.handle_stop_signals():
        with pytest.raises(signals.Interrupted) as e:
            send_self(signal.SIGTERM)
        assert isinstance(e.value, KeyboardInterrupt)  # the run's one interrupt path handles it
        assert (e.value.signum, e.value.exit_code, signals.exit_code(e.value)) == (signal.SIGTERM, 143, 143)
    with signals.handle_stop_signals():
        with pytest.raises(signals.Interrupted) as e:
            send_self(signal.SIGUSR1)
        assert e.value.exit_code == 138
        # Ray re-raises a signal's exception from inside ray.get as a plain KeyboardInterrupt
        assert signals.exit_code(KeyboardInterrupt()) == 138 and signals.signal_name(KeyboardInterrupt()) == "SIGUSR1"
    assert signals.exit_code(KeyboardInterrupt()) == 130  # a plain Ctrl-C


def test_a_signal_inside_a_deferred_block_takes_effect_when_it_ends():
    done = []
    with signals.handle_stop_signals():
        with pytest.raises(signals.Interrupted) as e:
            with signals.deferred():
                send_self(signal.SIGTERM)  # not raised here: the block is finished first
                with signals.deferred():  # nested: still held
                    send_self(signal.SIGUSR1)
                done.append("whole")
        assert done == ["whole"] and e.value.signum == signal.SIGTERM  # the first signal decides
        # a stop is under way: a repeated SIGTERM (a launcher signalling twice) is ignored ...
        send_self(signal.SIGTERM)
        # ... and Ctrl-C again stops at once
        with pytest.raises(signals.Interrupted) as again:
            send_self(signal.SIGINT)
        assert again.value.exit_code == 130


def test_handlers_replaced_by_a_library_are_reclaimed_and_restored_at_the_end():
    def ray_like(signum, frame):  # ray.init sets SIGTERM to sys.exit(signum)
        raise SystemExit(signum)

    before = signal.getsignal(signal.SIGTERM)
    with signals.handle_stop_signals():
        signal.signal(signal.SIGTERM, ray_like)
        signals.reclaim()
        with pytest.raises(signals.Interrupted):
            send_self(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    # library use (replace=False) leaves a handler the program set alone, and takes a default one
    # (SIGTERM is set to the default here: a Ray test earlier in this process leaves Ray's handler)
    signal.signal(signal.SIGUSR1, ray_like)
    term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with signals.handle_stop_signals(replace=False):
            assert signal.getsignal(signal.SIGUSR1) is ray_like
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the default one is ours
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, term)
    # an ignored signal stays ignored (a shell's background job ignores Ctrl-C)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.handle_stop_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not before
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------- the wall-clock cadence


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_checkpoint_clock_is_due_every_n_minutes_since_the_last_checkpoint():
    clock = FakeClock()
    cadence = CheckpointClock(10, clock)
    clock.t += 599.0
    assert not cadence.due()
    clock.t += 1.0
    assert cadence.due()  # 10 minutes = 600 s since the start
    cadence.reset()  # a checkpoint was written
    assert not cadence.due()
    clock.t += 600.0
    assert cadence.due()
    off = CheckpointClock(0, clock)
    clock.t += 1e9
    assert not off.due()


def test_shipped_configs_checkpoint_by_wall_clock_time():
    assert load_config().checkpoint.every_minutes == 10  # the default
    for path in sorted((HERE.parent / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if "base" in tree:  # a comparison: its base is the run config
            tree = tree["base"]
        minutes = (tree.get("checkpoint") or {}).get("every_minutes", 10)
        assert 0 < minutes <= 10, path


def test_a_run_checkpoints_when_the_minutes_have_passed(tiny_model_dir, prompts_file, tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, prompts_file, tmp_path / "r", **SMALL, **{"checkpoint.every_minutes": 2.5})
    clock = FakeClock()
    run = Run(cfg, make_backend(cfg), callbacks=[lambda row: setattr(clock, "t", clock.t + 60.0)])
    try:
        run.checkpoint_clock = CheckpointClock(cfg.checkpoint.every_minutes, clock)
        run.train()  # a minute per step: due after step 3 (180 s >= 150 s), again at step 6 (the last: no)
    finally:
        run.close()
    assert checkpoints(tmp_path / "r") == ["step-00000003"]


def test_wall_clock_checkpoints_never_prune_an_offline_runs_epoch_checkpoints(tiny_model_dir, tmp_path):
    from oapl.data.rollouts import RolloutGroup, write_rollouts

    data = tmp_path / "data"
    data.mkdir()
    write_rollouts(
        [
            RolloutGroup(
                prompt_id=f"g{i}",
                prompt="p",
                prompt_token_ids=[5, 6],
                responses=["a", "b"],
                response_token_ids=[[7, 2], [8, 2]],
                response_logprobs=[[-0.1, -0.2], [-0.3, -0.1]],
                rewards=[1.0, 0.0],
                finish_reasons=["stop", "stop"],
                weights_id=tiny_model_dir,
                version=0,
                sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 8},
            )
            for i in range(4)
        ],
        data / "part-00000.parquet",
    )
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"offline.data={data}",
            "offline.epochs=3",
            f"output_dir={tmp_path / 'r'}",
            "rollout.group_size=2",
            "rollout.prompts_per_step=2",
            "logging.progress=false",
            "threads=1",
            "checkpoint.every_minutes=1",
            "checkpoint.keep=2",
        ],
    )
    clock = FakeClock()
    run = Run(cfg, make_backend(cfg), callbacks=[lambda row: setattr(clock, "t", clock.t + 61.0)])
    try:
        run.checkpoint_clock = CheckpointClock(1, clock)
        written, checkpoint = [], run.checkpoint
        run.checkpoint = lambda keep=None: written.append(run.step) or checkpoint(keep)
        run.train()  # 2 steps an epoch; a clock checkpoint after steps 1, 3, 5, each superseded by its epoch's
    finally:
        run.close()
    assert written == [1, 2, 3, 4, 5, 6]
    assert checkpoints(tmp_path / "r") == ["step-00000002", "step-00000004", "step-00000006"]
    assert run.checkpoints == [str(tmp_path / "r" / "checkpoints" / f"step-0000000{s}") for s in (2, 4, 6)]


# --------------------------------------------------------------------------- runs that cannot learn


@pytest.mark.parametrize("algorithm", ["oapl", "grpo"])
def test_temperature_zero_is_refused_naming_the_field(algorithm):
    with pytest.raises(ConfigError, match=r"sampling\.temperature=0: .*every advantage is exactly 0"):
        load_config(None, [f"algorithm.name={algorithm}", "sampling.temperature=0"])
    cfg = load_config(None, [f"algorithm.name={algorithm}", "eval.temperature=0", "sampling.temperature=0.6"])
    assert cfg.eval.temperature == 0  # greedy evaluation is another field, and fine


def test_temperature_zero_is_one_line_from_the_cli(capsys, tmp_path):
    rc = main(["train", "sampling.temperature=0", f"output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = oapl_lines(err)
    assert "sampling.temperature=0" in line and "rollout.group_size=1" in line


# --------------------------------------------------------------------------- a dead rollout worker


def test_a_rollout_worker_that_died_after_the_last_batch_fails_the_run_with_a_checkpoint(
    tiny_model_dir, prompts_file, tmp_path
):
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, prompts_file, tmp_path / "r", **SMALL, steps=3)
    run = Run(cfg, make_backend(cfg))

    def dies_at_the_last_step(row):
        if row.get("step") == 3 and "loss" in row:
            run.rollout.failure = OSError("engine process died")

    run.callbacks.append(dies_at_the_last_step)
    try:
        with pytest.raises(RolloutFailed, match=r"failed at step 3 \(checkpoint of step 3: .*step-00000003\)") as e:
            run.train()
    finally:
        run.close()
    assert isinstance(e.value.__cause__, OSError)
    assert checkpoints(tmp_path / "r") == ["step-00000003"]  # nothing trained is lost
    assert not (tmp_path / "r" / "summary.yaml").exists()  # the run did not finish


def test_a_dead_rollout_worker_exits_non_zero(capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path):
    from oapl.errors import UserError
    from oapl.rollout.worker import RolloutWorker

    real = RolloutWorker.produce
    calls = []

    def produce(self):
        calls.append(1)
        if len(calls) == 3:  # the worker thread dies on its third engine call
            raise UserError("task.dataset: row 20: the prompt does not fit engine.max_model_len")
        return real(self)

    monkeypatch.setattr(RolloutWorker, "produce", produce)
    out = tmp_path / "r"
    rc = main(train_args(tiny_model_dir, prompts_file, out, "rollout.asynchronous=true", "steps=20"))
    err = capsys.readouterr().err
    assert rc == 2, err
    (line,) = oapl_lines(err)
    assert "the rollout worker failed at step 2" in line and "row 20" in line, line
    assert checkpoints(out) == ["step-00000002"]


# --------------------------------------------------------------------------- every phase, in process


def _signal_self(sig=signal.SIGTERM):
    send_self(sig)


def test_sigterm_during_model_loading(capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path):
    from oapl.backends.local import LocalBackend

    real = LocalBackend.build

    def build(self, run_dir, resume):
        real(self, run_dir, resume)
        _signal_self()  # the handler raises here, inside the loading
        raise AssertionError("not interrupted")

    monkeypatch.setattr(LocalBackend, "build", build)
    rc = main(train_args(tiny_model_dir, prompts_file, tmp_path / "r"))
    err = capsys.readouterr().err
    assert rc == 143, err
    assert oapl_lines(err) == ["oapl: interrupted (SIGTERM); no checkpoint was written"]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing started


def test_sigterm_mid_step_finishes_the_step_then_checkpoints_and_resumes(
    capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path
):
    from oapl.backends.local import LocalBackend

    real = LocalBackend.train_step
    steps = []

    def train_step(self, groups):
        steps.append(1)
        if len(steps) == 2:
            _signal_self()  # arrives inside the second step: it completes, is logged, then the stop
        return real(self, groups)

    monkeypatch.setattr(LocalBackend, "train_step", train_step)
    out = tmp_path / "r"
    rc = main(train_args(tiny_model_dir, prompts_file, out))
    err = capsys.readouterr().err
    assert rc == 143, err
    assert oapl_lines(err) == [
        f"oapl: interrupted (SIGTERM); checkpoint written: {out / 'checkpoints' / 'step-00000002'}"
        "; continue with --resume"
    ]
    assert steps_logged(out) == [1, 2] and checkpoints(out) == ["step-00000002"]
    monkeypatch.setattr(LocalBackend, "train_step", real)
    assert main(train_args(tiny_model_dir, prompts_file, out, "--resume")) == 0
    assert steps_logged(out) == [1, 2, 3, 4]  # continued, rows unique and contiguous


def test_sigusr1_during_evaluation_checkpoints_the_steps_trained(
    capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path
):
    import oapl.loop

    real = oapl.loop.Run.evaluate
    evals = []

    def evaluate(self):
        evals.append(self.step)
        if self.step == 2:
            _signal_self(signal.SIGUSR1)
        return real(self)

    monkeypatch.setattr(oapl.loop.Run, "evaluate", evaluate)
    out = tmp_path / "r"
    rc = main(
        train_args(
            tiny_model_dir,
            prompts_file,
            out,
            "eval.every=2",
            "task.eval_dataset=" + str(prompts_file),
            "task.eval_split=train",
            "task.max_eval_prompts=2",
        )
    )
    err = capsys.readouterr().err
    assert rc == 138, err
    assert evals == [2] and steps_logged(out) == [1, 2]  # the step's row is logged, without its evaluation
    assert checkpoints(out) == ["step-00000002"]
    assert "checkpoint written" in oapl_lines(err)[0]


def test_sigterm_during_the_final_evaluation_then_resume_finishes_the_run(
    capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path
):
    import oapl.loop

    real = oapl.loop.Run.evaluate
    evals = []

    def evaluate(self):
        evals.append(self.step)
        if len(evals) == 1:
            _signal_self()
        return real(self)

    monkeypatch.setattr(oapl.loop.Run, "evaluate", evaluate)
    out = tmp_path / "r"
    args = train_args(
        tiny_model_dir,
        prompts_file,
        out,
        "eval.at_end=true",
        "task.eval_dataset=" + str(prompts_file),
        "task.eval_split=train",
        "task.max_eval_prompts=2",
    )
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 143, err
    assert evals == [4] and checkpoints(out) == ["step-00000004"] and not (out / "summary.yaml").exists()
    assert main([*args, "--resume"]) == 0  # nothing left to train: the evaluation, then the summary
    assert evals == [4, 4] and (out / "summary.yaml").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and "eval/reward_mean" in rows[-1]


def test_a_second_sigterm_during_the_checkpoint_write_is_ignored(
    capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path
):
    from oapl.backends.local import LocalBackend

    real = LocalBackend.save
    saves = []

    def save(self, run_dir, step, state, config_yaml, keep):
        saves.append(step)
        if len(saves) == 2:  # the interrupt's checkpoint: signalled again in the middle of its write
            _signal_self()
        return real(self, run_dir, step, state, config_yaml, keep)

    monkeypatch.setattr(LocalBackend, "save", save)
    train_step = LocalBackend.train_step
    steps = []

    def step_then_signal(self, groups):
        out = train_step(self, groups)
        steps.append(1)
        if len(steps) == 3:  # after the step-2 checkpoint (checkpoint.every=2)
            _signal_self()
        return out

    monkeypatch.setattr(LocalBackend, "train_step", step_then_signal)
    out = tmp_path / "r"
    rc = main(train_args(tiny_model_dir, prompts_file, out, "checkpoint.every=2"))
    err = capsys.readouterr().err
    assert rc == 143, err
    assert saves == [2, 3] and checkpoints(out) == ["step-00000002", "step-00000003"]
    assert "ignored" in err and oapl_lines(err)[0].endswith("step-00000003; continue with --resume")


def test_a_second_ctrl_c_during_the_checkpoint_write_leaves_the_previous_checkpoint_whole(
    capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path
):
    from transformers import PreTrainedTokenizerBase

    from oapl.backends.local import LocalBackend

    real = PreTrainedTokenizerBase.save_pretrained
    saves = []

    def save_tokenizer(self, path, *a, **k):
        saves.append(str(path))
        if len(saves) == 2:  # inside the interrupt's checkpoint write: the model is written, the rest is not
            _signal_self(signal.SIGINT)
        return real(self, path, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_tokenizer)
    train_step = LocalBackend.train_step
    steps = []

    def step_then_signal(self, groups):
        out = train_step(self, groups)
        steps.append(1)
        if len(steps) == 3:
            _signal_self(signal.SIGTERM)
        return out

    monkeypatch.setattr(LocalBackend, "train_step", step_then_signal)
    out = tmp_path / "r"
    rc = main(train_args(tiny_model_dir, prompts_file, out, "checkpoint.every=2"))
    err = capsys.readouterr().err
    assert rc == 130, err
    # the write was abandoned atomically: the step-2 checkpoint stands, no half folder is left
    assert checkpoints(out) == ["step-00000002"]  # (checkpoints() lists every entry: no .tmp-step-* folder)
    assert oapl_lines(err) == [
        f"oapl: interrupted (SIGINT) before a checkpoint was written; the latest checkpoint "
        f"is {out / 'checkpoints' / 'step-00000002'} (--resume continues from it)"
    ]
    monkeypatch.setattr(LocalBackend, "train_step", train_step)
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", real)
    assert main(train_args(tiny_model_dir, prompts_file, out, "--resume")) == 0
    assert steps_logged(out)[-1] == 4


# --------------------------------------------------------------------------- a real signal to a real run


def _start(cfg_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("OAPL_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "oapl.cli.main", "train", str(cfg_path), *extra],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env=env,
        cwd=str(cfg_path.parent),
    )


def _wait_for(proc: subprocess.Popen, cond, limit: float = 300) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, "the run ended before the event"
        assert time.monotonic() < end, "the run made no progress"
        time.sleep(0.005)


RAY = ("distributed.backend=ray", "distributed.num_engines=1", "distributed.trainer_workers=1")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "sig, code, backend",
    [(signal.SIGTERM, 143, ()), (signal.SIGUSR1, 138, ()), (signal.SIGTERM, 143, RAY)],
    ids=["SIGTERM", "SIGUSR1", "ray"],
)
def test_a_real_signal_to_a_real_run_then_resume(sig, code, backend, tiny_model_dir, prompts_file, tmp_path):
    if backend:
        pytest.importorskip("ray")  # ray.init sets its own SIGTERM handler: ours is put back
    out = tmp_path / "run"
    steps = 40  # far more than are done before the signal is sent
    tree = load_config(
        None, train_args(tiny_model_dir, prompts_file, out, f"steps={steps}", "rollout.asynchronous=true", *backend)[1:]
    ).model_dump(mode="json")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    log = tmp_path / "stderr.log"
    proc = _start(cfg_path, log)  # generation in the background worker thread
    _wait_for(proc, lambda: bool(steps_logged(out)))  # the first step row is written
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == code, log.read_text()[-3000:]
    err = log.read_text()
    assert "Traceback" not in err, err
    (line,) = oapl_lines(err)
    done = steps_logged(out)
    assert done == list(range(1, len(done) + 1)) and len(done) < steps
    assert line == (
        f"oapl: interrupted ({signal.Signals(sig).name}); checkpoint written: "
        f"{out / 'checkpoints' / f'step-{done[-1]:08d}'}; continue with --resume"
    )
    assert checkpoints(out) == [f"step-{done[-1]:08d}"]
    # --resume continues from it to the end
    proc = _start(cfg_path, tmp_path / "resume.log", "steps=" + str(len(done) + 2), "--resume")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert steps_logged(out) == list(range(1, len(done) + 3))
