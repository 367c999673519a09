"""Reward functions used by the tests (loaded as ``module:function`` from this folder)."""

from __future__ import annotations


def digit_fraction(prompts, completions, **_):
    """Share of the characters of the completion that are the digit '7' (dense, easy to learn)."""
    return [sum(ch == "7" for ch in c) / max(1, len(c)) for c in completions]


def flaky(prompts, completions, **_):
    """Raises on completions containing 'a'; otherwise the '7' share. Also returns NaN for 'b'."""
    out = []
    for c in completions:
        if "a" in c:
            raise RuntimeError("verifier crashed")
        out.append(float("nan") if "b" in c else sum(ch == "7" for ch in c) / max(1, len(c)))
    return out


def interrupting(prompts, completions, **_):
    """Simulates Ctrl-C on the third scoring call of training (the one-completion check before training,
    oapl.data.tasks.check_user_reward, does not count)."""
    from oapl.data.tasks import PROBE_COMPLETION

    if len(completions) == 1 and completions[0] == PROBE_COMPLETION:
        return [0.0]
    interrupting.calls = getattr(interrupting, "calls", 0) + 1
    if interrupting.calls == 3:
        raise KeyboardInterrupt
    return [0.0 for _ in completions]


def has_seven(prompts, completions, **_):
    """1.0 when the completion contains the digit '7' (binary, like a verifier)."""
    return [1.0 if "7" in c else 0.0 for c in completions]
