"""Reward functions that hang, return non-numbers or fail: bounded, refused or reported once (issue 27).

* a hanging reward (from a module or passed in Python) times out after ``task.reward_timeout_s``:
  its call scores as errors, the error-fraction rule applies, and the message names the function;
* timed-out calls cannot pile up: at most ``MAX_HUNG_CALLS`` may still run, then the run stops;
* a reward returning strings (``'1.0'``) is refused naming the function; bool is 1.0 / 0.0;
* the rollout worker reports a failure in one line, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path

import pytest

from oapl.config import TaskConfig
from oapl.data.tasks import build_task
from oapl.rewards import user
from oapl.rewards.base import (
    CombinedReward,
    RewardErrorRateError,
    RewardSignatureError,
    RewardTypeError,
    RewardUnavailableError,
    SafeReward,
)
from oapl.rollout.worker import report_failure

HERE = Path(__file__).parent


@pytest.fixture
def release():
    """An event that hung test rewards wait on; set at the end so no thread outlives the test."""
    event = threading.Event()
    saved = list(user._hung)
    user._hung.clear()
    yield event
    event.set()
    for thread, _ in list(user._hung):
        thread.join(10)
        assert not thread.is_alive()
    user._hung[:] = saved


def _hanging(event: threading.Event, on: str = ""):
    def stuck(prompts, completions, **kw):
        if any(on in c for c in completions):
            event.wait()
        return [1.0] * len(completions)

    return stuck


# --------------------------------------------------------------------------- timeouts


def test_a_hanging_reward_times_out_scores_its_call_as_errors_and_names_itself(release):
    reward = SafeReward(CombinedReward([_hanging(release)], timeout_s=0.2))
    with pytest.raises(RewardErrorRateError) as e:
        reward(["p"] * 4, ["a", "b", "c", "d"], prompt=["q"] * 4)
    msg = str(e.value)
    assert "stuck failed on 4 of 4 completions" in msg
    assert "stuck did not return within task.reward_timeout_s=0.2s" in msg and "raise task.reward_timeout_s" in msg
    assert reward.stats.errors == 4  # every completion of the call, counted; not retried one by one
    assert user.hung_calls() == ["stuck"]  # the call was abandoned, not waited for


def test_with_failures_allowed_a_timed_out_call_scores_zero_and_the_next_call_runs(release):
    reward = SafeReward(CombinedReward([_hanging(release, on="slow")], timeout_s=0.2), max_error_fraction=1.0)
    out = reward(["p"] * 2, ["slow", "x"], prompt=["q"] * 2)
    assert out == [0.0, 0.0] and reward.stats.errors == 2
    assert all(math.isnan(v) for v in out.parts["stuck"])  # no value of the function in its metrics
    assert reward(["p"] * 2, ["x", "y"], prompt=["q"] * 2) == [1.0, 1.0]  # not blocked by the hung call
    assert reward.stats.errors == 2


def test_hung_calls_are_capped_then_the_run_stops_naming_the_function(release, monkeypatch):
    monkeypatch.setattr(user, "MAX_HUNG_CALLS", 2)
    reward = SafeReward(CombinedReward([_hanging(release)], timeout_s=0.1), max_error_fraction=1.0)
    assert reward(["p"], ["a"], prompt=["q"]) == [0.0]  # one hung call: scored as an error
    with pytest.raises(
        RewardUnavailableError,
        match=r"stuck did not return .* 2 timed-out reward calls \(stuck\) "
        r"are still running",
    ):
        reward(["p"], ["a"], prompt=["q"])
    assert len(user.hung_calls()) == 2  # never more than the cap


def test_oapls_own_rewards_keep_their_own_per_completion_timeouts():
    from oapl.rewards.arithmetic import arithmetic_reward
    from oapl.rewards.user import UserReward
    from oapl.rewards.code import code_reward
    from oapl.rewards.math import math_reward

    assert all(UserReward(f, timeout_s=1.0).timeout_s is None for f in (math_reward, code_reward, arithmetic_reward))
    assert UserReward(lambda prompts, completions, **kw: [], timeout_s=1.0).timeout_s == 1.0


def test_a_reward_that_hangs_from_the_start_fails_before_the_model_loads(tmp_path, release):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(3)))
    flag = tmp_path / "release"
    mod = tmp_path / "hang_reward.py"
    mod.write_text(
        "import os, time\n"
        "def stuck_reward(prompts, completions, **kw):\n"
        f"    while not os.path.exists({str(flag)!r}):\n        time.sleep(0.01)\n"
        "    return [0.0] * len(completions)\n"
    )
    cfg = TaskConfig(name="dataset", dataset=str(rows), reward=f"{mod}:stuck_reward", reward_timeout_s=0.2)
    try:
        with pytest.raises(
            RewardSignatureError,
            match=r"stuck_reward did not return within "
            r"task.reward_timeout_s=0.2s .*before the model loads",
        ):
            build_task(cfg)  # build_task runs before any model or engine is loaded (backends' build())
    finally:
        flag.touch()


# --------------------------------------------------------------------------- values


def test_string_rewards_are_refused_naming_the_function():
    def stringly(prompts, completions, **kw):
        return ["1.0" for _ in completions]

    with pytest.raises(RewardTypeError, match=r"stringly returned '1.0' \(str\) for completion 0"):
        SafeReward(CombinedReward([stringly]), max_error_fraction=1.0)(["p"], ["c"], prompt=["q"])
    # and caught before training, on the first row
    with pytest.raises(RewardTypeError, match="stringly returned '1.0'"):
        CombinedReward([stringly]).check(["p"], ["c"], prompt=["q"])


@pytest.mark.parametrize("value, expected", [(True, 1.0), (False, 0.0), (3, 3.0), (0.25, 0.25)])
def test_numbers_and_bools_are_rewards(value, expected):
    np = pytest.importorskip("numpy")
    for v in (value, np.float32(value) if not isinstance(value, bool) else np.bool_(value)):
        out = SafeReward(CombinedReward([lambda prompts, completions, **kw: [v] * len(completions)]))(
            ["p"], ["c"], prompt=["q"]
        )
        assert out == [expected]


@pytest.mark.parametrize("bad", [[1.0], {"a": 1.0}, b"1", "nan"])
def test_other_non_numbers_are_refused(bad):
    with pytest.raises(RewardTypeError, match="a reward must be a number"):
        SafeReward(CombinedReward([lambda prompts, completions, **kw: [bad] * len(completions)]))(
            ["p"], ["c"], prompt=["q"]
        )


def test_none_adds_nothing_as_in_trl_and_nan_counts_as_an_error():
    def maybe(prompts, completions, **kw):
        return [None if c == "skip" else float("nan") if c == "nan" else 1.0 for c in completions]

    reward = SafeReward(
        CombinedReward([maybe, lambda prompts, completions, **kw: [0.5] * len(completions)], weights=[1.0, 2.0]),
        max_error_fraction=1.0,
    )
    out = reward(["p"] * 3, ["ok", "skip", "nan"], prompt=["q"] * 3)
    assert out == [2.0, 1.0, 0.0]  # 1 + 2*0.5 ; None adds nothing: 2*0.5 ; NaN: an error, scored 0
    assert reward.stats.errors == 1
    assert out.parts["maybe"][0] == 1.0 and math.isnan(out.parts["maybe"][1])


# --------------------------------------------------------------------------- reported once


def test_the_rollout_worker_reports_a_failure_in_one_line_traceback_only_with_debug(caplog, monkeypatch):
    monkeypatch.delenv("OAPL_DEBUG", raising=False)
    caplog.set_level(logging.ERROR, logger="oapl.rollout.worker")
    report_failure(RewardErrorRateError("task.reward: f failed on 9 of 16 completions"))
    assert caplog.records == []  # a user error: the trainer raises it, and the CLI prints it once
    try:
        raise RuntimeError("engine exploded\nsecond line")
    except RuntimeError as e:
        report_failure(e)
        (record,) = caplog.records
        assert record.getMessage() == "rollout worker stopped: RuntimeError: engine exploded second line"
        assert record.exc_info is None
        monkeypatch.setenv("OAPL_DEBUG", "1")
        report_failure(e)
        assert caplog.records[-1].exc_info is not None


@pytest.mark.parametrize("asynchronous", ["false", "true"])
def test_a_reward_that_raises_is_one_line_from_the_cli(capsys, tmp_path, tiny_model_dir, prompts_file, asynchronous):
    from oapl.cli.main import main

    mod = tmp_path / "raising.py"
    mod.write_text(
        "def picky(prompts, completions, **kw):\n"
        "    if completions[0] == 'The answer is 0.':\n        return [0.0]\n"  # the check before training
        "    raise KeyError('gold')\n"
    )
    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    vllm = logging.getLogger("vllm")
    vllm_state = (vllm.level, vllm.propagate)
    try:
        rc = main(
            [
                "train",
                f"output_dir={tmp_path / 'r'}",
                f"model.name={tiny_model_dir}",
                "task.name=dataset",
                f"task.dataset={prompts_file}",
                "task.columns={prompt: question, prompt_id: id}",
                f"task.reward={mod}:picky",
                "engine.kind=transformers",
                "steps=2",
                "rollout.group_size=2",
                "rollout.prompts_per_step=2",
                f"rollout.asynchronous={asynchronous}",
                "sampling.max_tokens=4",
                "eval.at_start=false",
                "eval.at_end=false",
                "logging.progress=false",
                "checkpoint.save_final=false",
            ]
        )
    finally:  # main() configures logging and vLLM's env vars for the process: undo it
        os.environ.clear()
        os.environ.update(env)
        root.handlers[:] = handlers
        root.setLevel(level)
        vllm.setLevel(vllm_state[0])
        vllm.propagate = vllm_state[1]
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    mentions = [line for line in err.splitlines() if "picky" in line]
    assert len(mentions) == 1, err  # said once, not once per completion nor again by the worker
    assert (
        mentions[0].startswith("oapl: ") and "KeyError: 'gold'" in mentions[0] and "raising.py, line 4" in mentions[0]
    )


def test_reward_weights_without_reward_functions_are_refused_when_the_task_is_built():
    cfg = TaskConfig(reward_weights=[1.0, 2.0])  # accepted: OAPLTrainer(reward_funcs=...) may give them later
    with pytest.raises(ValueError, match="task.reward_weights needs task.reward"):
        build_task(cfg)


@pytest.fixture
def cli(capsys):
    """``oapl ...`` in this process; main() configures logging and vLLM's env vars: undone after."""
    from oapl.cli.main import main

    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    vllm = logging.getLogger("vllm")
    vllm_state = (vllm.level, vllm.propagate)

    def run(argv):
        rc = main([str(a) for a in argv])
        return rc, capsys.readouterr().err

    yield run
    os.environ.clear()
    os.environ.update(env)
    root.handlers[:] = handlers
    root.setLevel(level)
    vllm.setLevel(vllm_state[0])
    vllm.propagate = vllm_state[1]


@pytest.mark.parametrize("fraction", [None, 1.0])
def test_a_reward_that_hangs_during_training(cli, tmp_path, tiny_model_dir, prompts_file, release, fraction):
    flag = tmp_path / "release"
    mod = tmp_path / "sometimes.py"
    mod.write_text(
        "import os, time\n"
        "def hangs_in_training(prompts, completions, **kw):\n"
        "    while len(completions) > 1 and not os.path.exists(%r):\n"  # the check before training: 1
        "        time.sleep(0.01)\n"
        "    return [1.0] * len(completions)\n" % str(flag)
    )
    out = tmp_path / "r"
    argv = [
        "train",
        f"output_dir={out}",
        f"model.name={tiny_model_dir}",
        "task.name=dataset",
        f"task.dataset={prompts_file}",
        "task.columns={prompt: question, prompt_id: id}",
        f"task.reward={mod}:hangs_in_training",
        "task.reward_timeout_s=0.5",
        "engine.kind=transformers",
        "steps=2",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "rollout.prompts_per_generate=2",
        "rollout.asynchronous=false",
        "sampling.max_tokens=4",
        "eval.at_start=false",
        "eval.at_end=false",
        "logging.progress=false",
        "checkpoint.save_final=false",
    ]
    if fraction is not None:
        argv.append(f"task.max_reward_error_fraction={fraction}")
    try:
        rc, err = cli(argv)
        hung = user.hung_calls()  # read before the flag lets the abandoned calls return (they poll it)
    finally:
        flag.touch()
    if fraction is None:  # the default 0.5: a call that hangs fails all its completions: the run stops
        assert rc == 2, err
        assert "Traceback" not in err
        (line,) = [x for x in err.splitlines() if "hangs_in_training" in x]
        assert line.startswith("oapl: task.reward: hangs_in_training failed on 4 of 4 completions")
        assert "did not return within task.reward_timeout_s=0.5s" in line
    else:  # failures allowed: each hung call scores 0, is counted, and training goes on
        assert rc == 0, err
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["reward_errors"] for r in rows] == [4, 8]  # cumulative: 2 prompts x G=2 per step
        assert all(r["reward_mean"] == 0.0 and r["rewards/hangs_in_training/mean"] is None for r in rows)
        assert hung == ["hangs_in_training"] * 2
