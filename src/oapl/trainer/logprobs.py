"""Token log-probabilities of a causal LM, computed in chunks, in fp32.

The full-vocabulary log-softmax of a whole batch (``B x T x V`` floats: 8 x 4096 x 151k is 20 GB in
fp32) is never materialised. The decoder runs once (packed or padded, see
:mod:`oapl.trainer.batching`); only the hidden states of positions that predict a response token
are kept; the LM head and log-softmax then run over ``chunk_size`` tokens at a time, each chunk
under activation checkpointing so that backward stores hidden states, not logits.

Precision: the decoder and the LM-head matmul run in the compute dtype (bf16 under mixed
precision, as the engine does); the logits are cast to fp32 before the temperature, the
log-softmax and everything downstream (the loss and its reductions), whatever the compute dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from oapl.trainer.attention import packed_forward
from oapl.trainer.batching import Sequence, TokenBatch, collate

__all__ = ["Sequence", "TokenBatch", "collate", "token_logprobs"]


def _decoder_and_head(model):
    """The body returning hidden states and the LM head, for HF models with or without peft."""
    base = model
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None:
        raise TypeError(f"{type(base).__name__} exposes no decoder/output embeddings; cannot chunk log-probs")
    return decoder, head


def _chunk_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temp: float,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * inv_temp  # fp32, or fp64 if given
    logz = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.no_grad():
        if with_entropy:
            # H = logZ - sum_v p_v z_v: one V-wide temporary (softmax), not three
            entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        else:
            entropy = torch.zeros_like(logz)
    return chosen, entropy


def _shared_prompt_hidden(decoder, batch: TokenBatch, amp) -> torch.Tensor:
    """Hidden states ``(n, 1 + R, H)`` of the shared-prompt layout (:func:`collate_shared`).

    The distinct prompts run once with a KV cache; the cache is indexed out to the ``n`` sequences
    (an autograd op: each response's gradient flows back into its prompt's keys and values) and
    the responses run on top of it. Slot 0 is the hidden state of the prompt's last token.
    """
    assert batch.prefix_ids is not None and batch.prefix_last is not None, "not a shared-prompt batch"
    with amp:
        pre = decoder(input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask, use_cache=True)
        cache = pre.past_key_values
        if cache is None:
            raise RuntimeError(
                "the decoder returned no KV cache for the shared prompt (gradient checkpointing "
                "turns the cache off): set optim.share_prompts=off"
            )
        last = pre.last_hidden_state[
            torch.arange(batch.prefix_ids.shape[0], device=batch.prefix_ids.device), batch.prefix_last
        ]  # (U, H)
        cache.batch_select_indices(batch.prefix_index)
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    return torch.cat([last.index_select(0, batch.prefix_index).unsqueeze(1).to(out.dtype), out], dim=1)


def token_logprobs(
    model,
    batch: TokenBatch,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response-aligned log-probs ``(n, R)`` under ``softmax(logits / temperature)``.

    Row ``i`` holds the log-probs of response ``i``'s tokens, then zeros (``batch.response_mask``).
    With ``with_entropy`` also returns the per-token entropy of the same distribution (no
    gradient). Differentiable when grad is enabled. ``autocast`` (e.g. ``torch.autocast(..., bf16)``)
    wraps the decoder and the LM-head matmuls; the log-softmax is fp32 regardless.
    """
    if temperature <= 0:
        raise ValueError("log-probs need temperature > 0 (greedy data cannot be scored)")
    decoder, head = _decoder_and_head(model)
    amp = autocast if autocast is not None else contextlib.nullcontext()
    if batch.shared:
        hidden = _shared_prompt_hidden(decoder, batch, amp)
    elif batch.packed:
        kwargs = {
            "cu_seq_lens_q": batch.cu_seqlens,
            "cu_seq_lens_k": batch.cu_seqlens,
            "max_length_q": batch.max_seqlen,
            "max_length_k": batch.max_seqlen,
        }
        with amp, packed_forward():
            hidden = decoder(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                attention_mask=None,
                use_cache=False,
                **kwargs,
            ).last_hidden_state
    else:
        with amp:
            hidden = decoder(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)  # (M, H)
    targets = batch.target_ids
    weight, bias = head.weight, getattr(head, "bias", None)
    inv_temp = 1.0 / temperature
    chosen_parts, entropy_parts = [], []
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
        with amp:
            if torch.is_grad_enabled():
                c, e = checkpoint(_chunk_logprobs, hc, tc, weight, bias, inv_temp, with_entropy, use_reentrant=False)
            else:
                c, e = _chunk_logprobs(hc, tc, weight, bias, inv_temp, with_entropy)
        chosen_parts.append(c)
        entropy_parts.append(e)
    shape = batch.response_mask.shape
    if not chosen_parts:  # no response tokens at all: zeros that still depend on the graph
        zeros = torch.zeros(shape, dtype=torch.float32, device=hidden.device)
        return zeros + 0.0 * hidden.float().sum(), (zeros.clone() if with_entropy else None)
    chosen = torch.cat(chosen_parts)
    out = torch.zeros(shape, dtype=chosen.dtype, device=hidden.device).index_put(
        (batch.seq_index, batch.tok_index), chosen
    )
    ent = None
    if with_entropy:
        entropy = torch.cat(entropy_parts).detach()
        ent = torch.zeros(shape, dtype=entropy.dtype, device=hidden.device).index_put(
            (batch.seq_index, batch.tok_index), entropy
        )
    return out, ent


def sequence_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    ref_logprobs: list[list[float]],
    pad_token_id: int = 0,
    packed: bool = False,
) -> TokenBatch:
    """One :class:`TokenBatch` from parallel lists (tests and benchmarks)."""
    if not (len(prompts) == len(responses) == len(ref_logprobs)):
        raise ValueError("prompts, responses and ref_logprobs must have the same length")
    seqs = [Sequence(list(p), list(r), list(lp)) for p, r, lp in zip(prompts, responses, ref_logprobs)]
    return collate(seqs, packed=packed, pad_token_id=pad_token_id)
