"""Rollout dataset storage: roundtrip, atomic resumable writing, schema validation, filtering."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oapl.data.rollouts import (
    COLUMNS,
    META_FILENAME,
    ROLLOUT_SCHEMA,
    RolloutGroup,
    RolloutMetaMismatchError,
    RolloutSchemaError,
    RolloutWriter,
    filter_groups,
    group_from_rows,
    group_to_rows,
    groups_to_table,
    read_rollouts,
    write_rollouts,
)

FIXTURE = Path(__file__).parent / "fixtures" / "rollouts_small.jsonl"
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "n": 4, "stop": ("\n\n",)}
META = dict(sampling=SAMPLING, weights_id="test-model@v0", task="math")


def make_group(i: int, n: int = 4, correct: int | None = None, benchmark: str = "b") -> RolloutGroup:
    """Deterministic group; log-probs are exactly representable in float32."""
    c = (i % (n + 1)) if correct is None else correct
    rewards = [1.0] * c + [0.0] * (n - c)
    return RolloutGroup(
        prompt_id=f"prompt-{i:03d}",
        prompt=f"What is {i} + {i}?",
        prompt_token_ids=[1, 1000 + i, 2],
        responses=[f"resp {i}.{j}" for j in range(n)],
        response_token_ids=[[10 + j, 20 + i, 3][: 1 + (i + j) % 3] for j in range(n)],
        response_logprobs=[[-0.5, -0.25, -1.0][: 1 + (i + j) % 3] for j in range(n)],
        rewards=rewards,
        finish_reasons=["stop" if j % 2 == 0 else "length" for j in range(n)],
        weights_id="test-model@v0",
        version=3,
        sampling=SAMPLING,
        task="math",
        benchmark=benchmark,
        extra={"answer": str(2 * i), "level": i % 3},
    )


def normalised(g: RolloutGroup) -> RolloutGroup:
    """What a group looks like after a JSON roundtrip of sampling/extra (tuples become lists)."""
    return RolloutGroup(
        **{**g.__dict__, "sampling": json.loads(json.dumps(g.sampling)), "extra": json.loads(json.dumps(g.extra))}
    )


def fixture_groups() -> list[RolloutGroup]:
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    by_pid: dict[str, list[dict]] = {}
    for row in rows:
        by_pid.setdefault(row["prompt_id"], []).append(row)
    return [group_from_rows(rs) for rs in by_pid.values()]


# ------------------------------------------------------------------------------------------------
# roundtrip
# ------------------------------------------------------------------------------------------------


def test_to_rows_from_rows_roundtrip_any_order():
    g = make_group(7)
    rows = group_to_rows(g)
    assert len(rows) == g.n == 4
    assert [r["response_index"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert all(r["group_rewards"] == g.rewards for r in rows)
    assert json.loads(rows[0]["sampling"])["stop"] == ["\n\n"]
    back = group_from_rows(list(reversed(rows)))
    assert back == normalised(g)


def test_writer_reader_roundtrip_and_shards_never_split(tmp_path):
    groups = [make_group(i, benchmark="ab"[i % 2]) for i in range(11)]
    with RolloutWriter(tmp_path, shard_size=10, **META) as w:
        for g in groups:
            w.write(g)
    shards = sorted(tmp_path.glob("part-*.parquet"))
    # 10 rows per shard target, 4 rows per group -> 3 groups (12 rows) per shard, last one partial
    assert [p.name for p in shards] == [f"part-0000{i}.parquet" for i in range(4)]
    for shard in shards:
        t = pq.read_table(shard)
        assert t.schema.equals(ROLLOUT_SCHEMA, check_metadata=False)
        ids = t.column("prompt_id").to_pylist()
        for pid in set(ids):
            assert ids.count(pid) == 4  # every group complete within one shard
    assert [pq.read_metadata(s).num_rows for s in shards] == [12, 12, 12, 8]
    meta = json.loads((tmp_path / META_FILENAME).read_text())
    assert meta["weights_id"] == "test-model@v0" and meta["task"] == "math"
    assert meta["schema_version"] == 1 and meta["sampling"]["stop"] == ["\n\n"]

    back = read_rollouts(tmp_path)
    assert back == [normalised(g) for g in groups]
    assert not list(tmp_path.glob(".*tmp*"))


def test_single_file_and_with_tokens_false(tmp_path):
    groups = [make_group(i) for i in range(5)]
    path = write_rollouts(groups, tmp_path / "sub" / "rollouts.parquet")
    assert read_rollouts(path) == [normalised(g) for g in groups]
    light = read_rollouts(path, with_tokens=False)
    assert [g.rewards for g in light] == [g.rewards for g in groups]
    assert [g.responses for g in light] == [g.responses for g in groups]
    assert all(g.prompt_token_ids == [] and g.response_token_ids == [[]] * 4 for g in light)
    with pytest.raises(ValueError, match="duplicate prompt_id"):
        write_rollouts([groups[0], groups[0]], tmp_path / "dup.parquet")


def test_reader_accepts_wider_integer_types(tmp_path):
    """Files written by other tools (e.g. pandas: int64 everywhere) are cast, not rejected."""
    table = groups_to_table([make_group(1), make_group(2)])
    wide = table.set_column(
        COLUMNS.index("response_index"), "response_index", table.column("response_index").cast(pa.int64())
    ).set_column(
        COLUMNS.index("response_token_ids"),
        "response_token_ids",
        table.column("response_token_ids").cast(pa.large_list(pa.int64())),
    )
    pq.write_table(wide, tmp_path / "wide.parquet")
    assert read_rollouts(tmp_path / "wide.parquet") == [normalised(make_group(1)), normalised(make_group(2))]


def test_group_validation_errors():
    with pytest.raises(ValueError, match="rewards has 3 entries but there are 4 responses"):
        RolloutGroup(**{**make_group(1).__dict__, "rewards": [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="response 0: 2 response_token_ids but 1 response_logp"):
        g = make_group(1)
        RolloutGroup(**{**g.__dict__, "response_token_ids": [[1, 2]] * 4, "response_logprobs": [[-1.0]] * 4})
    with pytest.raises(ValueError, match="no responses"):
        RolloutGroup(
            **{
                **make_group(1).__dict__,
                "responses": [],
                "response_token_ids": [],
                "response_logprobs": [],
                "rewards": [],
                "finish_reasons": [],
            }
        )


# ------------------------------------------------------------------------------------------------
# resume after a kill
# ------------------------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests_dir!r})
    import test_rollouts as T
    from oapl.data import rollouts

    out, n_groups, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    w = rollouts.RolloutWriter(out, shard_size=8, **T.META)
    if mode == "during-flush":
        # die inside the 3rd shard write, after the temp file is complete but before os.replace
        calls = {{"n": 0}}
        real_replace = os.replace
        def dying_replace(src, dst):
            if str(dst).endswith(".parquet"):
                calls["n"] += 1
                if calls["n"] == 3:
                    os._exit(17)
            real_replace(src, dst)
        os.replace = dying_replace  # the writer renames through oapl.atomic
    for i in range(n_groups):
        w.write(T.make_group(i))
    os._exit(17)  # killed: no close(), buffered groups are lost
    """
)


def _run_and_kill(out: Path, n_groups: int, mode: str) -> None:
    script = KILL_SCRIPT.format(tests_dir=str(Path(__file__).parent))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out), str(n_groups), mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr


def _resume(out: Path, total: int) -> tuple[set[str], int]:
    with RolloutWriter(out, shard_size=8, **META) as w:
        done = set(w.done_prompt_ids())
        resumed = w.resumed_groups
        for i in range(total):
            g = make_group(i)
            if g.prompt_id not in done:
                w.write(g)
    return done, resumed


@pytest.mark.parametrize("mode", ["after-writes", "during-flush"])
def test_resume_after_kill_no_loss_no_duplicates(tmp_path, mode):
    total = 12
    # shard_size=8 rows = 2 groups of 4; killing after 7 groups leaves 3 shards + 1 buffered group
    _run_and_kill(tmp_path, 7, mode)
    shards = sorted(p.name for p in tmp_path.glob("part-*.parquet"))
    temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    if mode == "after-writes":
        assert shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        assert temps == []
        expected_done = {make_group(i).prompt_id for i in range(6)}
    else:
        # died while replacing the 3rd shard: its temp file is left behind, complete but unnamed
        assert shards == ["part-00000.parquet", "part-00001.parquet"]
        assert len(temps) == 1 and temps[0].startswith(".part-00002.parquet.tmp")
        expected_done = {make_group(i).prompt_id for i in range(4)}

    done, resumed = _resume(tmp_path, total)
    assert done == expected_done and resumed == len(expected_done)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "stray temp file kept"
    back = read_rollouts(tmp_path)
    ids = [g.prompt_id for g in back]
    assert len(ids) == len(set(ids)) == total
    assert sorted(back, key=lambda g: g.prompt_id) == [normalised(make_group(i)) for i in range(total)]
    # resuming a finished run writes nothing more
    n_shards = len(list(tmp_path.glob("part-*.parquet")))
    done, _ = _resume(tmp_path, total)
    assert len(done) == total
    assert len(list(tmp_path.glob("part-*.parquet"))) == n_shards


def test_stray_temp_file_is_ignored_by_reader_and_removed_by_writer(tmp_path):
    with RolloutWriter(tmp_path, shard_size=4, **META) as w:
        w.write(make_group(0))
    stray = tmp_path / ".part-00001.parquet.tmp-99999"
    stray.write_bytes(b"PAR1 truncated garbage")
    assert [g.prompt_id for g in read_rollouts(tmp_path)] == ["prompt-000"]
    with RolloutWriter(tmp_path, shard_size=4, **META) as w:
        assert not stray.exists()
        assert w.done_prompt_ids() == {"prompt-000"}
        w.write(make_group(1))
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]


def test_writer_rejects_duplicates_and_foreign_groups(tmp_path):
    with RolloutWriter(tmp_path, shard_size=100, **META) as w:
        w.write(make_group(0))
        assert w.done_prompt_ids() == {"prompt-000"}  # buffered counts as done
        with pytest.raises(ValueError, match="'prompt-000' is already in"):
            w.write(make_group(0))
        other = RolloutGroup(**{**make_group(1).__dict__, "weights_id": "other-model"})
        with pytest.raises(ValueError, match="weights_id='other-model'"):
            w.write(other)
        other = RolloutGroup(**{**make_group(1).__dict__, "sampling": {"temperature": 0.0}})
        with pytest.raises(ValueError, match="sampling="):
            w.write(other)
        too_big = make_group(2)
        too_big.response_token_ids[3] = [2**40] * len(too_big.response_token_ids[3])
        with pytest.raises(ValueError, match="'prompt-002' does not fit the rollout schema"):
            w.write(too_big)
        assert w.done_prompt_ids() == {"prompt-000"}
    with RolloutWriter(tmp_path, shard_size=100, **META) as w:
        with pytest.raises(ValueError, match="already in"):
            w.write(make_group(0))
    with pytest.raises(ValueError, match="shard_size"):
        RolloutWriter(tmp_path / "x", shard_size=0, **META)


@pytest.mark.parametrize(
    "field,value",
    [("weights_id", "another-model@v1"), ("task", "code"), ("sampling", {**SAMPLING, "temperature": 0.6})],
)
def test_meta_mismatch_refuses_resume(tmp_path, field, value):
    with RolloutWriter(tmp_path, **META) as w:
        w.write(make_group(0))
    with pytest.raises(RolloutMetaMismatchError, match=f"field '{field}'") as info:
        RolloutWriter(tmp_path, **{**META, field: value})
    assert info.value.field == field
    assert str(tmp_path) in str(info.value)
    # the identical meta (tuple vs list in sampling does not matter) still resumes
    with RolloutWriter(tmp_path, **{**META, "sampling": {**SAMPLING, "stop": ["\n\n"]}}) as w:
        assert w.done_prompt_ids() == {"prompt-000"}


def test_shards_without_meta_are_refused(tmp_path):
    write_rollouts([make_group(0)], tmp_path / "part-00000.parquet")
    with pytest.raises(ValueError, match="no _meta.json"):
        RolloutWriter(tmp_path, **META)


# ------------------------------------------------------------------------------------------------
# schema errors name file, row and column
# ------------------------------------------------------------------------------------------------


def _write_rows(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _rows(n_groups: int = 3) -> list[dict]:
    return [r for i in range(n_groups) for r in group_to_rows(make_group(i))]


def test_missing_column_names_file_and_column(tmp_path):
    table = groups_to_table([make_group(0)]).drop_columns(["reward"])
    path = tmp_path / "no_reward.parquet"
    pq.write_table(table, path)
    with pytest.raises(RolloutSchemaError, match="column 'reward': missing column") as info:
        read_rollouts(path)
    assert info.value.file == str(path) and info.value.column == "reward"
    assert str(path) in str(info.value)
    with pytest.raises(RolloutSchemaError, match="column 'response_logprobs'"):
        pq.write_table(groups_to_table([make_group(0)]).drop_columns(["response_logprobs"]), path)
        read_rollouts(path, with_tokens=False)


def test_mistyped_column_names_file_and_column(tmp_path):
    rows = _rows()
    for r in rows:
        r["reward"] = str(r["reward"])
    schema = ROLLOUT_SCHEMA.set(COLUMNS.index("reward"), pa.field("reward", pa.string()))
    path = _write_rows(tmp_path / "str_reward.parquet", rows, schema)
    with pytest.raises(RolloutSchemaError, match=r"column 'reward': has type string, expected do"):
        read_rollouts(path)


def test_null_value_names_row(tmp_path):
    rows = _rows()
    rows[6]["finish_reason"] = None
    schema = ROLLOUT_SCHEMA.set(COLUMNS.index("finish_reason"), pa.field("finish_reason", pa.string()))
    path = _write_rows(tmp_path / "null.parquet", rows, schema)
    with pytest.raises(RolloutSchemaError) as info:
        read_rollouts(path)
    assert (info.value.row, info.value.column) == (6, "finish_reason")
    assert f"file {path}, row 6, column 'finish_reason': null value" in str(info.value)


def test_group_rewards_disagreement_names_row(tmp_path):
    rows = _rows()
    rows[9]["group_rewards"] = [9.0, 9.0, 9.0, 9.0]  # row 9 = response 1 of the 3rd group
    path = _write_rows(tmp_path / "gr.parquet", rows, ROLLOUT_SCHEMA)
    with pytest.raises(RolloutSchemaError, match="rows disagree on group_rewards") as info:
        read_rollouts(path)
    assert (info.value.file, info.value.row, info.value.column) == (str(path), 9, "group_rewards")


def test_missing_response_index_is_reported(tmp_path):
    rows = _rows()
    del rows[5]  # response_index 1 of prompt-001
    path = _write_rows(tmp_path / "missing.parquet", rows, ROLLOUT_SCHEMA)
    with pytest.raises(RolloutSchemaError, match=r"prompt 'prompt-001': missing response_index 1 ") as info:
        read_rollouts(path)
    assert info.value.column == "response_index" and info.value.row == 4


def test_reward_must_match_group_rewards_and_logprob_lengths(tmp_path):
    rows = _rows()
    rows[2]["reward"] = 0.5
    path = _write_rows(tmp_path / "r.parquet", rows, ROLLOUT_SCHEMA)
    with pytest.raises(RolloutSchemaError, match=r"row 2, column 'reward'.*group_rewards\[2\]"):
        read_rollouts(path)
    rows = _rows()
    rows[3]["response_logprobs"] = rows[3]["response_logprobs"] + [-1.0]
    path = _write_rows(tmp_path / "l.parquet", rows, ROLLOUT_SCHEMA)
    with pytest.raises(RolloutSchemaError, match=r"row 3, column 'response_logprobs'"):
        read_rollouts(path)


def test_prompt_in_two_shards_is_a_duplicate(tmp_path):
    write_rollouts([make_group(0), make_group(1)], tmp_path / "part-00000.parquet")
    write_rollouts([make_group(1)], tmp_path / "part-00001.parquet")
    with pytest.raises(RolloutSchemaError, match="'prompt-001' appears again") as info:
        read_rollouts(tmp_path)
    assert info.value.file.endswith("part-00001.parquet") and info.value.row == 0


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no part-"):
        read_rollouts(tmp_path)
    with pytest.raises(FileNotFoundError, match="no rollout file"):
        read_rollouts(tmp_path / "nope.parquet")


def test_from_rows_type_errors_name_row_and_column():
    rows = group_to_rows(make_group(0))
    rows[2]["response_token_ids"] = [1, "2"]
    with pytest.raises(RolloutSchemaError, match="row 2, column 'response_token_ids': expected a list of integers"):
        group_from_rows(rows)
    rows = group_to_rows(make_group(0))
    del rows[1]["task"]
    with pytest.raises(RolloutSchemaError, match="row 1, column 'task': missing column"):
        group_from_rows(rows)
    rows = group_to_rows(make_group(0)) + group_to_rows(make_group(1))[:1]
    with pytest.raises(RolloutSchemaError, match="rows of several prompts"):
        group_from_rows(rows)


# ------------------------------------------------------------------------------------------------
# filtering
# ------------------------------------------------------------------------------------------------


def test_filter_groups_counts():
    groups = [make_group(i, correct=c) for i, c in enumerate([0, 1, 2, 3, 4, 0, 4, 2])]
    kept, counts = filter_groups(groups)
    assert [g.num_correct() for g in kept] == [1, 2, 3, 4, 4, 2]
    assert counts == dict(total=8, kept=6, dropped=2, dropped_too_few=2, dropped_too_many=0, all_wrong=2, all_correct=2)

    kept, counts = filter_groups(groups, drop_all_correct=True)
    assert [g.num_correct() for g in kept] == [1, 2, 3, 2]
    assert counts["dropped_too_few"] == 2 and counts["dropped_too_many"] == 2

    kept, counts = filter_groups(groups, min_correct=2, max_correct=3)
    assert [g.prompt_id for g in kept] == ["prompt-002", "prompt-003", "prompt-007"]
    assert counts == dict(total=8, kept=3, dropped=5, dropped_too_few=3, dropped_too_many=2, all_wrong=2, all_correct=2)

    kept, counts = filter_groups(groups, min_correct=0)
    assert counts["kept"] == 8


def test_filter_groups_threshold_and_nan():
    g = RolloutGroup(**{**make_group(0).__dict__, "rewards": [0.4, 0.6, float("nan"), 0.5]})
    assert g.num_correct(0.5) == 2  # 0.6 and 0.5 (>=), NaN never counts
    assert g.num_correct(0.7) == 0
    assert filter_groups([g], threshold=0.7)[1]["all_wrong"] == 1
    with pytest.raises(ValueError, match="max_correct"):
        filter_groups([g], min_correct=2, max_correct=1)


def test_fixture_file_loads():
    groups = fixture_groups()
    assert [g.prompt_id for g in groups] == ["arith-0", "arith-1", "arith-2", "algebra-0", "algebra-1"]
    assert [g.num_correct() for g in groups] == [0, 2, 4, 1, 3]
    assert groups[1].extra == {"answer": "9"} and groups[1].sampling["n"] == 4


def test_group_rewards_length_must_match_group_size(tmp_path):
    rows = _rows(1)
    for r in rows:
        r["group_rewards"] = r["group_rewards"][:3]
    rows = [r for r in rows if r["response_index"] < 3] + rows[3:]
    path = _write_rows(tmp_path / "gl.parquet", rows, ROLLOUT_SCHEMA)
    with pytest.raises(RolloutSchemaError, match="group_rewards has 3 entries but the group has 4"):
        read_rollouts(path)
