"""The GRPO(+IS) baseline: objectives against hand-computed values, and the loop's off-by-one asynchrony."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from oapl.config import ConfigError, load_config
from conftest import tiny_config
from oapl.objectives import group_normalized_advantage, grpo_loss


LOG = math.log


# ------------------------------------------------------------------------------------------------
# group-normalised advantages
# ------------------------------------------------------------------------------------------------


def test_advantage_one_correct_of_four_hand_computed():
    # mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330127
    a = group_normalized_advantage(torch.tensor([1.0, 0.0, 0.0, 0.0]), eps=0.0)
    std = math.sqrt(0.25 * 0.75)
    assert torch.allclose(a, torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]), atol=1e-6)
    assert a.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_advantage_per_group_mean_only_and_degenerate_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 3.0]])
    a = group_normalized_advantage(r)  # default eps=1e-6
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))  # all-equal rewards: no signal, no NaN
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    assert torch.allclose(a[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / std, atol=1e-5)
    # Dr. GRPO: mean subtracted, not scaled
    assert torch.allclose(group_normalized_advantage(r, scale=False)[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


# ------------------------------------------------------------------------------------------------
# grpo_loss: clip, importance-weight cap, length normalisation
# ------------------------------------------------------------------------------------------------


def _loss(logp, old, inf, mask, adv, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, inf, mask, adv, **kw)
    loss.backward()
    return loss.item(), logp.grad, stats


def test_clip_with_positive_advantage():
    # ratios 1.5 and 0.5 against old = 0 ; A = +1 ; no IS correction
    logp = torch.tensor([[LOG(1.5), LOG(0.5)]])
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])
    loss, grad, stats = _loss(logp, old, None, mask, adv, clip_eps=0.2, is_cap=None)
    # token 0: min(1.5, 1.2) = 1.2 (clipped: no gradient) ; token 1: min(0.5, 0.8) = 0.5 (unclipped)
    assert loss == pytest.approx(-(1.2 + 0.5) / 2, rel=1e-6)
    # d/dlogp of -rho*A/len = -rho*A/len: only the unclipped token gets it
    assert grad[0, 0].item() == 0.0
    assert grad[0, 1].item() == pytest.approx(-0.5 / 2, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)


def test_clip_with_negative_advantage_is_pessimistic():
    # A = -1: min(rho*A, clip(rho)*A) keeps the *larger* |loss|; clipping binds when rho < 1 - eps
    logp = torch.tensor([[LOG(1.5), LOG(0.5), LOG(1.1)]])
    old, mask, adv = torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([-1.0])
    loss, grad, stats = _loss(logp, old, None, mask, adv, clip_eps=0.2, is_cap=None)
    # token 0: min(-1.5, -1.2) = -1.5 unclipped (ratio above 1+eps is NOT clipped for A < 0)
    # token 1: min(-0.5, -0.8) = -0.8 clipped (no gradient)
    # token 2: min(-1.1, -1.1) = -1.1 inside the range
    assert loss == pytest.approx((1.5 + 0.8 + 1.1) / 3, rel=1e-6)
    assert grad[0, 0].item() == pytest.approx(1.5 / 3, rel=1e-6)  # -(rho * A)/len, A = -1
    assert grad[0, 1].item() == 0.0
    assert grad[0, 2].item() == pytest.approx(1.1 / 3, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)


def test_importance_weight_is_truncated_at_the_cap_and_not_raised():
    # rho = 1 everywhere (one update per batch: old = current); w = exp(old - inf)
    old = torch.tensor([[0.0, 0.0, 0.0, LOG(0.3)]])
    logp = old.clone()
    inf = torch.tensor([[LOG(0.25), 0.0, LOG(2.0), LOG(0.3)]])  # w = 4 -> 2 (cap), 1, 0.5 (kept), 1
    mask, adv = torch.ones(1, 4), torch.tensor([2.0])
    loss, grad, stats = _loss(logp, old, inf, mask, adv, clip_eps=0.2, is_cap=2.0)
    w = torch.tensor([2.0, 1.0, 0.5, 1.0])
    assert loss == pytest.approx(-(w * 2.0).sum().item() / 4, rel=1e-6)
    assert torch.allclose(grad[0], -w * 2.0 / 4, atol=1e-6)  # d/dlogp of -w*rho*A/len at rho = 1
    assert stats["is_weight_mean"].item() == pytest.approx(w.mean().item(), rel=1e-6)
    # another cap
    loss3, _, st3 = _loss(logp, old, inf, mask, adv, clip_eps=0.2, is_cap=3.0)
    assert st3["is_weight_mean"].item() == pytest.approx((3.0 + 1.0 + 0.5 + 1.0) / 4, rel=1e-6)
    # the weight is a constant: no gradient flows into the engine's (or old) log-probs
    inf_req = inf.clone().requires_grad_(True)
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, inf_req, mask, adv, is_cap=2.0)[0].backward()
    assert inf_req.grad is None or torch.count_nonzero(inf_req.grad) == 0


def test_no_correction_when_cap_is_none_or_no_engine_logprobs():
    logp = torch.tensor([[LOG(1.1), LOG(0.95)]])
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])
    inf = torch.tensor([[-3.0, 2.0]])
    a, ga, sa = _loss(logp, old, inf, mask, adv, is_cap=None)
    b, gb, sb = _loss(logp, old, None, mask, adv, is_cap=2.0)
    assert a == pytest.approx(-(1.1 + 0.95) / 2, rel=1e-6) and b == pytest.approx(a, rel=1e-7)
    assert torch.equal(ga, gb)
    assert sa["is_weight_mean"].item() == 1.0 and sb["is_weight_mean"].item() == 1.0


def test_per_sequence_length_normalisation_and_padding():
    # sequence 0 has 1 token, sequence 1 has 3; padding carries garbage that must not matter
    logp = torch.tensor([[0.0, 7.0, -9.0], [0.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, -5.0, 3.0], [0.0, 0.0, 0.0]])
    inf = torch.tensor([[LOG(0.5), 11.0, -4.0], [0.0, LOG(0.5), 0.0]])  # w: seq0 [2 (cap)]; seq1 [1, 2, 1]
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -0.5])
    loss, grad, stats = _loss(logp, old, inf, mask, adv, clip_eps=0.2, is_cap=2.0)
    seq0 = -2.0 * 1.0 / 1  # one token, w = 2, rho = 1
    seq1 = -(1.0 + 2.0 + 1.0) * -0.5 / 3
    assert loss == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # the long sequence's tokens get 1/3 of the weight a lone token gets (length normalisation)
    assert grad[0, 0].item() == pytest.approx(-2.0 / 2, rel=1e-6)
    assert grad[1, 0].item() == pytest.approx(0.5 / 3 / 2, rel=1e-6)
    assert grad[0, 1].item() == 0.0 and grad[0, 2].item() == 0.0  # padding
    assert stats["is_weight_mean"].item() == pytest.approx((2 + 1 + 2 + 1) / 4, rel=1e-6)


def test_micro_batches_sum_to_the_full_batch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 5, generator=g)
    old = logp + 0.1 * torch.randn(6, 5, generator=g)
    inf = old + 0.3 * torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    adv = torch.randn(6, generator=g)
    full, _ = grpo_loss(logp, old, inf, mask, adv, is_cap=2.0)
    parts = sum(
        grpo_loss(logp[s], old[s], inf[s], mask[s], adv[s], is_cap=2.0, num_sequences=6)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    )
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# GRPO in the training loop: IS against the engine, off-by-one asynchrony, plain on-policy GRPO
# ------------------------------------------------------------------------------------------------


def char_code(prompts, completions, **_):
    """Dense toy reward (mean character code / 128): every group has reward variance, so every step moves."""
    return [sum(map(ord, c)) / max(1, len(c)) / 128.0 for c in completions]


def grpo_cfg(tiny_model_dir, prompts_file, out, **over):
    """GRPO+IS with off-by-one asynchrony: sync every step, groups one version old still used."""
    return tiny_config(
        tiny_model_dir,
        prompts_file,
        out,
        **{
            "algorithm.name": "grpo",
            "algorithm.is_cap": 2.0,
            "rollout.prompts_per_step": 2,
            "rollout.sync_interval": 1,
            "rollout.max_staleness": 1,
            "rollout.buffer_groups": 8,
            **over,
        },
    )


def rows_of(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_off_by_one_staleness_is_used_and_corrected(tiny_model_dir, prompts_file, tmp_path):
    """4 prompts generated per engine call, 2 used per step, sync every step, staleness 1 allowed:
    every other batch comes from the previous weights (lag 1), and its IS weights are not 1."""
    from oapl.loop import Run

    cfg = grpo_cfg(tiny_model_dir, prompts_file, tmp_path / "run", **{"task.reward": "test_grpo:char_code"})
    trainer = Run.for_config(cfg)
    try:
        trainer.train()
        assert trainer.buffer.cleared == 0  # nothing was too old to use
    finally:
        trainer.close()
    rows = rows_of(tmp_path / "run")
    assert [r["lag"] for r in rows] == [0, 1, 0, 1, 0, 1]
    assert [r["weight_version"] for r in rows] == [0, 0, 2, 2, 4, 4]
    for r in rows:
        assert r["is_weight_mean"] <= 2.0 + 1e-6 and r["clip_frac"] == 0.0
    fresh = [r for r in rows if r["lag"] == 0]
    stale = [r for r in rows if r["lag"] == 1]
    # fresh data: trainer == engine weights, so every token weight w = pi_old / pi_inf is 1 up to numerics
    assert all(abs(r["is_weight_mean"] - 1.0) < 1e-4 and r["logprob_absdiff_mean"] < 1e-4 for r in fresh)
    # one step stale: the trainer moved, so the token weights |log w| = |log pi_old - log pi_inf| are
    # not 0 (their mean over tokens sampled from pi_inf stays near 1: E_{pi_inf}[pi_old / pi_inf] = 1)
    assert all(r["logprob_absdiff_mean"] > 1e-3 and r["kl"] > 1e-6 for r in stale)


@pytest.mark.slow  # trains the tiny model through the loop: up to ~30 s on a loaded 2-core machine
def test_zero_staleness_drops_the_leftovers(tiny_model_dir, prompts_file, tmp_path):
    from oapl.loop import Run

    cfg = grpo_cfg(tiny_model_dir, prompts_file, tmp_path / "run", **{"rollout.max_staleness": 0})
    trainer = Run.for_config(cfg)
    try:
        trainer.train()
        assert trainer.buffer.cleared == 12  # 4 generated, 2 used, 2 dropped at each of the 6 syncs
    finally:
        trainer.close()
    assert [r["lag"] for r in rows_of(tmp_path / "run")] == [0] * 6


def test_asynchronous_off_by_one_never_exceeds_one_version(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """The background worker, L=1, max_staleness=1: the data of every step comes from weights at most
    one step old (the configuration `oapl compare` uses for GRPO+IS)."""
    from oapl.loop import Run
    from oapl.trainer.policy import Policy

    seen = []
    orig = Policy.train_step

    def spy(self, groups):
        seen.append([g.version for g in groups])
        return orig(self, groups)

    monkeypatch.setattr(Policy, "train_step", spy)
    cfg = grpo_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=8,
        **{"rollout.asynchronous": True, "rollout.prompts_per_generate": 1, "rollout.buffer_groups": 4},
    )
    trainer = Run.for_config(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(seen) == 8
    for step, versions in enumerate(seen):  # before step `step` the engine holds version `step`
        assert all(step - 1 <= v <= step for v in versions), (step, versions)
    rows = rows_of(tmp_path / "run")
    assert all(r["lag"] in (0, 1) for r in rows)
    assert all(math.isfinite(r["loss"]) and r["is_weight_mean"] <= 2.0 + 1e-6 for r in rows)


@pytest.mark.slow  # trains the tiny model through the loop: up to ~30 s on a loaded 2-core machine
def test_plain_on_policy_grpo_without_correction(tiny_model_dir, prompts_file, tmp_path):
    from oapl.loop import train

    cfg = grpo_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=4,
        **{"algorithm.is_cap": None, "rollout.max_staleness": 0, "rollout.prompts_per_generate": 2},
    )
    assert cfg.algorithm.is_cap is None
    train(cfg)
    rows = rows_of(tmp_path / "run")
    assert [r["lag"] for r in rows] == [0, 0, 0, 0]
    assert all(r["is_weight_mean"] == 1.0 for r in rows)  # no weights at all
    assert all("baseline_mean" in r and "v_star_mean" not in r for r in rows)


@pytest.mark.slow  # trains the tiny model through the loop: up to ~30 s on a loaded 2-core machine
def test_grpo_learns_the_toy_task(tiny_model_dir, prompts_file, tmp_path):
    from oapl.loop import train

    cfg = grpo_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=16,
        **{
            "task.reward": "test_grpo:char_code",
            "rollout.group_size": 8,
            "rollout.prompts_per_step": 2,
            "rollout.prompts_per_generate": 2,
        },
    )
    train(cfg)
    rows = rows_of(tmp_path / "run")
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first + 0.1, (first, last)


def test_staleness_config_rules(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="max_staleness"):
        grpo_cfg(tiny_model_dir, prompts_file, tmp_path / "x", **{"algorithm.name": "oapl"})
    # GRPO+IS compares the trainer's full softmax with the engine's: top-p < 1 is refused, as for OAPL
    with pytest.raises(ConfigError, match="top_p"):
        grpo_cfg(tiny_model_dir, prompts_file, tmp_path / "x", **{"sampling.top_p": 0.9})
    cfg = grpo_cfg(tiny_model_dir, prompts_file, tmp_path / "x", **{"sampling.top_p": 0.9, "algorithm.is_cap": None})
    assert cfg.rollout.max_staleness == 1  # plain GRPO (no IS correction) tolerates top-p < 1 and staleness


# ------------------------------------------------------------------------------------------------
# the paper's GRPO+IS: two mini-batches per batch, pi_old from the start of the batch
# ------------------------------------------------------------------------------------------------


def test_two_mini_batches_make_the_clip_act(tiny_model_dir, tmp_path):
    from test_packing import _groups

    from oapl.trainer.policy import Policy

    def step(mini_batches):
        cfg = load_config(
            None,
            [
                f"output_dir={tmp_path / str(mini_batches)}",
                f"model.name={tiny_model_dir}",
                "algorithm.name=grpo",
                f"algorithm.mini_batches={mini_batches}",
                "algorithm.clip_eps=0.05",
                "optim.lr=3e-2",
                "optim.max_grad_norm=null",
                "optim.micro_batch_size=4",
                "model.logprob_chunk_size=16",
            ],
        )
        torch.manual_seed(0)
        policy = Policy(cfg, total_steps=3)
        m = policy.train_step(_groups(n_groups=4, g=4, seed=1))
        return m, policy

    one, _ = step(1)
    assert one["clip_frac"] == 0.0 and one["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    two, policy = step(2)
    # the second mini-batch is scored against pi_old = the weights before the first update
    assert two["clip_frac"] > 0.0 and two["ratio_max"] > 1.05
    assert policy.optimizer.state[next(iter(policy.optimizer.state))]["step"] == 2  # two optimiser steps
    assert policy.scheduler.last_epoch == 2


def test_mini_batches_need_enough_groups(tiny_model_dir, tmp_path):
    from test_packing import _groups

    from oapl.trainer.policy import Policy

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.name={tiny_model_dir}", "algorithm.mini_batches=3"])
    with pytest.raises(ValueError, match="algorithm.mini_batches=3 needs at least 3 prompt groups"):
        Policy(cfg, total_steps=1).train_step(_groups(n_groups=2))


def test_mini_batches_above_prompts_per_step_are_refused_by_the_config(tiny_model_dir, tmp_path):
    # refused when the config is read, not after the run has started (a mini-batch is whole groups)
    with pytest.raises(ConfigError, match=r"algorithm.mini_batches=2 .*rollout.prompts_per_step=1"):
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                f"model.name={tiny_model_dir}",
                "algorithm.name=grpo",
                "algorithm.mini_batches=2",
                "rollout.prompts_per_step=1",
            ],
        )
