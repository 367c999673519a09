"""The training loop (Algorithm 1) end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from oapl.loop import Run, train


def make_cfg(tiny_model_dir, prompts_file, out, **over):
    return tiny_config(tiny_model_dir, prompts_file, out, **over)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_on_toy_task(tiny_model_dir, prompts_file, tmp_path):
    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=40,
        **{
            "optim.lr": 1e-2,
            "algorithm.beta2": 0.05,
            "rollout.sync_interval": 3,
            "rollout.group_size": 8,
            "rollout.prompts_per_step": 4,
        },
    )
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert len(rows) == 40
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.5, (first, last)  # seen: ~0.01 -> ~0.99
    for r in rows:  # the metrics a user reads are there and finite
        for key in (
            "loss",
            "v_star_mean",
            "adv_mean",
            "adv_std",
            "grad_norm",
            "lr",
            "entropy",
            "kl",
            "log_ratio_mean",
            "weight_version",
            "lag",
            "samples_seen",
            "gen_tokens_per_s",
            "train_tokens_per_s",
            "seq_entropy",
            "logprob_absdiff_mean",
        ):
            assert r[key] is not None, key


def test_lag_and_versions_follow_sync_interval(tiny_model_dir, prompts_file, tmp_path):
    cfg = make_cfg(tiny_model_dir, prompts_file, tmp_path / "run", steps=7, **{"rollout.sync_interval": 3})
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["lag"] for r in rows] == [0, 1, 2, 0, 1, 2, 0]
    assert [r["weight_version"] for r in rows] == [0, 0, 0, 1, 1, 1, 2]
    # right after a sync the engine and trainer hold the same weights: the log-ratio is ~0
    assert abs(rows[3]["log_ratio_mean"]) < 1e-3 and abs(rows[0]["log_ratio_mean"]) < 1e-3
    # later in the window the trainer has moved away from pi_inf
    assert rows[2]["logprob_absdiff_mean"] > rows[0]["logprob_absdiff_mean"]


def test_async_batches_never_mix_versions(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    from oapl.trainer.policy import Policy

    seen = []
    orig = Policy.train_step

    def spy(self, groups):
        seen.append([g.version for g in groups])
        return orig(self, groups)

    monkeypatch.setattr(Policy, "train_step", spy)
    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=8,
        **{"rollout.asynchronous": True, "rollout.sync_interval": 2, "rollout.prompts_per_generate": 2},
    )
    trainer = Run.for_config(cfg)
    try:
        trainer.train()
        # every group the worker put into the buffer was trained on, dropped at a sync (cleared), or is
        # still there; a group refused as stale is counted on both sides
        buffer, stats = trainer.buffer, trainer.rollout.stats
        trained = sum(len(versions) for versions in seen)
        assert trained == 8 * 4  # steps x rollout.prompts_per_step
        assert stats.groups == trained + buffer.cleared + len(buffer), (stats.groups, buffer.cleared, len(buffer))
        assert stats.stale_dropped == buffer.discarded_stale
        # and none was generated in vain: the worker makes only what the trainer takes before each sync
        assert (stats.groups, buffer.cleared, stats.stale_dropped, len(buffer)) == (trained, 0, 0, 0)
    finally:
        trainer.close()
    assert len(seen) == 8
    for step, versions in enumerate(seen):
        assert len(set(versions)) == 1, versions  # one weight version per batch
        assert versions[0] == step // 2  # and it is the current one: the buffer was cleared at sync


def test_resume_matches_uninterrupted_run(tiny_model_dir, prompts_file, tmp_path):
    import shutil

    over = {
        "checkpoint.every": 2,
        "checkpoint.keep": 5,
        "rollout.sync_interval": 2,
        "optim.schedule": "cosine",
        "optim.warmup_steps": 1,
    }
    cfg_a = make_cfg(tiny_model_dir, prompts_file, tmp_path / "a", steps=6, **over)
    train(cfg_a)
    # a run "killed" after step 4: its directory as it was then (checkpoint 4, metrics up to 4 and beyond)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg_b = make_cfg(tiny_model_dir, prompts_file, tmp_path / "b", steps=6, **over)
    rows_a = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    ckpts = sorted((tmp_path / "b" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    train(cfg_b, resume=True)
    rows_b = [r for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint were replaced
    for ra, rb in zip(rows_a[4:], rows_b[4:]):
        for key in ("loss", "reward_mean", "grad_norm", "lr", "weight_version", "lag"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key


def test_interrupt_writes_checkpoint(tiny_model_dir, prompts_file, tmp_path):
    import toy_rewards

    toy_rewards.interrupting.calls = 0
    cfg = make_cfg(
        tiny_model_dir, prompts_file, tmp_path / "run", steps=10, **{"task.reward": "toy_rewards:interrupting"}
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000002"]
    assert (ckpts[0] / "model" / "config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpts[0] / "model")  # HF-loadable


def test_failing_reward_scores_zero_and_run_continues(tiny_model_dir, prompts_file, tmp_path):
    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=3,
        **{"task.reward": "toy_rewards:flaky", "sampling.max_tokens": 12},
    )
    result = train(cfg)
    assert result.steps == 3
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows[-1]["reward_errors"] > 0  # counted
    import yaml

    summary = yaml.safe_load((tmp_path / "run" / "summary.yaml").read_text())
    assert summary["reward_error_samples"], "a failing sample is logged"
    assert "completion" in summary["reward_error_samples"][0]


def test_non_finite_loss_skips_step_without_touching_weights(tiny_model_dir, prompts_file, tmp_path):
    cfg = make_cfg(tiny_model_dir, prompts_file, tmp_path / "run", steps=1)
    trainer = Run.for_config(cfg)
    try:
        trainer.rollout.fill(4)
        groups = trainer.buffer.take(4)
        groups[0].response_logprobs[0][0] = float("nan")
        before = {n: p.detach().clone() for n, p in trainer.backend.policy.model.named_parameters()}
        m = trainer.backend.policy.train_step(groups)
        assert m["skipped"] == 1.0
        for n, p in trainer.backend.policy.model.named_parameters():
            assert torch.equal(before[n], p.detach()), n
        # the optimiser holds no state from the skipped step
        assert all(not s for s in trainer.backend.policy.optimizer.state.values())
    finally:
        trainer.close()


def test_micro_batching_gives_the_same_update(tiny_model_dir, prompts_file, tmp_path):
    params = []
    for mb in (16, 3):
        cfg = make_cfg(
            tiny_model_dir,
            prompts_file,
            tmp_path / f"run{mb}",
            steps=1,
            **{"optim.micro_batch_size": mb, "optim.lr": 1e-3},
        )
        trainer = Run.for_config(cfg)
        try:
            trainer.rollout.fill(4)
            trainer.backend.policy.train_step(trainer.buffer.take(4))
            params.append({n: p.detach().clone() for n, p in trainer.backend.policy.model.named_parameters()})
        finally:
            trainer.close()
    for n in params[0]:
        assert torch.allclose(params[0][n], params[1][n], atol=1e-6), n


def test_empty_and_truncated_responses_are_handled(tiny_model_dir, prompts_file, tmp_path):
    cfg = make_cfg(tiny_model_dir, prompts_file, tmp_path / "run", steps=1)
    trainer = Run.for_config(cfg)
    try:
        trainer.rollout.fill(4)
        groups = trainer.buffer.take(4)
        groups[0].response_token_ids[0] = []
        groups[0].response_logprobs[0] = []
        m = trainer.backend.policy.train_step(groups)
        assert m["skipped"] == 0.0 and m["loss"] == pytest.approx(m["loss"])  # finite
        assert 0.0 <= m["truncated_frac"] <= 1.0
    finally:
        trainer.close()


def test_lora_trains_syncs_merged_weights_and_resumes(tiny_model_dir, prompts_file, tmp_path):
    over = {
        "model.lora.enabled": True,
        "model.lora.r": 4,
        "optim.lr": 1e-2,
        "rollout.sync_interval": 2,
        "checkpoint.every": 2,
        "checkpoint.keep": 3,
        "checkpoint.save_final": True,
    }
    cfg = make_cfg(tiny_model_dir, prompts_file, tmp_path / "run", steps=2, **over)
    trainer = Run.for_config(cfg)
    try:
        trainer.train()
        names = {n for n, _ in trainer.backend.policy.engine_weights()}
        engine_params = dict(trainer.backend.engine.model.named_parameters())
        assert names <= set(engine_params) and not any("lora" in n for n in names)
        # after the final sync the engine holds the merged LoRA weights
        merged = dict(trainer.backend.policy.engine_weights())
        for n, t in merged.items():
            assert torch.allclose(engine_params[n], t, atol=1e-6), n
        q = "model.layers.0.self_attn.q_proj"
        base_q = dict(trainer.backend.policy.model.get_base_model().named_parameters())[f"{q}.base_layer.weight"]
        assert not torch.allclose(merged[f"{q}.weight"], base_q), "LoRA updates reach the engine merged"
    finally:
        trainer.close()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    # peft's layout at the checkpoint's root (as TRL's), no merged model until it is exported
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt)
    lora_a = {n: p for n, p in loaded.named_parameters() if "lora_A" in n}
    assert lora_a and torch.equal(
        lora_a[f"base_model.model.{q}.lora_A.default.weight"],
        dict(trainer.backend.policy.model.named_parameters())[f"base_model.model.{q}.lora_A.default.weight"],
    )
    cfg2 = make_cfg(tiny_model_dir, prompts_file, tmp_path / "run", steps=4, **over)
    result = train(cfg2, resume=True)
    assert result.steps == 4
