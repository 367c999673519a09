"""Score only the final answer of a thinking model: the text after its ``</think>``.

Thinking models (Qwen3-*-Thinking, DeepSeek-R1 distills) write their reasoning in a
``<think> ... </think>`` block and the final answer after it. Their chat templates usually open the
block in the prompt itself (the rendered prompt ends with ``<think>\\n``), so the response holds only
the closing tag. A verifier that reads the whole response would score a ``\\boxed{}`` the model tried
inside its reasoning, and a response cut off by ``max_tokens`` in the middle of its thinking could
collect the reward without ever answering.

:func:`final_answer` decides what a reward may see (``task.thinking``):

``auto`` (default)
    The response thinks when the rendered prompt ends inside an open ``<think>`` block, or the
    response itself contains ``<think>`` or ``</think>``. A thinking response is scored on the text
    after its last ``</think>``; one with no ``</think>`` (truncated inside its thinking) scores 0
    without calling the reward. A response that does not think is scored whole, so non-thinking
    models are unaffected.
``required``
    Every response must close a thinking block: no ``</think>`` scores 0; otherwise the text after
    the last ``</think>`` is scored.
``off``
    The whole response is scored (the reward function sees the raw text).

The tags are ``task.think_tags`` (default ``["<think>", "</think>"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oapl.rewards.base import RewardFn, Scores, split_context
from oapl.rewards.user import reward_name

THINKING_MODES = ("auto", "required", "off")
DEFAULT_THINK_TAGS = ("<think>", "</think>")


def prompt_opens_thinking(prompt: str, open_tag: str = "<think>") -> bool:
    """True when the rendered prompt ends with an open thinking tag (the chat template opened it)."""
    return prompt.rstrip().endswith(open_tag)


def final_answer(
    prompt: str, completion: str, mode: str = "auto", tags: Sequence[str] = DEFAULT_THINK_TAGS
) -> str | None:
    """The part of ``completion`` a reward may score, or ``None`` when it must score 0.

    ``None`` means the response thinks but never closed its thinking block (truncated inside it),
    or, with ``mode="required"``, that it has no closing tag at all.
    """
    if mode not in THINKING_MODES:
        raise ValueError(f"task.thinking: unknown mode {mode!r}; use one of {', '.join(THINKING_MODES)}")
    if mode == "off":
        return completion
    open_tag, close_tag = tags
    end = completion.rfind(close_tag)
    if end >= 0:
        return completion[end + len(close_tag) :]
    if mode == "required":
        return None
    thinks = open_tag in completion or prompt_opens_thinking(prompt, open_tag)
    return None if thinks else completion


class ThinkingAwareReward:
    """Wrap a TRL-style reward so that it sees only the final answers (see the module docstring).

    Responses for which :func:`final_answer` is ``None`` score 0.0 and are not passed to the
    wrapped function; the others are passed in one call, with every column sliced to match.
    """

    def __init__(self, fn: RewardFn, mode: str = "auto", tags: Sequence[str] = DEFAULT_THINK_TAGS) -> None:
        if mode not in THINKING_MODES:
            raise ValueError(f"task.thinking: unknown mode {mode!r}; use one of {', '.join(THINKING_MODES)}")
        if len(tags) != 2 or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"task.think_tags must be two non-empty strings [open, close], got {list(tags)!r}")
        self.fn = fn
        self.mode = mode
        self.tags = (tags[0], tags[1])
        self.__name__ = reward_name(fn)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        columns, context = split_context(columns)  # trainer_state, ...: one object for the call, not sliced
        answers = [final_answer(p, c, self.mode, self.tags) for p, c in zip(prompts, completions)]
        keep = [i for i, a in enumerate(answers) if a is not None]
        out = [0.0] * len(completions)
        if not keep:
            return out
        scored = self.fn(
            [prompts[i] for i in keep],
            [answers[i] for i in keep],
            **{k: [v[i] for i in keep] for k, v in columns.items()},
            **context,
        )
        scored_out = scored
        parts = getattr(scored, "parts", None)
        scored = list(scored)
        if len(scored) != len(keep):
            raise ValueError(f"reward {self.__name__} returned {len(scored)} rewards for {len(keep)} completions")
        for i, value in zip(keep, scored):
            out[i] = value
        if not parts:
            return Scores(out, None, getattr(scored_out, "metrics", None))
        full = {}
        for name, values in parts.items():  # a response cut off in its thinking scores 0 in every part too
            full[name] = [0.0] * len(completions)
            for i, value in zip(keep, values):
                full[name][i] = value
        return Scores(out, full, getattr(scored_out, "metrics", None))

    def close(self) -> None:
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()
