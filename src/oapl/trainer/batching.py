"""From rollout sequences to model inputs: token-budget micro-batches, packed or padded collation.

A batch of N (prompt, response) sequences of very different lengths (RL traces: median ~1.5K
tokens, a tail at the 8-32K cap) is trained in micro-batches. Two decisions make that fast:

* **Which sequences go together** (:func:`plan_micro_batches`): with a token budget, sequences are
  grouped by token count into as few micro-batches as the budget allows, balanced by the
  longest-processing-time rule (longest first, each to the lightest micro-batch), so micro-batches
  are of similar cost; a sequence longer than the budget gets a micro-batch of its own. Without a
  budget, fixed ``micro_batch_size`` sequences per micro-batch, in batch order.
* **How they are laid out** (:func:`collate`): *packed* concatenates the sequences of a micro-batch
  into one row with per-sequence ``position_ids`` and cumulative lengths ``cu_seqlens`` (the
  attention in :mod:`oapl.trainer.attention` never crosses sequences and builds no ``T x T`` mask),
  so no FLOP is spent on padding; *padded* right-pads every sequence to the micro-batch's longest.

Either way the model's output is brought back to one *response-aligned* layout, ``(n, R)`` with
``R`` the longest response of the micro-batch: row ``i`` holds the log-probs of response ``i``'s
tokens, in order, then zeros (``response_mask`` says which). The objectives see the same tensors
whatever the layout, so the loss is the same function of the same numbers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch


@dataclass
class Sequence:
    """One response of the batch: its prompt, its tokens, the engine's log-probs of those tokens."""

    prompt_ids: list[int]
    response_ids: list[int]
    ref_logprobs: list[float]

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.ref_logprobs):
            raise ValueError(f"{len(self.response_ids)} response tokens but {len(self.ref_logprobs)} log-probs")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def balanced_partition(costs: list[int], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` lists of near-equal total cost (LPT: longest first, each to
    the lightest part). Indices inside a part are in increasing order. Empty parts are possible only
    when there are fewer items than parts."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + costs[i], p))
    return [sorted(x) for x in out]


def plan_micro_batches(lengths: list[int], max_tokens: int | None = None,
                       micro_batch_size: int | None = None) -> list[list[int]]:
    """Indices of the sequences of each micro-batch.

    With ``max_tokens``: the fewest balanced micro-batches of at most ``max_tokens`` tokens each
    (a sequence over the budget alone in its own); ``micro_batch_size`` then caps the sequences per
    micro-batch as well. Without: consecutive runs of ``micro_batch_size`` sequences.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens is None:
        mb = micro_batch_size or n
        return [list(range(s, min(s + mb, n))) for s in range(0, n, mb)]
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    over = [i for i in range(n) if lengths[i] > max_tokens]
    rest = [i for i in range(n) if lengths[i] <= max_tokens]
    plans: list[list[int]] = [[i] for i in over]
    if rest:
        total = sum(lengths[i] for i in rest)
        k = max(-(-total // max_tokens), -(-len(rest) // micro_batch_size) if micro_batch_size else 1)
        while True:
            parts = balanced_partition([lengths[i] for i in rest], k)
            fits = all(sum(lengths[rest[j]] for j in p) <= max_tokens
                       and (micro_batch_size is None or len(p) <= micro_batch_size) for p in parts)
            if fits:
                plans.extend([[rest[j] for j in p] for p in parts if p])
                break
            k += 1
    return sorted(plans, key=lambda p: p[0])


@dataclass
class TokenBatch:
    """Model inputs of one micro-batch and where its response tokens are.

    ``input_ids``/``position_ids`` are ``(B, T)``: ``B = 1`` when packed (then ``cu_seqlens``, the
    ``(n+1,)`` int32 cumulative sequence lengths, and ``max_seqlen`` are set and ``attention_mask``
    is None), ``B = n`` when padded. ``target_index`` are flat ``B*T`` positions whose *next* token
    is a response token and ``target_ids`` those tokens; ``seq_index``/``tok_index`` say where each
    lands in the response-aligned ``(n, R)`` outputs. ``ref_logprobs``/``response_mask`` are
    ``(n, R)``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    target_index: torch.Tensor
    target_ids: torch.Tensor
    seq_index: torch.Tensor
    tok_index: torch.Tensor
    ref_logprobs: torch.Tensor
    response_mask: torch.Tensor
    num_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_sequences(self) -> int:
        return self.response_mask.shape[0]

    @property
    def computed_tokens(self) -> int:
        """Tokens the decoder runs on (useful + padding)."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> TokenBatch:
        def mv(t):
            return t.to(device, non_blocking=True) if torch.is_tensor(t) else t

        return TokenBatch(*(mv(getattr(self, f)) for f in (
            "input_ids", "position_ids", "attention_mask", "cu_seqlens", "max_seqlen", "target_index",
            "target_ids", "seq_index", "tok_index", "ref_logprobs", "response_mask", "num_tokens")),
            extra=self.extra)


def collate(seqs: list[Sequence], packed: bool, pad_token_id: int = 0, pad_to: int | None = None) -> TokenBatch:
    """Lay out ``seqs`` for one forward pass (see the module docstring); padded rows are at least
    ``pad_to`` wide when given."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    n = len(seqs)
    r_max = max(1, max(len(s.response_ids) for s in seqs))
    ref = torch.zeros((n, r_max), dtype=torch.float32)
    rmask = torch.zeros((n, r_max), dtype=torch.float32)
    lens = [s.num_tokens for s in seqs]
    width = max(lens) if pad_to is None or packed else max(max(lens), pad_to)
    tgt_index, tgt_ids, seq_idx, tok_idx = [], [], [], []
    if packed:
        total = sum(lens)
        ids = torch.empty((1, total), dtype=torch.long)
        pos = torch.empty((1, total), dtype=torch.long)
        cu = torch.zeros(n + 1, dtype=torch.int32)
        att = None
    else:
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        cu = None
    offset = 0
    for i, s in enumerate(seqs):
        toks = torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.long)
        length = toks.numel()
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p == 0 and r > 0:
            raise ValueError(f"sequence {i}: an empty prompt leaves its first response token unscored")
        base = offset if packed else i * width
        if packed:
            ids[0, offset : offset + length] = toks
            pos[0, offset : offset + length] = torch.arange(length)
            offset += length
            cu[i + 1] = offset
        else:
            ids[i, :length] = toks
            pos[i, :length] = torch.arange(length)
            att[i, :length] = 1
        if r:
            # position p-1+j predicts response token j
            tgt_index.append(torch.arange(base + p - 1, base + p - 1 + r))
            tgt_ids.append(toks[p:])
            seq_idx.append(torch.full((r,), i, dtype=torch.long))
            tok_idx.append(torch.arange(r))
            ref[i, :r] = torch.tensor(s.ref_logprobs, dtype=torch.float32)
            rmask[i, :r] = 1.0

    def cat(parts):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    return TokenBatch(ids, pos, att, cu, width, cat(tgt_index), cat(tgt_ids), cat(seq_idx), cat(tok_idx),
                      ref, rmask, num_tokens=sum(lens))
