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

A third layout, *shared prompt* (:func:`collate_shared`), serves the case where the prompt is most of
the tokens (GRPO/OAPL groups: G responses of one prompt; few-shot prompts, short answers): each
distinct prompt of the micro-batch runs once, its key/value cache is shared by the responses that
follow it, and the responses run as one padded ``(n, R)`` block on top. The decoder then computes
``U x P + n x R`` tokens instead of ``n x (P + R)``; gradients reach the prompt's activations from
every response that attends to them, exactly as when each copy is recomputed.
:func:`choose_layout` picks it when it computes fewer tokens than packing or padding would.

Either way the model's output is brought back to one *response-aligned* layout, ``(n, R)`` with
``R`` the longest response of the micro-batch: row ``i`` holds the log-probs of response ``i``'s
tokens, in order, then zeros (``response_mask`` says which). The objectives see the same tensors
whatever the layout, so the loss is the same function of the same numbers.
"""

from __future__ import annotations

import heapq
import dataclasses
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


def plan_micro_batches(
    lengths: list[int], max_tokens: int | None = None, micro_batch_size: int | None = None
) -> list[list[int]]:
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
            fits = all(
                sum(lengths[rest[j]] for j in p) <= max_tokens
                and (micro_batch_size is None or len(p) <= micro_batch_size)
                for p in parts
            )
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
    prefix_ids: torch.Tensor | None = None
    prefix_mask: torch.Tensor | None = None
    prefix_last: torch.Tensor | None = None
    prefix_index: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def shared(self) -> bool:
        """Shared-prompt layout: ``prefix_ids`` ``(U, P)`` (right-padded, ``prefix_mask``) run first;
        sequence ``i`` continues prompt ``prefix_index[i]``, whose last token is at ``prefix_last``."""
        return self.prefix_ids is not None

    @property
    def num_sequences(self) -> int:
        return self.response_mask.shape[0]

    @property
    def computed_tokens(self) -> int:
        """Tokens the decoder runs on (useful + padding)."""
        return self.input_ids.numel() + (self.prefix_ids.numel() if self.prefix_ids is not None else 0)

    def to(self, device: torch.device | str) -> TokenBatch:
        def mv(t):
            return t.to(device, non_blocking=True) if torch.is_tensor(t) else t

        return dataclasses.replace(
            self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        )


class _Targets:
    """Where the response tokens of a micro-batch are: the flat hidden-state positions that predict
    them, the tokens, their ``(sequence, token)`` slots in the ``(n, R)`` outputs, and the engine's
    log-probs laid out as those outputs."""

    def __init__(self, n: int, r_max: int) -> None:
        self.index: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.seq: list[torch.Tensor] = []
        self.tok: list[torch.Tensor] = []
        self.ref = torch.zeros((n, r_max), dtype=torch.float32)
        self.mask = torch.zeros((n, r_max), dtype=torch.float32)

    def add(self, i: int, first: int, toks: torch.Tensor, ref_logprobs: list[float]) -> None:
        """Sequence ``i``'s ``r`` response tokens, predicted at flat positions ``first .. first + r - 1``."""
        r = toks.numel()
        self.index.append(torch.arange(first, first + r))
        self.ids.append(toks)
        self.seq.append(torch.full((r,), i, dtype=torch.long))
        self.tok.append(torch.arange(r))
        self.ref[i, :r] = torch.tensor(ref_logprobs, dtype=torch.float32)
        self.mask[i, :r] = 1.0

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``target_index, target_ids, seq_index, tok_index, ref_logprobs, response_mask``."""

        def cat(parts):
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

        return cat(self.index), cat(self.ids), cat(self.seq), cat(self.tok), self.ref, self.mask


def collate(seqs: list[Sequence], packed: bool, pad_token_id: int = 0, pad_to: int | None = None) -> TokenBatch:
    """Lay out ``seqs`` for one forward pass (see the module docstring); padded rows are at least
    ``pad_to`` wide when given."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    n = len(seqs)
    r_max = max(1, max(len(s.response_ids) for s in seqs))
    targets = _Targets(n, r_max)
    lens = [s.num_tokens for s in seqs]
    width = max(lens) if pad_to is None or packed else max(max(lens), pad_to)
    if packed:
        total = sum(lens)
        ids = torch.empty((1, total), dtype=torch.long)
        pos = torch.empty((1, total), dtype=torch.long)
        cu = torch.zeros(n + 1, dtype=torch.int32)
        att = torch.empty(0, dtype=torch.long)  # packed: no mask (cu_seqlens bounds the sequences)
    else:
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        cu = torch.empty(0, dtype=torch.int32)  # padded: no sequence boundaries
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
            targets.add(i, base + p - 1, toks[p:], s.ref_logprobs)  # position p-1+j predicts response token j

    return TokenBatch(
        ids, pos, None if packed else att, cu if packed else None, width, *targets.fields(), num_tokens=sum(lens)
    )


def _distinct_prompts(seqs: list[Sequence]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The distinct prompts of ``seqs`` in first-seen order, and each sequence's prompt's index."""
    where: dict[tuple[int, ...], int] = {}
    index = []
    for s in seqs:
        key = tuple(s.prompt_ids)
        index.append(where.setdefault(key, len(where)))
    return list(where), index


def layout_tokens(seqs: list[Sequence], packed: bool) -> tuple[int, int]:
    """Tokens the decoder computes for ``seqs`` laid out packed (or padded when not ``packed``) and
    with shared prompts (:func:`collate_shared`)."""
    lens = [s.num_tokens for s in seqs]
    plain = sum(lens) if packed else len(seqs) * max(lens)
    prompts, _ = _distinct_prompts(seqs)
    shared = len(prompts) * max(len(p) for p in prompts) + len(seqs) * max(1, max(len(s.response_ids) for s in seqs))
    return plain, shared


def choose_layout(seqs: list[Sequence], packed: bool, share_prompts: str = "off") -> str:
    """``"shared"``, ``"packed"`` or ``"padded"`` for one micro-batch.

    ``share_prompts``: ``"off"`` never shares; ``"on"`` shares whenever a prompt repeats in the
    micro-batch; ``"auto"`` shares when that computes fewer decoder tokens than the other layout
    (prompts much longer than their responses, e.g. few-shot prompts with short answers).
    """
    plain = "packed" if packed else "padded"
    if share_prompts == "off" or len(seqs) < 2:
        return plain
    prompts, _ = _distinct_prompts(seqs)
    if len(prompts) == len(seqs):  # nothing repeats: nothing to share
        return plain
    if share_prompts == "on":
        return "shared"
    if share_prompts != "auto":
        raise ValueError(f"optim.share_prompts: unknown value {share_prompts!r} (auto, on, off)")
    plain_tokens, shared_tokens = layout_tokens(seqs, packed)
    return "shared" if shared_tokens < plain_tokens else plain


def collate_shared(seqs: list[Sequence], pad_token_id: int = 0) -> TokenBatch:
    """Shared-prompt layout (see the module docstring): the ``U`` distinct prompts as ``prefix_ids``
    ``(U, P)``, right-padded; the responses as ``input_ids`` ``(n, R)``, right-padded, with
    ``position_ids`` continuing their prompt's and an ``attention_mask`` ``(n, P + R)`` over the
    prompt's cache then the response.

    The hidden states that predict response tokens are laid out ``(n, 1 + R)``: slot 0 is the last
    prompt token's (it predicts response token 0), slot ``j + 1`` response token ``j``'s;
    ``target_index`` indexes that layout.
    """
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    prompts, index = _distinct_prompts(seqs)
    for i, s in enumerate(seqs):
        if not s.prompt_ids:
            raise ValueError(f"sequence {i}: an empty prompt leaves its first response token unscored")
    n, u = len(seqs), len(prompts)
    p_max = max(len(p) for p in prompts)
    r_max = max(1, max(len(s.response_ids) for s in seqs))
    pre = torch.full((u, p_max), pad_token_id, dtype=torch.long)
    pre_mask = torch.zeros((u, p_max), dtype=torch.long)
    for k, prompt in enumerate(prompts):
        pre[k, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        pre_mask[k, : len(prompt)] = 1
    ids = torch.full((n, r_max), pad_token_id, dtype=torch.long)
    pos = torch.zeros((n, r_max), dtype=torch.long)
    att = torch.zeros((n, p_max + r_max), dtype=torch.long)
    targets = _Targets(n, r_max)
    for i, s in enumerate(seqs):
        p, r = len(s.prompt_ids), len(s.response_ids)
        att[i, :p_max] = pre_mask[index[i]]
        pos[i] = torch.arange(p, p + r_max)  # pad positions continue the count; they are masked
        if r:
            toks = torch.tensor(s.response_ids, dtype=torch.long)
            ids[i, :r] = toks
            att[i, p_max : p_max + r] = 1
            targets.add(i, i * (1 + r_max), toks, s.ref_logprobs)  # slot j of row i predicts token j

    useful = sum(len(p) for p in prompts) + sum(len(s.response_ids) for s in seqs)
    return TokenBatch(
        ids,
        pos,
        att,
        None,
        p_max + r_max,
        *targets.fields(),
        num_tokens=useful,
        prefix_ids=pre,
        prefix_mask=pre_mask,
        prefix_last=torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long),
        prefix_index=torch.tensor(index, dtype=torch.long),
    )


def collate_auto(seqs: list[Sequence], packed: bool, pad_token_id: int = 0, share_prompts: str = "off") -> TokenBatch:
    """:func:`collate` or :func:`collate_shared`, as :func:`choose_layout` decides."""
    if choose_layout(seqs, packed, share_prompts) == "shared":
        return collate_shared(seqs, pad_token_id)
    return collate(seqs, packed=packed, pad_token_id=pad_token_id)
