"""Offline OAPL: train on a stored rollout dataset, with no inference engine.

This is the paper's code experiment: the data was sampled once by a fixed policy (the "lagged
inference policy"), V* comes from the stored group rewards, the KL reference is the stored engine
log-probs (or a frozen copy of the sampling weights recomputing them), and the trainer makes several
passes over it without any weight sync (L = the whole run).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import yaml

from oapl.config import TrainConfig, save_config
from oapl.data.rollouts import RolloutGroup, filter_groups, read_rollouts
from oapl.metrics import MetricsLogger
from oapl.rundir import begin_run, check_run_dir
from oapl.trainer.checkpoint import latest_checkpoint, save_checkpoint, set_rng_state
from oapl.trainer.policy import load_policy

log = logging.getLogger(__name__)


def _epoch_batches(n_groups: int, per_step: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n_groups))
    random.Random(seed * 7_919 + epoch).shuffle(order)
    return [order[i : i + per_step] for i in range(0, n_groups - per_step + 1, per_step)]


def _same_weights(recorded: str, configured: str) -> bool:
    if recorded == configured:
        return True
    a, b = Path(recorded).expanduser(), Path(configured).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def check_sampling_provenance(groups: list[RolloutGroup], cfg: TrainConfig) -> None:
    """Refuse offline data sampled otherwise than the configuration says (unless allowed).

    Each group records how it was sampled (``sampling.temperature``, ``sampling.top_p``) and by which
    weights (``weights_id``). The trainer scores responses at ``sampling.temperature`` with
    ``model.name`` as the starting point (and, with ``reference_logprobs: recompute``, as pi_inf), so
    the stored engine log-probs must come from that same distribution. A mismatch raises
    ``ValueError`` naming the recorded and the configured value and an example ``prompt_id``; with
    ``offline.allow_sampling_mismatch`` it is logged as a warning instead.
    """
    source = cfg.offline.data
    s = cfg.sampling
    checks = (("temperature", "sampling.temperature", s.temperature),
              ("top_p", "sampling.top_p", s.top_p))
    problems: list[str] = []
    for key, field_name, want in checks:
        bad = [g for g in groups if not isinstance(g.sampling.get(key), (int, float))
               or not math.isclose(float(g.sampling[key]), want, rel_tol=0.0, abs_tol=1e-9)]
        if bad:
            got = sorted({repr(g.sampling.get(key, "not recorded")) for g in bad})
            problems.append(f"{len(bad)} of {len(groups)} groups were sampled with {key}={', '.join(got)} "
                            f"(e.g. prompt_id {bad[0].prompt_id!r}) but {field_name} is {want}")
    bad = [g for g in groups if not _same_weights(g.weights_id, cfg.model.name)]
    if bad:
        got = sorted({repr(g.weights_id) for g in bad})
        problems.append(f"{len(bad)} of {len(groups)} groups were sampled by weights_id={', '.join(got)} "
                        f"(e.g. prompt_id {bad[0].prompt_id!r}) but model.name is {cfg.model.name!r}")
    if not problems:
        return
    text = (f"offline.data {source}: " + "; ".join(problems) + ". The stored log-probs are pi_inf of the "
            "data's own sampling; training at other settings regresses onto a distribution the data was not "
            "drawn from. Set the configuration to the recorded values, or offline.allow_sampling_mismatch="
            "true to train anyway")
    if cfg.offline.allow_sampling_mismatch:
        log.warning("%s (allowed by offline.allow_sampling_mismatch)", text)
        return
    raise ValueError(text)


def train_offline(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.offline.data`` for ``cfg.offline.epochs`` epochs.

    ``output_dir`` rules as in :func:`oapl.loop.train`: a non-empty one needs ``resume`` or ``overwrite``.
    """
    off = cfg.offline
    if not off.data:
        raise ValueError("offline.data is required for offline training")
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # refuses to clobber a run
    groups = read_rollouts(off.data)
    check_sampling_provenance(groups, cfg)
    kept, counts = filter_groups(groups, min_correct=off.min_correct, drop_all_correct=off.drop_all_correct)
    log.info("offline data %s: %s", off.data, counts)
    if len(kept) < cfg.rollout.prompts_per_step:
        raise ValueError(f"offline.data: only {len(kept)} prompt groups left after filtering {counts}; "
                         f"need at least rollout.prompts_per_step={cfg.rollout.prompts_per_step}")
    per_epoch = len(kept) // cfg.rollout.prompts_per_step
    total = per_epoch * off.epochs
    ckpt = latest_checkpoint(run_dir) if resume else None
    # the one restore path: fp32 masters (or LoRA adapters), optimiser and schedule
    policy, state = load_policy(cfg, total, ckpt)
    if state:
        set_rng_state(state["rng"])
    if cfg.algorithm.reference_logprobs == "recompute":
        if ckpt is not None:
            raise ValueError("resuming offline training with reference_logprobs=recompute needs the "
                             "sampling weights; restart the stage instead")
        policy.snapshot_reference()  # the frozen sampling weights = the model we start from
    begin_run(run_dir, resume=resume, overwrite=overwrite)  # loaded: only now touch the run dir
    save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project,
                            cfg.model_dump(), resume=ckpt is not None)
    step = int(state.get("step", 0))
    samples_seen = int(state.get("samples_seen", 0))
    if ckpt is not None:
        metrics.truncate_after(step)
    checkpoints: list[str] = []
    progress = None
    if cfg.logging.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, initial=step, desc="oapl offline", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for epoch in range(step // per_epoch, off.epochs):
            batches = _epoch_batches(len(kept), cfg.rollout.prompts_per_step, cfg.seed, epoch)
            for b, idxs in enumerate(batches):
                if epoch * per_epoch + b < step:
                    continue  # resumed past this batch
                batch = [kept[i] for i in idxs]
                m = policy.train_step(batch)
                step += 1
                samples_seen += sum(g.n for g in batch)
                metrics.log({"step": step, "epoch": epoch + (b + 1) / len(batches), "samples_seen": samples_seen,
                             **m, "weight_version": min(g.version for g in batch), "lag": step - 1,
                             "elapsed_s": time.perf_counter() - t0})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(epoch=epoch + 1, loss=f"{m['loss']:.4g}")
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    _save(cfg, run_dir, step, policy, samples_seen, epoch)
            if off.checkpoint_every_epoch or epoch == off.epochs - 1:
                path = _save(cfg, run_dir, step, policy, samples_seen, epoch + 1, keep=off.epochs + 1)
                checkpoints.append(str(path))
    except KeyboardInterrupt as interrupt:
        interrupt.oapl_checkpoint = str(_save(cfg, run_dir, step, policy, samples_seen, step // per_epoch))
        raise
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
    summary = {"steps": step, "samples_seen": samples_seen, "filter": counts, "checkpoints": checkpoints}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _save(cfg, run_dir, step, policy, samples_seen, epoch, keep=None):
    state = {"step": step, "samples_seen": samples_seen, "epoch": epoch, "version": 0, "sync_step": 0}
    return save_checkpoint(run_dir, step, policy, state, yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False),
                           keep=keep or cfg.checkpoint.keep)
