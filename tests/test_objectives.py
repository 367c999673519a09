"""OAPL / GRPO objectives against hand-computed values, limits and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from oapl.objectives import (
    group_normalized_advantage,
    grpo_loss,
    oapl_loss,
    optimal_advantage,
    optimal_value,
    sequence_log_ratio,
)


def test_optimal_value_hand_computed():
    r = torch.tensor([0.0, 1.0])
    # beta1 = 1: log((e^0 + e^1) / 2)
    assert optimal_value(r, 1.0).item() == pytest.approx(math.log((1 + math.e) / 2), abs=1e-7)
    # beta1 = 0.5: 0.5 * log((1 + e^2) / 2)
    assert optimal_value(r, 0.5).item() == pytest.approx(0.5 * math.log((1 + math.e**2) / 2), abs=1e-7)


def test_optimal_value_limits():
    r = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.2, 0.4, 0.9, 0.1, 0.0]])
    assert torch.allclose(optimal_value(r, 1e-4), r.max(dim=-1).values, atol=1e-3)
    assert torch.allclose(optimal_value(r, 1e6), r.mean(dim=-1), atol=1e-5)
    # all-equal rewards: V* is that reward for any beta1
    same = torch.full((4,), 0.7)
    for b in (0.01, 1.0, 100.0):
        assert optimal_value(same, b).item() == pytest.approx(0.7, abs=1e-6)


def test_optimal_value_is_stable_for_large_rewards():
    r = torch.tensor([1000.0, 999.0])
    v = optimal_value(r, 0.01)  # exp(1e5) overflows without logsumexp
    assert torch.isfinite(v)
    assert v.item() == pytest.approx(1000.0 - 0.01 * math.log(2), abs=1e-4)


def test_optimal_value_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta1"):
        optimal_value(torch.zeros(3), 0.0)


def test_optimal_advantage_per_group():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    a = optimal_advantage(r, 1.0)
    v0 = math.log((math.e + 1) / 2)
    assert torch.allclose(a[0], torch.tensor([1 - v0, -v0]), atol=1e-6)
    assert torch.allclose(a[1], torch.zeros(2), atol=1e-6)


def test_oapl_loss_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([0.3, -0.2])
    # s = [(-1+1.5) + (-2+1) , (-0.5+1)] = [-0.5, 0.5]
    assert torch.allclose(sequence_log_ratio(logp, ref, mask), torch.tensor([-0.5, 0.5]))
    beta2 = 0.1
    expected = ((0.1 * -0.5 - 0.3) ** 2 + (0.1 * 0.5 + 0.2) ** 2) / 2
    assert oapl_loss(logp, ref, mask, adv, beta2).item() == pytest.approx(expected, rel=1e-6)


def test_oapl_loss_ignores_padding_values():
    logp = torch.tensor([[-1.0, 123.0]])
    ref = torch.tensor([[-1.0, -50.0]])
    mask = torch.tensor([[1.0, 0.0]])
    assert oapl_loss(logp, ref, mask, torch.tensor([0.5]), 1.0).item() == pytest.approx(0.25)


def test_oapl_loss_micro_batches_sum_to_full_batch():
    torch.manual_seed(0)
    logp = torch.randn(6, 5, requires_grad=True)
    ref = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    adv = torch.randn(6)
    full = oapl_loss(logp, ref, mask, adv, 0.5)
    (g_full,) = torch.autograd.grad(full, logp)
    parts = sum(
        oapl_loss(logp[i : i + 2], ref[i : i + 2], mask[i : i + 2], adv[i : i + 2], 0.5, num_sequences=6)
        for i in range(0, 6, 2)
    )
    (g_parts,) = torch.autograd.grad(parts, logp)
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(g_full, g_parts, atol=1e-7)


def test_oapl_gradient_matches_finite_differences_on_tiny_model(char_tokenizer):
    from conftest import build_tiny_model

    from oapl.trainer.logprobs import sequence_batch, token_logprobs

    model = build_tiny_model(len(char_tokenizer), seed=1, dtype=torch.float64)
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, 12], [13, 14, 15, 16]]
    ref = [[-4.0, -4.1, -3.9], [-4.2, -4.0, -3.8, -4.4]]
    batch = sequence_batch(prompts, responses, ref, pad_token_id=0)
    batch.ref_logprobs = batch.ref_logprobs.double()
    adv = torch.tensor([0.4, -0.3], dtype=torch.float64)

    def loss_fn():
        lp, _ = token_logprobs(model, batch, temperature=0.7, chunk_size=3)
        return oapl_loss(lp.double(), batch.ref_logprobs, batch.response_mask, adv, beta2=0.5)

    # compute log-probs in float64 end to end
    import oapl.trainer.logprobs as lpmod

    orig = lpmod._chunk_logprobs

    def chunk64(hidden, targets, weight, bias, inv_temp, with_entropy=True):
        logits = torch.nn.functional.linear(hidden, weight, bias) * inv_temp
        logz = torch.logsumexp(logits, dim=-1)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz, torch.zeros_like(logz)

    from transformers.models.llama import modeling_llama

    orig_norm = modeling_llama.LlamaRMSNorm.forward

    def norm64(self, x):  # transformers' RMSNorm upcasts to float32 only; keep float64 here
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    lpmod._chunk_logprobs = chunk64
    modeling_llama.LlamaRMSNorm.forward = norm64
    try:
        loss = loss_fn()
        params = {n: p for n, p in model.named_parameters()}
        names = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.embed_tokens.weight",
        ]
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        eps = 1e-6
        for name, g in zip(names, grads):
            p = params[name]
            for idx in [(0, 0), (3, 5), (11, 2)]:
                with torch.no_grad():
                    old = p[idx].item()
                    p[idx] = old + eps
                    up = loss_fn().item()
                    p[idx] = old - eps
                    down = loss_fn().item()
                    p[idx] = old
                fd = (up - down) / (2 * eps)
                assert g[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, idx)
    finally:
        lpmod._chunk_logprobs = orig
        modeling_llama.LlamaRMSNorm.forward = orig_norm


def test_group_normalized_advantage_hand_computed():
    a = group_normalized_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert torch.allclose(group_normalized_advantage(torch.ones(3)), torch.zeros(3))


def test_grpo_loss_hand_computed_with_clip_and_is_cap():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5 against old = 0
    old = torch.zeros(1, 2)
    inf = torch.tensor([[math.log(0.25), 0.0]])  # w = exp(0 - log .25) = 4 -> capped at 2 ; w = 1
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    loss, stats = grpo_loss(logp, old, inf, mask, adv, clip_eps=0.2, is_cap=2.0)
    # token 0: min(1.5, 1.2) * 1 = 1.2, weight 2 -> -2.4 ; token 1: min(0.5, 0.8) = 0.5, weight 1 -> -0.5
    assert loss.item() == pytest.approx((-2.4 - 0.5) / 2, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    # without correction
    loss_plain, _ = grpo_loss(logp, old, None, mask, adv, clip_eps=0.2, is_cap=None)
    assert loss_plain.item() == pytest.approx((-1.2 - 0.5) / 2, rel=1e-6)
