"""One trainer step, for one process and for N ranks: Algorithm 1's "optimiser step on the loss".

A step takes one batch of prompt groups and runs in two halves:

1. :func:`plan_step` (wherever the whole batch is: the local trainer or the Ray driver) turns the
   groups into sequences with advantages (from whole groups, by the objective), splits the batch
   into ``algorithm.mini_batches`` mini-batches of whole groups (one optimiser step each), gives
   each rank a token-balanced share of every mini-batch, and plans each share's micro-batches
   (token budget or fixed count, :func:`oapl.trainer.batching.plan_micro_batches`). A rank receives
   only its :class:`RankWork`.
2. :func:`run_step` (on every rank) runs the micro-batches: collate (packed, padded or with shared
   prompts, :func:`oapl.trainer.batching.choose_layout`), fp32
   log-probs under the compute dtype, the objective's loss, backward with exact accumulation (each
   micro-batch's loss is its share of the mini-batch mean: the denominator is the mini-batch's N),
   then clip, AdamW step on the fp32 masters, schedule step. With pi_old needed (GRPO with several
   mini-batches), pi_old's log-probs are computed once, before the first update.

How ranks combine is a :class:`Parallel`: one process is the identity; DDP/FSDP2 ranks scale the
loss by W (the frameworks average gradients over ranks: ``(1/W) sum_r W * grad_r`` is the
full-batch gradient), skip the all-reduce on all but the last micro-batch (DDP), run the same number
of micro-batches on every rank (FSDP2 all-gathers in every forward; the extra ones are zero-weight),
and agree on skipping a non-finite step. Metrics are partial sums merged across ranks
(:mod:`oapl.trainer.stats`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch

from oapl.trainer.batching import Sequence, balanced_partition, collate_auto, plan_micro_batches
from oapl.trainer.logprobs import token_logprobs
from oapl.trainer.stats import StepStats, batch_metrics

log = logging.getLogger(__name__)


@dataclass
class MiniWork:
    """One rank's share of one mini-batch."""

    seqs: list[Sequence]
    advantages: list[float]
    num_sequences: int  # N of the whole mini-batch: the loss denominator
    micro: list[list[int]]  # this rank's micro-batches (indices into ``seqs``)
    num_micro: int  # the most micro-batches any rank runs on this mini-batch


@dataclass
class RankWork:
    minis: list[MiniWork]

    @property
    def num_sequences(self) -> int:
        return sum(len(m.seqs) for m in self.minis)


def batch_sequences(groups, objective) -> tuple[list[Sequence], torch.Tensor, torch.Tensor]:
    """Sequences of a batch in group order, their advantages ``(N,)`` and the groups' baselines."""
    seqs, advs, vals = [], [], []
    for g in groups:
        a, v = objective.advantages(torch.tensor(g.rewards, dtype=torch.float64))
        advs.append(a)
        vals.append(v)
        for toks, lps in zip(g.response_token_ids, g.response_logprobs):
            seqs.append(Sequence(g.prompt_token_ids, toks, lps))
    return seqs, torch.cat(advs).float(), torch.stack(vals).float()


def _split_groups(groups, parts: int) -> list[list]:
    if len(groups) < parts:
        raise ValueError(
            f"algorithm.mini_batches={parts} needs at least {parts} prompt groups per batch, "
            f"got {len(groups)} (rollout.prompts_per_step)"
        )
    base, rem = divmod(len(groups), parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < rem else 0)
        out.append(groups[lo:hi])
        lo = hi
    return out


def plan_step(
    groups, objective, optim_cfg, mini_batches: int = 1, world: int = 1
) -> tuple[list[RankWork], dict[str, float]]:
    """Split a batch into every rank's work (see the module docstring); also the batch metrics."""
    seqs_all, adv_all, values = batch_sequences(groups, objective)
    works = [RankWork([]) for _ in range(world)]
    start = 0
    for part in _split_groups(groups, mini_batches):
        n = sum(g.n for g in part)
        seqs, adv = seqs_all[start : start + n], adv_all[start : start + n].tolist()
        start += n
        if n < world:
            raise ValueError(f"a mini-batch of {n} sequences cannot be split over {world} trainer ranks")
        lengths = [s.num_tokens for s in seqs]
        shares = balanced_partition(lengths, world) if world > 1 else [list(range(n))]
        plans = [
            plan_micro_batches(
                [lengths[i] for i in sh], optim_cfg.max_tokens_per_micro_batch, optim_cfg.micro_batch_size
            )
            for sh in shares
        ]
        most = max(len(p) for p in plans)
        for r, (sh, plan) in enumerate(zip(shares, plans)):
            works[r].minis.append(MiniWork([seqs[i] for i in sh], [adv[i] for i in sh], n, plan, most))
    return works, batch_metrics(groups, objective, adv_all, values)


class Parallel:
    """One process: no communication (see :class:`oapl.distributed.trainer.RankParallel` for N ranks)."""

    world = 1
    rank = 0
    pad_micro = False  # run the same number of micro-batches as the busiest rank (FSDP2)

    def __init__(self, policy) -> None:
        self.policy = policy

    def logprobs(self, batch, with_entropy: bool = True):
        p = self.policy
        return token_logprobs(
            p.model,
            batch,
            p.temperature,
            p.cfg.model.logprob_chunk_size,
            with_entropy=with_entropy,
            autocast=p.precision.autocast(),
        )

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_finite(self, local: bool) -> bool:
        return local

    def grad_norm(self, params, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return t


def run_step(policy, work: RankWork, par: Parallel, capture_grads: bool = False) -> dict:
    """Run one rank's work: ``mini_batches`` optimiser steps. Returns the rank's partial results."""
    t0 = time.perf_counter()
    recompute = policy.cfg.algorithm.reference_logprobs == "recompute" and policy.reference is not None
    policy.model.train()
    stats = StepStats()
    # pi_old = the trainer before this batch's first update
    old = _old_logprobs(policy, work, par) if policy.objective.needs_old_logprobs else None
    finite_all, grad_norms, lrs, grads = True, [], [], None
    for m, mini in enumerate(work.minis):
        policy.optimizer.zero_grad(set_to_none=True)
        local_finite = _accumulate(policy, mini, par, None if old is None else old[m], recompute, stats)
        finite, grad_norm, mini_grads = _clip(policy, par, local_finite, capture_grads)
        if mini_grads is not None:
            grads = mini_grads
        lrs.append(policy.scheduler.get_last_lr()[0])
        _update(policy, par, finite)
        finite_all = finite_all and finite
        grad_norms.append(grad_norm)
    return {
        "rank": par.rank,
        "finite": finite_all,
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": lrs[0],
        "stats": stats.as_dict(),
        "seconds": time.perf_counter() - t0,
        "mini_batches": len(work.minis),
        "grads": grads,
    }


def _micro(policy, mini: MiniWork, j: int, device):
    """Micro-batch ``j`` of ``mini``, collated on ``device``; past this rank's last one, a zero-weight dummy."""
    dummy = j >= len(mini.micro)
    idx = mini.micro[0] if dummy else mini.micro[j]
    batch = collate_auto([mini.seqs[i] for i in idx], policy.packing, policy.pad_token_id, policy.share_prompts)
    return dummy, idx, batch.to(device)


def _schedule(mini: MiniWork, par: Parallel) -> int:
    """How many micro-batches this rank runs on ``mini`` (the busiest rank's count under FSDP2)."""
    return max(mini.num_micro, len(mini.micro)) if par.pad_micro else len(mini.micro)


def _old_logprobs(policy, work: RankWork, par: Parallel) -> list[list[torch.Tensor | None]]:
    """pi_old's log-probs of every micro-batch of every mini-batch, by the trainer as it is now."""
    device = policy.device
    old: list[list[torch.Tensor | None]] = []
    with torch.no_grad():
        for mini in work.minis:
            old.append(
                [
                    par.logprobs(_micro(policy, mini, j, device)[2], with_entropy=False)[0]
                    for j in range(_schedule(mini, par))
                ]
            )
    return old


def _accumulate(
    policy, mini: MiniWork, par: Parallel, old: list[torch.Tensor | None] | None, recompute: bool, stats: StepStats
) -> bool:
    """Forward and backward over the micro-batches of ``mini``, gradients accumulated; whether every loss
    on this rank was finite (the caller agrees across ranks)."""
    objective = policy.objective
    device = policy.device
    chunk = policy.cfg.model.logprob_chunk_size
    local_finite = True
    n_run = _schedule(mini, par)
    for j in range(n_run):
        dummy, idx, mb = _micro(policy, mini, j, device)
        ref_lp = mb.ref_logprobs
        if recompute:
            with torch.no_grad():
                ref_lp, _ = token_logprobs(
                    policy.reference, mb, policy.temperature, chunk, autocast=policy.precision.autocast()
                )
        with par.accumulate(last=j == n_run - 1):
            logp, ent = par.logprobs(mb)
            adv = torch.tensor([mini.advantages[i] for i in idx], dtype=torch.float32, device=device)
            loss, ostats = objective.loss(
                logp, ref_lp, None if old is None else old[j], mb.response_mask, adv, mini.num_sequences
            )
            (loss * (0.0 if dummy else float(par.world))).backward()
        if dummy:
            continue
        if not torch.isfinite(loss):
            local_finite = False  # keep going: every rank must run the same collectives
            continue
        stats.add(loss, logp, ref_lp, mb.response_mask, ent, ostats, mb.num_tokens, mb.computed_tokens)
    return local_finite


def _clip(policy, par: Parallel, local_finite: bool, capture_grads: bool) -> tuple[bool, float, dict | None]:
    """Agree on finiteness across ranks and clip the gradients: ``(finite, grad norm, captured gradients)``
    (the norm is NaN and nothing is captured when a loss was not finite)."""
    finite = par.all_finite(local_finite)
    grad_norm = float("nan")
    grads = None
    if finite:
        params = [p for p in policy.model.parameters() if p.requires_grad]
        if capture_grads:
            grads = {
                k: par.full(p.grad).detach().cpu().clone()
                for k, p in policy.model.named_parameters()
                if p.requires_grad and p.grad is not None
            }
        max_norm = policy.cfg.optim.max_grad_norm if policy.cfg.optim.max_grad_norm is not None else float("inf")
        grad_norm = par.grad_norm(params, max_norm)
        finite = math.isfinite(grad_norm)
    return finite, grad_norm, grads


def _update(policy, par: Parallel, finite: bool) -> None:
    """The AdamW step (skipped, with a warning, when not ``finite``), then the schedule step."""
    if finite:
        policy.optimizer.step()
    elif par.rank == 0:
        log.warning(
            "non-finite loss or gradient: optimiser step skipped%s, weights untouched",
            " on every rank" if par.world > 1 else "",
        )
    policy.optimizer.zero_grad(set_to_none=True)
    policy.scheduler.step()
