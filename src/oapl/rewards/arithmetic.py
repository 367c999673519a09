"""Strict verifier for the built-in arithmetic task.

The final answer is the content of the last ``\\boxed{...}`` if there is one, else the number after
the last "answer is"/"answer:", else the last number in the response. Only that one number counts,
so printing many numbers cannot collect the reward: ``"1 2 3 ... 40"`` is judged by ``40`` alone.
"""

from __future__ import annotations

import re
from typing import Any

_NUM = r"[-\u2212]?\d[\d,]*(?:\.\d+)?"
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}")
_ANSWER = re.compile(r"answer\s*(?:is|:|=)\s*\**\s*(" + _NUM + r")", re.IGNORECASE)
_ANY = re.compile(r"(?<![\w.])(" + _NUM + r")")


def extract_final_number(text: str) -> float | None:
    """The response's final answer as a number, or ``None`` when it has none."""
    for pattern in (_BOXED, _ANSWER, _ANY):
        found = pattern.findall(text)
        if found:
            raw = found[-1].replace(",", "").replace("\u2212", "-")
            try:
                return float(raw)
            except ValueError:
                return None
    return None


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 when the final number of the completion equals ``answer``, else 0.0 (TRL convention)."""
    out = []
    for completion, target in zip(completions, answer):
        got = extract_final_number(completion)
        out.append(1.0 if got is not None and abs(got - float(target)) < 1e-9 else 0.0)
    return out
