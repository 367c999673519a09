"""The Ray backend on a small local Ray cluster (2 physical cores here: logical CPUs are a scheduling
unit), with the tiny random Llama of conftest.py.

* 2 trainer ranks (DDP/gloo) give the single-process loss, gradients and update on the same batch;
* a Ray run (1 engine, 2 ranks, synchronous) reproduces the local run's metric rows step by step;
* 2 engines + 2 ranks, asynchronous: killing an engine actor mid-run does not stop training, the
  batches never mix weight versions, rows carry the local keys plus num_engines/engine_restarts;
* killing a trainer rank resumes the run from its latest checkpoint (collective weight transport).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import tiny_config  # noqa: E402


pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # starts Ray


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:  # rewards run on the driver: the workers need nothing from tests/
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=500 * 1024**2, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def lower_fraction(prompts, completions, **_):
    """Reward for the tests: share of lower-case letters (varies within a group from the first step)."""
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]


def make_cfg(tiny_model_dir, prompts_file, out, **over):
    return tiny_config(
        tiny_model_dir,
        prompts_file,
        out,
        **{
            "threads": 1,
            "task.reward": "test_distributed:lower_fraction",
            "distributed.backend": "ray",
            "distributed.num_engines": 2,
            "distributed.trainer_workers": 2,
            **over,
        },
    )


def read_all(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def read_rows(out):
    return [r for r in read_all(out) if "loss" in r]


LOCAL_KEYS = (
    "step",
    "samples_seen",
    "loss",
    "skipped",
    "reward_mean",
    "reward_std",
    "v_star_mean",
    "adv_mean",
    "adv_std",
    "grad_norm",
    "lr",
    "response_len_mean",
    "truncated_frac",
    "train_seconds",
    "train_tokens_per_s",
    "kl",
    "logprob_absdiff_mean",
    "logprob_absdiff_max",
    "log_ratio_mean",
    "log_ratio_std",
    "log_ratio_absmax",
    "entropy",
    "seq_entropy",
    "weight_version",
    "lag",
    "gen_tokens_per_s",
    "reward_errors",
    "stale_dropped",
    "elapsed_s",
)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(ray_cluster, tiny_model_dir, prompts_file, tmp_path, monkeypatch, parallel):
    """Same batch: the 2-rank step (DDP replicas, or FSDP2 shards over gloo) has the single-process loss,
    metrics, gradient and update."""
    from oapl.distributed.trainer import TrainerGroup
    from oapl.loop import Run

    # 4 prompts x 4 = 16 sequences; micro-batches of 3 so that shards (8 + 8) accumulate unevenly
    over = {
        "optim.micro_batch_size": 3,
        "optim.lr": 1e-3,
        "optim.max_grad_norm": 1e9,
        "algorithm.beta2": 0.1,
        "distributed.backend": "local",
    }
    local = Run.for_config(make_cfg(tiny_model_dir, prompts_file, tmp_path / "local", **over))
    captured = {}
    orig_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        captured["grads"] = [p.grad.detach().clone() for p in params]
        return orig_clip(params, max_norm, *a, **k)

    try:
        local.rollout.fill(4)
        groups = local.buffer.take(4)
        # a batch with signal: varied rewards, and engine log-probs away from the trainer's (s_i != 0)
        for j, g in enumerate(groups):
            g.rewards = [((3 * j + i) % 5) / 4 for i in range(g.n)]
            g.response_logprobs = [[lp - 0.05 * (i + 1) for lp in lps] for i, lps in enumerate(g.response_logprobs)]
        # an odd sequence count (8 + 7 over the ranks) is the harder case: drop one response
        groups[-1].response_token_ids.pop()
        groups[-1].response_logprobs.pop()
        groups[-1].responses.pop()
        groups[-1].rewards.pop()
        groups[-1].finish_reasons.pop()
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
        m_local = local.backend.policy.train_step(groups)
        monkeypatch.undo()
        assert m_local["loss"] > 1e-2 and m_local["grad_norm"] > 1e-2  # not a degenerate batch
        names = [n for n, p in local.backend.policy.model.named_parameters() if p.requires_grad]
        g_local = dict(zip(names, captured["grads"]))
        p_local = {n: p.detach().clone() for n, p in local.backend.policy.model.named_parameters()}
    finally:
        local.close()

    group = TrainerGroup(
        make_cfg(
            tiny_model_dir,
            prompts_file,
            tmp_path / "ray",
            **{**over, "distributed.backend": "ray", "distributed.parallel": parallel},
        )
    )
    assert group.mode == parallel
    try:
        group.setup(resume=False)
        m_ray, parts = group.train_step(groups, want_grads=True)
        p_ray = ray.get(group.publish_weights())  # every rank takes part (FSDP2 all-gathers)
    finally:
        group.close()
    # 15 sequences: each rank received only its token-balanced share (7 + 8), not the whole batch
    assert sorted(p["stats"]["seqs"] for p in parts) == [7, 8]
    assert list(m_ray) == list(m_local)  # same metric keys, same order
    for k in m_local:
        # padding depends on which sequences share a micro-batch (a rank's share lays out differently:
        # optim.share_prompts=auto shares a prompt where that is cheaper), the update does not
        if k in ("train_seconds", "train_tokens_per_s", "padding_frac"):
            continue
        assert m_ray[k] == pytest.approx(m_local[k], rel=1e-4, abs=1e-6), k
    g_ray = parts[0]["grads"]
    assert set(g_ray) == set(g_local)
    rtol, atol = 1e-4, 1e-7
    for n in g_local:
        assert torch.allclose(g_ray[n], g_local[n], rtol=rtol, atol=atol), n
    # the update: AdamW's first step is lr * g / (|g| + eps). With |g_ray - g| <= d = rtol |g| + atol
    # (checked above) and no sign flip (|g| > d), the two updates differ by at most
    # lr * eps * d / ((|g| - d + eps) (|g| + eps)); where |g| <= d the sign may flip: 2 lr. Plus fp32
    # rounding: of AdamW's update arithmetic (a few ulps of lr) and of w + update (one ulp of w each side).
    lr, eps = 1e-3, 1e-8
    for n in p_local:  # tied embeddings appear once under HF names in both
        g = g_local[n].abs()
        d = rtol * g + atol
        bound = torch.where(g > d, lr * eps * d / ((g - d + eps) * (g + eps)), torch.full_like(g, 2 * lr))
        ulp = 2 * p_local[n].abs() * 2.0**-23 + 8 * lr * 2.0**-23
        diff = (p_ray[n] - p_local[n]).abs()
        assert bool((diff <= bound + ulp).all()), (n, float((diff - bound - ulp).max()))


def test_ray_run_matches_local_run(ray_cluster, tiny_model_dir, prompts_file, tmp_path):
    """1 engine actor (seeded like the local engine) + 2 trainer ranks, synchronous: the metric rows
    follow the local run step by step; checkpoints are the local format and resume."""
    from oapl.loop import train

    # held-out evaluation (greedy) before, mid-window at step 3 (rank 0's current weights) and after
    # (on the engines) must give the local numbers too
    over = {
        "steps": 4,
        "rollout.sync_interval": 2,
        "checkpoint.every": 2,
        "checkpoint.keep": 5,
        "task.eval_dataset": str(prompts_file),
        "task.eval_split": "train",
        "task.max_eval_prompts": 6,
        "eval.at_start": True,
        "eval.every": 3,
        "eval.at_end": True,
    }
    train(make_cfg(tiny_model_dir, prompts_file, tmp_path / "local", **over, **{"distributed.backend": "local"}))
    train(make_cfg(tiny_model_dir, prompts_file, tmp_path / "ray", **over, **{"distributed.num_engines": 1}))
    rows_l, rows_r = read_rows(tmp_path / "local"), read_rows(tmp_path / "ray")
    assert all(r["loss"] > 1e-3 and r["grad_norm"] > 1e-4 for r in rows_l)  # a run with signal
    assert [r["step"] for r in rows_r] == [1, 2, 3, 4]
    for rl, rr in zip(rows_l, rows_r):
        assert set(LOCAL_KEYS) <= set(rr) and rr["num_engines"] == 1 and rr["engine_restarts"] == 0
        assert set(rr) - set(rl) == {"num_engines", "engine_restarts"}
        for k in (
            "loss",
            "reward_mean",
            "v_star_mean",
            "grad_norm",
            "lr",
            "kl",
            "log_ratio_mean",
            "entropy",
            "response_len_mean",
            "weight_version",
            "lag",
            "samples_seen",
        ):
            assert rr[k] == pytest.approx(rl[k], rel=1e-3, abs=1e-5), (rr["step"], k)
    evals = [
        [(r["step"], r["eval/reward_mean"], r["eval/pass@1"]) for r in read_all(out) if "eval/reward_mean" in r]
        for out in (tmp_path / "local", tmp_path / "ray")
    ]
    assert [e[0] for e in evals[1]] == [0, 3, 4]
    assert [x for e in evals[1] for x in e] == pytest.approx([x for e in evals[0] for x in e], rel=1e-6)
    assert [r["weight_version"] for r in rows_r] == [0, 0, 1, 1]
    assert [r["lag"] for r in rows_r] == [0, 1, 0, 1]
    ckpts = sorted(p.name for p in (tmp_path / "ray" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]
    # the Ray run's checkpoint resumes in the local backend (same format)
    cfg = make_cfg(tiny_model_dir, prompts_file, tmp_path / "ray", **over, **{"distributed.backend": "local"})
    result = train(cfg, resume=True)
    assert result.steps == 4
    rows = read_rows(tmp_path / "ray")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for rl, rr in zip(rows_l[2:], rows[2:]):
        assert rr["loss"] == pytest.approx(rl["loss"], rel=1e-3, abs=1e-5)


def _capture_trainers(monkeypatch) -> list:
    """Every RayBackend the run creates (one per attempt), to reach its actors."""
    from oapl.distributed.backend import RayBackend

    live = []
    orig_init = RayBackend.__init__

    def capture(self, *a, **k):
        live.append(self)
        orig_init(self, *a, **k)

    monkeypatch.setattr(RayBackend, "__init__", capture)
    return live


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)


def test_engine_death_does_not_stop_training(ray_cluster, tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """2 engines, 2 ranks, asynchronous: SIGKILL engine 0 while it generates (before step 3); the run
    finishes, the restart is counted, every batch is of one (the current) weight version."""
    from oapl.distributed.trainer import TrainerGroup
    from oapl.loop import train

    live = _capture_trainers(monkeypatch)
    versions, killed = [], []
    orig = TrainerGroup.train_step

    def spy(self, groups, want_grads=False):
        versions.append([g.version for g in groups])
        if len(versions) == 3:  # mid-window: the engines are generating version 1 in the background
            pid = live[0].pool.pids()[0]
            _sigkill(pid)
            killed.append(pid)
        return orig(self, groups, want_grads)

    monkeypatch.setattr(TrainerGroup, "train_step", spy)
    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=8,
        **{"rollout.asynchronous": True, "rollout.prompts_per_generate": 2, "distributed.max_engine_restarts": 2},
    )
    result = train(cfg)
    assert killed and len(live) == 1  # no resume: the trainer never noticed
    assert result.steps == 8
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["engine_restarts"] == 1 and all(r["num_engines"] == 2 for r in rows)
    for r in rows:
        assert set(LOCAL_KEYS) <= set(r)
    for step, vs in enumerate(versions):
        assert len(set(vs)) == 1, vs  # never mixed
        assert vs[0] == step // 2  # the current version: the buffer was cleared at every sync
    assert [r["lag"] for r in rows] == [0, 1] * 4


def test_trainer_death_resumes_from_checkpoint(ray_cluster, tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """SIGKILL trainer rank 1 after the step-2 checkpoint (before step 4): the run resumes there and
    completes; the engines get their weights by broadcast (the collective transport of the GPU path,
    here on gloo)."""
    from oapl.distributed.trainer import TrainerGroup
    from oapl.loop import train

    live = _capture_trainers(monkeypatch)
    calls, killed = [], []
    orig = TrainerGroup.train_step

    def spy(self, groups, want_grads=False):
        calls.append(len(live))
        if len(live) == 1 and len(calls) == 4:
            pid = self.pids()[1]
            _sigkill(pid)
            killed.append(pid)
        return orig(self, groups, want_grads)

    monkeypatch.setattr(TrainerGroup, "train_step", spy)
    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=5,
        **{
            "checkpoint.every": 2,
            "checkpoint.keep": 5,
            "distributed.num_engines": 2,
            "distributed.weight_transport": "collective",
        },
    )
    result = train(cfg)
    assert killed
    assert len(live) == 2  # one resume
    assert calls == [1, 1, 1, 1, 2, 2, 2]  # steps 1-3, the failed step 4, then 3-5 again
    assert result.steps == 5
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # rows after the checkpoint were replaced
    assert [r["weight_version"] for r in rows] == [0, 0, 1, 1, 2]
    # after a collective sync, engines and trainer hold the same weights: log-ratio ~ 0
    assert abs(rows[2]["log_ratio_mean"]) < 1e-3 and abs(rows[4]["log_ratio_mean"]) < 1e-3


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_keep_every_update_under_bf16_compute(ray_cluster, tiny_model_dir, prompts_file, tmp_path, parallel):
    """DDP replicas and FSDP2 shards hold fp32 masters under bf16 autocast: one step at lr 1e-6 moves >= 99%
    of the weights that received a gradient (stored in bf16 almost none would move: tests/test_precision.py)."""
    from test_precision import _groups

    from oapl.distributed.sharded import iter_checkpoint_weights
    from oapl.distributed.trainer import TrainerGroup

    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        **{
            "model.compute_dtype": "bfloat16",
            "optim.lr": 1e-6,
            "optim.max_grad_norm": None,
            "algorithm.beta2": 0.1,
            "optim.micro_batch_size": 4,
            "distributed.parallel": parallel,
        },
    )
    group = TrainerGroup(cfg)
    try:
        group.setup(resume=False)
        run = str(tmp_path / "run")
        before = Path(group.call("save_checkpoint", run, 0, {"step": 0}, "{}", 5)[0])
        _, parts = group.train_step(_groups(), want_grads=True)
        after = Path(group.call("save_checkpoint", run, 1, {"step": 1}, "{}", 5)[0])
    finally:
        group.close()
    w0, w1 = dict(iter_checkpoint_weights(before / "model")), dict(iter_checkpoint_weights(after / "model"))
    grads = parts[0]["grads"]
    moved = total = 0
    for n, g in grads.items():
        assert w1[n].dtype == torch.float32
        nz = g != 0
        moved += int(((w1[n] - w0[n]) != 0)[nz].sum())
        total += int(nz.sum())
    assert total > 1000 and moved / total >= 0.99, moved / total


def test_collective_sync_publishes_once_and_a_restarted_engine_waits(
    ray_cluster, tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """Collective transport, 2 engines in the background: a sync is one broadcast (no object-store copy
    of the weights); an engine killed mid-window is restarted once, holds no synced weights until the
    next sync's broadcast and draws no prompts meanwhile, and the run finishes with batches of one (the
    current) version each. Whether the rollout worker or the next sync notices the death first is up
    to the scheduler: both must give exactly this."""
    from oapl.distributed.trainer import TrainerGroup
    from oapl.loop import train

    live = _capture_trainers(monkeypatch)
    versions, killed, published = [], [], []
    orig_step, orig_publish = TrainerGroup.train_step, TrainerGroup.publish_weights

    def spy(self, groups, want_grads=False):
        versions.append([g.version for g in groups])
        if len(versions) == 3:  # mid-window: the engines are generating version 1 in the background
            pid = live[0].pool.pids()[1]
            _sigkill(pid)
            killed.append(pid)
        return orig_step(self, groups, want_grads)

    def count_publish(self):
        published.append(1)
        return orig_publish(self)

    monkeypatch.setattr(TrainerGroup, "train_step", spy)
    monkeypatch.setattr(TrainerGroup, "publish_weights", count_publish)
    cfg = make_cfg(
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        steps=8,
        **{
            "rollout.asynchronous": True,
            "rollout.prompts_per_generate": 2,
            "distributed.weight_transport": "collective",
            "distributed.max_engine_restarts": 2,
        },
    )
    result = train(cfg)
    assert killed and len(live) == 1 and result.steps == 8  # no resume: the trainer never noticed
    backend = live[0]
    assert backend.pool.lazy_copy and published == []  # 4 syncs, every one a single broadcast
    assert backend.pool.pending == set()  # the restarted slot got its weights at the next sync
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    # one restart: the new actor, built before restart() returned, was not taken for dead at the next sync
    assert rows[-1]["engine_restarts"] == 1
    for step, vs in enumerate(versions):
        assert len(set(vs)) == 1 and vs[0] == step // 2, (step, vs)  # never mixed, always current
    assert abs(rows[4]["log_ratio_mean"]) < 1e-3  # right after a sync the engines hold the trainer's weights
    # a pending slot draws no prompts: every drawn prompt became a group (kept or dropped as stale)
    # except those of the call the kill interrupted and of the calls cut off when the run stopped
    fleet = backend.rollout
    state = fleet.sampler.state_dict()
    drawn = state["epoch"] * len(backend.task.train) + state["pos"]
    lost = drawn - fleet.groups_generated
    assert 0 <= lost <= 2 * (1 + len(fleet.workers)), (drawn, fleet.groups_generated)
