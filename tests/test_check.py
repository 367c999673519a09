"""`oapl check CONFIG`: passes on a good run with its plan; one clear line per defect, exit 2."""

from __future__ import annotations

import json

import pytest
import yaml

from oapl.check import run_check
from oapl.cli.main import main
from oapl.data.rollouts import RolloutGroup, write_rollouts


def _yaml(tmp_path, tiny_model_dir, prompts_file, **over):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "steps": 10,
        "model": {"name": tiny_model_dir},
        "sampling": {"temperature": 1.0, "max_tokens": 6},
        "task": {
            "name": "dataset",
            "dataset": str(prompts_file),
            "eval_dataset": str(prompts_file),
            "reward": "toy_rewards:has_seven",
            "columns": {"prompt": "question", "prompt_id": "id"},
        },
        "algorithm": {"mini_batches": 2},
        "rollout": {"group_size": 2, "prompts_per_step": 4, "sync_interval": 5},
        "engine": {"kind": "transformers", "max_model_len": 200},
    }
    for dotted, value in over.items():
        node = cfg
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_good_config_passes_with_its_plan(tmp_path, tiny_model_dir, prompts_file, capsys):
    path = _yaml(tmp_path, tiny_model_dir, prompts_file)
    res = run_check(path)
    assert res.ok, res.problems
    p = res.plan
    # 4 prompts x G=2 = 8 responses per step; 2 mini-batches -> 20 optimiser steps; L=5 -> one sync
    assert (p["responses_per_step"], p["optimiser_steps"], p["syncs"]) == (8, 20, 1)
    assert (p["samples_per_sync_window"], p["samples_total"], p["generated_tokens_per_step_max"]) == (40, 80, 48)
    # the tiny Llama: 99-token vocabulary x 32 (tied) + 2 layers x 9,280 + final norm 32
    assert p["model_params"] == 99 * 32 + 2 * 9280 + 32
    assert p["trainer_state_gb"] == pytest.approx(p["model_params"] * 16 / 1e9)  # fp32 masters + grads + AdamW
    # every rendered prompt (40 rows), one token per character or special token; the longest:
    # "<|im_start|>" "user" "\n" "say 39" "<|im_end|>" "\n" "<|im_start|>" "assistant" "\n"
    assert p["longest_sampled_prompt_tokens"] == 1 + 4 + 1 + 6 + 1 + 1 + 1 + 9 + 1
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "is ready to run" in out and "samples_per_sync_window: 40" in out


def _lines(capsys, argv):
    assert main(argv) == 2
    return [ln for ln in capsys.readouterr().out.splitlines() if ln]


def test_token_budget_defects(tmp_path, tiny_model_dir, prompts_file, capsys):
    # a max_tokens that cannot fit: refused by the configuration, one line naming the field
    path = _yaml(tmp_path, tiny_model_dir, prompts_file, **{"eval.max_tokens": 200})
    lines = _lines(capsys, ["check", str(path)])
    assert len(lines) == 1 and lines[0].startswith("eval.max_tokens=200 does not fit engine.max_model_len=200")
    # prompts that cannot fit: one line per split naming the first row, with how many more and the longest
    # ("say 0".."say 9": 24 tokens, "say 10".."say 39": 25; 24 + 6 > 29, so all 40 rows)
    path = _yaml(tmp_path, tiny_model_dir, prompts_file, **{"engine.max_model_len": 29})
    lines = _lines(capsys, ["check", str(path), "--rows", "2"])
    assert len(lines) == 2
    assert lines[0].startswith(
        "train row 0 (prompt_id 'p0'): prompt of 24 tokens + sampling.max_tokens=6 = 30 "
        "tokens > engine.max_model_len=29"
    )
    assert lines[0].endswith("(39 more train row(s) do not fit either; the longest is row 10 with 25 tokens)")
    assert lines[1].startswith("eval row 0 (prompt_id 'p0'): prompt of 24 tokens + sampling.max_tokens=6 = 30")


def test_top_p_and_missing_data_defects(tmp_path, tiny_model_dir, prompts_file, capsys):
    path = _yaml(tmp_path, tiny_model_dir, prompts_file, **{"sampling.top_p": 0.9})
    assert _lines(capsys, ["check", str(path)])[0].startswith("sampling.top_p must be 1.0 for OAPL")
    path = _yaml(tmp_path, tiny_model_dir, prompts_file, **{"task.dataset": str(tmp_path / "nope.jsonl")})
    lines = _lines(capsys, ["check", str(path)])
    assert lines == [f"task.dataset: dataset file {tmp_path / 'nope.jsonl'} does not exist"]


def test_unparseable_math_answer(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(["4", "??", "\\frac{1}{2}"]))
    )
    path = _yaml(
        tmp_path,
        tiny_model_dir,
        data,
        **{"task": {"name": "math", "dataset": str(data), "columns": {"prompt": "problem"}}},
    )
    lines = _lines(capsys, ["check", str(path)])
    assert lines == [
        "task.dataset row 1 (prompt_id 'math-1'): answer '??' does not parse as a math expression "
        "(math-verify keeps at most its raw text), so a correct response in another form would score 0"
    ]


def test_offline_data_sampled_otherwise(tmp_path, tiny_model_dir, prompts_file, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_rollouts(
        [
            RolloutGroup(
                prompt_id="p0",
                prompt="p",
                prompt_token_ids=[1],
                responses=["a"],
                response_token_ids=[[2]],
                response_logprobs=[[-0.1]],
                rewards=[1.0],
                finish_reasons=["stop"],
                weights_id=tiny_model_dir,
                version=0,
                sampling={"temperature": 0.7, "top_p": 1.0},
            )
        ],
        data / "part-00000.parquet",
    )
    path = _yaml(tmp_path, tiny_model_dir, prompts_file, **{"offline.data": str(data)})
    lines = _lines(capsys, ["check", str(path)])
    assert len(lines) == 1
    assert (
        "1 of 1 groups were sampled with temperature=0.7 (e.g. prompt_id 'p0') but sampling.temperature is 1.0"
        in lines[0]
    )


@pytest.mark.parametrize(
    "name", ["arithmetic_cpu", "two_stage_cpu", "code_cpu", pytest.param("compare_cpu", marks=pytest.mark.slow)]
)  # imports vLLM: 8 s
def test_shipped_local_configs_pass(name, monkeypatch):
    """The shipped configs that need no Hub access pass (the GPU ones are validated in test_paper_configs)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # their dataset paths are relative to the repository
    try:
        from oapl.trainer.model import resolve_model_path

        resolve_model_path("embedded:smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"embedded model unavailable: {e}")
    res = run_check(root / "configs" / f"{name}.yaml", rows=4)
    assert res.ok, res.problems
    plans = res.plan.values() if name == "compare_cpu" else [res.plan]
    assert all(p["model_params"] == 134_515_008 for p in plans)  # SmolLM2-135M


def test_gpu_flags_plan_per_rank_and_bad_sizes_name_the_flag(tmp_path, tiny_model_dir, prompts_file, capsys):
    path = _yaml(tmp_path, tiny_model_dir, prompts_file)
    res = run_check(path, gpus=1, gpu_memory="80GiB")
    assert res.ok, res.problems
    t = res.plan["trainer_rank"]
    assert t["parallel"] == "single (1 rank)" and t["budget"].startswith("85.9 GB") and res.plan["fits"] is True
    assert res.plan["optimiser_steps_per_sync_window"] == "10 (L = 5 trainer steps x 2 mini-batches)"
    env = res.plan["environment"]
    assert {"gpus_here", "vllm", "disk", "host_ram"} <= set(env) and "checkpoints need" in env["disk"]
    assert run_check(path, gpu_memory="lots").problems == [
        "--gpu-memory: cannot read 'lots' as a memory size (e.g. 80GiB, 80GB, 141e9)"
    ]
    # a GPU the model's state cannot fit: exit 2, naming memory and what would fit
    assert main(["check", str(path), "--gpus", "1", "--gpu-memory", "100KB"]) == 2
    out = capsys.readouterr().out
    assert "GPU memory: a trainer rank needs" in out and "the plan, which does not fit:" in out


def test_what_the_trainer_ranks_refuse_is_a_problem_line(tmp_path, tiny_model_dir, prompts_file):
    """A Ray config the trainer ranks would refuse at start-up (FSDP2 with LoRA) is refused here, naming
    the fields, instead of being called ready."""
    path = _yaml(
        tmp_path,
        tiny_model_dir,
        prompts_file,
        **{
            "distributed.backend": "ray",
            "distributed.trainer_workers": 2,
            "distributed.parallel": "fsdp",
            "model.lora": {"enabled": True},
        },
    )
    res = run_check(path, hub=False)
    assert not res.ok
    assert any(p.startswith("distributed.parallel=fsdp with model.lora.enabled=true") for p in res.problems), (
        res.problems
    )
