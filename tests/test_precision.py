"""fp32 master weights under bf16 compute: every update is kept (issue 15).

bf16 compute runs on CPU too (autocast), so the GPU default is tested here.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from oapl.config import load_config
from oapl.trainer.precision import dropped_update_fraction

U = 2.0**-8  # bf16 unit roundoff


def test_dropped_update_fraction_hand_values():
    w = torch.nn.Parameter(torch.full((1000,), 0.02))
    # spacing of bf16 at 0.02 is 2**(floor(log2 0.02) - 7) = 2**-13 = 1.22e-4; half of it 6.1e-5
    assert dropped_update_fraction([w], 1e-6, torch.bfloat16) == 1.0
    assert dropped_update_fraction([w], 1e-4, torch.bfloat16) == 0.0
    assert dropped_update_fraction([w], 1e-6, torch.float32) == 0.0


def test_config_splits_storage_and_compute_and_keeps_the_old_name():
    cfg = load_config(None, ["model.dtype=bfloat16"])
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.param_dtype == "auto"
    from oapl.trainer.precision import resolve_precision

    p = resolve_precision(cfg.model, torch.device("cpu"))
    assert p.param_dtype == torch.float32 and p.compute_dtype == torch.bfloat16 and p.mixed
    assert p.export_dtype == torch.bfloat16
    auto = resolve_precision(load_config(None, []).model, torch.device("cpu"))
    assert auto.param_dtype == auto.compute_dtype == torch.float32  # CPU default: plain fp32
    with pytest.raises(ValueError, match="narrower"):
        resolve_precision(
            load_config(None, ["model.param_dtype=bfloat16", "model.compute_dtype=float32"]).model, torch.device("cpu")
        )


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, caplog):
    """The main job computes in bf16 (2.5x faster matmuls where the CPU has AVX512-BF16/AMX); where it
    has neither, bf16 is emulated and slower than fp32, and the run says so naming the field."""
    import oapl.trainer.precision as precision

    cfg = load_config(None, ["model.compute_dtype=bfloat16"])
    for native, warned in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="oapl.trainer.precision"):
            p = precision.resolve_precision(cfg.model, torch.device("cpu"))
        assert p.compute_dtype == torch.bfloat16  # a warning, never a silent change of what was asked
        assert ("model.compute_dtype=float32" in caplog.text) is warned, (native, caplog.text)
    monkeypatch.undo()
    assert precision.cpu_has_native_bf16() in (True, False, None)


def _groups(seed: int = 0):
    from oapl.rollout.buffer import RolloutGroup

    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(4):
        toks = [
            torch.randint(3, 60, (int(torch.randint(4, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(4)
        ]
        out.append(
            RolloutGroup(
                prompt_id=f"p{j}",
                prompt="x",
                prompt_token_ids=torch.randint(3, 60, (6,), generator=gen).tolist(),
                responses=["y"] * 4,
                response_token_ids=toks,
                response_logprobs=[(-torch.rand(len(t), generator=gen) * 4 - 1).tolist() for t in toks],
                rewards=[float((i + j) % 3 == 0) for i in range(4)],
                finish_reasons=["stop"] * 4,
                weights_id="tiny",
                version=0,
            )
        )
    return out


def _cfg(model_dir, out, **over):
    base = {
        "output_dir": str(out),
        "model.name": model_dir,
        "model.logprob_chunk_size": 16,
        "optim.lr": 1e-6,
        "optim.max_grad_norm": None,
        "algorithm.beta2": 0.1,
        "optim.micro_batch_size": 8,
    }
    base.update(over)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def _step(cfg, groups):
    """One step; returns (grads, weights before, weights after) under HF names."""
    from oapl.trainer.policy import Policy

    torch.manual_seed(0)
    policy = Policy(cfg, total_steps=2)
    named = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {}
    orig = policy.optimizer.step

    def spy(*a, **k):
        grads.update({n: p.grad.detach().float().clone() for n, p in named.items() if p.grad is not None})
        return orig(*a, **k)

    policy.optimizer.step = spy
    policy.train_step(groups)
    after = {n: p.detach().clone() for n, p in named.items()}
    return grads, before, after, policy


def _check_update(grads, before, after, ref_grads, ref_before, ref_after, lr, layers):
    """>= 99% of the weights with a gradient moved, and the update is the fp32 step's (derived bounds).

    bf16 compute rounds every matmul operand to 8 significant bits (unit roundoff u = 2**-8) and
    accumulates in fp32; through the 2 x ``layers`` + 2 matmul hops of forward and backward the error of
    a gradient entry is at most K u max|g| with K = 2 (2 layers + 2) -- measured: < 2 u. Where
    |g_fp32| > tau = 2 K u max|g| no sign can flip, and AdamW's first update -lr g / (|g| + eps)
    differs from the fp32 one by at most lr eps / tau; plus one fp32 ulp of w each side.
    """
    eps = 1e-8
    k = 2 * (layers + 2)
    moved = total = strong = 0
    for n, g in grads.items():
        nz = g != 0
        delta = (after[n] - before[n]).float()
        moved += int((delta[nz] != 0).sum())
        total += int(nz.sum())
        g_ref = ref_grads[n]
        assert float((g - g_ref).abs().max()) <= k * U * float(g_ref.abs().max()) + 1e-12, n
        tau = 2 * k * U * float(g_ref.abs().max())
        big = g_ref.abs() > tau
        strong += int(big.sum())
        ref_delta = (ref_after[n] - ref_before[n]).float()
        ulp = 2 * before[n].abs().float() * 2.0**-23 + 1e-15
        bound = lr * eps / max(tau, 1e-30) + ulp
        assert bool(((delta - ref_delta).abs() <= bound)[big].all()), n
        assert bool((torch.sign(delta) == torch.sign(ref_delta))[big].all()), n
    assert moved / total >= 0.99, moved / total
    assert strong / total >= 0.5  # the bound is checked on most weights, not a vacuous few


def test_bf16_compute_keeps_every_update_at_lr_1e6(tiny_model_dir, tmp_path):
    groups = _groups()
    g, b, a, policy = _step(_cfg(tiny_model_dir, tmp_path / "mp", **{"model.compute_dtype": "bfloat16"}), groups)
    assert policy.precision.mixed and all(p.dtype == torch.float32 for p in policy.model.parameters())
    for st in policy.optimizer.state.values():
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    # the engine gets the bf16 cast of the masters
    assert {t.dtype for _, t in policy.engine_weights()} == {torch.bfloat16}
    rg, rb, ra, _ = _step(_cfg(tiny_model_dir, tmp_path / "fp32", **{"model.compute_dtype": "float32"}), groups)
    _check_update(g, b, a, rg, rb, ra, lr=1e-6, layers=2)


def test_pure_bf16_storage_loses_updates_and_warns(tiny_model_dir, tmp_path, caplog):
    """The failure the default prevents, shown on the same step: bf16 storage keeps few updates."""
    groups = _groups()
    with caplog.at_level(logging.WARNING, logger="oapl.trainer.precision"):
        g, b, a, policy = _step(
            _cfg(
                tiny_model_dir,
                tmp_path / "bf16",
                **{"model.param_dtype": "bfloat16", "model.compute_dtype": "bfloat16"},
            ),
            groups,
        )
    assert any("rounds away" in r.getMessage() for r in caplog.records)
    moved = sum(int(((a[n] - b[n]) != 0)[g[n] != 0].sum()) for n in g)
    total = sum(int((g[n] != 0).sum()) for n in g)
    assert moved / total < 0.2


def test_lora_under_bf16_compute_keeps_adapter_updates(tiny_model_dir, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "lora",
        **{"model.compute_dtype": "bfloat16", "model.lora.enabled": True, "model.lora.r": 4, "optim.lr": 1e-6},
    )
    g, b, a, policy = _step(cfg, _groups())
    base = policy.model.get_base_model()
    frozen = {p.dtype for n, p in base.named_parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the frozen base is stored in the compute dtype
    assert all(a[n].dtype == torch.float32 for n in a)  # adapters: fp32 masters
    moved = sum(int(((a[n] - b[n]) != 0)[g[n] != 0].sum()) for n in g)
    total = sum(int((g[n] != 0).sum()) for n in g)
    assert total > 0 and moved / total >= 0.99


def test_checkpoint_keeps_fp32_masters_and_export_is_compute_dtype(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from oapl.trainer.checkpoint import save_checkpoint
    from oapl.trainer.policy import load_policy

    cfg = _cfg(tiny_model_dir, tmp_path / "run", **{"model.compute_dtype": "bfloat16"})
    _, _, after, policy = _step(cfg, _groups())
    ckpt = save_checkpoint(tmp_path / "run", 1, policy, {"step": 1}, "{}")
    saved = load_file(str(ckpt / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    restored, state = load_policy(cfg, 2, ckpt)
    assert state["step"] == 1
    for n, p in restored.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), after[n]), n  # bit-exact masters
    st0 = next(iter(restored.optimizer.state.values()))
    assert st0["exp_avg"].dtype == torch.float32 and int(st0["step"]) == 1
    out = policy.export(tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_activation_offload_saves_tensors_through_the_host_hooks_and_changes_nothing(
    tiny_model_dir, tmp_path, monkeypatch
):
    """model.activation_offload: the forward's saved tensors go through save_on_cpu's pack hook (on CPU a
    no-op copy, on CUDA a pinned host copy), and the step's gradients are bit for bit those without it."""
    packed = {"n": 0}
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counted(t):
                packed["n"] += 1
                return pack(t)

            self.pack_hook = counted

    base = {"model.gradient_checkpointing": True, "optim.share_prompts": "off"}
    g_plain, _, _, _ = _step(_cfg(tiny_model_dir, tmp_path / "a", **base), _groups())
    assert packed["n"] == 0
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    g_off, _, _, _ = _step(
        _cfg(tiny_model_dir, tmp_path / "b", **base, **{"model.activation_offload": True}), _groups()
    )
    assert packed["n"] > 0
    assert set(g_off) == set(g_plain) and all(torch.equal(g_off[n], g_plain[n]) for n in g_plain)
