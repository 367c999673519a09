"""Inference engines behind one protocol (:class:`InferenceEngine`)."""

from oapl.engines.base import Completion, GenerationOutput, InferenceEngine, SamplingParams

__all__ = ["Completion", "GenerationOutput", "InferenceEngine", "SamplingParams"]
