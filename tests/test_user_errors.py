"""Every user mistake ends in one line ``oapl: <what>: <why>`` (exit 2) naming what to fix.

The traceback only with ``--debug`` or ``OAPL_DEBUG=1``; a Hub name without network fails in
seconds; Ctrl-C says truthfully whether a checkpoint was written.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oapl.cli.main import main

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() configures logging and vLLM's env vars for the process: undo it after each test."""
    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    vllm = logging.getLogger("vllm")
    vllm_state = (vllm.level, vllm.propagate)
    yield
    os.environ.clear()
    os.environ.update(env)
    root.handlers[:] = handlers
    root.setLevel(level)
    vllm.setLevel(vllm_state[0])
    vllm.propagate = vllm_state[1]
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = env.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    except ImportError:
        pass


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def oapl_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("oapl: ")]


def assert_one_line(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = oapl_lines(err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


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
        "steps=2",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "rollout.asynchronous=false",
        "sampling.max_tokens=4",
        "eval.at_start=false",
        "eval.at_end=false",
        "logging.progress=false",
        "checkpoint.save_final=false",
        *extra,
    ]


@pytest.fixture
def toy_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


# --------------------------------------------------------------------------- configuration


def test_unknown_task_name_suggests_the_nearest(capsys, tmp_path):
    rc, err = run_cli(["train", "task.name=mathh", f"output_dir={tmp_path / 'r'}"], capsys)
    assert_one_line(rc, err, "task.name", "did you mean 'math'?", "arithmetic, math, code, dataset")
    assert not (tmp_path / "r").exists()  # nothing written for a config error


@pytest.mark.parametrize("algorithm", ["oapl", "grpo"])
def test_group_size_one_is_refused_saying_why(capsys, tmp_path, algorithm):
    rc, err = run_cli(
        ["train", "rollout.group_size=1", f"algorithm.name={algorithm}", f"output_dir={tmp_path / 'r'}"], capsys
    )
    line = assert_one_line(rc, err, "rollout.group_size=1", "at least 2", "exactly 0")
    assert algorithm.upper() in line


def test_several_config_mistakes_are_one_line(capsys):
    rc, err = run_cli(["train", "optim.lr=-1", "nope=2"], capsys)
    assert_one_line(rc, err, "optim.lr", "nope: unknown field")


# --------------------------------------------------------------------------- data and rewards


def test_missing_dataset_file(capsys, tmp_path, tiny_model_dir):
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "r"), capsys)
    assert_one_line(rc, err, "task.dataset", "nope.jsonl", "does not exist")


def test_dataset_row_without_the_mapped_column(capsys, tmp_path, tiny_model_dir, toy_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "q"}) + "\n" + json.dumps({"id": "b", "text": "q"}) + "\n")
    rc, err = run_cli(train_args(tiny_model_dir, data, tmp_path / "r"), capsys)
    assert_one_line(rc, err, str(data), "row 1", "'question'")


@pytest.mark.parametrize(
    "spec,needles",
    [
        ("no_such_module_oapl:fn", ["task.reward", "cannot import module 'no_such_module_oapl'"]),
        ("toy_rewards:no_such_fn", ["task.reward", "no function 'no_such_fn'", "digit_fraction"]),
        ("missing_file.py:fn", ["task.reward", "missing_file.py does not exist"]),
        ("notaspec", ["task.reward", "module:function"]),
    ],
)
def test_reward_that_cannot_be_loaded(capsys, tmp_path, tiny_model_dir, prompts_file, toy_path, spec, needles):
    rc, err = run_cli(train_args(tiny_model_dir, prompts_file, tmp_path / "r", f"task.reward={spec}"), capsys)
    assert_one_line(rc, err, *needles)


def test_reward_file_with_a_syntax_error_names_file_and_line(capsys, tmp_path, tiny_model_dir, prompts_file):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def reward(prompts, completions, **kw):\n    return [1.0 for c in completions\n")
    rc, err = run_cli(train_args(tiny_model_dir, prompts_file, tmp_path / "r", f"task.reward={bad}:reward"), capsys)
    assert_one_line(rc, err, "task.reward", "bad_reward.py", "SyntaxError", "line")


# --------------------------------------------------------------------------- models


@pytest.mark.timeout(120)  # a guard against a hang, not the bound under test
def test_local_model_path_that_does_not_exist_fails_at_once(capsys, monkeypatch, tmp_path, prompts_file, toy_path):
    """ "At once": the preflight refuses the path before training starts, and never asks the Hub."""
    import huggingface_hub

    import oapl.loop

    reached = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: reached.append("hub lookup"))
    monkeypatch.setattr(oapl.loop, "train", lambda *a, **k: reached.append("training"))
    rc, err = run_cli(train_args(str(tmp_path / "models" / "nope"), prompts_file, tmp_path / "r"), capsys)
    assert_one_line(rc, err, "model.name", "local path", "does not exist", f"nearest existing folder: {tmp_path}")
    assert reached == []
    assert not any((tmp_path / "r").glob("*"))  # nothing written for a mistake found in the preflight


def test_folder_that_is_not_a_model_says_so(capsys, tmp_path, prompts_file, toy_path):
    ckpt = tmp_path / "step-00000002"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "config.json").write_text("{}")
    rc, err = run_cli(train_args(str(ckpt), prompts_file, tmp_path / "r"), capsys)
    assert_one_line(rc, err, "model.name", "no config.json", str(ckpt / "model"))


def test_generate_names_the_model_flag(capsys, tmp_path):
    rc, err = run_cli(["generate", "--out", tmp_path / "d", "--model", tmp_path / "no" / "model"], capsys)
    assert_one_line(rc, err, "--model", "does not exist")


def test_hub_name_with_the_hub_unreachable_fails_fast_saying_what_to_do(tmp_path):
    """A refused connection stands in for no network; an empty cache for an uncached model."""
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
    }
    env.pop("OAPL_DEBUG", None)
    # a hang would end in subprocess.TimeoutExpired: the guard, not the bound under test (the cap on
    # the Hub check is asserted in test_hub_check_is_capped_when_the_network_hangs)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oapl.cli.main",
            "train",
            "model.name=someorg/some-model",
            f"output_dir={tmp_path / 'r'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_one_line(
        proc.returncode,
        proc.stderr,
        "model.name",
        "someorg/some-model",
        "unreachable",
        "local path",
        "HF_HUB_OFFLINE=1",
    )
    assert not any((tmp_path / "r").glob("*"))  # refused in the preflight: nothing was started


@pytest.mark.timeout(60)  # a guard against a hang, not the bound under test
def test_hub_check_is_capped_when_the_network_hangs(monkeypatch):
    import huggingface_hub

    from oapl import preflight

    asked, answer = threading.Event(), threading.Event()

    def hang(*a, **k):  # a Hub that never answers (until the test lets it go)
        asked.set()
        answer.wait()

    monkeypatch.setattr(huggingface_hub, "model_info", hang)
    monkeypatch.setattr(preflight, "_cached", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        # without the cap check_model would wait on the lookup forever: this test's pytest timeout
        with pytest.raises(
            preflight.ModelNotFoundError, match=r"model.name: cannot download 'org/name'.*no answer in 2 s"
        ):
            preflight.check_model("org/name", timeout_s=2)
        # it gave up on a lookup that was asked and is still waiting for its answer
        assert asked.is_set() and not answer.is_set()
        assert any(t.name == "oapl-hub-check" and t.is_alive() for t in threading.enumerate())
    finally:
        answer.set()


def test_cached_model_with_the_hub_unreachable_goes_offline(monkeypatch):
    import huggingface_hub

    from oapl import preflight

    class ConnectError(Exception):
        pass

    def refuse(*a, **k):
        raise ConnectError("connection refused")

    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    monkeypatch.setattr(preflight, "_cached", lambda *a, **k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    preflight.check_model("org/name")  # no error: the cached copy is used
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_offline_mode_and_a_model_not_in_the_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = run_cli(["train", "model.name=someorg/not-cached-oapl", f"output_dir={tmp_path / 'r'}"], capsys)
    assert_one_line(rc, err, "model.name", "not in the local Hugging Face cache", "hf download")


def test_unknown_hub_model_and_gated_model_have_their_own_messages(monkeypatch):
    import huggingface_hub

    from oapl import preflight

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name, needle in (
        ("RepositoryNotFoundError", "no model 'org/name' on the Hugging Face Hub"),
        ("GatedRepoError", "gated"),
    ):
        exc_type = type(name, (Exception,), {})

        def raise_it(*a, exc_type=exc_type, **k):
            raise exc_type("404")

        monkeypatch.setattr(huggingface_hub, "model_info", raise_it)
        with pytest.raises(preflight.ModelNotFoundError, match=needle):
            preflight.check_model("org/name")


def test_dataset_names_are_checked_like_model_names(monkeypatch, tmp_path):
    import huggingface_hub

    from oapl import preflight
    from oapl.errors import UserError

    with pytest.raises(UserError, match="task.eval_dataset: dataset file data/held_out/ does not exist"):
        preflight.check_dataset("data/held_out/", "task.eval_dataset")

    class ConnectError(Exception):
        pass

    def refuse(*a, **k):
        raise ConnectError("connection refused")

    monkeypatch.setattr(huggingface_hub, "dataset_info", refuse)
    monkeypatch.setattr(preflight, "_cached", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(
        UserError,
        match=r"task.dataset: cannot download dataset 'org/data'.*unreachable.*local "
        r"\.jsonl/\.parquet file",
    ):
        preflight.check_dataset("org/data", "task.dataset")


# --------------------------------------------------------------------------- files and directories


def test_output_dir_that_cannot_be_created(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = run_cli(["train", f"output_dir={blocker / 'run'}"], capsys)
    assert_one_line(rc, err, "output_dir", str(blocker / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = run_cli(["train", f"output_dir={ro / 'run'}"], capsys)
    finally:
        ro.chmod(0o755)
    assert_one_line(rc, err, "output_dir", "Permission denied")


def test_read_only_file_system(capsys):
    if os.access("/proc", os.W_OK) and not Path("/proc/sys").exists():
        pytest.skip("no read-only file system to try")
    rc, err = run_cli(["train", "output_dir=/proc/oapl-run"], capsys)
    assert_one_line(rc, err, "output_dir", "/proc/oapl-run")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["plot", "passk", "before=reports/nope.json", "--out", "x.png"], ["plot passk", "before=reports/nope.json"]),
        (["plot", "training", "oapl=runs/nope", "--out", "x.png"], ["plot training", "oapl=runs/nope"]),
        (["eval", "--rollouts", "data/nope", "--out", "r"], ["--rollouts", "data/nope"]),
        (["train", "offline.data=data/nope"], ["offline.data", "data/nope", "oapl generate"]),
    ],
)
def test_missing_input_files(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(argv, capsys)
    assert_one_line(rc, err, *needles)


def test_plot_training_of_a_run_without_metrics(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    rc, err = run_cli(["plot", "training", f"a={tmp_path / 'run'}", "--out", tmp_path / "x.png"], capsys)
    assert_one_line(rc, err, "metrics.jsonl")


# --------------------------------------------------------------------------- --debug


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(capsys, monkeypatch, how, tmp_path):
    argv = ["train", "task.name=mathh", f"output_dir={tmp_path / 'r'}"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("OAPL_DEBUG", "1")
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and "Traceback" in err and "oapl: task.name" in err


def test_bugs_keep_their_traceback(capsys, monkeypatch):
    import oapl.cli.main as cli

    def boom(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_train", boom)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train"])


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_startup_does_not_claim_a_checkpoint(
    capsys, monkeypatch, tmp_path, tiny_model_dir, prompts_file, toy_path
):
    import oapl.loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(oapl.loop, "train", interrupted)
    rc = main(train_args(tiny_model_dir, prompts_file, tmp_path / "r"))
    err = capsys.readouterr().err
    assert rc == 130
    assert "no checkpoint was written" in err and "checkpoint written" not in err


def test_ctrl_c_during_training_names_the_checkpoint_written(capsys, tmp_path, tiny_model_dir, prompts_file, toy_path):
    import toy_rewards

    toy_rewards.interrupting.calls = 0
    rc = main(
        train_args(tiny_model_dir, prompts_file, tmp_path / "r", "steps=10", "task.reward=toy_rewards:interrupting")
    )
    err = capsys.readouterr().err
    (ckpt,) = (tmp_path / "r" / "checkpoints").glob("step-*")
    assert rc == 130
    assert f"checkpoint written: {ckpt}" in err and "--resume" in err
