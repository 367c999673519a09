"""generate -> eval -> offline training -> two-stage recipe, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oapl.cli.main import main
from oapl.data.rollouts import read_rollouts

from test_loop import make_cfg
from conftest import write_prompts


@pytest.fixture
def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl", 24)


def cfg_for(tiny_model_dir, prompts_file, out, **over):
    over = {
        "task.reward": "toy_rewards:has_seven",
        "task.eval_dataset": str(prompts_file),
        "rollout.group_size": 8,
        **over,
    }
    return make_cfg(tiny_model_dir, prompts_file, out, **over)


def test_generate_resumes_after_a_kill_without_loss_or_duplicates(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    import oapl.generate as gen

    cfg = cfg_for(tiny_model_dir, prompts_file, tmp_path / "run")
    out = tmp_path / "data"
    real = gen.generate_groups
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the middle of the third batch
        return real(*a, **k)

    monkeypatch.setattr(gen, "generate_groups", dying)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_dataset(cfg, out, split="train", n=4, batch_prompts=5)
    partial = read_rollouts(out)
    assert 0 < len(partial) < 24
    monkeypatch.setattr(gen, "generate_groups", real)
    summary = gen.generate_dataset(cfg, out, split="train", n=4, batch_prompts=5)
    assert summary["skipped_done"] == len(partial)
    groups = read_rollouts(out)
    ids = [g.prompt_id for g in groups]
    assert sorted(ids) == sorted(f"p{i}" for i in range(24))  # nothing lost, nothing twice
    assert all(g.n == 4 and len(g.response_logprobs[0]) == len(g.response_token_ids[0]) for g in groups)
    # a finished generation run is a no-op
    assert gen.generate_dataset(cfg, out, split="train", n=4, batch_prompts=5)["generated"] == 0


def test_cli_generate_eval_plot(tiny_model_dir, prompts_file, tmp_path):
    cfg = cfg_for(tiny_model_dir, prompts_file, tmp_path / "run")
    cfg_path = tmp_path / "cfg.yaml"
    from oapl.config import save_config

    save_config(cfg, cfg_path)
    assert main(["generate", str(cfg_path), "--out", str(tmp_path / "data"), "--n", "4", "--max-prompts", "6"]) == 0
    assert main(["eval", "--rollouts", str(tmp_path / "data"), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    ks = [row["k"] for row in report["overall"]["pass_at_k"]]
    assert ks == [1, 2, 4]
    assert (tmp_path / "report.csv").exists()
    # eval straight from a model on the held-out split
    assert (
        main(
            [
                "eval",
                str(cfg_path),
                "eval.n=2",
                "eval.temperature=1.0",
                "--max-prompts",
                "4",
                "--out",
                str(tmp_path / "heldout"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "heldout.json").read_text())["overall"]["num_prompts"] == 4
    assert (
        main(
            [
                "plot",
                "passk",
                f"a={tmp_path / 'report.json'}",
                f"b={tmp_path / 'heldout.json'}",
                "--out",
                str(tmp_path / "passk.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "passk.png").stat().st_size > 5000


def test_offline_training_filters_and_checkpoints_each_epoch(tiny_model_dir, prompts_file, tmp_path):
    from oapl.generate import generate_dataset
    from oapl.offline import train_offline

    cfg = cfg_for(tiny_model_dir, prompts_file, tmp_path / "gen")
    generate_dataset(cfg, tmp_path / "data", n=8)
    groups = read_rollouts(tmp_path / "data")
    useful = sum(any(r >= 0.5 for r in g.rewards) for g in groups)
    assert useful >= 2, "fixture should give some prompts with a correct response"
    off = cfg_for(
        tiny_model_dir,
        prompts_file,
        tmp_path / "off",
        **{"offline.data": str(tmp_path / "data"), "offline.epochs": 2, "rollout.prompts_per_step": 2},
    )
    summary = train_offline(off)
    assert summary["filter"]["kept"] == useful
    assert len(summary["checkpoints"]) == 2
    assert summary["steps"] == 2 * (useful // 2)
    rows = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["v_star_mean"] is not None for r in rows)
    # a plain `oapl train` with offline.data set takes the same path
    assert (
        main(
            [
                "train",
                f"output_dir={tmp_path / 'off2'}",
                f"model.name={tiny_model_dir}",
                f"offline.data={tmp_path / 'data'}",
                "rollout.prompts_per_step=2",
                "logging.progress=false",
                "task.name=dataset",
                f"task.dataset={prompts_file}",
                "task.reward=toy_rewards:has_seven",
                "task.columns={prompt: question, prompt_id: id}",
            ]
        )
        == 0
    )


def test_two_stage_recipe_end_to_end(tiny_model_dir, prompts_file, tmp_path):
    from oapl.recipes.two_stage import run_two_stage

    cfg = cfg_for(
        tiny_model_dir,
        prompts_file,
        tmp_path / "recipe",
        **{"rollout.prompts_per_step": 2, "eval.n": 4, "eval.temperature": 1.0, "optim.lr": 5e-3},
    )
    report = run_two_stage(cfg, stage2_prompts=12, stage2_epochs=2)
    assert set(report["eval"]) == {"base", "stage1", "stage2-epoch1", "stage2-epoch2"}
    assert report["best"]["label"] in report["eval"]
    assert len(read_rollouts(tmp_path / "recipe" / "stage2_data")) == 12
    assert (tmp_path / "recipe" / "report.json").exists()
    assert (tmp_path / "recipe" / "passk.png").exists()


def test_named_math_benchmarks_report_per_benchmark(tiny_model_dir, tmp_path, monkeypatch):
    """`oapl eval --benchmarks` on a local fixture in the MathArena schema (problem, answer)."""
    import oapl.data.benchmarks as bm

    fixture = Path(__file__).parent / "fixtures" / "math_benchmark.jsonl"
    monkeypatch.setitem(bm.BENCHMARKS, "aime25", bm.Benchmark("aime25", str(fixture), "train", "problem", "answer"))
    monkeypatch.setitem(bm.BENCHMARKS, "brumo25", bm.Benchmark("brumo25", str(fixture), "train", "problem", "answer"))
    args = [
        "eval",
        f"model.name={tiny_model_dir}",
        "engine.kind=transformers",
        "sampling.max_tokens=8",
        "eval.n=2",
        "eval.temperature=1.0",
        "--benchmarks",
        "aime25,brumo25",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["benchmarks"]) == {"aime25", "brumo25"}
    assert report["benchmarks"]["aime25"]["num_prompts"] == 4
    with pytest.raises(ValueError, match="unknown benchmark"):
        bm.get_benchmark("aime24")


def test_code_task_trains_end_to_end(tiny_model_dir, tmp_path):
    """A short run on the code task: prompts from the DeepCoder-format fixture, rewards from the sandbox."""
    fixture = Path(__file__).parent / "fixtures" / "code_problems.jsonl"
    from oapl.config import load_config
    from oapl.loop import train

    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "code_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            f"model.name={tiny_model_dir}",
            "engine.kind=transformers",
            f"task.dataset={fixture}",
            f"task.eval_dataset={fixture}",
            "sampling.max_tokens=16",
            "steps=2",
            "eval.at_start=false",
            "logging.progress=false",
            "checkpoint.save_final=false",
            "rollout.asynchronous=false",
        ],
    )
    result = train(cfg)
    assert result.steps == 2 and result.eval_after is not None
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward_errors"] == 0  # random text scores 0 through the sandbox, it does not crash it
    assert rows[0]["reward_mean"] == 0.0


def test_offline_lora_run_resumes_its_adapters(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """Interrupted after epoch 1 and resumed, an offline LoRA run ends with the adapters of an
    uninterrupted run: the checkpoint's adapters come back, not fresh ones."""
    from safetensors.torch import load_file

    from oapl.generate import generate_dataset
    from oapl.offline import train_offline
    from oapl.trainer.policy import Policy

    gen = cfg_for(tiny_model_dir, prompts_file, tmp_path / "gen")
    generate_dataset(gen, tmp_path / "data", n=8)
    over = {
        "offline.data": str(tmp_path / "data"),
        "offline.epochs": 2,
        "offline.min_correct": 0,
        "rollout.prompts_per_step": 2,
        "model.lora.enabled": True,
        "model.lora.r": 4,
        "optim.lr": 1e-2,
    }
    full = train_offline(cfg_for(tiny_model_dir, prompts_file, tmp_path / "full", **over))
    per_epoch = full["steps"] // 2
    real_step, calls = Policy.train_step, {"n": 0}

    def interrupted(self, groups):
        calls["n"] += 1
        if calls["n"] == per_epoch + 1:  # the first step of epoch 2
            raise KeyboardInterrupt
        return real_step(self, groups)

    monkeypatch.setattr(Policy, "train_step", interrupted)
    cfg = cfg_for(tiny_model_dir, prompts_file, tmp_path / "resumed", **over)
    with pytest.raises(KeyboardInterrupt):
        train_offline(cfg)
    monkeypatch.setattr(Policy, "train_step", real_step)
    resumed = train_offline(cfg, resume=True)
    assert resumed["steps"] == full["steps"]
    a = load_file(str(Path(full["checkpoints"][-1]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["checkpoints"][-1]) / "adapter_model.safetensors"))
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
