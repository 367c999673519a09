"""benchmarks/time_to_quality.py: the time-to-quality arithmetic by hand, and its smallest mode end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "time_to_quality.py"


@pytest.fixture(scope="module")
def ttq():
    spec = importlib.util.spec_from_file_location("time_to_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_time_to_reach_takes_the_first_measured_point_at_or_above(ttq):
    curve = [(0.0, 0.05), (30.0, 0.20), (60.0, 0.50), (90.0, 0.45), (120.0, 0.50)]
    assert ttq.time_to_reach(curve, 0.50) == 60.0  # first reached at 60 s, not the later tie at 120 s
    assert ttq.time_to_reach(curve, 0.30) == 60.0  # no interpolation between 30 s (0.20) and 60 s (0.50)
    assert ttq.time_to_reach(curve, 0.05) == 0.0
    assert ttq.time_to_reach(curve, 0.51) is None
    assert ttq.time_to_reach(list(reversed(curve)), 0.45) == 60.0  # order of the points does not matter
    assert ttq.best_point(curve) == (0.50, 60.0)


def test_headline_pairs_each_oapl_side_with_trl_of_the_same_repetition(ttq):
    runs = [
        {"side": "trl", "rep": 0, "curve": [(0.0, 0.1), (100.0, 0.3), (200.0, 0.6), (300.0, 0.5)]},
        {"side": "oapl-async-vllm", "rep": 0, "curve": [(0.0, 0.1), (40.0, 0.4), (80.0, 0.7)], "train_s": 80.0},
        {"side": "oapl-grpo-vllm", "rep": 0, "curve": [(0.0, 0.1), (50.0, 0.5)], "train_s": 50.0},
        {"side": "trl-async", "rep": 0, "error": "AssertionError: Torch not compiled with CUDA enabled"},
        {"side": "trl", "rep": 1, "curve": [(0.0, 0.1), (120.0, 0.4)]},
        {"side": "oapl-async-vllm", "rep": 1, "curve": [(0.0, 0.1), (30.0, 0.45)], "train_s": 30.0},
    ]
    heads = {(h["rep"], h["side"]): h for h in ttq.headline(runs)}
    assert set(heads) == {(0, "oapl-async-vllm"), (0, "oapl-grpo-vllm"), (1, "oapl-async-vllm")}
    h = heads[(0, "oapl-async-vllm")]
    # TRL rep 0: best 0.6, first at 200 s; oapl reaches >= 0.6 first at 80 s: 80 / 200
    assert (h["target_pass1"], h["ref_seconds"], h["seconds"]) == (0.6, 200.0, 80.0)
    assert h["ratio"] == pytest.approx(0.4, abs=1e-12)
    assert h["side_best_pass1"] == 0.7
    h = heads[(0, "oapl-grpo-vllm")]  # best 0.5 < 0.6 within its 50 s: no ratio
    assert h["seconds"] is None and h["ratio"] is None and h["budget_s"] == 50.0
    h = heads[(1, "oapl-async-vllm")]  # rep 1 pairs with TRL rep 1 (0.4 at 120 s), not rep 0: 30 / 120
    assert (h["target_pass1"], h["ref_seconds"]) == (0.4, 120.0)
    assert h["ratio"] == pytest.approx(0.25, abs=1e-12)


def test_a_side_may_carry_its_own_sync_interval(ttq):
    assert ttq.parse_side("oapl-async-vllm") == ("oapl-async-vllm", None)
    assert ttq.parse_side("oapl-async-vllm@1") == ("oapl-async-vllm", 1)
    assert ttq.parse_side("oapl-grpo@16") == ("oapl-grpo", 16)
    for bad, words in [
        ("oapl-sync@1", "unknown side 'oapl-sync'"),
        ("trl@4", "only an oapl side"),
        ("oapl-async@0", "integer >= 1"),
        ("oapl-async@x", "integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=words):
            ttq.parse_side(bad)
    # two lags of one side in one repetition: each is an oapl side of its own in the headline
    runs = [
        {"side": "trl", "rep": 0, "curve": [(0.0, 0.1), (200.0, 0.6)]},
        {"side": "oapl-async-vllm@1", "rep": 0, "curve": [(0.0, 0.1), (50.0, 0.6)], "train_s": 50.0},
        {"side": "oapl-async-vllm@4", "rep": 0, "curve": [(0.0, 0.1), (80.0, 0.6)], "train_s": 80.0},
    ]
    heads = {h["side"]: h["ratio"] for h in ttq.headline(runs)}
    assert heads == {"oapl-async-vllm@1": pytest.approx(0.25), "oapl-async-vllm@4": pytest.approx(0.4)}


def test_headline_has_no_ratio_when_trl_never_left_its_start(ttq):
    runs = [
        {"side": "trl", "rep": 0, "curve": [(0.0, 0.2), (60.0, 0.1)]},
        {"side": "oapl-grpo", "rep": 0, "curve": [(0.0, 0.2), (30.0, 0.3)], "train_s": 30.0},
    ]
    (h,) = ttq.headline(runs)
    assert (h["target_pass1"], h["ref_seconds"], h["seconds"], h["ratio"]) == (0.2, 0.0, 0.0, None)


@pytest.mark.slow
def test_smallest_mode_end_to_end(tiny_model_dir, tmp_path):
    """The tiny random model, oapl's two sides on its transformers engine, one repetition, a 1 s budget."""
    out = tmp_path / "ttq.json"
    fig = tmp_path / "ttq.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            tiny_model_dir,
            "--sides",
            "oapl-async,oapl-grpo",
            "--reps",
            "1",
            "--budget-s",
            "1",
            "--eval-every-s",
            "0.5",
            "--eval-n",
            "4",
            "--max-tokens",
            "4",
            "--prompts",
            "2",
            "--group-size",
            "2",
            "--threads",
            "1",
            "--json",
            str(out),
            "--plot",
            str(fig),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "runs", "headline"}
    assert data["headline"] == []  # no TRL side ran: nothing to pair with
    assert isinstance(data["meta"]["base_pass1"], float)
    assert [(r["side"], r["rep"]) for r in data["runs"]] == [("oapl-async", 0), ("oapl-grpo", 0)]
    for r in data["runs"]:
        assert "error" not in r, r
        times = [t for t, _ in r["curve"]]
        assert times[0] == 0.0 and times == sorted(times)
        assert r["curve"][0][1] == data["meta"]["base_pass1"]  # every curve starts at the one base score
        assert len(r["curve"]) == len(r["snapshots"]) + 1
        # the base model is scored once, in the first side's evaluation
        assert len(r["eval_seconds"]) == len(r["snapshots"]) + (1 if r is data["runs"][0] else 0)
        assert r["train_s"] >= 1.0  # it trained until the budget was spent
        assert r["steps"] >= 1 and all(0.0 <= s <= 1.0 for _, s in r["curve"])
        assert r["load_before"] >= 0 and r["load_after"] >= 0
    assert fig.stat().st_size > 0
    assert "| side | rep |" in proc.stdout
