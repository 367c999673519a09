"""Plots: PNGs are written, non-trivial, of the expected pixel size, and robust to messy data."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from oapl.data.rollouts import RolloutGroup
from oapl.evaluation.passk import evaluate_groups, write_report
from oapl.evaluation.plots import PANEL_HEIGHT, PANEL_WIDTH, grid_shape, load_metrics, plot_passk, plot_training

DPI = 80


def make_groups(p_correct: dict[str, float], n: int = 16, prompts: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = []
    for bench, p in p_correct.items():
        for i in range(prompts):
            q = float(np.clip(p + rng.normal(0, 0.2), 0, 1))  # per-prompt difficulty
            rewards = (rng.random(n) < q).astype(float).tolist()
            groups.append(
                RolloutGroup(
                    prompt_id=f"{bench}-{i}",
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
                    task="math",
                    benchmark=bench,
                    extra={},
                )
            )
    return groups


def check_png(path: Path, nrows: int, ncols: int, min_kb: float = 15) -> np.ndarray:
    assert path.is_file()
    assert path.stat().st_size > min_kb * 1024, f"{path} is only {path.stat().st_size} bytes"
    img = mpimg.imread(path)
    assert img.shape[:2] == (round(PANEL_HEIGHT * nrows * DPI), round(PANEL_WIDTH * ncols * DPI))
    # something was drawn: many distinct colours, not a blank canvas
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50
    return img


def test_grid_shape():
    assert grid_shape(1) == (1, 1)
    assert grid_shape(3) == (1, 3)
    assert grid_shape(4) == (2, 3)
    assert grid_shape(5) == (2, 3)
    assert grid_shape(7) == (3, 3)


def test_plot_passk_compares_runs_one_panel_per_benchmark_plus_mean(tmp_path):
    base = evaluate_groups(make_groups({"gsm8k": 0.3, "math500": 0.15}, seed=1))
    trained = evaluate_groups(make_groups({"gsm8k": 0.5, "math500": 0.3}, seed=2))
    out = plot_passk({"base": base, "step-100": trained}, tmp_path / "figs" / "passk.png", dpi=DPI)
    assert out == tmp_path / "figs" / "passk.png"
    check_png(out, nrows=1, ncols=3)  # gsm8k, math500, mean


def test_plot_passk_from_json_reports_and_single_panel(tmp_path):
    a, _ = write_report(evaluate_groups(make_groups({"gsm8k": 0.3, "aime": 0.05}, seed=3)), tmp_path / "a")
    b, _ = write_report(evaluate_groups(make_groups({"gsm8k": 0.6}, seed=4)), tmp_path / "b")
    # b lacks "aime": it is left out of that panel instead of failing
    check_png(plot_passk({"a": a, "b": str(b)}, tmp_path / "all.png", dpi=DPI), 1, 3)
    for panel in ("gsm8k", "overall", "mean"):
        check_png(plot_passk({"a": a, "b": b}, tmp_path / f"{panel}.png", benchmark=panel, dpi=DPI), 1, 1)
    with pytest.raises(ValueError, match="'nope' is in none of the results; available"):
        plot_passk({"a": a}, tmp_path / "x.png", benchmark="nope")
    with pytest.raises(ValueError, match="at least one"):
        plot_passk({}, tmp_path / "x.png")


def test_plot_passk_single_sample_and_nan_means(tmp_path):
    res = evaluate_groups(make_groups({"tiny": 0.5}, n=1, prompts=3))  # ks == [1]
    res["benchmarks"]["tiny"]["pass_at_k"][0]["stderr"] = math.nan
    other = json.loads(json.dumps(res))
    other["benchmarks"]["tiny"]["pass_at_k"][0]["mean"] = math.nan  # nothing finite to draw
    out = plot_passk({"ok": res, "nan": other}, tmp_path / "one.png", dpi=DPI)
    check_png(out, 1, 1, min_kb=5)


def write_metrics(path: Path, rows: list[dict], tail: str = "") -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # json.dumps writes NaN/Infinity literals
        f.write(tail)
    return path


def fake_run(steps: int, batch: int, seed: int, with_kl: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "samples_seen": step * batch,
            "reward_mean": float(0.2 + 0.5 * (1 - math.exp(-step / 40)) + rng.normal(0, 0.03)),
            "entropy": float(1.5 * math.exp(-step / 80) + 0.2),
            "lag": int(step % 3),
        }
        if with_kl:
            row["kl"] = float(abs(rng.normal(0.01, 0.005)))
        rows.append(row)
        if step % 25 == 0:  # sparse evaluation rows
            rows.append({"step": step, "samples_seen": step * batch, "eval/pass@1": float(0.1 + step / 400)})
    return rows


def test_plot_training_two_runs(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", fake_run(120, 64, 0))
    b = write_metrics(tmp_path / "b.jsonl", fake_run(90, 128, 1, with_kl=False))
    out = plot_training({"oapl": a, "grpo": b}, tmp_path / "train.png", dpi=DPI)
    check_png(out, nrows=2, ncols=3)  # 5 default keys
    out = plot_training(
        {"oapl": a, "grpo": b},
        tmp_path / "train_samples.png",
        keys=("reward_mean", "eval/pass@1"),
        x="samples_seen",
        dpi=DPI,
    )
    check_png(out, nrows=1, ncols=2)


def test_plot_training_survives_nan_missing_keys_and_truncated_lines(tmp_path):
    rows = fake_run(60, 32, 2)
    rows[5]["reward_mean"] = float("nan")
    rows[6]["reward_mean"] = float("inf")
    rows[7]["reward_mean"] = None
    rows[8]["entropy"] = "n/a"
    del rows[9]["step"]
    for r in rows:
        r["kl"] = float("nan")  # a key with no finite value at all
    path = write_metrics(tmp_path / "m.jsonl", rows, tail='\n[1, 2]\n{"step": 61, "reward_me')
    with pytest.warns(RuntimeWarning, match=r"skipped 2 malformed line\(s\)"):
        loaded = load_metrics(path)
    assert len(loaded) == len(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = plot_training(
            {"run": path}, tmp_path / "messy.png", keys=("reward_mean", "entropy", "kl", "not_a_key"), dpi=DPI
        )
    check_png(out, nrows=2, ncols=3)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_training({"run": tmp_path / "missing.jsonl"}, tmp_path / "x.png")


def test_plot_training_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = plot_training({"empty": empty}, tmp_path / "empty.png", keys=("reward_mean",), dpi=DPI)
    check_png(out, 1, 1, min_kb=3)


def test_mean_panel_uses_benchmarks_common_to_all_runs():
    from oapl.evaluation.plots import _passk_series

    a = evaluate_groups(make_groups({"gsm8k": 0.3, "aime": 0.05}, seed=3))
    gsm = [r["mean"] for r in a["benchmarks"]["gsm8k"]["pass_at_k"]]
    aime = [r["mean"] for r in a["benchmarks"]["aime"]["pass_at_k"]]
    ks, ys, errs = _passk_series(a, "mean", ["gsm8k"])
    assert ks == a["ks"] and ys == pytest.approx(gsm) and errs == [0.0] * len(ks)
    ks, ys, _ = _passk_series(a, "mean", None)  # the run's own macro mean
    assert ys == pytest.approx([(g + m) / 2 for g, m in zip(gsm, aime)])
    assert _passk_series(a, "math500") is None
