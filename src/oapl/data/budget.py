"""Token budgets: a prompt plus its ``max_tokens`` must fit the engine's ``max_model_len``.

vLLM does not refuse a request whose prompt plus ``max_tokens`` exceeds ``max_model_len``: it stops
the response when the sequence reaches ``max_model_len`` and reports ``finish_reason="length"``, so
a 64K-token evaluation on a 34K engine silently becomes a ~34K one. ``max_tokens`` alone is checked
when the configuration is validated (:meth:`oapl.config.TrainConfig._check`); the prompt's share is
only known once the prompt is rendered and tokenized, which is where :func:`check_prompt_budget` is
called (the rollout worker for training prompts, :func:`oapl.evaluation.heldout.generate_groups`
for evaluation and ``oapl generate``).
"""

from __future__ import annotations

from typing import Any


class TokenBudgetError(ValueError):
    """A prompt plus ``max_tokens`` does not fit ``engine.max_model_len``; the message names the row."""


def engine_max_model_len(engine: Any) -> int | None:
    """The prompt + response limit an engine enforces, or ``None`` when it enforces none."""
    value = getattr(engine, "max_model_len", None)
    return int(value) if value is not None else None


def check_prompt_budget(prompt_len: int, max_tokens: int, max_model_len: int | None, *, split: str, row: int,
                        prompt_id: str, max_tokens_field: str) -> None:
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
    cut = (f"the engine would stop the response after {room} tokens" if room > 0
           else "the engine would refuse the prompt")
    raise TokenBudgetError(
        f"{split} row {row} (prompt_id {prompt_id!r}): prompt of {prompt_len} tokens + {max_tokens_field}="
        f"{max_tokens} = {total} tokens > engine.max_model_len={max_model_len}; {cut} instead of "
        f"{max_tokens}. Raise engine.max_model_len to at least {total}, lower {max_tokens_field}, or remove "
        f"the row from the dataset")
