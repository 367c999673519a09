"""The inference-engine protocol: the one interface the loop talks to.

An engine samples responses from its own copy of the policy weights (the lagged inference policy
``pi_inf``), returns the sampled token ids together with their log-probabilities under the sampling
distribution, and accepts new weights in place. vLLM, transformers and remote (Ray) engines all
implement it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """JSON-able record of how responses were sampled (stored with every rollout group)."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop),
        "n": params.n,
    }


@dataclass
class Completion:
    """One sampled response.

    ``logprobs[t]`` is the log-probability of ``token_ids[t]`` under the distribution it was sampled
    from (after temperature and top-p). ``finish_reason`` is ``"stop"`` (EOS or a stop string) or
    ``"length"`` (hit ``max_tokens``).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"completion has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")


@dataclass
class GenerationOutput:
    """The ``n`` completions of one prompt, and the engine weight version that produced them."""

    prompt_token_ids: list[int]
    completions: list[Completion]
    version: int
    stats: dict[str, float] = field(default_factory=dict)


WeightIterator = Iterable[tuple[str, torch.Tensor]]


@runtime_checkable
class InferenceEngine(Protocol):
    """What the trainer loop needs from an inference engine."""

    @property
    def version(self) -> int:
        """Weight version currently loaded (0 = initial weights, +1 per sync)."""
        ...

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        """Sample ``params.n`` completions for each prompt."""
        ...

    def load_weights(self, weights: WeightIterator, version: int) -> float:
        """Replace the weights in place (Hugging Face parameter names); return seconds taken."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...
