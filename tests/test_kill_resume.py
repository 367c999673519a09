"""Fault injection: kill -9 a real `oapl train` at random moments, then `--resume`, over and over.

Twelve kills, at least 2 of them inside a checkpoint write (a ``.tmp-step-*`` directory
exists when the process dies), others during start-up and between steps. After every kill the
run has lost at most one checkpoint interval; at the end the metrics have one training row per step
(1..N, unique and contiguous), one held-out row before and one after, the samples log has no
duplicates, no temporary directory or file is left, and every number equals an uninterrupted run's
(synchronous generation with checkpoints at sync boundaries resumes bit-exactly).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
STEPS, EVERY = 24, 2

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def config(tiny_model_dir: str, prompts_file: Path, out: Path) -> dict:
    return {
        "output_dir": str(out),
        "seed": 0,
        "steps": STEPS,
        "threads": 1,
        "model": {"name": tiny_model_dir, "logprob_chunk_size": 16},
        "sampling": {"max_tokens": 6, "temperature": 1.0},
        "engine": {"kind": "transformers"},
        "task": {
            "name": "dataset",
            "dataset": str(prompts_file),
            "eval_dataset": str(prompts_file),
            "eval_split": "train",
            "max_eval_prompts": 4,
            "columns": {"prompt": "question", "prompt_id": "id"},
            "reward": "toy_rewards:digit_fraction",
            "system_prompt": None,
        },
        "rollout": {
            "group_size": 4,
            "prompts_per_step": 4,
            "prompts_per_generate": 4,
            "sync_interval": 2,
            "asynchronous": False,
            "buffer_groups": 16,
        },
        "optim": {"lr": 1e-2, "micro_batch_size": 16},
        "eval": {"at_start": True, "at_end": True},
        "logging": {"progress": False, "log_samples_every": 1},
        "checkpoint": {"every": EVERY, "keep": 2, "save_final": True},
    }


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a row cut short by the kill
    return out


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in rows(run) if "loss" in r]


def checkpoint_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    if not root.exists():
        return []
    return sorted(
        int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and (p / "manifest.json").exists()
    )


def tmp_writes(run: Path) -> list[str]:
    root = run / "checkpoints"
    try:
        return [n for n in os.listdir(root) if n.startswith(".tmp-step-")]
    except FileNotFoundError:
        return []


def start(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("OAPL_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "oapl.cli.main", "train", str(cfg_path), "--resume"],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(cfg_path.parent),
    )


def wait_for(proc: subprocess.Popen, cond, poll: float, limit: float = 240) -> bool:
    """Poll ``cond`` until it holds (True) or the process exits on its own (False)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("the run neither progressed nor ended")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_ten_kills_at_random_moments_then_resume(tiny_model_dir, prompts_file, tmp_path):
    from oapl.config import load_config
    from oapl.loop import train

    # the uninterrupted reference
    ref_cfg = config(tiny_model_dir, prompts_file, tmp_path / "reference")
    train(load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flatten(ref_cfg).items()]))
    reference = rows(tmp_path / "reference")

    run = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tiny_model_dir, prompts_file, run)))
    log = tmp_path / "runs.log"
    rng = random.Random(1234)
    kills: list[dict] = []
    modes = ["startup", "step", "write", "step", "write", "write", "step", "startup", "write", "step", "end", "end"]
    while len(kills) < len(modes) or sum(k["in_write"] for k in kills) < 2:
        assert len(kills) < 30, kills
        mode = modes[len(kills)] if len(kills) < len(modes) else "write"
        done_before = max(train_steps(run), default=0)
        if done_before >= STEPS - 1 and (mode != "startup" or done_before >= STEPS):
            mode = "write"  # late in the run: the final checkpoint write is the moment left
        proc = start(cfg_path, log)
        if mode == "startup":
            # importing, loading the model or resuming: a random moment, but never later than the
            # event "the resumed run logged a new step", so a fast idle machine cannot finish the
            # remaining run inside the wait (a fixed sleep did)
            deadline = time.monotonic() + rng.uniform(0.2, 4.0)
            hit = wait_for(
                proc, lambda: time.monotonic() >= deadline or max(train_steps(run), default=0) > done_before, 0.005
            )
        elif mode in ("step", "end"):  # "end": after the last step (final sync, evaluation, checkpoint)
            target = STEPS if mode == "end" else min(STEPS, done_before + rng.randint(1, 3))
            hit = wait_for(proc, lambda: max(train_steps(run), default=0) >= target, 0.01)
            if hit:
                time.sleep(rng.uniform(0.0, 0.6 if mode == "end" else 0.15))
        else:
            hit = wait_for(proc, lambda: bool(tmp_writes(run)), 0.0005)
        if not hit or proc.poll() is not None:
            assert proc.wait() == 0, log.read_text()[-3000:]
            break  # the run finished before this kill
        kill(proc)
        in_write = bool(tmp_writes(run))
        done, ckpts = max(train_steps(run), default=0), checkpoint_steps(run)
        last = ckpts[-1] if ckpts else 0
        kills.append({"mode": mode, "in_write": in_write, "steps_logged": done, "checkpoint": last})
        assert done - last <= EVERY, kills  # a resume loses at most one checkpoint interval
        if len(kills) >= 2 and kills[-2]["checkpoint"]:
            assert last >= kills[-2]["checkpoint"], kills  # no checkpoint of the run is ever lost
        if done >= STEPS and last >= STEPS:
            break
    if len(kills) < 10 or sum(k["in_write"] for k in kills) < 2:
        pytest.fail(f"the run ended before 10 kills (2 in checkpoint writes): {kills}")
    # finish it
    proc = start(cfg_path, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]

    final = rows(run)
    assert [r["step"] for r in final if "loss" in r] == list(range(1, STEPS + 1)), kills
    evals = [r["step"] for r in final if "loss" not in r]
    assert evals == [0, STEPS], (evals, kills)  # held-out before and after, once each
    samples = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted(samples) == sorted(s for s in range(1, STEPS + 1) for _ in range(2))
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".tmp"]
    assert leftovers == [], leftovers
    assert checkpoint_steps(run)[-1] == STEPS and (run / "summary.yaml").exists()
    # the killed-and-resumed run is the uninterrupted run, number for number
    assert len(final) == len(reference)
    for a, b in zip(final, reference):
        assert a["step"] == b["step"]
        for key in (
            "loss",
            "reward_mean",
            "grad_norm",
            "lr",
            "weight_version",
            "lag",
            "eval/pass@1",
            "eval/reward_mean",
        ):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a["step"], kills)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("columns",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
