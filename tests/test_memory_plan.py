"""The memory plan: hand-computed bytes for a small shape, the shipped shapes, the paper configs on 1 and 8 GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from oapl.config import TrainConfig, load_config
from oapl.errors import UserError
from oapl.memory_plan import (
    GiB,
    Hardware,
    ModelShape,
    count_params,
    lora_params,
    parse_size,
    plan_memory,
    resolve_shape,
    shapes_table,
    trainer_rank,
)

ROOT = Path(__file__).resolve().parents[1]
CODE, MATH = ROOT / "configs" / "two_stage_deepcoder.yaml", ROOT / "configs" / "math_qwen3_4b.yaml"
# the tiny Llama of the test suite: 2 layers, hidden 32, 4 heads (and 2 KV heads) of 8, MLP 64, vocabulary 100
TINY = ModelShape(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=100, tied=True, params=0)
# per layer: q, o 32 x 32 = 1,024 each; k, v 32 x 16 = 512 each; MLP 3 x 32 x 64 = 6,144; 2 norms x 32: 9,280
# root: 100 x 32 tied embeddings + final norm 32 = 3,232; total 2 x 9,280 + 3,232 = 21,792
P = 21_792


def _cfg(**distributed) -> TrainConfig:
    return TrainConfig.model_validate({"model": {"name": "x", "device": "cuda"}, "distributed": distributed})


def test_param_count_by_hand_and_the_shipped_table():
    assert TINY.layer_params() == 9_280 and TINY.root_params() == 3_232 and count_params(TINY) == P
    for name, shape in shapes_table().items():  # the table's params agree with the architecture
        assert count_params(shape) == shape.params, name
    assert shapes_table()["Qwen/Qwen3-4B-Thinking-2507"].params == 4_022_468_096
    assert shapes_table()["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"].params == 14_770_033_664


def test_state_per_rank_by_hand():
    tiny = ModelShape(**{**TINY.__dict__, "params": P})
    one = trainer_rank(_cfg(), tiny, 16, True)
    assert (one["parallel"], one["weights"], one["gradients"], one["optimizer"]) == ("single", 4 * P, 4 * P, 8 * P)
    ddp = trainer_rank(_cfg(backend="ray", trainer_workers=2), tiny, 16, True)  # no GPUs per rank: DDP replicas
    # DDP's buckets: a second fp32 copy of the gradients
    assert (ddp["parallel"], ddp["weights"], ddp["gradients"], ddp["optimizer"]) == ("ddp", 4 * P, 8 * P, 8 * P)
    fsdp = trainer_rank(_cfg(backend="ray", trainer_workers=8, trainer_num_gpus=1), tiny, 16, True)
    assert (fsdp["parallel"], fsdp["weights"], fsdp["gradients"], fsdp["optimizer"]) == ("fsdp", 10_896, 10_896, 21_792)
    # gathered in fp32: the root (3,232) and its gradient, and 5 layers' worth (9,280 each) in flight
    assert fsdp["gathered"] == max(2 * 3_232 + 5 * 9_280, 3 * 3_232) * 4 == 211_456
    lora_cfg = TrainConfig.model_validate({"model": {"name": "x", "device": "cuda", "lora": {"enabled": True, "r": 4}}})
    # r x (in + out) for q 64, k 48, v 48, o 64, gate 96, up 96, down 96 -> 4 x 512 per layer, 2 layers
    assert lora_params(lora_cfg, tiny) == 4_096
    lora = trainer_rank(lora_cfg, tiny, 16, True)  # bf16 frozen base + fp32 adapters, their grads and AdamW
    assert (lora["weights"], lora["gradients"], lora["optimizer"]) == (2 * P + 4 * 4_096, 4 * 4_096, 8 * 4_096)


def test_sizes_and_unknown_models():
    assert parse_size("80GiB") == 80 * GiB and parse_size("80GB") == 80e9 and parse_size("141e9") == 141e9
    with pytest.raises(UserError, match="--gpu-memory"):
        parse_size("lots")
    with pytest.raises(UserError, match="model.name: cannot plan the memory of 'nobody/none-such'"):
        resolve_shape("nobody/none-such", "/nonexistent/none-such", timeout_s=3)


def test_code_config_refused_on_one_gpu_and_fits_on_eight():
    cfg = load_config(CODE)
    shape = shapes_table()[cfg.model.name]
    seq = cfg.sampling.max_tokens + 4096  # the prompt room engine.max_model_len leaves
    plan, problems = plan_memory(cfg, shape, seq, Hardware(1, 80 * GiB, "flags"))
    assert problems[0].startswith("GPUs: the layout needs 8 GPUs")
    # one rank holds 16 B/parameter: 236 GB of state, refused naming memory and the fix
    assert problems[1].startswith(
        "GPU memory: a trainer rank needs 263.8 GB (weights 59.1 GB, gradients 59.1 GB, AdamW 118.2 GB"
    )
    assert "distributed.trainer_workers=6 with distributed.trainer_num_gpus=1 (FSDP2 over 6 GPUs" in problems[1]
    assert plan["fits"] is False and "FSDP2" not in plan["layout"]
    plan, problems = plan_memory(cfg, shape, seq, Hardware(8, 141e9, "flags"))  # 8 x H200
    assert problems == [] and plan["fits"] and plan["trainer_rank"]["parallel"] == "fsdp (8 ranks)"
    assert plan["trainer_rank"]["optimizer"] == "14.8 GB"  # 8 B x 14.77e9 / 8
    # 8 x 80 GB: fits because the checkpointed layer inputs (35.5 GB of fp32 residual stream) are offloaded
    plan, problems = plan_memory(cfg, shape, seq, Hardware(8, 80 * GiB, "flags"))
    assert problems == [] and plan["fits"] and plan["trainer_rank"]["total"] == "75.7 GB"
    assert plan["trainer_rank"]["offloaded_to_host"] == "35.5 GB"  # 48 x 5,120 x 4 B x 36,096
    # without the offload the state fits (30 GB per rank) but one 36K-token sequence's activations do not
    no_off = load_config(CODE, ["model.activation_offload=false"])
    plan, problems = plan_memory(no_off, shape, seq, Hardware(8, 80 * GiB, "flags"))
    assert len(problems) == 1 and "needs 111.2 GB" in problems[0] and "activations 54.1 GB" in problems[0]
    assert "model.activation_offload=true (the 35.5 GB" in problems[0]
    # a longer sequence than any rank count can hold: no single change; says what a rank needs at best
    cfg = load_config(CODE, ["sampling.max_tokens=120000", "engine.max_model_len=140000"])
    plan, problems = plan_memory(cfg, shape, 124_096, Hardware(8, 80 * GiB, "flags"))
    assert "no single change fits it: even over" in problems[0] and "GPUs with at least" in problems[0]


def test_cli_refuses_the_code_config_on_one_gpu(monkeypatch, capsys):
    """`oapl check CODE --gpus 1 --gpu-memory 80GiB` exits 2 naming memory (no network: the shipped shapes)."""
    import oapl.data.tasks
    from oapl.cli.main import main

    def no_network(*a, **k):
        raise RuntimeError("task.dataset: no network here")

    monkeypatch.setattr(oapl.data.tasks, "build_task", no_network)
    monkeypatch.setattr("oapl.preflight._vllm_status", lambda cfg: "not checked (importing vLLM takes seconds)")
    assert main(["check", str(CODE), "--no-hub", "--gpus", "1", "--gpu-memory", "80GiB"]) == 2
    out = capsys.readouterr().out
    assert "GPU memory: a trainer rank needs 263.8 GB" in out and "distributed.trainer_workers=6" in out
    assert "the plan, which does not fit:" in out and "checkpoint_size:" in out


def test_math_config_fits_one_node_with_engines_and_trainer_ranks():
    cfg = load_config(MATH)
    plan, problems = plan_memory(cfg, shapes_table()[cfg.model.name], 18_432, Hardware(8, 80 * GiB, "flags"))
    assert problems == [] and plan["fits"]
    assert "4 engine(s) on 4 GPU(s)" in plan["layout"] and plan["trainer_rank"]["parallel"] == "fsdp (4 ranks)"


def test_optimiser_steps_per_sync_window_line():
    from oapl.check import _plan

    plan, _ = _plan(load_config(MATH), 100, None)
    assert plan["optimiser_steps_per_sync_window"] == "100 (L = 50 trainer steps x 2 mini-batches)"
    plan, _ = _plan(load_config(MATH, ["offline.data=somewhere"]), 100, None)
    assert plan["optimiser_steps_per_sync_window"].startswith("no sync within an offline epoch")
