"""LoRA weight syncs compute the merged weights out of place: the frozen base never drifts (issue 23, 8).

Merging adapters into a bf16 base and unmerging them (the old sync) does not round-trip; here the
engine gets ``W + scaling * B @ A`` as new tensors and the trainer's base is never written.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from oapl.config import load_config

EPS32 = 2.0**-23  # fp32 machine epsilon (spacing at 1)
EPS_BF16 = 2.0**-7
R = 4


def _cfg(model_dir, out, compute: str):
    over = {
        "output_dir": str(out),
        "model.name": model_dir,
        "model.logprob_chunk_size": 16,
        "model.compute_dtype": compute,
        "model.lora.enabled": True,
        "model.lora.r": R,
        "model.lora.alpha": 8,
        "optim.lr": 1e-2,
        "optim.max_grad_norm": None,
        "optim.micro_batch_size": 8,
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def _groups(seed: int):
    from oapl.rollout.buffer import RolloutGroup

    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(2):
        toks = [
            torch.randint(3, 60, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen).tolist()
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
                rewards=[float((i + j) % 2 == 0) for i in range(4)],
                finish_reasons=["stop"] * 4,
                weights_id="tiny",
                version=0,
            )
        )
    return out


def _policy(tiny_model_dir, tmp_path, compute: str, steps: int = 1):
    from oapl.trainer.policy import Policy

    torch.manual_seed(0)
    policy = Policy(_cfg(tiny_model_dir, tmp_path / compute, compute), total_steps=8)
    for s in range(steps):  # lora_B starts at zero: train so the merge is not trivially the base
        policy.train_step(_groups(s))
    return policy


def _base(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.model.get_base_model().named_parameters() if "lora_" not in n}


def test_frozen_base_is_bit_identical_after_syncs_and_steps(tiny_model_dir, tmp_path):
    policy = _policy(tiny_model_dir, tmp_path, "bfloat16", steps=0)
    before = _base(policy)
    assert {t.dtype for t in before.values()} == {torch.bfloat16}  # the frozen base is bf16: where drift showed
    for s in range(5):
        policy.train_step(_groups(s))
        synced = dict(policy.engine_weights())  # a sync, consumed as the engine does
        assert not any("lora" in n for n in synced)
    after = dict(policy.model.get_base_model().named_parameters())
    for n, t in before.items():
        assert torch.equal(after[n].detach(), t), n
    # the test can see drift: the old merge_adapter/unmerge_adapter round trip moves this base
    old = copy.deepcopy(policy.model)
    old.merge_adapter()
    old.unmerge_adapter()
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in old.get_base_model().named_parameters() if n in before)
    assert moved > 0


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_engine_weights_equal_an_independent_merge(tiny_model_dir, tmp_path, compute):
    """Bound: each side computes fl(W + fl(s * B @ A)) in fp32, a rank-r dot product and one add, so each
    is within (r + 1) u |W| + s |B| @ |A| of the exact merge (u = EPS32 / 2); their difference is within
    (r + 1) EPS32 (|W| + s |B| @ |A|), plus one bf16 spacing of the result when both round to bf16."""
    from peft.tuners.lora import LoraLayer

    policy = _policy(tiny_model_dir, tmp_path, compute, steps=2)
    engine = dict(policy.engine_weights())
    ref_model = copy.deepcopy(policy.model).merge_and_unload()
    ref = {n: p.detach().to(policy.precision.engine_dtype) for n, p in ref_model.named_parameters()}
    assert set(engine) == set(ref)
    base = policy.model.get_base_model()
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    base_params = dict(base.named_parameters())
    worst, changed = 0.0, 0
    for n, t in engine.items():
        assert t.dtype == policy.precision.engine_dtype, n
        mod, _, attr = n.rpartition(".")
        if mod not in layers or attr != "weight":
            own = base_params[n] if n in base_params else base_params[f"{mod}.base_layer.{attr}"]
            assert torch.equal(t, own.detach().to(t.dtype)), n  # not adapted: exactly base
            continue
        m = layers[mod]
        w = base_params[f"{mod}.base_layer.weight"].detach().float()
        s = m.scaling["default"]
        mag = w.abs() + s * (m.lora_B["default"].weight.detach().abs() @ m.lora_A["default"].weight.detach().abs())
        bound = (R + 1) * EPS32 * mag
        if t.dtype == torch.bfloat16:
            bound = bound + EPS_BF16 * ref[n].float().abs()
        err = (t.float() - ref[n].float()).abs()
        assert bool((err <= bound).all()), (n, float(err.max()))
        worst = max(worst, float(err.max()))
        changed += int((t.float() != w.to(t.dtype).float()).sum())
    assert changed > 0  # the adapters reach the engine
    assert worst == 0.0  # measured: the same fp32 arithmetic as peft's merge, bit for bit


def test_trainer_logprobs_unchanged_by_a_sync(tiny_model_dir, tmp_path):
    from oapl.trainer.logprobs import sequence_batch, token_logprobs

    policy = _policy(tiny_model_dir, tmp_path, "bfloat16", steps=2)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 60, (6,), generator=gen).tolist() for _ in range(3)]
    responses = [torch.randint(3, 60, (9,), generator=gen).tolist() for _ in range(3)]
    batch = sequence_batch(prompts, responses, [[0.0] * 9] * 3)

    def logprobs():
        with torch.no_grad():
            return token_logprobs(policy.model, batch, autocast=policy.precision.autocast())[0]

    first = logprobs()
    for _ in policy.engine_weights():
        pass
    policy.hf_model()  # the checkpoint / in-memory engine path merges too
    assert torch.equal(logprobs(), first)


def test_lora_variants_are_refused_naming_the_field(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from oapl.trainer.lora_sync import merged_weights

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=R, lora_alpha=8, use_dora=True, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    with pytest.raises(ValueError, match=r"model\.lora.*DoRA|model\.lora.*variant"):
        list(merged_weights(model))
