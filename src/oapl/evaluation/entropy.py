"""The entropy of a policy on its own held-out samples.

For a prompt ``x`` and responses ``y ~ pi(.|x)`` sampled at temperature ``T``, two numbers describe
how spread the policy ``pi_T = softmax(logits / T)`` still is:

* the mean **token entropy** ``1/|y| sum_t H(pi_T(. | x, y_<t))`` in nats, with
  ``H(p) = log Z - sum_v p_v z_v`` over the full vocabulary (exact at every visited prefix);
* the Monte-Carlo **sequence entropy** ``E_{y ~ pi_T}[-log pi_T(y | x)] = E[-sum_t log pi_T(y_t | ...)]``,
  which is an unbiased estimate of ``H(pi_T(. | x))`` when the ``y`` are sampled from ``pi_T`` itself.

Unlike the training metrics ``entropy``/``seq_entropy`` (measured on the engine's batch, i.e. on
samples of the lagged ``pi_inf``), these score the *trained* weights on samples they generated.
Sequences are packed into micro-batches of at most ``max_tokens`` tokens and scored without
gradients with the trainer's chunked log-probs, so the full-vocabulary log-softmax is never built
for more than ``chunk_size`` positions at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from oapl.rollout.group import RolloutGroup
from oapl.trainer.batching import Sequence, collate, plan_micro_batches
from oapl.trainer.logprobs import token_logprobs

__all__ = ["policy_entropy"]


@torch.no_grad()
def policy_entropy(
    model,
    groups: Iterable[RolloutGroup],
    temperature: float,
    *,
    packed: bool = False,
    pad_token_id: int = 0,
    max_tokens: int = 8192,
    chunk_size: int = 1024,
    autocast: contextlib.AbstractContextManager | None = None,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Per prompt: ``{"token_entropy", "seq_entropy", "response_tokens"}`` means over its responses.

    ``token_entropy`` averages the per-token entropies of all the prompt's response tokens (a token-
    weighted mean); ``seq_entropy`` is the mean over responses of ``-log pi_T(y|x)``; empty responses
    count in ``seq_entropy`` (as 0) but add no tokens. ``packed`` needs a model whose attention
    handles packed rows (:func:`oapl.trainer.attention.enable_varlen`).
    """
    groups = list(groups)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seqs: list[Sequence] = []
    owner: list[str] = []
    for g in groups:
        for ids in g.response_token_ids:
            seqs.append(Sequence(list(g.prompt_token_ids), list(ids), [0.0] * len(ids)))
            owner.append(g.prompt_id)
    ent_sum: dict[str, float] = {g.prompt_id: 0.0 for g in groups}
    nll_sum: dict[str, float] = {g.prompt_id: 0.0 for g in groups}
    toks: dict[str, int] = {g.prompt_id: 0 for g in groups}
    count: dict[str, int] = {g.prompt_id: 0 for g in groups}
    was_training = model.training
    model.eval()
    try:
        for plan in plan_micro_batches([s.num_tokens for s in seqs], max_tokens, None):
            batch = collate([seqs[i] for i in plan], packed=packed, pad_token_id=pad_token_id).to(device)
            lp, ent = token_logprobs(model, batch, temperature, chunk_size, with_entropy=True, autocast=autocast)
            assert ent is not None  # with_entropy=True
            mask = batch.response_mask
            ent_rows = (ent * mask).sum(-1).tolist()
            nll_rows = (-(lp * mask)).sum(-1).tolist()
            for j, i in enumerate(plan):
                pid = owner[i]
                ent_sum[pid] += ent_rows[j]
                nll_sum[pid] += nll_rows[j]
                toks[pid] += len(seqs[i].response_ids)
                count[pid] += 1
    finally:
        model.train(was_training)
    return {
        pid: {
            "token_entropy": ent_sum[pid] / max(toks[pid], 1),
            "seq_entropy": nll_sum[pid] / max(count[pid], 1),
            "response_tokens": toks[pid] / max(count[pid], 1),
        }
        for pid in ent_sum
    }
