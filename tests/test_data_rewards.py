"""Datasets, tasks, reward functions and the buffer: bad input gets errors that say where."""

from __future__ import annotations

import json
import threading

import pytest

from oapl.config import TaskConfig
from oapl.data.datasets import DatasetError, load_rows, map_columns
from oapl.data.tasks import arithmetic_examples, build_task

from oapl.rewards.arithmetic import arithmetic_reward, extract_final_number
from oapl.rewards.base import RewardErrorRateError, RewardTypeError, SafeReward, load_reward
from oapl.rewards.math import last_boxed, math_reward
from oapl.rollout.buffer import BufferClosed, RolloutBuffer, RolloutGroup


def test_missing_column_names_file_row_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "solution": "2"}) + "\n" + json.dumps({"problem": "2+2"}) + "\n")
    rows, label = load_rows(str(path))
    with pytest.raises(DatasetError) as e:
        map_columns(rows, {"prompt": "problem", "answer": "solution"}, ["prompt", "answer"], label)
    msg = str(e.value)
    assert str(path) in msg and "row 1" in msg and "'solution'" in msg


def test_bad_json_line_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DatasetError, match="row 2"):
        load_rows(str(path))
    with pytest.raises(DatasetError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_math_task_from_parquet_with_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "math.parquet"
    pq.write_table(pa.table({"problem": ["What is 1/2 + 1/4?"], "solution": ["\\frac{3}{4}"]}), path)
    task = build_task(TaskConfig(name="math", dataset=str(path), columns={"prompt": "problem", "answer": "solution"}))
    assert task.train[0]["answer"] == "\\frac{3}{4}"
    assert "\\boxed" in task.messages(task.train[0])[-1]["content"]


def test_arithmetic_held_out_split_is_fixed_and_disjoint():
    cfg = TaskConfig(num_train=500, num_eval=50, max_operand=20)
    train_a, held_a = arithmetic_examples(cfg, seed=0)
    train_b, held_b = arithmetic_examples(cfg, seed=1)
    assert held_a == held_b  # same held-out set whatever the run seed
    assert train_a != train_b
    held_prompts = {h["prompt"] for h in held_a}
    assert not held_prompts & {t["prompt"] for t in train_a}
    assert all(eval(h["prompt"][8:-1]) == h["answer"] for h in held_a)  # "What is a + b?"


@pytest.mark.parametrize(
    "text, value",
    [
        ("12 + 7 = 19", 19),
        ("The answer is 19.", 19),
        ("\\boxed{19} then 3", 19),
        ("answer: -4", -4),
        ("1,234", 1234),
        ("no number", None),
        ("x = 3.5", 3.5),
    ],
)
def test_extract_final_number(text, value):
    assert extract_final_number(text) == value


def test_arithmetic_verifier_cannot_be_gamed_by_many_numbers():
    many = " ".join(str(i) for i in range(100))  # contains 19 but ends with 99
    assert arithmetic_reward(["q"], [many], answer=[19]) == [0.0]
    assert arithmetic_reward(["q", "q"], ["7 + 12 = 19", "19 20"], answer=[19, 19]) == [1.0, 0.0]


def test_safe_reward_scores_failures_zero_and_counts_them():
    def bad(prompts, completions, **_):
        out = []
        for c in completions:
            if c == "boom":
                raise ValueError("kaput")
            out.append(float("inf") if c == "inf" else float("nan") if c == "nan" else "1.0" if c == "str" else 1.0)
        return out

    r = SafeReward(bad, max_error_fraction=1.0)  # never stop: every failure scores 0 and is counted
    assert r(["p"] * 4, ["ok", "boom", "inf", "nan"]) == [1.0, 0.0, 0.0, 0.0]
    assert r.stats.errors == 3
    assert r.stats.samples[0]["completion"] in ("boom", "inf", "nan")
    # by default (task.max_reward_error_fraction=0.5) more than half failing stops with the first error
    with pytest.raises(RewardErrorRateError, match=r"failed on 3 of 4 completions.*ValueError: kaput .*line \d+"):
        SafeReward(bad)(["p"] * 4, ["ok", "boom", "inf", "nan"])
    # at most half failing goes on
    assert SafeReward(bad)(["p"] * 4, ["ok", "ok", "boom", "inf"]) == [1.0, 1.0, 0.0, 0.0]
    # a string is not a number: refused at once, naming the function, even when failures are allowed
    with pytest.raises(RewardTypeError, match=r"bad returned '1.0' \(str\) for completion 3"):
        r(["p"] * 4, ["ok", "ok", "ok", "str"])


def test_load_reward_errors():
    with pytest.raises(ValueError, match="module:function"):
        load_reward("oapl.rewards.arithmetic")
    with pytest.raises(ValueError, match="no function"):
        load_reward("oapl.rewards.arithmetic:nope")
    assert load_reward("oapl.rewards.arithmetic:arithmetic_reward") is arithmetic_reward


def test_math_reward_works_outside_the_main_thread():
    assert last_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    out = {}

    def run():
        out["r"] = math_reward(["p"] * 3, ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{2}"], answer=["1/2"] * 3)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert out["r"] == [1.0, 1.0, 0.0]


def _group(version, pid="p"):
    return RolloutGroup(
        prompt_id=pid,
        prompt="x",
        prompt_token_ids=[1],
        responses=["a"],
        response_token_ids=[[2]],
        response_logprobs=[[-0.1]],
        rewards=[1.0],
        finish_reasons=["stop"],
        weights_id="m",
        version=version,
    )


def test_buffer_refuses_stale_groups_and_clears_at_sync():
    buf = RolloutBuffer(capacity=4, version=0)
    assert buf.put(_group(0))
    assert buf.clear(1) == 1 and len(buf) == 0
    assert not buf.put(_group(0))  # generated before the sync: dropped
    assert buf.discarded_stale == 1
    assert buf.put(_group(1))
    assert [g.version for g in buf.take(1)] == [1]


def test_buffer_staleness_window_for_grpo_off_by_one():
    buf = RolloutBuffer(capacity=8, version=0, max_staleness=1)
    buf.put(_group(0, "a"))
    buf.clear(1)
    assert len(buf) == 1  # one version old: kept
    assert buf.put(_group(0, "b"))
    buf.clear(2)
    assert len(buf) == 0 and not buf.put(_group(0, "c"))


def test_buffer_demand_holds_a_worker_back_until_the_sync():
    """OAPL's buffer is cleared at every sync: a worker reserves groups before generating them and waits
    once the version's demand is produced or in flight; a sync (clear) with a new demand lets it go on."""
    buf = RolloutBuffer(capacity=8, version=0)
    buf.set_demand(4)
    v = buf.reserve(2)
    assert v == 0
    buf.reserve(2)  # 4 in flight: the demand is met
    released = threading.Event()

    def third():
        buf.reserve(2)
        released.set()

    t = threading.Thread(target=third, daemon=True)
    t.start()
    assert not released.wait(0.1)  # a 5th and 6th group would be cleared unused
    buf.put(_group(0, "a"))
    buf.release(2, v)  # a call that put only 1 of its 2 groups: the other may be generated again
    assert released.wait(2)
    t.join(2)
    # 1 put + 2 + 2 in flight = 5 >= 4: the next reservation waits for the sync, which resets the count
    done = threading.Event()
    t = threading.Thread(target=lambda: (buf.reserve(2), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.1)
    buf.clear(1, demand=2)
    assert done.wait(2)
    buf.release(2, 0)  # a release for the old version changes nothing at the new one
    blocked = threading.Event()
    t = threading.Thread(target=lambda: (buf.reserve(1), blocked.set()), daemon=True)
    t.start()
    assert not blocked.wait(0.1)  # version 1's 2 groups are still in flight
    buf.set_demand(None)  # no limit (groups outlive a sync: GRPO's max_staleness > 0)
    for _ in range(5):
        buf.reserve(2)
    buf.close()
    with pytest.raises(BufferClosed):
        buf.reserve(1)


def test_buffer_blocks_when_full_and_take_waits():
    buf = RolloutBuffer(capacity=1)
    buf.put(_group(0))
    with pytest.raises(TimeoutError):
        buf.put(_group(0), timeout=0.05)
    got = []
    t = threading.Thread(target=lambda: got.extend(buf.take(1)))
    t.start()
    t.join(2)
    assert len(got) == 1
    with pytest.raises(TimeoutError):
        buf.take(1, timeout=0.05)
