"""What a reward can raise that is not about one completion, or not one completion's score.

Kept apart from :mod:`oapl.rewards.base` (which scores batches) and :mod:`oapl.rewards.user` (which
calls one user function) because both raise them, and the rewards that ship with oapl (math, code)
raise :class:`RewardUnavailableError` too.
"""

from __future__ import annotations

from oapl.errors import UserError


class RewardUnavailableError(UserError):
    """A reward that cannot score anything here (its workers cannot start, no sandbox): stops the run."""


class RewardErrorRateError(UserError):
    """More than ``task.max_reward_error_fraction`` of one scoring call's rewards failed: stops the run."""


class RewardTypeError(UserError):
    """A reward returned something that is not a number (a string, a list): refused, naming the function."""


class RewardSignatureError(UserError):
    """A reward cannot be called with what TRL (and oapl) pass it: found before the model loads."""


class RewardLengthError(ValueError):
    """A reward returned a list whose length is not the number of completions."""
