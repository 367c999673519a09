"""FSDP2 trainer ranks on CPU (gloo) and their sharded checkpoints (issue 23).

A run saved by 2 FSDP2 ranks resumes in one process, and a one-process run resumes on 2 FSDP2
ranks; in both directions the next step equals the uninterrupted run's within the bound that the
1-vs-2-rank arithmetic allows (derived below from AdamW's update), which is far tighter than what a
lost or misplaced optimiser state would give (an O(lr) change of almost every weight).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from test_distributed import make_cfg, ray_cluster  # noqa: E402,F401  (the module-scoped Ray cluster)
from test_precision import _groups  # noqa: E402

pytestmark = pytest.mark.timeout(600)

LR = 1e-3
RTOL, ATOL = 1e-4, 1e-7  # gradients of 1 and 2 ranks (tests/test_distributed.py::test_two_ranks_match_one_process)
OVER = {"optim.micro_batch_size": 4, "optim.lr": LR, "optim.max_grad_norm": 1e9, "algorithm.beta2": 0.1}


def fsdp_cfg(tiny_model_dir, prompts_file, out):
    return make_cfg(
        tiny_model_dir, prompts_file, out, **OVER, **{"distributed.parallel": "fsdp", "distributed.num_engines": 1}
    )


def local_cfg(tiny_model_dir, prompts_file, out):
    return make_cfg(
        tiny_model_dir, prompts_file, out, **OVER, **{"distributed.backend": "local", "distributed.trainer_workers": 1}
    )


def adam_bound(w, g, m, v, t: int, betas=(0.9, 0.95), eps=1e-8):
    """How far AdamW's step ``t`` from state ``(m, v)`` can move when the gradient ``g`` is off by up to
    ``d = RTOL |g| + ATOL`` (what 1 and 2 ranks differ by): the update ``u(g')`` is smooth in ``g'``,
    so its largest change over ``[g - d, g + d]`` is taken on a grid of 9 points and doubled (the
    grid's spacing is d/4 of a function whose curvature is bounded on that interval), plus fp32
    rounding of the update (a few ulps of lr) and of ``w + u`` (one ulp of ``w`` on each side)."""
    b1, b2 = betas
    d = RTOL * g.abs() + ATOL

    def update(gg):
        mm, vv = b1 * m + (1 - b1) * gg, b2 * v + (1 - b2) * gg * gg
        return LR * (mm / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + eps)

    u0 = update(g)
    worst = torch.stack([(update(g + k / 4 * d) - u0).abs() for k in range(-4, 5)]).amax(0)
    return 2 * worst + 2 * w.abs() * 2.0**-23 + 8 * LR * 2.0**-23


def local_step(policy, groups, monkeypatch):
    """One single-process step; returns (grads, AdamW state before it, weights after) by HF name."""
    named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
    before = {
        n: {k: v.clone() for k, v in policy.optimizer.state[p].items()} for n, p in named if p in policy.optimizer.state
    }
    grads = {}
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        grads.update({n: p.grad.detach().clone() for n, p in named})
        return orig(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    try:
        policy.train_step(groups)
    finally:
        monkeypatch.undo()
    return grads, before, {n: p.detach().clone() for n, p in policy.model.named_parameters()}


def fsdp_step(group, groups):
    """One step on the FSDP2 ranks; returns (grads, weights after) gathered by HF name."""
    _, parts = group.train_step(groups, want_grads=True)
    return parts[0]["grads"], ray.get(group.publish_weights())


def assert_same_step(g_ref, w_ref, g, w, state):
    """The two runs' gradients agree to (RTOL, ATOL), and their weights after AdamW's step from the same
    restored state to :func:`adam_bound`."""
    assert set(g) == set(g_ref)
    for n in g_ref:
        assert torch.allclose(g[n], g_ref[n], rtol=RTOL, atol=ATOL), n
    assert set(state) == set(g_ref)  # every parameter has a restored AdamW state
    for n, st in state.items():
        t = int(st["step"]) + 1
        bound = adam_bound(w_ref[n], g_ref[n], st["exp_avg"], st["exp_avg_sq"], t)
        diff = (w[n] - w_ref[n]).abs()
        assert bool((diff <= bound).all()), (n, float((diff - bound).max()))


@pytest.mark.slow  # starts Ray
def test_two_fsdp_ranks_save_shards_and_resume_in_one_process(
    ray_cluster, tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    from oapl.distributed.trainer import TrainerGroup
    from oapl.trainer.policy import load_policy

    run = tmp_path / "fsdp"
    group = TrainerGroup(fsdp_cfg(tiny_model_dir, prompts_file, run))
    try:
        group.setup(resume=False)
        group.train_step(_groups(0))
        ckpt = Path(group.call("save_checkpoint", str(run), 1, {"step": 1}, "{}", 2)[0])
        g_ref, w_ref = fsdp_step(group, _groups(1))  # the uninterrupted run's next step
    finally:
        group.close()
    # each rank wrote its own part: its optimiser shards and the weights it owns
    assert sorted(p.name for p in (ckpt / "optim").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    files = {p.name[:10] for p in (ckpt / "model").glob("model-r*.safetensors")}
    assert files == {"model-r000", "model-r001"}
    assert not list(ckpt.parent.glob(".tmp-step-*"))
    # the folder is an ordinary Hugging Face model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert next(hf.parameters()).dtype == torch.float32

    policy, state = load_policy(local_cfg(tiny_model_dir, prompts_file, tmp_path / "one"), 6, ckpt)
    assert state["step"] == 1 and state["world"] == 2
    g, st, w = local_step(policy, _groups(1), monkeypatch)
    assert_same_step(g_ref, w_ref, g, w, st)


@pytest.mark.slow  # starts Ray
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(
    ray_cluster, tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    from oapl.distributed.trainer import TrainerGroup
    from oapl.trainer.checkpoint import save_checkpoint
    from oapl.trainer.policy import Policy

    run = tmp_path / "one"
    policy = Policy(local_cfg(tiny_model_dir, prompts_file, run), total_steps=6)
    policy.train_step(_groups(0))
    save_checkpoint(run, 1, policy, {"step": 1}, "{}", keep=2)
    g_ref, st, w_ref = local_step(policy, _groups(1), monkeypatch)  # the uninterrupted run's next step

    group = TrainerGroup(fsdp_cfg(tiny_model_dir, prompts_file, tmp_path / "fsdp"))
    try:
        group.setup(resume=True, run_dir=str(run))
        assert group.state["step"] == 1
        g, w = fsdp_step(group, _groups(1))
        # and the 2 ranks save it again, sharded, as step 2
        ckpt = Path(group.call("save_checkpoint", str(run), 2, {"step": 2}, "{}", 2)[0])
    finally:
        group.close()
    assert_same_step(g_ref, w_ref, g, w, st)
    assert (ckpt / "optim" / ".metadata").exists() and (run / "checkpoints" / "step-00000001").exists()


def test_fsdp_refuses_lora_and_shared_prompts_naming_the_field(tiny_model_dir, prompts_file, tmp_path):
    from oapl.distributed.trainer import parallel_mode

    cfg = make_cfg(
        tiny_model_dir, prompts_file, tmp_path, **{"distributed.parallel": "fsdp", "model.lora.enabled": True}
    )
    with pytest.raises(ValueError, match="distributed.parallel=fsdp with model.lora.enabled"):
        parallel_mode(cfg)
    auto = make_cfg(
        tiny_model_dir, prompts_file, tmp_path, **{"model.lora.enabled": True, "distributed.trainer_num_gpus": 1}
    )
    assert parallel_mode(auto) == "ddp"


@pytest.mark.slow  # starts Ray
def test_offline_training_on_two_fsdp_ranks_follows_one_process(ray_cluster, tiny_model_dir, prompts_file, tmp_path):
    """``offline.data`` with ``distributed.backend: ray``: the same Run and train step on 2 FSDP2 ranks,
    the one-process run's first step, and sharded end-of-epoch checkpoints."""
    import json

    from oapl.data.rollouts import read_rollouts
    from oapl.generate import generate_dataset
    from oapl.offline import train_offline

    generate_dataset(
        make_cfg(tiny_model_dir, prompts_file, tmp_path / "gen", **{"distributed.backend": "local"}),
        tmp_path / "data",
        n=4,
    )
    assert len(read_rollouts(tmp_path / "data")) >= 4
    off = {
        "offline.data": str(tmp_path / "data"),
        "offline.epochs": 2,
        "offline.min_correct": 0,
        "offline.drop_all_correct": False,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "optim.micro_batch_size": 2,
        "optim.lr": 1e-3,
        "algorithm.beta2": 0.1,
    }
    one = train_offline(
        make_cfg(tiny_model_dir, prompts_file, tmp_path / "one", **{**off, "distributed.backend": "local"})
    )
    two = train_offline(
        make_cfg(tiny_model_dir, prompts_file, tmp_path / "two", **{**off, "distributed.parallel": "fsdp"})
    )
    assert two["steps"] == one["steps"] >= 4 and len(two["checkpoints"]) == 2
    rows = {
        k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("one", "two")
    }
    assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["one"]]
    for key in ("loss", "grad_norm", "reward_mean", "kl"):  # step 1: the same weights, summed in another order
        assert rows["two"][0][key] == pytest.approx(rows["one"][0][key], rel=1e-4, abs=1e-6), key
    assert all(r["loss"] == r["loss"] and r["skipped"] == 0 for r in rows["two"])  # finite, none skipped
    for ckpt in two["checkpoints"]:
        assert (Path(ckpt) / "optim" / ".metadata").exists() and (Path(ckpt) / "model" / "config.json").exists()


MISMATCH = ("kl", "logprob_absdiff_mean", "logprob_absdiff_max", "log_ratio_mean", "log_ratio_std", "entropy")


@pytest.mark.slow  # starts Ray
def test_one_precision_path_under_bf16(ray_cluster, tiny_model_dir, prompts_file, tmp_path):
    """bf16 compute, one precision path: an FSDP2 rank computes a batch's log-probs bit for bit as one
    process does (the fp32 masters are gathered and autocast decides what runs in bf16, as on one GPU),
    so the trainer/engine mismatch metrics users read do not depend on the world size. FSDP2's
    ``MixedPrecisionPolicy(param_dtype=bf16)``, the old path, ran the norms and the residual stream in
    bf16 as well: on this batch it moved kl by 5.6e-5 and log_ratio_std by 1.5e-4 (relative)."""
    from oapl.distributed.trainer import TrainerGroup
    from oapl.trainer.logprobs import sequence_batch, token_logprobs
    from oapl.trainer.policy import Policy

    over = {**OVER, "model.compute_dtype": "bfloat16", "optim.lr": 1e-6}
    one = Policy(
        make_cfg(
            tiny_model_dir,
            prompts_file,
            tmp_path / "one",
            **over,
            **{"distributed.backend": "local", "distributed.trainer_workers": 1},
        ),
        total_steps=6,
    )
    groups = _groups(2)
    prompts = [g.prompt_token_ids for g in groups for _ in range(g.n)]
    responses = [r for g in groups for r in g.response_token_ids]
    refs = [lp for g in groups for lp in g.response_logprobs]
    batch = sequence_batch(prompts, responses, refs, packed=one.packing)
    with torch.no_grad():
        lp1 = token_logprobs(one.model, batch, one.temperature, 16, autocast=one.precision.autocast())[0].float()
    m1 = one.train_step(groups)
    group = TrainerGroup(
        make_cfg(tiny_model_dir, prompts_file, tmp_path / "two", **over, **{"distributed.parallel": "fsdp"})
    )
    try:
        group.setup(resume=False)
        scored = group.call("score", batch)
        m2, _ = group.train_step(groups)
    finally:
        group.close()
    for lp2 in scored:  # every rank, the same batch: bit for bit
        assert torch.equal(lp2, lp1)
    # the step's metrics: each rank scores its own share in its own micro-batches, whose matmul shapes
    # differ from the single process's; a CPU whose bf16 kernels round by row count may move a token's
    # log-prob by bf16's unit roundoff (2**-8) of its size, so the means agree to that relative bound
    for k in MISMATCH:
        assert m2[k] == pytest.approx(m1[k], rel=2.0**-8, abs=1e-6), k


def test_a_failed_sharded_save_leaves_the_previous_checkpoint_the_latest(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """A save that dies after some of its files are written (here: the optimiser shards) leaves no
    ``step-N`` and no temporary folder; the previous checkpoint is still the latest and loads. (A kill -9
    inside the write leaves the ``.tmp-step-*`` folder, which is never taken for a checkpoint and is
    removed when the run resumes: tests/test_kill_resume.py.)"""
    import oapl.distributed.sharded as sharded
    from oapl.trainer.checkpoint import latest_checkpoint
    from oapl.trainer.policy import Policy, load_policy

    cfg = local_cfg(tiny_model_dir, prompts_file, tmp_path / "run")
    policy = Policy(cfg, total_steps=6)
    policy.train_step(_groups(0))
    first = sharded.save_sharded_checkpoint(tmp_path / "run", 1, policy, 0, 1, {"step": 1}, "{}", keep=2)
    policy.train_step(_groups(1))

    def dies(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(sharded, "save_optimizer", dies)
    with pytest.raises(OSError, match="No space"):
        sharded.save_sharded_checkpoint(tmp_path / "run", 2, policy, 0, 1, {"step": 2}, "{}", keep=2)
    assert latest_checkpoint(tmp_path / "run") == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no step-2, no temporary folder
    _, state = load_policy(cfg, 6, first)
    assert state["step"] == 1


@pytest.mark.slow  # starts Ray
def test_online_ray_run_on_two_fsdp_ranks_follows_the_local_run(ray_cluster, tiny_model_dir, prompts_file, tmp_path):
    """1 engine actor + 2 FSDP2 ranks, synchronous: the weight syncs (every rank takes part in the
    all-gathers), the held-out evaluations on the engine and the metric rows follow the local run, as the
    DDP run does in tests/test_distributed.py; its sharded checkpoint resumes in the local backend."""
    import json

    from oapl.loop import train

    over = {
        "steps": 4,
        "rollout.sync_interval": 2,
        "checkpoint.every": 2,
        "checkpoint.keep": 5,
        "task.eval_dataset": str(prompts_file),
        "task.eval_split": "train",
        "task.max_eval_prompts": 6,
        "eval.at_start": True,
        "eval.at_end": True,
    }
    train(make_cfg(tiny_model_dir, prompts_file, tmp_path / "local", **over, **{"distributed.backend": "local"}))
    train(
        make_cfg(
            tiny_model_dir,
            prompts_file,
            tmp_path / "ray",
            **over,
            **{"distributed.num_engines": 1, "distributed.parallel": "fsdp"},
        )
    )
    rows = {
        k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("local", "ray")
    }
    assert [r["step"] for r in rows["ray"]] == [r["step"] for r in rows["local"]] == [0, 1, 2, 3, 4, 4]
    for rl, rr in zip(rows["local"], rows["ray"]):
        for k in ("loss", "reward_mean", "grad_norm", "kl", "weight_version", "lag", "eval/pass@1", "eval/reward_mean"):
            if k in rl:
                assert rr[k] == pytest.approx(rl[k], rel=1e-3, abs=1e-5), (rr["step"], k)
    ckpt = tmp_path / "ray" / "checkpoints" / "step-00000002"  # (no final checkpoint in the tiny run)
    assert (ckpt / "optim" / ".metadata").exists()
    cfg = make_cfg(
        tiny_model_dir, prompts_file, tmp_path / "ray", **{**over, "steps": 6}, **{"distributed.backend": "local"}
    )
    assert train(cfg, resume=True).steps == 6
