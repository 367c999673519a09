"""Token budgets: a prompt plus its ``max_tokens`` must fit the engine's ``max_model_len``.

vLLM does not refuse a request whose prompt plus ``max_tokens`` exceeds ``max_model_len``: it stops
the response when the sequence reaches ``max_model_len`` and reports ``finish_reason="length"``, so
a 64K-token evaluation on a 34K engine silently becomes a ~34K one. ``max_tokens`` alone is checked
when the configuration is validated (:meth:`oapl.config.TrainConfig._check`); the prompt's share is
only known once the prompt is rendered and tokenized, which is where :func:`check_prompt_budget` is
called (the rollout worker for training prompts, :func:`oapl.evaluation.heldout.generate_groups`
for evaluation and ``oapl generate``).

Before a run starts, :func:`check_splits` tokenizes every prompt of the training split (and of the
held-out split when the run evaluates) and refuses the run, in one line naming the row and its token
count, when one does not fit; ``oapl check`` reports the same. The prompt lengths are computed once
per dataset, tokenizer and template, in batches, and cached (:func:`prompt_lengths`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from oapl.errors import DiskFullError, UserError

log = logging.getLogger(__name__)

#: prompts rendered and tokenized per batch call of the tokenizer
TOKENIZE_BATCH = 1024


class TokenBudgetError(UserError):
    """A prompt plus ``max_tokens`` does not fit ``engine.max_model_len``; the message names the row."""


def engine_max_model_len(engine: Any) -> int | None:
    """The prompt + response limit an engine enforces, or ``None`` when it enforces none."""
    value = getattr(engine, "max_model_len", None)
    return int(value) if value is not None else None


def check_prompt_budget(
    prompt_len: int,
    max_tokens: int,
    max_model_len: int | None,
    *,
    split: str,
    row: int,
    prompt_id: str,
    max_tokens_field: str,
) -> None:
    """Raise :class:`TokenBudgetError` when ``prompt_len + max_tokens > max_model_len``.

    ``split`` ("train" or "eval"), ``row`` (index in that split) and ``prompt_id`` locate the prompt;
    ``max_tokens_field`` names the setting that asked for ``max_tokens`` (``sampling.max_tokens``,
    ``eval.max_tokens``).
    """
    if max_model_len is None:
        return
    total = prompt_len + max_tokens
    if total <= max_model_len:
        return
    room = max_model_len - prompt_len
    cut = (
        f"the engine would stop the response after {room} tokens instead of {max_tokens}"
        if room > 0
        else "the engine would refuse the prompt, longer than the limit by itself"
    )
    raise TokenBudgetError(
        f"{split} row {row} (prompt_id {prompt_id!r}): prompt of {prompt_len} tokens + {max_tokens_field}="
        f"{max_tokens} = {total} tokens > engine.max_model_len={max_model_len}; {cut}. Raise engine.max_model_len to at least {total}, lower {max_tokens_field}, or remove "
        f"the row from the dataset"
    )


def _tokenizer_fingerprint(tokenizer) -> str:
    """What decides token counts: the fast tokenizer's whole definition (vocabulary, merges, normalizer,
    pre-tokenizer), or for a slow tokenizer its class, vocabulary and name."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(t) for t in getattr(tokenizer, "all_special_tokens", [])]).encode())
    return h.hexdigest()


def _cache_key(task, rows: list[dict[str, Any]], tokenizer) -> str:
    h = hashlib.sha256(b"oapl-prompt-lengths-v1")
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    template = {
        "system_prompt": task.system_prompt,
        "prompt_template": task.prompt_template,
        "chat_template": bool(task.chat_template),
        "tokenizer_chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    for row in rows:  # the dataset's fingerprint: every row, as the task renders it
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def lengths_cache_dir() -> Path:
    """``$OAPL_CACHE/prompt_lengths`` (default ``~/.cache/oapl/prompt_lengths``)."""
    return Path(os.environ.get("OAPL_CACHE", Path.home() / ".cache" / "oapl")) / "prompt_lengths"


def _batch_counter(tokenizer):
    """``texts -> token counts`` as ``tokenizer(text, add_special_tokens=False)`` counts them: the fast
    tokenizer's Rust ``encode_batch_fast`` (no offsets: ~3x a ``tokenizer(texts)`` call) when it agrees
    with the tokenizer on the first batch, else one ``tokenizer(texts)`` batch call."""

    def batch_call(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]

    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return batch_call
    state = {"checked": False, "use": True}

    def counter(texts: list[str]) -> list[int]:
        if not state["use"]:
            return batch_call(texts)
        counts = [len(e.ids) for e in fast(texts, add_special_tokens=False)]
        if not state["checked"]:  # the tokenizer may pre-process text itself: then count its way
            state["checked"] = True
            sample = texts[:16]
            if counts[: len(sample)] != batch_call(sample):
                state["use"] = False
                return batch_call(texts)
        return counts

    return counter


def prompt_lengths(task, rows: list[dict[str, Any]], tokenizer, *, cache: bool = True) -> list[int]:
    """Token count of every rendered prompt of ``rows`` (as the rollout worker tokenizes them).

    Rendered with ``task.render`` and tokenized :data:`TOKENIZE_BATCH` at a time (one batch call of a
    fast tokenizer: :func:`_batch_counter`), then cached under :func:`lengths_cache_dir`, keyed by the rows, the tokenizer and
    the template: a second run on the same data reads the counts back instead of tokenizing again.
    A cache that cannot be read or written is skipped (the counts are recomputed).
    """
    if not rows:
        return []
    path = None
    if cache:
        path = lengths_cache_dir() / f"{_cache_key(task, rows, tokenizer)}.json"
        try:
            stored = json.loads(path.read_text())
            if isinstance(stored, list) and len(stored) == len(rows) and all(isinstance(n, int) for n in stored):
                return stored
        except (OSError, ValueError):
            pass
    lengths: list[int] = []
    count = _batch_counter(tokenizer)
    for start in range(0, len(rows), TOKENIZE_BATCH):
        texts = [task.render(ex, tokenizer) for ex in rows[start : start + TOKENIZE_BATCH]]
        lengths += count(texts)
    if path is not None:
        try:
            from oapl.atomic import atomic_write_text

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(lengths))
        except (OSError, DiskFullError) as e:  # a read-only or full cache: the counts are still right
            log.debug("prompt lengths not cached at %s: %s", path, e)
    return lengths


def split_problems(
    task,
    rows: list[dict[str, Any]],
    tokenizer,
    max_tokens: int,
    max_model_len: int | None,
    *,
    split: str,
    max_tokens_field: str,
    cache: bool = True,
) -> tuple[list[str], int]:
    """(problems, longest prompt): one line for the first prompt of ``rows`` that does not fit (with the
    number of others that do not either), and the longest prompt's token count."""
    lengths = prompt_lengths(task, rows, tokenizer, cache=cache)
    longest = max(lengths, default=0)
    if max_model_len is None:
        return [], longest
    bad = [i for i, n in enumerate(lengths) if n + max_tokens > max_model_len]
    if not bad:
        return [], longest
    i = bad[0]
    try:
        check_prompt_budget(
            lengths[i],
            max_tokens,
            max_model_len,
            split=split,
            row=i,
            prompt_id=str(rows[i].get("prompt_id", i)),
            max_tokens_field=max_tokens_field,
        )
    except TokenBudgetError as e:
        message = str(e)
    if len(bad) > 1:
        worst = max(bad, key=lambda j: lengths[j])
        message += (
            f" ({len(bad) - 1} more {split} row(s) do not fit either; the longest is row {worst} with "
            f"{lengths[worst]} tokens)"
        )
    return [message], longest


def check_splits(cfg, task, tokenizer, max_model_len: int | None, *, evaluate: bool = True, cache: bool = True) -> int:
    """Before a run starts: every training prompt (and held-out prompt when ``evaluate``) plus its
    ``max_tokens`` fits ``max_model_len``, else :class:`TokenBudgetError` naming the row and its token
    count. Returns the longest prompt's token count."""
    longest = 0
    splits = [("train", task.train, cfg.sampling.max_tokens, "sampling.max_tokens")]
    if evaluate and task.eval:
        splits.append(
            (
                "eval",
                task.eval,
                cfg.eval.max_tokens or cfg.sampling.max_tokens,
                "eval.max_tokens" if cfg.eval.max_tokens else "sampling.max_tokens",
            )
        )
    for split, rows, max_tokens, field in splits:
        problems, n = split_problems(
            task, rows, tokenizer, max_tokens, max_model_len, split=split, max_tokens_field=field, cache=cache
        )
        if problems:
            raise TokenBudgetError(problems[0])
        longest = max(longest, n)
    return longest
