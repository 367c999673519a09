"""The memory plan of a run, per rank, from the model's architecture shapes (no weights loaded).

``oapl check`` prints it and refuses a run whose plan does not fit the GPUs (``--gpus``,
``--gpu-memory``). Every figure is arithmetic on the shapes below (a model's shape comes from
:mod:`oapl.model_shape`); ``benchmarks/memory_plan.py`` compares it with the peak resident memory of real
CPU train steps (docs/benchmarks.md).

**Trainer state per rank** (``P`` parameters, ``N`` trainer ranks):

* full fine-tuning, fp32 masters (``model.param_dtype: auto``): weights 4 B, gradients 4 B, AdamW
  ``exp_avg`` + ``exp_avg_sq`` 8 B per parameter. One process and DDP keep all of it on every rank
  (DDP's gradient buckets add another 4 B); FSDP2 divides the three by ``N`` and adds the gathered
  units (:func:`gathered_bytes`): the root (embeddings, final norm, LM head; it stays gathered
  between forward and backward) and the decoder layers in flight, in the storage dtype (FSDP2
  gathers the fp32 masters as they are and computes under autocast), with their unsharded gradients;
* pure 16-bit storage (``param_dtype: bfloat16``): 2 + 2 + 4 B per parameter;
* LoRA: the frozen base in the compute dtype (no gradients, no AdamW state) and the adapters
  (``r x (in + out)`` per adapted linear) with fp32 weights, gradients and AdamW state (16 B).

**Activations** of one packed micro-batch of ``T`` tokens: ``optim.max_tokens_per_micro_batch`` if set,
else ``optim.micro_batch_size x`` (longest prompt + ``sampling.max_tokens``). Per token and decoder
layer of a Llama/Qwen layer, with ``c`` the compute dtype's bytes and ``r`` the residual stream's
(fp32 under autocast over fp32 masters, so ``r = 4``):

* each of the two RMSNorms keeps the fp32 normalised value (``4 h``) and the projections' input (its
  output, or the autocast copy of it: ``c h``); the second also its input, the residual after
  attention (``r h``; the first one's is the layer input): ``(2 (4 + c) + r) h`` -- 20 h in fp32,
  16 h under bf16 autocast;
* attention keeps the rotated queries and keys, the values and the output: ``c (2 q + 2 kv)``
  (``q = heads x head_dim``, ``kv = kv_heads x head_dim``); Qwen3's q/k norms add ``(4 + 2c)(q + kv)``;
* the SwiGLU MLP keeps gate, SiLU(gate), up and their product: ``4 c i`` (``i`` = intermediate).

Without gradient checkpointing the decoder keeps ``layers x`` that (SmolLM2-135M in fp32: 43.5 KB per
token and layer); backward adds ``BACKWARD_TEMPS`` of one layer's worth. With it, only each layer's
input (``r h``) is kept, plus one layer's full activations while it is recomputed and its backward
temporaries. Chunked log-probs (:mod:`oapl.trainer.logprobs`) add ``LOGIT_TEMPS`` fp32 tensors of
``model.logprob_chunk_size x vocab`` (the logits, the log-sum-exp's exponentials, the softmax of the
entropy and the logits' gradient in backward), plus one more in the compute dtype under bf16. On
CPU the transient part (activations and logits) is multiplied by ``CPU_HEAP``: glibc's heap keeps
freed blocks, so the resident set exceeds the live tensors (fit to benchmarks/memory_plan.py).

**Engine** (vLLM): it takes ``engine.gpu_memory_utilization`` of its GPU; the weights in the compute
dtype (2 B/parameter in bf16) and ``ENGINE_RUNTIME_BYTES`` of activations and CUDA graphs come out of
that, the rest is KV cache at ``2 x layers x kv_heads x head_dim x 2 B`` per token. It must hold one
full ``engine.max_model_len`` sequence or vLLM refuses to start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from oapl.config_views import is_offline
from oapl.errors import UserError
from oapl.model_shape import ModelShape, ShapeError, count_params, resolve_shape, shape_from_config, shapes_table

# the shape of a model lives in oapl.model_shape; these names are re-exported for existing callers
__all__ = [
    "GB",
    "GiB",
    "Hardware",
    "ModelShape",
    "ShapeError",
    "checkpoint_bytes",
    "count_params",
    "detect_hardware",
    "lora_params",
    "parse_size",
    "plan_memory",
    "resolve_shape",
    "shape_from_config",
    "shapes_table",
    "trainer_rank",
    "trainer_ranks",
]

GB = 1e9
GiB = 1 << 30
BACKWARD_TEMPS = 1.0  # one layer's worth of activation gradients alive during its backward
CPU_HEAP = 1.2  # CPU: glibc's heap keeps freed blocks, so the resident set exceeds the live transient tensors
LOGIT_TEMPS = 5  # fp32 chunk x vocab tensors alive at once: logits, logits / T, logsumexp's exp, softmax, its product
CUDA_CONTEXT_BYTES = 2.0 * GB  # CUDA context, cuBLAS/NCCL workspaces, allocator slack per GPU process
ENGINE_RUNTIME_BYTES = 2.0 * GB  # vLLM's profiled activations, sampler and CUDA graphs
HOST_BASELINE_BYTES = {"cpu": 0.6 * GB, "cuda": 3.0 * GB}  # a trainer process's own host memory


def parse_size(text: str, field: str = "--gpu-memory") -> float:
    """``80GiB``, ``80GB``, ``141G``, ``80e9`` -> bytes; bad input names ``field``."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise UserError(f"{field}: cannot read {text!r} as a memory size (e.g. 80GiB, 80GB, 141e9)")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    base = 1024 if unit.endswith("i") else 1000
    value = float(m.group(1)) * base**power
    if value <= 0:
        raise UserError(f"{field}: {text!r} is not a positive size")
    return value


@dataclass
class Hardware:
    gpus: int
    gpu_bytes: float | None
    source: str  # "flags" or "detected"


def detect_hardware(gpus: int | None = None, gpu_memory: str | None = None) -> Hardware:
    """The GPUs to plan for: the flags, else the devices present (torch.cuda)."""
    count, size = 0, None
    try:
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            size = float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no usable CUDA is no GPU
        pass
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus: {gpus} is not a number of GPUs (at least 1)")
    if gpu_memory is not None:
        size = parse_size(gpu_memory)
    elif gpus is not None and size is None:
        raise UserError("--gpu-memory: no GPU here to read the memory of; give it, e.g. --gpu-memory 80GiB")
    source = "flags" if (gpus is not None or gpu_memory is not None) else "detected"
    return Hardware(gpus if gpus is not None else (count or (1 if gpu_memory else 0)), size, source)


def compute_bytes(cfg, on_gpu: bool) -> int:
    m = cfg.model
    if m.compute_dtype in ("bfloat16", "float16", "bf16", "fp16"):
        return 2
    return 2 if (m.compute_dtype == "auto" and on_gpu) else 4


def lora_params(cfg, shape: ModelShape) -> int:
    """Adapter parameters: r x (in + out) per adapted linear of every layer (``all-linear``: all seven)."""
    h, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    linears = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    targets = cfg.model.lora.target_modules
    names = (
        list(linears)
        if targets == "all-linear"
        else [t for t in ([targets] if isinstance(targets, str) else targets) if t in linears]
    )
    return shape.layers * sum(cfg.model.lora.r * sum(linears[n]) for n in names)


# -- layout: which GPUs hold what ------------------------------------------------------------------
def parallel_mode(cfg) -> str:
    """``single``, or how the trainer ranks split the model (:func:`oapl.distributed.trainer.parallel_mode`,
    the one place that decides; a combination it refuses is planned as DDP and reported by ``oapl check``)."""
    from oapl.distributed.trainer import parallel_mode as ranks_mode

    if trainer_ranks(cfg) == 1:
        return "single"
    try:
        return ranks_mode(cfg)
    except ValueError:
        return "ddp"


def sequential(cfg) -> bool:
    """The engine is never resident while the trainer trains: offline training (``offline.data``, or a config
    with an ``offline`` section, which ``oapl two-stage`` fills in per stage), or vLLM's sleep mode."""
    return is_offline(cfg) or bool(cfg.offline.model_fields_set or cfg.engine.enable_sleep_mode)


def trainer_ranks(cfg) -> int:
    d = cfg.distributed
    return d.trainer_workers if (d.backend == "ray" or sequential(cfg)) else 1


def engine_gpus(cfg) -> int:
    """GPUs of their own the engines take (0: the engine shares the trainer's first GPU)."""
    d = cfg.distributed
    if d.backend == "ray" and d.engine_num_gpus >= 1 and not sequential(cfg):
        return math.ceil(d.num_engines * d.engine_num_gpus)
    return 0


def gpus_needed(cfg) -> int:
    d = cfg.distributed
    per_rank = max(1, math.ceil(d.trainer_num_gpus)) if (d.trainer_num_gpus or trainer_ranks(cfg) > 1) else 1
    return engine_gpus(cfg) + trainer_ranks(cfg) * per_rank


def engine_share(cfg) -> float:
    """The share of its GPU vLLM takes (``engine.gpu_memory_utilization``; vLLM's default here: 0.5)."""
    return cfg.engine.gpu_memory_utilization or 0.5


# -- trainer ---------------------------------------------------------------------------------------
def trainer_state(cfg, shape: ModelShape, cb: int, mode: str, ranks: int) -> dict[str, float]:
    """Bytes per rank: weights, gradients, optimiser state, FSDP2's gathered units (see the module doc)."""
    p = shape.params
    if cfg.model.lora.enabled:
        a = lora_params(cfg, shape)
        return {"weights": p * cb + 4 * a, "gradients": 4 * a, "optimizer": 8 * a, "gathered": 0.0}
    sb = 2 if cfg.model.param_dtype in ("bfloat16", "float16") else 4
    shard = ranks if mode == "fsdp" else 1
    out = {"weights": p * sb / shard, "gradients": p * sb / shard, "optimizer": p * 2 * sb / shard, "gathered": 0.0}
    if mode == "ddp":  # DDP's buckets hold a second copy of the gradients (gradient_as_bucket_view is off)
        out["gradients"] *= 2
    if mode == "fsdp":
        out["gathered"] = gathered_bytes(shape, sb)
    return out


def gathered_bytes(shape: ModelShape, sb: int) -> float:
    """FSDP2's unsharded units at the peak of backward, in the storage dtype (fp32 gradients).

    The root's parameters stay gathered and its unsharded gradient lives through the whole backward
    (the LM head's comes first); meanwhile the layer in backward holds its parameters, unsharded
    gradient and reduce-scatter buffer, and the next one is being all-gathered (the flat output and
    the parameters copied out of it): ``2 root + 5 layers``. At the end the root's own reduce-scatter
    buffer joins: ``3 root``. The larger of the two."""
    root, layer = shape.root_params() * sb, shape.layer_params() * sb
    return max(2 * root + 5 * layer, 3 * root)


def layer_activation_bytes(shape: ModelShape, cb: int, rb: int) -> float:
    """Bytes one decoder layer keeps for backward, per token (module doc)."""
    h, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    norms = (2 * (4 + cb) + rb) * h
    attn = cb * (2 * q + 2 * kv) + ((4 + 2 * cb) * (q + kv) if shape.qk_norm else 0)
    return norms + attn + 4 * cb * i


def micro_batch_tokens(cfg, seq_len: int) -> int:
    return cfg.optim.max_tokens_per_micro_batch or cfg.optim.micro_batch_size * seq_len


def activation_bytes(cfg, shape: ModelShape, tokens: int, cb: int, rb: int, checkpointing: bool) -> float:
    layer = layer_activation_bytes(shape, cb, rb) * tokens
    outside = (3 * rb + 4) * shape.hidden * tokens  # embeddings' output, final norm, the kept hidden states
    if checkpointing:
        return shape.layers * rb * shape.hidden * tokens + layer * (1 + BACKWARD_TEMPS) + outside
    return shape.layers * layer + layer * BACKWARD_TEMPS + outside


def offloaded_bytes(shape: ModelShape, tokens: int, cb: int, rb: int, checkpointing: bool) -> float:
    """What ``model.activation_offload`` moves to host memory: the tensors the forward saves for backward,
    i.e. the layer inputs under gradient checkpointing, else every layer's activations (on GPUs only: on
    a CPU host and device memory are one)."""
    if checkpointing:
        return shape.layers * rb * shape.hidden * tokens
    return shape.layers * layer_activation_bytes(shape, cb, rb) * tokens


def logits_bytes(cfg, shape: ModelShape, tokens: int, cb: int) -> float:
    chunk = min(cfg.model.logprob_chunk_size, tokens)
    return chunk * shape.vocab * (4 * LOGIT_TEMPS + (cb if cb != 4 else 0))


def optimizer_temps(cfg, shape: ModelShape, on_gpu: bool) -> float:
    """AdamW's own temporaries: none fused (CUDA default); the single-tensor loop's two largest-tensor copies."""
    fused = cfg.optim.fused == "on" or (cfg.optim.fused == "auto" and on_gpu)
    return 0.0 if fused or cfg.model.lora.enabled else 2 * 4 * shape.vocab * shape.hidden


def trainer_rank(
    cfg,
    shape: ModelShape,
    seq_len: int,
    on_gpu: bool,
    *,
    ranks: int | None = None,
    checkpointing: bool | None = None,
    tokens: int | None = None,
    lora: bool | None = None,
    offload: bool | None = None,
) -> dict:
    """Bytes of one trainer rank (the keyword arguments try a change: more ranks, checkpointing, a budget, LoRA,
    activation offload)."""
    if lora is not None and lora != cfg.model.lora.enabled:
        cfg = _with(cfg, "model", lora=cfg.model.lora.model_copy(update={"enabled": lora}))
    configured = trainer_ranks(cfg)
    ranks = ranks or configured
    if ranks == 1:
        mode = "single"
    elif ranks == configured:
        mode = parallel_mode(cfg)
    else:  # more ranks than configured: what shards full fine-tuning (LoRA replicates)
        mode = "ddp" if cfg.model.lora.enabled else "fsdp"
    cb = compute_bytes(cfg, on_gpu)
    rb = cb if cfg.model.param_dtype in ("bfloat16", "float16") else 4
    ckpt = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    tokens = tokens or micro_batch_tokens(cfg, seq_len)
    out: dict[str, Any] = {"parallel": mode, "ranks": ranks, "tokens": tokens, "checkpointing": ckpt}
    out.update(trainer_state(cfg, shape, cb, mode, ranks))
    out["activations"] = activation_bytes(cfg, shape, tokens, cb, rb, ckpt)
    off = cfg.model.activation_offload if offload is None else offload
    out["offloaded"] = offloaded_bytes(shape, tokens, cb, rb, ckpt) if (off and on_gpu) else 0.0
    out["activations"] -= out["offloaded"]
    out["logits"] = logits_bytes(cfg, shape, tokens, cb)
    out["optimizer_temps"] = optimizer_temps(cfg, shape, on_gpu)
    out["context"] = CUDA_CONTEXT_BYTES if on_gpu else 0.0
    state = out["weights"] + out["gradients"] + out["optimizer"] + out["gathered"] + out["context"]
    transient = (out["activations"] + out["logits"]) * (1.0 if on_gpu else CPU_HEAP)
    out["total"] = state + max(transient, out["optimizer_temps"])
    return out


# -- engine, host, disk ----------------------------------------------------------------------------
def engine_memory(cfg, shape: ModelShape, gpu_bytes: float | None, seq_len: int) -> dict[str, Any]:
    """Bytes of one engine: weights in the compute dtype and the KV cache (module doc)."""
    kv_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    full = cfg.engine.max_model_len or seq_len
    wanted = cfg.engine.extra.get("max_num_seqs") or cfg.rollout.prompts_per_generate * cfg.rollout.group_size
    out: dict[str, Any] = {
        "weights": shape.params * 2,
        "kv_per_token": kv_token,
        "full_sequence_tokens": full,
        "concurrent_wanted": wanted,
        "kv_wanted": wanted * seq_len * kv_token,
    }
    if cfg.engine.kind == "transformers":
        out["total"] = out["weights"] + cfg.engine.max_batch_size * seq_len * kv_token
        return out
    if gpu_bytes:
        out["total"] = engine_share(cfg) * gpu_bytes
        out["kv_pool"] = out["total"] - out["weights"] - ENGINE_RUNTIME_BYTES
        out["sequences_at_once"] = max(0, int(out["kv_pool"] // (kv_token * full)))
    return out


def checkpoint_bytes(cfg, shape: ModelShape) -> float:
    """One checkpoint on disk: fp32 masters + AdamW state (12 B/parameter; of the adapters under LoRA) and
    the exported model in the export dtype (2 B/parameter); a sharded checkpoint splits the same total."""
    trained = lora_params(cfg, shape) if cfg.model.lora.enabled else shape.params
    return 12 * trained + 2 * shape.params


def host_bytes(cfg, shape: ModelShape, mode: str, ranks: int, on_gpu: bool) -> float:
    """Host memory of trainer rank 0: the process, the checkpoint it stages (its shard under FSDP2, the whole
    state otherwise) and, online, the weights it hands the engines at a sync (bf16)."""
    staged = (checkpoint_bytes(cfg, shape) - 2 * shape.params) / (ranks if mode == "fsdp" else 1)
    sync = 0 if sequential(cfg) else 2 * shape.params
    return HOST_BASELINE_BYTES["cuda" if on_gpu else "cpu"] + staged + sync


# -- fitting ---------------------------------------------------------------------------------------
def _with(cfg, section: str, **values):
    """``cfg`` with ``section``'s fields replaced (a what-if for :func:`fixes`)."""
    part = getattr(cfg, section).model_copy(update=values)
    return cfg.model_copy(update={section: part})


def fixes(cfg, shape: ModelShape, seq_len: int, budget: float, gpus: int, ranks: int) -> list[str]:
    """The changes that would each make a trainer rank (of ``ranks``) fit ``budget`` bytes, most faithful to the
    paper first: gradient checkpointing, a token budget, a smaller log-prob chunk, more ranks, LoRA."""
    out = []
    ckpt_on = trainer_rank(cfg, shape, seq_len, True, ranks=ranks, checkpointing=True)["total"]
    if not cfg.model.gradient_checkpointing and ckpt_on <= budget:
        out.append("model.gradient_checkpointing=true")
    if not cfg.model.activation_offload:
        ckpt = cfg.model.gradient_checkpointing or None
        t = trainer_rank(cfg, shape, seq_len, True, ranks=ranks, checkpointing=ckpt, offload=True)
        if t["total"] <= budget:
            out.append(
                f"model.activation_offload=true (the {_gb(t['offloaded'])} of tensors saved for backward "
                "in host memory)"
            )
    now = micro_batch_tokens(cfg, seq_len)
    if now > seq_len:
        fit = [
            t
            for t in range(seq_len, now, max(1, (now - seq_len) // 64))
            if trainer_rank(cfg, shape, seq_len, True, ranks=ranks, tokens=t)["total"] <= budget
        ]
        if fit:
            out.append(
                f"optim.max_tokens_per_micro_batch={fit[-1]} (a token budget; the longest sequence is {seq_len} tokens)"
            )
    chunk = cfg.model.logprob_chunk_size
    while (
        chunk > 128
        and trainer_rank(_with(cfg, "model", logprob_chunk_size=chunk // 2), shape, seq_len, True, ranks=ranks)["total"]
        > budget
    ):
        chunk //= 2
    if chunk > 128:
        out.append(f"model.logprob_chunk_size={chunk // 2}")
    if not cfg.model.lora.enabled:
        ckpt = cfg.model.gradient_checkpointing or None
        for n in range(ranks + 1, 257):
            if trainer_rank(cfg, shape, seq_len, True, ranks=n, checkpointing=ckpt)["total"] <= budget:
                where = "" if n + engine_gpus(cfg) <= gpus else f"; more GPUs than the {gpus} planned for"
                out.append(
                    f"distributed.trainer_workers={n} with distributed.trainer_num_gpus=1 (FSDP2 over {n} GPUs{where})"
                )
                break
        if trainer_rank(cfg, shape, seq_len, True, ranks=ranks, lora=True)["total"] <= budget:
            out.append("model.lora.enabled=true (adapters over a frozen base: not the paper's full fine-tuning)")
    return out


def _no_fix(cfg, shape: ModelShape, seq_len: int, ranks: int) -> str:
    """What a rank needs at best (the most useful FSDP2 width up to 64 ranks), when no single change fits."""
    best = min(range(max(ranks, 1), 65), key=lambda n: trainer_rank(cfg, shape, seq_len, True, ranks=n)["total"])
    t = trainer_rank(cfg, shape, seq_len, True, ranks=best)
    return (
        f"no single change fits it: even over {best} ranks a rank needs {_gb(t['total'])}, of which one "
        f"micro-batch's activations {_gb(t['activations'])} and logits {_gb(t['logits'])} do not shrink with "
        f"ranks: shorter sequences (sampling.max_tokens), or GPUs with at least {_gb(t['total'])}"
    )


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


def describe_layout(cfg, hw: Hardware, ranks: int, mode: str) -> str:
    what = {"single": "one trainer process", "ddp": f"DDP over {ranks} ranks", "fsdp": f"FSDP2 over {ranks} ranks"}
    eng = engine_gpus(cfg)
    if sequential(cfg):
        engine = "the engine runs between training phases (offline), on the same GPUs"
    elif eng:
        engine = f"{cfg.distributed.num_engines} engine(s) on {eng} GPU(s) of their own"
    else:
        engine = f"the engine shares trainer GPU 0 (engine.gpu_memory_utilization={engine_share(cfg)})"
    size = f" x {_gb(hw.gpu_bytes)}" if hw.gpu_bytes else ""
    return f"{hw.gpus} GPU(s){size} ({hw.source}): {what[mode]} on {ranks} GPU(s); {engine}"


def on_gpu(cfg, hw: Hardware) -> bool:
    m, d = cfg.model, cfg.distributed
    return (
        m.device.startswith("cuda")
        or cfg.engine.kind == "vllm"
        or d.trainer_num_gpus > 0
        or (m.device == "auto" and hw.gpus > 0)
    )


def plan_memory(cfg, shape: ModelShape, seq_len: int, hw: Hardware) -> tuple[dict[str, Any], list[str]]:
    """(plan lines, problems): the per-rank plan, and one line per thing that does not fit ``hw``."""
    gpu = on_gpu(cfg, hw)
    fewer = None  # the trainer ranks the GPUs planned for can hold, when fewer than configured
    if gpu and hw.gpus and gpus_needed(cfg) > hw.gpus:
        fewer = max(1, hw.gpus - engine_gpus(cfg))
    t = trainer_rank(cfg, shape, seq_len, gpu, ranks=fewer)
    eng = engine_memory(cfg, shape, hw.gpu_bytes if gpu else None, seq_len)
    colocated = gpu and not sequential(cfg) and engine_gpus(cfg) == 0
    plan: dict[str, Any] = {
        "layout": describe_layout(cfg, hw, t["ranks"], t["parallel"])
        if gpu
        else f"CPU: {t['parallel']} ({t['ranks']} process{'es' if t['ranks'] > 1 else ''})"
    }
    plan["trainer_rank"] = {
        "parallel": f"{t['parallel']} ({t['ranks']} rank{'s' if t['ranks'] > 1 else ''})",
        "weights": _gb(t["weights"]),
        "gradients": _gb(t["gradients"]),
        "optimizer": _gb(t["optimizer"]),
        **({"gathered_units": _gb(t["gathered"])} if t["gathered"] else {}),
        "activations": f"{_gb(t['activations'])} ({t['tokens']:,} tokens per micro-batch, gradient checkpointing "
        f"{'on' if t['checkpointing'] else 'off'})",
        **({"offloaded_to_host": _gb(t["offloaded"])} if t["offloaded"] else {}),
        "logits": f"{_gb(t['logits'])} (chunks of {min(cfg.model.logprob_chunk_size, t['tokens']):,} x "
        f"{shape.vocab:,} vocabulary)",
        **({"cuda_context": _gb(t["context"])} if t["context"] else {}),
        "total": _gb(t["total"]),
    }
    ranks = t["ranks"]
    plan["host_per_rank"] = _gb(host_bytes(cfg, shape, t["parallel"], ranks, gpu) + t["offloaded"])
    plan["checkpoint_size"] = (
        f"{_gb(checkpoint_bytes(cfg, shape))} (x checkpoint.keep={cfg.checkpoint.keep}, +1 while the next is written)"
    )
    e = {
        "weights": _gb(eng["weights"]),
        "kv_cache_per_token": f"{eng['kv_per_token'] / 1024:.0f} KiB",
        "kv_cache_per_full_sequence": f"{_gb(eng['kv_per_token'] * eng['full_sequence_tokens'])} "
        f"({eng['full_sequence_tokens']:,} tokens)",
        "kv_cache_if_all_at_once": f"{_gb(eng['kv_wanted'])} ({eng['concurrent_wanted']:,} sequences of {seq_len:,})",
    }
    if "kv_pool" in eng:
        e.update(
            share=f"{_gb(eng['total'])} (engine.gpu_memory_utilization={engine_share(cfg)})",
            kv_cache_pool=_gb(max(0.0, eng["kv_pool"])),
            full_sequences_at_once=eng["sequences_at_once"],
        )
    plan["engine"] = e
    plan["trainer_state_gb"] = (t["weights"] + t["gradients"] + t["optimizer"]) / GB
    problems: list[str] = []
    if not gpu or not hw.gpu_bytes:
        return plan, problems
    budget = hw.gpu_bytes - (eng.get("total", 0.0) if colocated else 0.0)
    plan["trainer_rank"]["budget"] = _gb(budget) + (" (the GPU less the engine's share)" if colocated else "")
    need = gpus_needed(cfg)
    if need > hw.gpus:
        problems.append(
            f"GPUs: the layout needs {need} GPUs ({engine_gpus(cfg)} for engines, {trainer_ranks(cfg)} "
            f"trainer ranks) but {hw.gpus} are planned for; planned with {ranks} trainer rank(s)"
        )
    if t["total"] > budget:
        fix = fixes(cfg, shape, seq_len, budget, hw.gpus, ranks)
        problems.append(
            f"GPU memory: a trainer rank needs {_gb(t['total'])} (weights {_gb(t['weights'])}, gradients "
            f"{_gb(t['gradients'])}, AdamW {_gb(t['optimizer'])}, activations {_gb(t['activations'])}, logits "
            f"{_gb(t['logits'])}) but has {_gb(budget)} of its {_gb(hw.gpu_bytes)} GPU; "
            + ("it fits with any of: " + "; ".join(fix) if fix else _no_fix(cfg, shape, seq_len, ranks))
        )
    if "kv_pool" in eng and eng["sequences_at_once"] < 1:
        problems.append(
            f"GPU memory: the engine's KV cache ({_gb(max(0.0, eng['kv_pool']))} after "
            f"{_gb(eng['weights'])} of weights) cannot hold one {eng['full_sequence_tokens']:,}-token "
            f"sequence ({_gb(eng['kv_per_token'] * eng['full_sequence_tokens'])}); raise "
            f"engine.gpu_memory_utilization or lower engine.max_model_len"
        )
    plan["fits"] = not problems
    return plan, problems
