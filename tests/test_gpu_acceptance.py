"""benchmarks/gpu_acceptance.py: its arithmetic by hand, its shipped shapes, and its CPU mode end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def ga():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_flops_hand_values(ga):
    # 6 N T = 6 * 10 * (2 + 3) = 300; causal attention 6 L d sum t^2 = 6 * 2 * 4 * (4 + 9) = 624
    assert ga.train_flops(10, [2, 3], layers=2, d_attn=4) == 924.0


def _adamw_side(w0: torch.Tensor, g: torch.Tensor, loss: float, lr: float = 1e-6) -> dict:
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    return {
        "loss": loss,
        "grad_norm": float(g.norm()),
        "grads": {"w": g.clone()},
        "before": {"w": w0.clone()},
        "after": {"w": p.detach().clone()},
    }


def test_compare_steps_same_step_passes_and_a_scaled_gradient_fails(ga):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, generator=gen) * 0.02
    g = torch.randn(64, generator=gen)
    ref = _adamw_side(w0, g, 0.25)
    same = ga.compare_steps(ref, _adamw_side(w0, g, 0.25), torch.float32, layers=2, lr=1e-6)
    assert same["ok"] and same["max_grad_rel_diff"] == 0.0 and same["update_entries_checked_frac"] > 0.9
    # fp32, k = 2 (2 + 2) = 8: a relative change of 1e-7 (< 8 * 2**-24 = 4.8e-7) is a reordering, 1e-5 is not
    assert ga.compare_steps(ref, _adamw_side(w0, g * (1 + 1e-7), 0.25), torch.float32, 2, 1e-6)["ok"]
    assert not ga.compare_steps(ref, _adamw_side(w0, g * (1 + 1e-5), 0.25), torch.float32, 2, 1e-6)["ok"]
    # a gradient x W (a world-size slip): AdamW's first step hides it in the update, not in the gradient
    doubled = ga.compare_steps(ref, _adamw_side(w0, 2 * g, 0.25), torch.bfloat16, 2, 1e-6)
    assert not doubled["ok"] and any("gradient of w" in p for p in doubled["problems"])
    assert not ga.compare_steps(ref, _adamw_side(w0, g, 0.5), torch.bfloat16, 2, 1e-6)["ok"]  # the loss


def test_layout_verdict_against_the_bf16_noise(ga):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    fp32 = torch.zeros(1, 4)
    padded = torch.tensor([[0.01, -0.01, 0.01, 5.0]])  # noise RMS 0.01 on the 3 response tokens; padding ignored
    ok = ga.layout_verdict(padded + 0.015, padded, fp32, mask)
    assert ok["ok"] and ok["ratio"] == pytest.approx(1.5) and ok["tokens"] == 3
    bad = ga.layout_verdict(padded + 0.05, padded, fp32, mask)  # 5x the noise: a layout bug
    assert not bad["ok"] and bad["ratio"] == pytest.approx(5.0)
    no_amp = ga.layout_verdict(fp32, fp32, fp32, mask)  # bf16 path identical to fp32: autocast off
    assert not no_amp["ok"] and "autocast" in no_amp["why"]


def test_shipped_configs_are_qwen3_and_the_big_one_is_the_table_shape(ga):
    from transformers import AutoConfig

    from oapl.memory_plan import count_params, shape_from_config, shapes_table

    def load(name):
        d = json.loads((ROOT / "benchmarks" / "configs" / name).read_text())
        return d, AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})

    big_json, big = load(ga.MODES["cuda"]["config"])
    tiny_json, tiny = load(ga.MODES["cpu"]["config"])
    assert big_json["architectures"] == tiny_json["architectures"] == ["Qwen3ForCausalLM"]
    assert type(big) is type(tiny)
    assert count_params(shape_from_config(big, "test")) == shapes_table()["Qwen/Qwen3-1.7B"].params


@pytest.mark.parametrize("gpu_bytes", [150e9, 85e9])  # an H200 (141 GB) and an H100 (80 GB) as torch reports them
def test_token_budget_and_micro_batch_are_what_the_memory_plan_fits(ga, tmp_path, monkeypatch, gpu_bytes):
    """CUDA mode sizes its micro-batches from oapl.memory_plan: 2 capped sequences when they fit in 90 % of
    the GPU (the H200), else fewer tokens and one sequence per micro-batch (the H100)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from oapl.memory_plan import count_params, shape_from_config, trainer_rank

    d = json.loads((ROOT / "benchmarks" / "configs" / "qwen3-1.7b.json").read_text())
    hf = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    b = object.__new__(ga.Bench)
    b.device, b.cuda, b.mode, b.tmp, b.model_dir = (
        torch.device("cuda"),
        True,
        SimpleNamespace(**ga.MODES["cuda"]),
        tmp_path,
        tmp_path,
    )
    b.model = SimpleNamespace(config=hf)
    b.n_params = count_params(shape_from_config(hf, "test"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=gpu_bytes))
    budget = ga.pick_budget(b)
    seq = b.mode.cap + b.mode.prompt
    cfg = b.cfg(**{"optim.max_tokens_per_micro_batch": budget, "optim.micro_batch_size": 1024})
    planned = trainer_rank(cfg, b.shape(), seq, True, tokens=budget)["total"]
    assert planned <= 0.9 * gpu_bytes
    if gpu_bytes > 100e9:
        assert budget == 2 * seq - b.mode.prompt and b.micro == 2  # two capped responses + one prompt
    else:
        assert seq <= budget < 2 * seq - b.mode.prompt and b.micro == 1
        assert trainer_rank(cfg, b.shape(), seq, True, tokens=budget + 512)["total"] > 0.9 * gpu_bytes


def test_time_limit_stops_starting_configs(ga):
    import time
    from types import SimpleNamespace

    now = time.perf_counter()
    assert ga.late(SimpleNamespace(a=SimpleNamespace(time_limit_s=100.0), t_start=now)) is None
    assert "time limit" in ga.late(SimpleNamespace(a=SimpleNamespace(time_limit_s=100.0), t_start=now - 71))
    assert ga.late(SimpleNamespace(a=SimpleNamespace(time_limit_s=0.0), t_start=now - 1e6)) is None  # no limit


@pytest.mark.slow
def test_cpu_mode_passes_with_every_field(tmp_path):
    """The whole CPU mode in a fresh process (~1 min on 2 busy cores): every check PASS or SKIP."""
    out = tmp_path / "acceptance.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["checks"]}
    assert {r["status"] for r in rows.values()} <= {"PASS", "SKIP"}, {
        n: r["reason"] for n, r in rows.items() if r["status"] == "FAIL"
    }
    assert proc.returncode == 0 and report["failed"] == []
    expected = {"memory", "update_share", "packed_vs_padded", "fsdp2_one_rank", "mfu_target"} | {
        f"step:{c}"
        for c in ("packed", "packed+budget", "padded", "reference", "fused-off", "compile", "liger", "all-on")
    }
    assert expected <= set(rows)
    for name in ("memory", "update_share", "packed_vs_padded", "fsdp2_one_rank"):
        assert rows[name]["status"] == "PASS", rows[name]
    assert rows["update_share"]["share"] >= 0.99 and rows["update_share"]["weights_with_grad"] > 0
    assert rows["packed_vs_padded"]["ratio"] <= 2.0 and rows["packed_vs_padded"]["rms_bf16_minus_fp32"] > 0
    assert rows["fsdp2_one_rank"]["backend"] == "gloo" and rows["fsdp2_one_rank"]["dtensor_params"] > 0
    assert rows["memory"]["measured_gib"] > 0 and rows["memory"]["planned_gib"] > 0
    for name in ("packed", "packed+budget", "padded", "reference", "fused-off"):
        r = rows[f"step:{name}"]
        assert r["status"] == "PASS"
        for field in ("step_s", "useful_tok_per_s", "eff_mfu", "flops", "loss", "peak_gib", "padding_frac"):
            assert isinstance(r[field], float), (name, field)
    # packed computes (almost) no padding: only where optim.share_prompts=auto picks the shared-prompt layout
    assert rows["step:packed+budget"]["padding_frac"] < rows["step:padded"]["padding_frac"]
    assert rows["step:packed"]["packing_active"] and not rows["step:padded"]["packing_active"]
    assert rows["step:liger"]["status"] == "SKIP" and "CUDA" in rows["step:liger"]["reason"]
    assert report["batch"]["useful_tokens"] == sum(report["batch"]["response_lengths"]) + 16 * report["batch"]["prompt"]
    for key in ("device", "torch", "transformers", "n_params", "peak_tflops", "config"):
        assert key in report
