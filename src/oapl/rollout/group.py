"""The core type of the pipeline: a rollout group (G responses to one prompt), and how groups are built.

:class:`RolloutGroup` is what the rollout worker puts into the buffer, what the trainer trains on,
what held-out evaluation scores and what :mod:`oapl.data.rollouts` stores as Parquet. It is a plain
dataclass (no pyarrow): the buffer and the trainer need only this module.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RolloutGroup", "filter_groups", "is_correct", "reward_metrics", "score_groups"]


def is_correct(reward: float, threshold: float = 0.5) -> bool:
    """A response counts as correct when ``reward >= threshold`` (NaN is never correct)."""
    return not math.isnan(reward) and reward >= threshold


@dataclass
class RolloutGroup:
    """The ``n`` responses sampled for one prompt.

    List fields are indexed by response index ``0..n-1``; ``response_logprobs[i][t]`` is the engine
    log-probability of ``response_token_ids[i][t]``. ``sampling`` and ``extra`` are JSON-able dicts
    (``extra`` holds the dataset columns given to the reward function, e.g. the reference answer).
    """

    prompt_id: str
    prompt: str
    prompt_token_ids: list[int]
    responses: list[str]
    response_token_ids: list[list[int]]
    response_logprobs: list[list[float]]
    rewards: list[float]
    finish_reasons: list[str]
    weights_id: str
    version: int
    sampling: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    benchmark: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: each reward function's own values (TRL's rewards_per_func), ``{name: [n values]}``; NaN where it
    #: returned None or failed. Not stored in rollout files.
    reward_parts: dict[str, list[float]] = field(default_factory=dict)
    #: values the reward functions logged with TRL's ``log_metric`` during the call that scored this
    #: group (kept on the first group of the call only, so each value counts once)
    reward_logged: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_id, str) or not self.prompt_id:
            raise ValueError(f"prompt_id must be a non-empty string, got {self.prompt_id!r}")
        n = len(self.responses)
        if n == 0:
            raise ValueError(f"group {self.prompt_id!r} has no responses")
        for name in ("response_token_ids", "response_logprobs", "rewards", "finish_reasons"):
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(f"group {self.prompt_id!r}: {name} has {got} entries but there are {n} responses")
        for i, (ids, lps) in enumerate(zip(self.response_token_ids, self.response_logprobs)):
            if len(ids) != len(lps):
                raise ValueError(
                    f"group {self.prompt_id!r}, response {i}: {len(ids)} response_token_ids but "
                    f"{len(lps)} response_logprobs"
                )
        self.rewards = [float(r) for r in self.rewards]
        self.version = operator.index(self.version)
        if not isinstance(self.sampling, Mapping):
            raise ValueError(f"group {self.prompt_id!r}: sampling must be a dict")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"group {self.prompt_id!r}: extra must be a dict")

    @property
    def n(self) -> int:
        """Number of responses in the group."""
        return len(self.responses)

    def num_correct(self, threshold: float = 0.5) -> int:
        """Number of responses with ``reward >= threshold``."""
        return sum(is_correct(r, threshold) for r in self.rewards)


def score_groups(
    reward,
    task,
    prompts: Sequence[tuple[str, Sequence[int]]],
    examples: Sequence[Mapping[str, Any]],
    outputs,
    *,
    n: int,
    weights_id: str,
    sampling: dict[str, Any],
    default_ids: Sequence[Any],
    benchmark: str = "",
    version: int | None = None,
) -> list[RolloutGroup]:
    """Score an engine's outputs with ``reward`` and make one group per prompt.

    ``prompts[j]`` is ``(text, token ids)``, ``examples[j]`` the dataset row (its ``prompt_id``, else
    ``default_ids[j]``, names the group; its ``benchmark`` wins over ``benchmark``), ``outputs[j]``
    the engine's :class:`~oapl.engines.base.GenerationOutput` with ``n`` completions. The reward is
    called once on all completions, TRL-style: ``reward(prompts, completions, **task.reward_kwargs(rows))``.
    ``version`` defaults to the version each output reports. Used by the rollout worker (training
    groups) and by held-out evaluation alike.
    """
    flat_p, flat_c, flat_ex, flat_ids = [], [], [], []
    for (text, _), ex, out in zip(prompts, examples, outputs):
        for c in out.completions:
            flat_p.append(text)
            flat_c.append(c.text)
            flat_ex.append(ex)
            flat_ids.append(list(c.token_ids))
    context = {"completion_ids": flat_ids}  # TRL's keywords besides the columns (SafeReward passes what a reward takes)
    if getattr(task, "trainer_state", None) is not None:
        context["trainer_state"] = task.trainer_state
    rewards = reward(flat_p, flat_c, **task.reward_kwargs(flat_ex), **context)
    parts = getattr(rewards, "parts", None) or {}
    groups = []
    for j, ((text, ids), ex, out) in enumerate(zip(prompts, examples, outputs)):
        comps = out.completions
        groups.append(
            RolloutGroup(
                prompt_id=str(ex.get("prompt_id", default_ids[j])),
                prompt=text,
                prompt_token_ids=list(ids),
                responses=[c.text for c in comps],
                response_token_ids=[c.token_ids for c in comps],
                response_logprobs=[c.logprobs for c in comps],
                rewards=list(rewards[j * n : (j + 1) * n]),
                finish_reasons=[c.finish_reason for c in comps],
                weights_id=weights_id,
                version=out.version if version is None else version,
                sampling=sampling,
                task=task.name,
                benchmark=str(ex.get("benchmark") or benchmark),
                extra=dict(ex),
                reward_parts={k: list(v[j * n : (j + 1) * n]) for k, v in parts.items()},
                reward_logged=dict(getattr(rewards, "metrics", None) or {}) if j == 0 else {},
            )
        )
    return groups


def reward_metrics(groups: Iterable[RolloutGroup]) -> dict[str, float]:
    """TRL's per-function metrics of a batch: ``rewards/<name>/mean`` and ``rewards/<name>/std`` over its
    completions, ignoring NaN (a function's ``None`` or failure) as TRL's ``nanmean``/``nanstd`` (the
    sample standard deviation, n - 1). A name with no value in the batch gets NaN. Values logged with
    TRL's ``log_metric(name, value)`` appear under ``name``, averaged."""
    values: dict[str, list[float]] = {}
    logged: dict[str, list[float]] = {}
    for g in groups:
        for name, vals in g.reward_parts.items():
            values.setdefault(name, []).extend(float(v) for v in vals)
        for name, vals in g.reward_logged.items():
            logged.setdefault(name, []).extend(float(v) for v in vals)
    out: dict[str, float] = {name: sum(vals) / len(vals) for name, vals in logged.items() if vals}
    for name, vals in values.items():
        ok = [v for v in vals if not math.isnan(v)]
        mean = sum(ok) / len(ok) if ok else math.nan
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = (
            math.sqrt(sum((v - mean) ** 2 for v in ok) / (len(ok) - 1)) if len(ok) > 1 else math.nan
        )
    return out


def filter_groups(
    groups: Iterable[RolloutGroup],
    min_correct: int = 1,
    max_correct: int | None = None,
    threshold: float = 0.5,
    *,
    drop_all_correct: bool = False,
) -> tuple[list[RolloutGroup], dict[str, int]]:
    """Keep the groups whose number of correct responses ``c`` satisfies the bounds.

    A response is correct when ``reward >= threshold``. A group is kept iff
    ``c >= min_correct``, and ``c <= max_correct`` when ``max_correct`` is given, and
    ``c < n`` when ``drop_all_correct`` is set (``n`` varies per group, hence the flag). The
    default ``min_correct=1`` drops all-wrong prompts, which give no learning signal to
    group-relative objectives. Order is preserved.

    Returns ``(kept, counts)`` with ``counts`` = ``total``, ``kept``, ``dropped``,
    ``dropped_too_few`` (``c < min_correct``), ``dropped_too_many`` (above ``max_correct`` or
    all-correct with ``drop_all_correct``), and, over all input groups, ``all_wrong`` and
    ``all_correct``.
    """
    if min_correct < 0:
        raise ValueError(f"min_correct must be >= 0, got {min_correct}")
    if max_correct is not None and max_correct < min_correct:
        raise ValueError(f"max_correct ({max_correct}) must be >= min_correct ({min_correct})")
    kept: list[RolloutGroup] = []
    counts = dict(total=0, kept=0, dropped=0, dropped_too_few=0, dropped_too_many=0, all_wrong=0, all_correct=0)
    for g in groups:
        c = g.num_correct(threshold)
        counts["total"] += 1
        counts["all_wrong"] += c == 0
        counts["all_correct"] += c == g.n
        if c < min_correct:
            counts["dropped_too_few"] += 1
        elif (max_correct is not None and c > max_correct) or (drop_all_correct and c == g.n):
            counts["dropped_too_many"] += 1
        else:
            kept.append(g)
    counts["kept"] = len(kept)
    counts["dropped"] = counts["total"] - counts["kept"]
    return kept, counts
