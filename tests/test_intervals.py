"""Intervals over seeds, the paired bootstrap, per-prompt pass@k, the policy's entropy (claim verdicts:
tests/test_compare_claims.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oapl.compare.claims import ConfigResults, paired
from oapl.evaluation.intervals import Interval, paired_bootstrap, passk_matrix, seeds_needed, t_interval
from oapl.evaluation.passk import pass_at_k


def test_passk_matrix_matches_the_estimator_and_hand_values():
    counts = np.array([[0, 1, 3, 16], [8, 15, 2, 4]])
    ks = list(range(1, 17))
    m = passk_matrix(counts, 16, ks)
    assert m.shape == (2, 4, 16)
    for idx in np.ndindex(counts.shape):
        for j, k in enumerate(ks):
            assert m[idx + (j,)] == pytest.approx(pass_at_k(16, int(counts[idx]), k), abs=1e-12)
    # hand: n=16, c=1: pass@k = k/16; c=3, k=4: 1 - C(13,4)/C(16,4) = 1 - 715/1820
    assert m[0, 1, 3] == pytest.approx(4 / 16)
    assert m[0, 2, 3] == pytest.approx(1 - 715 / 1820)
    with pytest.raises(ValueError, match="correct counts"):
        passk_matrix(np.array([17]), 16, [1])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        passk_matrix(np.array([1]), 4, [5])


def test_t_interval_hand_computed():
    iv = t_interval([0.5, 0.6, 0.7])  # mean 0.6, sd 0.1, t_{0.975,2} = 4.303
    assert iv.mean == pytest.approx(0.6)
    assert iv.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    one = t_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.lo)  # one seed gives no interval
    assert t_interval([0.2, float("nan"), 0.4]).n == 2


def test_paired_bootstrap_constant_difference_is_exact():
    a = np.random.default_rng(0).random((3, 50))
    iv = paired_bootstrap(a + 0.1, a, reps=500)
    assert iv.mean == pytest.approx(0.1) and iv.lo == pytest.approx(0.1) and iv.hi == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same shape|one shape"):
        paired_bootstrap(a, a[:, :10])


def test_paired_bootstrap_one_seed_matches_the_normal_interval():
    # one seed: a prompt bootstrap of the mean of P iid differences. Its percentile interval is
    # mean +- 1.96 sd/sqrt(P) up to the bootstrap's Monte Carlo error (sd ~ 0.02 of the half-width at
    # 20000 replicates) and the skew of the mean of P=400 uniforms (O(1/sqrt(P)) = 5%): 10% covers both.
    rng = np.random.default_rng(1)
    d = rng.uniform(-1, 1, size=(1, 400))
    iv = paired_bootstrap(d, np.zeros_like(d), reps=20_000, seed=3)
    sd = d.std(ddof=0)
    assert iv.mean == pytest.approx(d.mean())
    assert iv.half_width == pytest.approx(1.96 * sd / math.sqrt(400), rel=0.10)


def test_paired_bootstrap_counts_the_seed_variance():
    # three seeds whose differences are +0.2, 0 and -0.2 on every prompt: the prompts alone say nothing,
    # the seeds say the mean difference is anywhere in [-0.2, 0.2]
    d = np.repeat(np.array([[0.2], [0.0], [-0.2]]), 64, axis=1)
    iv = paired_bootstrap(d, np.zeros_like(d), reps=4000)
    assert iv.mean == pytest.approx(0.0, abs=1e-12)
    assert iv.lo < -0.1 and iv.hi > 0.1 and iv.lo >= -0.2 and iv.hi <= 0.2
    assert iv.excludes_zero() == 0


def test_seeds_needed_scales_as_inverse_square():
    assert seeds_needed(Interval(0.0, -0.1, 0.1, 3), 3, 0.05) == 12
    assert seeds_needed(Interval(0.0, -0.01, 0.01, 3), 3, 0.05) == 3


def _cfg(name, group, counts, n=16):
    res = [{"n": n, "prompt_ids": [f"p{i}" for i in range(len(c))], "correct": list(c)} for c in counts]
    return ConfigResults(name, name, group, seeds=list(range(len(counts))), results=res)


def test_paired_refuses_different_prompts():
    a = _cfg("a", "algorithms", [[1, 2]])
    b = _cfg("b", "algorithms", [[1, 2]])
    b.results[0]["prompt_ids"] = ["x", "y"]
    with pytest.raises(ValueError, match="different held-out prompts"):
        paired(a, b, "pass@k", 1)


def test_policy_entropy_matches_a_direct_full_softmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from oapl.evaluation.entropy import policy_entropy
    from oapl.rollout.group import RolloutGroup

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    T = 0.7
    g1 = RolloutGroup(
        "a", "pa", [5, 6, 7], ["", ""], [[8, 9, 10], [11]], [[0.0] * 3, [0.0]], [0.0, 1.0], ["stop", "stop"], "w", 0
    )
    g2 = RolloutGroup(
        "b", "pb", [12, 13], ["", ""], [[14, 15], []], [[0.0] * 2, []], [1.0, 0.0], ["stop", "length"], "w", 0
    )
    got = policy_entropy(model, [g1, g2], T, max_tokens=6)  # small budget: several micro-batches

    def direct(prompt, resp):
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double() / T, -1)
        ent, nll = [], 0.0
        for j, tok in enumerate(resp):
            row = logp[len(prompt) - 1 + j]
            ent.append(float(-(row.exp() * row).sum()))
            nll -= float(row[tok])
        return ent, nll

    e1, n1 = direct([5, 6, 7], [8, 9, 10])
    e2, n2 = direct([5, 6, 7], [11])
    e3, n3 = direct([12, 13], [14, 15])
    # fp32 log-softmax against float64: ~1e-6 relative per token
    assert got["a"]["token_entropy"] == pytest.approx(sum(e1 + e2) / 4, rel=1e-5)
    assert got["a"]["seq_entropy"] == pytest.approx((n1 + n2) / 2, rel=1e-5)
    assert got["b"]["token_entropy"] == pytest.approx(sum(e3) / 2, rel=1e-5)
    assert got["b"]["seq_entropy"] == pytest.approx(n3 / 2, rel=1e-5)  # the empty response counts as 0
    assert got["b"]["response_tokens"] == 1.0
