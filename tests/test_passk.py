"""Unbiased Pass@k: exact reference, edge cases, input validation, aggregation and reports."""

from __future__ import annotations

import csv
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from oapl.data.rollouts import RolloutGroup, group_from_rows
from oapl.evaluation.passk import default_ks, evaluate_groups, load_report, pass_at_k, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "rollouts_small.jsonl"


def reference(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) with exact integers (math.comb(m, k) = 0 for m < k)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def fixture_groups() -> list[RolloutGroup]:
    by_pid: dict[str, list[dict]] = {}
    for line in FIXTURE.read_text().splitlines():
        row = json.loads(line)
        by_pid.setdefault(row["prompt_id"], []).append(row)
    return [group_from_rows(rows) for rows in by_pid.values()]


def group(pid: str, rewards: list[float], benchmark: str = "b") -> RolloutGroup:
    n = len(rewards)
    return RolloutGroup(
        prompt_id=pid,
        prompt="q",
        prompt_token_ids=[1],
        responses=["r"] * n,
        response_token_ids=[[2]] * n,
        response_logprobs=[[-1.0]] * n,
        rewards=rewards,
        finish_reasons=["stop"] * n,
        weights_id="w",
        version=0,
        sampling={},
        task="t",
        benchmark=benchmark,
        extra={},
    )


# ------------------------------------------------------------------------------------------------
# estimator
# ------------------------------------------------------------------------------------------------


def test_hand_values():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5, abs=1e-15)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-15)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # pass@1 = c/n
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(256, 1, 1) == pytest.approx(1 / 256, rel=1e-14)


def test_pass_at_1_is_fraction_correct():
    for n in (1, 2, 7, 64, 256):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-13, abs=1e-15)


def test_edge_cases():
    for n in (1, 3, 16, 256):
        for k in (1, n // 2 or 1, n):
            assert pass_at_k(n, 0, k) == 0.0  # nothing correct
            assert pass_at_k(n, n, k) == 1.0  # everything correct
        assert pass_at_k(n, 1, n) == 1.0  # k = n draws every sample
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # numpy integers are accepted
    assert pass_at_k(np.int64(8), np.int32(2), np.int16(2)) == pytest.approx(float(reference(8, 2, 2)), rel=1e-14)


def test_matches_exact_reference_exhaustive_small_n():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ref = float(reference(n, c, k))
                got = pass_at_k(n, c, k)
                assert got == pytest.approx(ref, rel=1e-12, abs=1e-15), (n, c, k)


def test_matches_exact_reference_random_including_n256():
    rng = random.Random(1234)
    cases = [(256, c, k) for c in (0, 1, 2, 5, 17, 128, 200, 254, 255, 256) for k in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    cases += [(n, rng.randint(0, n), rng.randint(1, n)) for n in (rng.randint(1, 512) for _ in range(400))]
    for n, c, k in cases:
        ref = reference(n, c, k)
        got = pass_at_k(n, c, k)
        assert math.isfinite(got) and 0.0 <= got <= 1.0
        # relative precision on both pass@k and its complement (1 - pass@k = C(n-c,k)/C(n,k))
        assert got == pytest.approx(float(ref), rel=1e-12, abs=1e-300), (n, c, k)
        assert 1.0 - got == pytest.approx(float(1 - ref), rel=1e-9, abs=1e-15), (n, c, k)


def test_monotone_in_k_and_c_at_n256():
    n = 256
    for c in (1, 3, 50):
        vals = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))
    for k in (1, 16, 100):
        vals = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize(
    "args,exc,msg",
    [
        ((4, 1, 5), ValueError, r"1 <= k <= n, got k=5 with n=4"),
        ((4, 1, 0), ValueError, r"1 <= k <= n, got k=0"),
        ((4, 5, 1), ValueError, r"0 <= c <= n, got c=5 with n=4"),
        ((4, -1, 1), ValueError, r"0 <= c <= n, got c=-1"),
        ((0, 0, 1), ValueError, r"n \(samples per prompt\) must be >= 1"),
        ((4.0, 1, 1), TypeError, r"n must be an integer, got float"),
        ((4, 1.5, 1), TypeError, r"c must be an integer"),
        ((4, True, 1), TypeError, r"c must be an integer, got bool"),
    ],
)
def test_invalid_inputs(args, exc, msg):
    with pytest.raises(exc, match=msg):
        pass_at_k(*args)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(2) == [1, 2]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(10) == [1, 2, 4, 8, 10]
    assert default_ks(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert default_ks(257) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 257]
    with pytest.raises(ValueError, match="n must be >= 1"):
        default_ks(0)


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------


def _by_k(summary: dict) -> dict[int, dict]:
    return {row["k"]: row for row in summary["pass_at_k"]}


def test_evaluate_groups_on_fixture_hand_values():
    # fixture: arith c = 0, 2, 4 and algebra c = 1, 3, all with n = 4 (0.3 -> wrong, 0.7 -> right)
    result = evaluate_groups(fixture_groups())
    assert result["ks"] == [1, 2, 4]
    assert result["threshold"] == 0.5
    assert result["weights_ids"] == ["fixture-model@v0"] and result["versions"] == [0]
    assert list(result["benchmarks"]) == ["algebra", "arith"]

    arith = result["benchmarks"]["arith"]
    assert (arith["num_prompts"], arith["num_responses"], arith["n_min"], arith["n_max"]) == (3, 12, 4, 4)
    assert (arith["all_wrong"], arith["all_correct"]) == (1, 1)
    assert arith["accuracy"] == pytest.approx(6 / 12)
    assert arith["mean_reward"] == pytest.approx((0.3 + 1.7 + 4.0) / 12)
    a = _by_k(arith)
    # pass@2 per prompt (n=4, C(4,2)=6): c=0 -> 0, c=2 -> 1 - 1/6, c=4 -> 1
    assert a[1]["mean"] == pytest.approx(0.5)
    assert a[2]["mean"] == pytest.approx((0 + 5 / 6 + 1) / 3)
    assert a[4]["mean"] == pytest.approx(2 / 3)
    assert a[1]["std"] == pytest.approx(np.std([0, 0.5, 1.0]))
    assert a[1]["stderr"] == pytest.approx(np.std([0, 0.5, 1.0], ddof=1) / math.sqrt(3))
    assert all(row["num_prompts"] == 3 for row in arith["pass_at_k"])

    alg = _by_k(result["benchmarks"]["algebra"])
    assert alg[1]["mean"] == pytest.approx(0.5)  # (1/4 + 3/4) / 2
    assert alg[2]["mean"] == pytest.approx(0.75)  # (1 - 3/6 + 1) / 2
    assert alg[4]["mean"] == pytest.approx(1.0)

    o = _by_k(result["overall"])
    assert result["overall"]["num_prompts"] == 5
    assert o[2]["mean"] == pytest.approx((0 + 5 / 6 + 1 + 0.5 + 1) / 5)
    assert o[4]["mean"] == pytest.approx(4 / 5)
    assert o[2]["macro_mean"] == pytest.approx(((0 + 5 / 6 + 1) / 3 + 0.75) / 2)
    assert o[1]["std"] == pytest.approx(np.std([0, 0.5, 1, 0.25, 0.75]))


def test_evaluate_groups_ks_threshold_and_mixed_n():
    groups = [group("a", [1.0, 0.0]), group("b", [0.0, 0.0, 0.0, 1.0]), group("c", [0.2] * 4)]
    result = evaluate_groups(groups, ks=[4, 1, 2])
    o = _by_k(result["overall"])
    assert result["ks"] == [1, 2, 4]
    assert o[1]["num_prompts"] == 3 and o[4]["num_prompts"] == 2  # "a" has only 2 samples
    assert o[4]["mean"] == pytest.approx(0.5)
    assert o[2]["mean"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert evaluate_groups(groups)["ks"] == [1, 2]  # default: up to the smallest n
    low = evaluate_groups(groups, threshold=0.1)  # 0.2 now counts as correct
    assert _by_k(low["overall"])[1]["mean"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    with pytest.raises(ValueError, match="k=8 exceeds the number of samples"):
        evaluate_groups(groups, ks=[1, 8])
    with pytest.raises(ValueError, match="at least one"):
        evaluate_groups([])
    # benchmark falls back to the task name
    assert list(evaluate_groups([group("x", [1.0], benchmark="")])["benchmarks"]) == ["t"]


def test_write_and_load_report(tmp_path):
    groups = fixture_groups() + [group("nan", [float("nan")] * 4, benchmark="broken")]
    result = evaluate_groups(groups)
    assert math.isnan(result["benchmarks"]["broken"]["mean_reward"])
    json_path, csv_path = write_report(result, tmp_path / "reports" / "ckpt-10")
    assert json_path.name == "ckpt-10.json" and csv_path.name == "ckpt-10.csv"

    data = json.loads(json_path.read_text())  # strict JSON: NaN written as null
    assert data["benchmarks"]["broken"]["mean_reward"] is None
    loaded = load_report(json_path)
    assert math.isnan(loaded["benchmarks"]["broken"]["mean_reward"])
    loaded["benchmarks"]["broken"]["mean_reward"] = result["benchmarks"]["broken"]["mean_reward"]
    assert json.dumps(loaded, sort_keys=True, default=str) == json.dumps(result, sort_keys=True, default=str)

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 + 3  # 3 benchmarks x 3 ks + overall
    arith2 = next(r for r in rows if r["benchmark"] == "arith" and r["k"] == "2")
    assert arith2["scope"] == "benchmark" and arith2["macro_mean"] == ""
    assert float(arith2["mean"]) == pytest.approx((0 + 5 / 6 + 1) / 3)
    assert int(arith2["num_prompts"]) == 3
    overall = [r for r in rows if r["scope"] == "overall"]
    assert [r["k"] for r in overall] == ["1", "2", "4"]
    assert float(overall[0]["macro_mean"]) == pytest.approx((0.5 + 0.5 + 0.0) / 3)

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Pass@k report"):
        load_report(tmp_path / "bad.json")
