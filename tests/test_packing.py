"""Packed variable-length micro-batches and token-budget planning (issue 10)."""

from __future__ import annotations

import json

import pytest
import torch

from oapl.config import load_config
from oapl.trainer.batching import balanced_partition, plan_micro_batches
from oapl.trainer.logprobs import sequence_batch, token_logprobs


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------


def test_balanced_partition_hand_example():
    # LPT: 9 -> p0, 7 -> p1, 6 -> p2, 5 -> p2 (6), 4 -> p1 (7), 2 -> p0 (9)... loads 11, 11, 11
    parts = balanced_partition([9, 7, 6, 5, 4, 2], 3)
    loads = sorted(sum([9, 7, 6, 5, 4, 2][i] for i in p) for p in parts)
    assert loads == [11, 11, 11]
    assert sorted(i for p in parts for i in p) == list(range(6))


def test_plan_respects_budget_and_is_balanced():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.distributions.LogNormal(7.3, 0.8).sample((64,)).clamp(64, 8192)).long().tolist()
    budget = 16384
    plan = plan_micro_batches(lengths, budget)
    assert sorted(i for mb in plan for i in mb) == list(range(64))  # every sequence exactly once
    loads = [sum(lengths[i] for i in mb) for mb in plan]
    assert all(x <= budget for x in loads)
    # the fewest micro-batches the budget allows, or one more (bin packing is not always exact)
    assert len(plan) <= -(-sum(lengths) // budget) + 1
    assert min(loads) >= 0.5 * max(loads)  # balanced, not greedy-fill-then-remainder
    del g


def test_plan_long_sequence_gets_its_own_micro_batch_and_caps_sequences():
    plan = plan_micro_batches([100, 5000, 100, 100, 100], max_tokens=1000)
    assert [1] in plan
    assert sorted(i for mb in plan for i in mb) == [0, 1, 2, 3, 4]
    capped = plan_micro_batches([10] * 10, max_tokens=1000, micro_batch_size=3)
    assert all(len(mb) <= 3 for mb in capped) and len(capped) == 4
    # without a budget: consecutive fixed-size runs (the previous behaviour)
    assert plan_micro_batches([5, 6, 7, 8, 9], None, 2) == [[0, 1], [2, 3], [4]]


# ------------------------------------------------------------------------------------------------
# packed == padded
# ------------------------------------------------------------------------------------------------


def _random_batch(vocab: int, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]
    responses = [
        torch.randint(3, vocab, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]
    responses[2] = []  # an empty response (cut at 0 tokens) contributes nothing
    ref = [(-torch.rand(len(r), generator=g) * 5).tolist() for r in responses]
    return prompts, responses, ref


def _logprobs_and_grads(model, prompts, responses, ref, packed: bool):
    from oapl.objectives import oapl_loss

    model.zero_grad(set_to_none=True)
    b = sequence_batch(prompts, responses, ref, packed=packed)
    lp, ent = token_logprobs(model, b, temperature=0.8, chunk_size=7, with_entropy=True)
    adv = torch.linspace(-1, 1, len(prompts))
    oapl_loss(lp, b.ref_logprobs, b.response_mask, adv, beta2=0.5).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent, grads, b


@pytest.mark.parametrize("variant", ["plain", "gradient_checkpointing", "lora"])
def test_packed_equals_padded_on_tiny_model(char_tokenizer, variant):
    from conftest import build_tiny_model

    from oapl.trainer.attention import enable_varlen

    model = build_tiny_model(len(char_tokenizer), seed=3)
    assert enable_varlen(model, "sdpa")
    if variant == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():  # B = 0 at init would make every adapter gradient trivial
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    prompts, responses, ref = _random_batch(len(char_tokenizer))
    lp_pad, ent_pad, g_pad, b_pad = _logprobs_and_grads(model, prompts, responses, ref, packed=False)
    lp_pack, ent_pack, g_pack, b_pack = _logprobs_and_grads(model, prompts, responses, ref, packed=True)
    assert b_pack.input_ids.shape[0] == 1 and b_pack.computed_tokens == b_pack.num_tokens  # no padding
    assert b_pad.computed_tokens > b_pad.num_tokens
    assert torch.equal(b_pack.response_mask, b_pad.response_mask)
    assert (lp_pack - lp_pad).abs().max() < 1e-5  # fp32 per-token log-probs
    assert (ent_pack - ent_pad).abs().max() < 1e-4
    assert set(g_pack) == set(g_pad) and g_pad
    for n in g_pad:
        scale = g_pad[n].abs().max().clamp(min=1e-6)
        assert ((g_pack[n] - g_pad[n]).abs().max() / scale) < 1e-4, n


def test_packed_attention_never_crosses_sequences(char_tokenizer):
    """A sequence's log-probs do not depend on what it is packed with."""
    from conftest import build_tiny_model

    from oapl.trainer.attention import enable_varlen

    model = build_tiny_model(len(char_tokenizer), seed=4)
    enable_varlen(model, "sdpa")
    prompts, responses, ref = _random_batch(len(char_tokenizer), n=4, seed=5)
    with torch.no_grad():
        alone = token_logprobs(model, sequence_batch(prompts[:1], responses[:1], ref[:1], packed=True))[0]
        together = token_logprobs(model, sequence_batch(prompts, responses, ref, packed=True))[0]
        other = [[7, 8, 9] * 5] + prompts[1:]
        changed = token_logprobs(
            model, sequence_batch(other[:1] + prompts[:1], [responses[1], responses[0]], [ref[1], ref[0]], packed=True)
        )[0]
    r = len(responses[0])
    assert torch.allclose(alone[0, :r], together[0, :r], atol=1e-6)
    assert torch.allclose(alone[0, :r], changed[1, :r], atol=1e-6)


def test_generation_on_a_packing_model_still_masks_padding(char_tokenizer):
    """The trainer's model (switched to packed attention) still serves padded generation."""
    from conftest import build_tiny_model

    from oapl.trainer.attention import enable_varlen

    plain = build_tiny_model(len(char_tokenizer), seed=6)
    packed = build_tiny_model(len(char_tokenizer), seed=6)
    enable_varlen(packed, "sdpa")
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=att).logits
        b = packed(input_ids=ids, attention_mask=att).logits
    assert torch.allclose(a[att.bool()], b[att.bool()], atol=1e-5)


@pytest.mark.slow
def test_packed_equals_padded_on_embedded_model():
    """The real SmolLM2-135M (30 layers, vocab 49K): packed log-probs equal padded ones in float64.

    The two layouts compute the same function and differ only in the order of floating-point sums
    (attention over one sequence vs. a padded row with masked keys; other matmul blocking). In fp32
    that order changes log-probs by up to ~1.5e-5 depending on the CPU's kernels, so an fp32
    comparison needs a bound that depends on the machine. In float64 the layout's maths is checked
    instead, with a worst-case bound from first-order forward-error analysis: a sum of ``n`` terms
    in unit roundoff ``u`` is off by at most ``n u`` relative to the magnitude it sums, and a
    log-prob goes through ``L`` decoder layers plus the LM head and log-sum-exp, each a reduction
    of at most ``n_max = max(hidden, intermediate, vocab)`` terms; the normalised residual stream
    keeps the magnitudes at the scale of the log-probs themselves. So two summation orders differ
    by at most ``2 (L + 1) n_max u64 max|log p|`` (~8e-9 here). A layout bug (a wrong position id,
    one sequence attending to another) moves log-probs by more than 1e-3.
    """
    from oapl.trainer.attention import enable_varlen
    from oapl.trainer.model import load_causal_lm, resolve_model_path

    model = load_causal_lm(resolve_model_path("embedded:smollm2-135m-instruct"), torch.float64, torch.device("cpu"))
    enable_varlen(model, "sdpa")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (12, 30, 7)]
    responses = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (40, 9, 25)]
    ref = [[-3.0] * len(r) for r in responses]
    with torch.no_grad():
        pad = token_logprobs(model, sequence_batch(prompts, responses, ref, packed=False), chunk_size=64)[0]
        pack = token_logprobs(model, sequence_batch(prompts, responses, ref, packed=True), chunk_size=64)[0]
    assert pad.dtype == pack.dtype == torch.float64  # the log-softmax stays in the model's float64
    c = model.config
    n_max = max(c.hidden_size, c.intermediate_size, c.vocab_size)
    bound = 2 * (c.num_hidden_layers + 1) * n_max * torch.finfo(torch.float64).eps / 2 * pad.abs().max().item()
    assert bound < 1e-6  # far below what a layout bug does
    assert (pad - pack).abs().max().item() <= bound


# ------------------------------------------------------------------------------------------------
# the train step: packing and token budgets change the speed, not the update
# ------------------------------------------------------------------------------------------------


def _groups(n_groups: int = 4, g: int = 4, seed: int = 0):
    from oapl.rollout.buffer import RolloutGroup

    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n_groups):
        prompt = torch.randint(3, 60, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
        toks = [
            torch.randint(3, 60, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(g)
        ]
        out.append(
            RolloutGroup(
                prompt_id=f"p{j}",
                prompt="x",
                prompt_token_ids=prompt,
                responses=["y"] * g,
                response_token_ids=toks,
                response_logprobs=[(-torch.rand(len(t), generator=gen) * 4 - 1).tolist() for t in toks],
                rewards=[float((i + j) % 3 == 0) for i in range(g)],
                finish_reasons=["stop"] * g,
                weights_id="tiny",
                version=0,
            )
        )
    return out


def step_cfg(tiny_model_dir, out, **over):
    base = {
        "output_dir": str(out),
        "model.name": tiny_model_dir,
        "model.logprob_chunk_size": 16,
        "optim.lr": 1e-3,
        "optim.max_grad_norm": None,
        "algorithm.beta2": 0.1,
    }
    base.update(over)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def _one_step(cfg, groups):
    from oapl.trainer.policy import Policy

    torch.manual_seed(0)
    policy = Policy(cfg, total_steps=4)
    grads = {}
    orig = policy.optimizer.step

    def spy(*a, **k):
        for n, p in policy.model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()
        return orig(*a, **k)

    policy.optimizer.step = spy
    metrics = policy.train_step(groups)
    return metrics, grads, policy


@pytest.mark.parametrize(
    "over",
    [
        {"optim.packing": True, "optim.micro_batch_size": 16, "optim.share_prompts": "off"},
        {
            "optim.packing": True,
            "optim.micro_batch_size": 16,
            "optim.max_tokens_per_micro_batch": 64,
            "optim.share_prompts": "off",
        },
        {"optim.packing": False, "optim.micro_batch_size": 16, "optim.max_tokens_per_micro_batch": 100},
        {"optim.packing": True, "optim.micro_batch_size": 16, "optim.share_prompts": "on"},
        {"optim.packing": False, "optim.micro_batch_size": 6, "optim.share_prompts": "on"},
    ],
)
def test_train_step_same_loss_and_gradient_as_padded(tiny_model_dir, tmp_path, over):
    groups = _groups()
    ref_m, ref_g, _ = _one_step(
        step_cfg(
            tiny_model_dir,
            tmp_path / "a",
            **{"optim.packing": False, "optim.micro_batch_size": 16, "optim.share_prompts": "off"},
        ),
        groups,
    )
    m, g, policy = _one_step(step_cfg(tiny_model_dir, tmp_path / "b", **over), groups)
    assert policy.packing == over["optim.packing"]
    assert m["loss"] == pytest.approx(ref_m["loss"], rel=1e-5)
    for k in ("kl", "entropy", "log_ratio_mean", "seq_entropy", "grad_norm"):
        assert m[k] == pytest.approx(ref_m[k], rel=1e-4, abs=1e-7), k
    for n in ref_g:
        scale = ref_g[n].abs().max().clamp(min=1e-8)
        assert ((g[n] - ref_g[n]).abs().max() / scale) < 1e-4, n
    if over.get("optim.share_prompts") == "on":
        # 4 groups x 4 responses: the micro-batch computes each prompt once
        assert policy.share_prompts == "on" and m["padding_frac"] > 0.0
    elif over["optim.packing"]:
        assert m["padding_frac"] == 0.0 and ref_m["padding_frac"] > 0.3


# ------------------------------------------------------------------------------------------------
# shared prompts: a group's prompt runs once, its responses share its KV cache
# ------------------------------------------------------------------------------------------------


def test_choose_layout_counts_tokens_by_hand():
    from oapl.trainer.batching import Sequence, choose_layout, layout_tokens

    # 4 responses of 3 tokens to one 10-token prompt: packed 4 x 13 = 52; shared 10 + 4 x 3 = 22
    group = [Sequence(list(range(10)), [1, 2, 3], [0.0] * 3) for _ in range(4)]
    assert layout_tokens(group, packed=True) == (52, 22)
    assert choose_layout(group, packed=True, share_prompts="auto") == "shared"
    assert choose_layout(group, packed=True, share_prompts="off") == "packed"
    # 2 responses of 30 and 2 tokens to a 2-token prompt: packed 36; shared 2 + 2 x 30 = 62 (padding)
    long = [Sequence([5, 6], list(range(30)), [0.0] * 30), Sequence([5, 6], [1, 2], [0.0] * 2)]
    assert layout_tokens(long, packed=True) == (36, 62)
    assert choose_layout(long, packed=True, share_prompts="auto") == "packed"
    assert choose_layout(long, packed=True, share_prompts="on") == "shared"
    # padded layout: 2 x 32 = 64 > 62
    assert choose_layout(long, packed=False, share_prompts="auto") == "shared"
    # no prompt repeats: nothing to share, whatever the mode
    distinct = [Sequence([i, 7, 7, 7], [1], [0.0]) for i in range(3)]
    assert choose_layout(distinct, packed=True, share_prompts="on") == "packed"


def test_collate_shared_layout():
    from oapl.trainer.batching import Sequence, collate_shared

    a, b = [4, 5, 6], [7, 8]
    seqs = [Sequence(a, [10, 11], [-1.0, -2.0]), Sequence(b, [12], [-3.0]), Sequence(a, [], [])]
    t = collate_shared(seqs, pad_token_id=0)
    assert t.shared and not t.packed
    assert t.prefix_ids.tolist() == [[4, 5, 6], [7, 8, 0]]
    assert t.prefix_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert t.prefix_last.tolist() == [2, 1] and t.prefix_index.tolist() == [0, 1, 0]
    assert t.input_ids.tolist() == [[10, 11], [12, 0], [0, 0]]
    assert t.position_ids.tolist() == [[3, 4], [2, 3], [3, 4]]  # each continues its own prompt
    assert t.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 1, 1, 0, 0]]
    # hidden layout (n, 1 + R) = (3, 3): sequence 0's tokens at slots 0, 1; sequence 1's at 3
    assert t.target_index.tolist() == [0, 1, 3] and t.target_ids.tolist() == [10, 11, 12]
    assert t.ref_logprobs.tolist() == [[-1.0, -2.0], [-3.0, 0.0], [0.0, 0.0]]
    assert t.num_tokens == 5 + 3 and t.computed_tokens == 6 + 6


@pytest.mark.parametrize("variant", ["plain", "lora"])
def test_shared_prompts_equal_packed_on_tiny_model(char_tokenizer, variant):
    """Log-probs, entropies and gradients of the shared-prompt layout equal the packed layout's.

    The two compute the same function: the same keys enter each softmax (the padded keys of the
    shared layout get weight exactly 0), only the order of the sums differs. In fp32 (unit
    roundoff 6e-8) over two layers of reductions of <= 32 terms the per-token log-probs agree to
    ~1e-6; 1e-5 leaves a 10x margin, as in the packed-vs-padded test above.
    """
    from conftest import build_tiny_model

    from oapl.objectives import oapl_loss
    from oapl.trainer.attention import enable_varlen
    from oapl.trainer.batching import Sequence, collate, collate_shared

    vocab = len(char_tokenizer)
    model = build_tiny_model(vocab, seed=3)
    assert enable_varlen(model, "sdpa")
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    model.train()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 4)]
    seqs = []
    for k in range(7):  # two groups interleaved, prompts of different lengths, one empty response
        r = torch.randint(3, vocab, (0 if k == 3 else 1 + k * 2,), generator=g).tolist()
        seqs.append(Sequence(prompts[k % 2], r, [-1.0] * len(r)))

    def run(batch):
        model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(model, batch, temperature=0.8, chunk_size=5, with_entropy=True)
        oapl_loss(lp, batch.ref_logprobs, batch.response_mask, torch.linspace(-1, 1, len(seqs)), beta2=0.5).backward()
        return lp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp_a, ent_a, g_a = run(collate(seqs, packed=True))
    shared = collate_shared(seqs)
    lp_b, ent_b, g_b = run(shared)
    assert shared.shared and shared.prefix_ids.shape[0] == 2
    assert (lp_a - lp_b).abs().max() < 1e-5
    assert (ent_a - ent_b).abs().max() < 1e-4
    assert set(g_a) == set(g_b) and g_a
    for n in g_a:
        scale = g_a[n].abs().max().clamp(min=1e-6)
        assert ((g_a[n] - g_b[n]).abs().max() / scale) < 1e-4, n


def test_share_prompts_and_gradient_checkpointing(tiny_model_dir, tmp_path):
    from oapl.trainer.policy import Policy

    with pytest.raises(Exception, match="share_prompts=on needs model.gradient_checkpointing=false"):
        step_cfg(tiny_model_dir, tmp_path, **{"optim.share_prompts": "on", "model.gradient_checkpointing": True})
    cfg = step_cfg(tiny_model_dir, tmp_path, **{"optim.share_prompts": "auto", "model.gradient_checkpointing": True})
    assert Policy(cfg, total_steps=1).share_prompts == "off"  # auto stands down; the step stays correct
