"""Token log-probabilities of a causal LM, computed in chunks.

The full-vocabulary log-softmax of a whole batch (``B x T x V`` floats: 8 x 4096 x 151k is 20 GB in
fp32) is never materialised. The decoder runs once; only the hidden states of response positions are
kept; the LM head and log-softmax then run over ``chunk_size`` tokens at a time, each chunk under
activation checkpointing so that backward stores hidden states, not logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenBatch:
    """Right-padded prompt+response sequences.

    ``input_ids``/``attention_mask`` are ``(N, L)``. Position ``j`` of the *target* tensors
    (``(N, L-1)``) scores token ``input_ids[:, j+1]``; ``response_mask`` is 1 where that token is a
    response token. ``ref_logprobs`` holds the engine's log-probs at the same positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    ref_logprobs: torch.Tensor

    @classmethod
    def from_sequences(cls, prompts: list[list[int]], responses: list[list[int]],
                       ref_logprobs: list[list[float]], pad_token_id: int) -> TokenBatch:
        if not (len(prompts) == len(responses) == len(ref_logprobs)):
            raise ValueError("prompts, responses and ref_logprobs must have the same length")
        n = len(prompts)
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        rmask = torch.zeros((n, width - 1), dtype=torch.float32)
        ref = torch.zeros((n, width - 1), dtype=torch.float32)
        for i, (p, r, lp) in enumerate(zip(prompts, responses, ref_logprobs)):
            if len(r) != len(lp):
                raise ValueError(f"sequence {i}: {len(r)} response tokens but {len(lp)} log-probs")
            seq = list(p) + list(r)
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            att[i, : len(seq)] = 1
            if r:
                start = len(p) - 1
                rmask[i, start : start + len(r)] = 1.0
                ref[i, start : start + len(r)] = torch.tensor(lp, dtype=torch.float32)
        return cls(ids, att, rmask, ref)

    def slice(self, idx: slice) -> TokenBatch:
        return TokenBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx],
                          self.ref_logprobs[idx])

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                     self.response_mask, self.ref_logprobs)))


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


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() * inv_temp
    logz = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.no_grad():
        logp = logits - logz.unsqueeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def token_logprobs(model, batch: TokenBatch, temperature: float = 1.0, chunk_size: int = 1024,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(N, L-1)`` of the response tokens under ``softmax(logits / temperature)``.

    Positions outside ``batch.response_mask`` are 0. With ``with_entropy`` also returns the
    per-token entropy of the same distribution (no gradient). Differentiable when grad is enabled.
    """
    if temperature <= 0:
        raise ValueError("log-probs need temperature > 0 (greedy data cannot be scored)")
    decoder, head = _decoder_and_head(model)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=position_ids, use_cache=False).last_hidden_state
    mask = batch.response_mask.bool()
    h = hidden[:, :-1][mask]  # (M, H): only positions that predict a response token
    targets = batch.input_ids[:, 1:][mask]
    weight, bias = head.weight, getattr(head, "bias", None)
    inv_temp = 1.0 / temperature
    chosen_parts, entropy_parts = [], []
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            c, e = checkpoint(_chunk_logprobs, hc, tc, weight, bias, inv_temp, use_reentrant=False)
        else:
            c, e = _chunk_logprobs(hc, tc, weight, bias, inv_temp)
        chosen_parts.append(c)
        entropy_parts.append(e)
    ent = None
    if not chosen_parts:  # no response tokens at all
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        return zeros + 0.0 * hidden.sum(), (zeros.clone() if with_entropy else None)
    chosen = torch.cat(chosen_parts)
    out = torch.zeros(mask.shape, dtype=chosen.dtype, device=hidden.device).masked_scatter(mask, chosen)
    if with_entropy:
        entropy = torch.cat(entropy_parts).detach()
        ent = torch.zeros(mask.shape, dtype=entropy.dtype, device=hidden.device).masked_scatter(mask, entropy)
    return out, ent
