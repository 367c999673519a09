"""VLLMEngine's arguments to ``vllm.LLM``: platform defaults and refusals (no vLLM needed)."""

from __future__ import annotations

import pytest

from oapl.engines.vllm_engine import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_CPU_MEMORY_UTILIZATION,
    DEFAULT_CUDA_MEMORY_UTILIZATION,
    _check_arguments,
    _llm_kwargs,
)
from oapl.errors import UserError

BASE = {
    "seed": 3,
    "dtype": "auto",
    "gpu_memory_utilization": None,
    "max_model_len": None,
    "sleep": False,
    "enforce_eager": None,
}


def test_cpu_defaults(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert _llm_kwargs({"max_num_seqs": 4}, on_cpu=True, **BASE) == {
        "max_num_seqs": 4,
        "kv_cache_memory_bytes": DEFAULT_CPU_KV_CACHE_BYTES,
        "seed": 3,
        "dtype": "auto",
        "gpu_memory_utilization": DEFAULT_CPU_MEMORY_UTILIZATION,
        "enforce_eager": True,
        "logprobs_mode": "processed_logprobs",
    }


@pytest.mark.parametrize("how", ["kwarg", "utilization", "env"])
def test_cpu_kv_cache_given_explicitly_is_left_alone(monkeypatch, how):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    given: dict = {}
    over = dict(BASE)
    if how == "kwarg":
        given["kv_cache_memory_bytes"] = 123
    elif how == "utilization":
        over["gpu_memory_utilization"] = 0.2
    else:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    out = _llm_kwargs(given, on_cpu=True, **over)
    assert out.get("kv_cache_memory_bytes") == (123 if how == "kwarg" else None)
    assert out["gpu_memory_utilization"] == (0.2 if how == "utilization" else DEFAULT_CPU_MEMORY_UTILIZATION)


def test_cuda_defaults_and_options():
    out = _llm_kwargs({}, on_cpu=False, **BASE)
    assert out == {
        "seed": 3,
        "dtype": "auto",
        "gpu_memory_utilization": DEFAULT_CUDA_MEMORY_UTILIZATION,
        "enforce_eager": False,
        "logprobs_mode": "processed_logprobs",
    }
    out = _llm_kwargs(
        {},
        on_cpu=False,
        **{**BASE, "max_model_len": 512, "sleep": True, "enforce_eager": True, "gpu_memory_utilization": 0.3},
    )
    assert (out["max_model_len"], out["enable_sleep_mode"], out["enforce_eager"], out["gpu_memory_utilization"]) == (
        512,
        True,
        True,
        0.3,
    )


def test_caller_kwargs_are_not_mutated():
    given = {"max_num_seqs": 2}
    _llm_kwargs(given, on_cpu=True, **BASE)
    assert given == {"max_num_seqs": 2}


@pytest.mark.parametrize(
    "kwargs,threads,match",
    [
        ({"model": "x"}, (None, None), "sets 'model' itself"),
        ({"logprobs_mode": "raw_logprobs"}, (None, None), "sets 'logprobs_mode' itself"),
        ({}, (0, None), "cpu_threads must be >= 1, got 0"),
        ({}, (None, 0), "sync_threads must be >= 1, got 0"),
        ({"tensor_parallel_size": 2}, (None, None), "one in-process vLLM worker"),
        ({"pipeline_parallel_size": 2}, (None, None), "one in-process vLLM worker"),
    ],
)
def test_refusals(kwargs, threads, match):
    with pytest.raises(ValueError, match=match):
        _check_arguments(kwargs, *threads)


def test_accepted():
    _check_arguments({"tensor_parallel_size": 1, "max_num_seqs": 8}, 1, 2)


@pytest.mark.parametrize(
    "exc, error, match",
    [
        (RuntimeError("boom"), RuntimeError, r"vLLM failed to start on 'm' with \{'seed': 1\}: RuntimeError: boom"),
        # vLLM's own argument/config validation: the user's to fix, one line naming where the arguments come from
        (ValueError("boom"), UserError, r"engine: vLLM refused its arguments on m: ValueError: boom .*engine.extra"),
    ],
)
def test_a_failed_start_is_one_error_and_the_process_state_is_restored(monkeypatch, exc, error, match):
    pytest.importorskip("vllm.envs")
    import os

    import torch

    from oapl.engines.vllm_engine import _starting_vllm

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", original)  # put back at teardown whatever happens
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with pytest.raises(error, match=match):
        with _starting_vllm("m", {"seed": 1}):
            assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine core runs in this process
            torch.manual_seed(123)  # what vLLM does to the global RNG
            torch.set_num_threads = lambda n: None  # and to set_num_threads (CPU worker)
            raise exc
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert torch.equal(torch.rand(3), expected)
    assert torch.set_num_threads is original
