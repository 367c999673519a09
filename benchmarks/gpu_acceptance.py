"""One command that tells, within minutes, whether the trainer's GPU paths are right and fast.

    python benchmarks/gpu_acceptance.py                      # CUDA: Qwen3-1.7B shape, bf16 over fp32 masters
    python benchmarks/gpu_acceptance.py --device cpu         # the same checks at a tiny Qwen3 shape (< 2 min)
    python benchmarks/gpu_acceptance.py --out acceptance.json --checks update_share,packed_vs_padded

Needs torch, transformers and the project only: no vLLM, no Ray, no network. The model is
random-initialised from a shipped architecture config (``benchmarks/configs/qwen3-1.7b.json`` on CUDA,
``qwen3-tiny.json`` on CPU: same architecture, tiny widths). The oapl side runs the code ``oapl train``
runs for a step (``Policy.train_step`` = ``plan_step`` + ``run_step``; FSDP2: ``TrainerRank.train_step``).

Checks (each PASS / FAIL / SKIP with the reason; the exit code is 1 on any FAIL):

* ``memory``: peak memory of the ``packed+budget`` step (CUDA: ``torch.cuda.max_memory_allocated``; CPU:
  peak resident set ``VmHWM`` less the resident set before the model existed) against
  ``oapl.memory_plan.trainer_rank`` for the same config (on CUDA less its fixed CUDA-context term, which
  the allocator does not see). PASS when measured / planned is within [1 / MEMORY_BAND, MEMORY_BAND].
* ``update_share``: one step at lr 1e-6 under bf16 compute over fp32 masters; the share of the weights
  with a non-zero gradient that the step moved. PASS at >= 99 %.
* ``packed_vs_padded``: per-token log-probs (the trainer's ``token_logprobs``) of the same sequences
  packed into one row (varlen attention) and padded, both under bf16 compute, against the bf16-vs-fp32
  noise on the same tokens (padded bf16 vs padded fp32 compute, same weights). If both layouts are
  within the bf16 noise of the fp32 values, they differ by at most twice it (triangle inequality):
  PASS when RMS(packed - padded) <= 2 x RMS(bf16 - fp32).
* ``fsdp2_one_rank``: ``TrainerRank`` (the Ray trainer actor's body, here without Ray) wrapped in FSDP2
  on one rank (gloo on CPU, NCCL on CUDA, ``tcp://127.0.0.1``) against the local ``run_step`` on the same
  batch from the same saved weights: loss, gradient norm, every gradient, every updated weight. The
  tolerance is derived from the compute dtype (see :func:`compare_steps`).
* ``step:<config>``: trainer throughput on a realistic variable-length batch (lognormal response
  lengths, median ~1.5K at an 8K cap, 3 of 16 at the cap; scaled down on CPU): useful tokens/s and
  effective MFU = (6 N useful_tokens + 6 L d_attn sum_i t_i^2) / step time / peak, peak = the dense
  matmul rate measured here in the compute dtype (``--peak-tflops`` overrides). Configs: ``packed``
  (2 sequences per micro-batch), ``packed+budget`` (token budget; the base of the toggles), ``padded``
  (no packing), ``fused-off``, ``compile``, ``liger``, ``all-on``, and ``reference``: a hand-written
  plain PyTorch step (HF forward on the padded micro-batch, full logits, cross-entropy log-probs, the
  OAPL loss, ``torch.optim.AdamW``) on the same tokens. PASS when the step ran with a finite loss.
* ``mfu_target``: CUDA only: the best effective MFU of the oapl configs >= ``--mfu-bar`` (0.45, issue 26).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("oapl") is None and (HERE.parent / "src" / "oapl").is_dir():
    sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without an install
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from trainer_throughput import lengths as lognormal_lengths  # noqa: E402
from trainer_throughput import make_groups, matmul_tflops  # noqa: E402

UPDATE_SHARE_BAR = 0.99
LAYOUT_NOISE_MULTIPLE = 2.0  # triangle inequality: two paths each within e of fp32 differ by <= 2e
MEMORY_BAND = 1.2  # the memory plan's stated accuracy (docs/benchmarks.md: within +-20 %)
MFU_BAR = 0.45

CHECKS = ("memory", "update_share", "packed_vs_padded", "fsdp2_one_rank", "throughput", "mfu_target")

#: per device: shipped config, the variable-length batch, the short batch of the correctness checks
MODES = {
    "cuda": dict(
        config="qwen3-1.7b.json",
        groups=2,
        group_size=8,
        prompt=128,
        cap=8192,
        median=1500.0,
        sigma=0.8,
        truncated=3,
        micro=2,
        chunk=1024,
        warmup=1,
        timed=2,
        short_groups=2,
        short_size=4,
        short_cap=512,
    ),
    "cpu": dict(
        config="qwen3-tiny.json",
        groups=2,
        group_size=8,
        prompt=16,
        cap=256,
        median=1500 * 256 / 8192,
        sigma=0.8,
        truncated=3,
        micro=2,
        chunk=256,
        warmup=1,
        timed=2,
        short_groups=2,
        short_size=4,
        short_cap=64,
    ),
}


# ------------------------------------------------------------------------------------------------
# arithmetic (unit-tested in tests/test_gpu_acceptance.py)
# ------------------------------------------------------------------------------------------------
def train_flops(n_params: int, seq_lens: list[int], layers: int, d_attn: int) -> float:
    """FLOPs of one forward + backward over ``seq_lens`` (useful tokens only): ``6 N T`` for the weights and
    ``6 L d_attn sum_i t_i^2`` for causal attention (QK^T and AV are ``2 t^2 d`` each in full, half of that
    causal, so ``2 t^2 d`` forward per layer, x3 with backward)."""
    return 6.0 * n_params * sum(seq_lens) + 6.0 * layers * d_attn * sum(t * t for t in seq_lens)


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}[dtype]


def compare_steps(
    ref: dict, other: dict, compute_dtype: torch.dtype, layers: int, lr: float, eps: float = 1e-8
) -> dict:
    """Whether ``other`` is the same optimiser step as ``ref``: within what reordering floating-point sums
    can do in ``compute_dtype``.

    ``ref``/``other``: ``loss``, ``grad_norm``, ``grads`` / ``before`` / ``after`` (name -> CPU tensor). Two
    computations of the same function in the same dtype differ only in the order of their sums (other
    kernels, atomics on CUDA); each matmul hop then adds at most one rounding, ``u`` (the unit roundoff),
    relative to the magnitudes summed, and a gradient passes ``2 (layers + 2)`` hops forward and back
    (tests/test_precision.py bounds bf16 against fp32 compute the same way). So ``|dg| <= k u max|g|``
    per tensor and ``|d loss| <= k u |loss|``, ``k = 2 (layers + 2)``. The update: where ``|g| > tau = 2 k u
    max|g|`` no sign can flip and AdamW's first step ``-lr g / (|g| + eps)`` moves by at most ``lr eps / tau``,
    plus one fp32 ulp of the weight each side.
    """
    u = unit_roundoff(compute_dtype)
    k = 2 * (layers + 2)
    out = {
        "k": k,
        "u": u,
        "loss_ref": ref["loss"],
        "loss": other["loss"],
        "grad_norm_ref": ref["grad_norm"],
        "grad_norm": other["grad_norm"],
    }
    problems = []
    if not (math.isfinite(other["loss"]) and abs(other["loss"] - ref["loss"]) <= k * u * abs(ref["loss"]) + 1e-30):
        problems.append(f"loss {other['loss']:.9g} vs {ref['loss']:.9g}")
    if not abs(other["grad_norm"] - ref["grad_norm"]) <= k * u * abs(ref["grad_norm"]) + 1e-30:
        problems.append(f"grad_norm {other['grad_norm']:.9g} vs {ref['grad_norm']:.9g}")
    missing = set(ref["grads"]) ^ set(other["grads"])
    if missing:
        problems.append(f"gradients of different parameters: {sorted(missing)[:3]}")
    worst_g = worst_w = 0.0
    checked = total = 0
    for name, g_ref in ref["grads"].items():
        if name not in other["grads"]:
            continue
        g = other["grads"][name].float()
        g_ref = g_ref.float()
        scale = float(g_ref.abs().max())
        err = float((g - g_ref).abs().max())
        worst_g = max(worst_g, err / scale if scale else err)
        if err > k * u * scale + 1e-30:
            problems.append(f"gradient of {name}: max |diff| {err:.3g} > {k * u * scale:.3g}")
        tau = 2 * k * u * scale
        big = g_ref.abs() > tau
        d_ref = (ref["after"][name] - ref["before"][name]).float()
        d = (other["after"][name] - other["before"][name]).float()
        ulp = 2 * ref["before"][name].abs().float() * 2.0**-23 + 1e-15
        bound = lr * eps / max(tau, 1e-30) + ulp
        diff = (d - d_ref).abs()
        worst_w = max(worst_w, float(diff.max()) if diff.numel() else 0.0)
        checked += int(big.sum())
        total += g_ref.numel()
        if not bool((diff <= bound)[big].all()):
            problems.append(f"update of {name} differs beyond lr*eps/tau")
        if not torch.equal(ref["before"][name], other["before"][name]):
            problems.append(f"{name}: the two sides did not start from the same weights")
    out.update(
        {
            "max_grad_rel_diff": worst_g,
            "max_update_abs_diff": worst_w,
            "update_entries_checked_frac": checked / max(total, 1),
            "problems": problems[:8],
            "ok": not problems and checked > 0,
        }
    )
    return out


def layout_verdict(
    packed: torch.Tensor,
    padded: torch.Tensor,
    fp32: torch.Tensor,
    mask: torch.Tensor,
    multiple: float = LAYOUT_NOISE_MULTIPLE,
) -> dict:
    """Packed vs padded bf16 log-probs against the bf16-vs-fp32 noise of the padded ones (same tokens)."""
    m = mask.bool()
    d = (packed - padded)[m].double()
    noise = (padded - fp32)[m].double()
    rms = lambda x: float(x.pow(2).mean().sqrt()) if x.numel() else 0.0  # noqa: E731
    out = {
        "tokens": int(m.sum()),
        "rms_packed_minus_padded": rms(d),
        "max_packed_minus_padded": float(d.abs().max()),
        "rms_bf16_minus_fp32": rms(noise),
        "max_bf16_minus_fp32": float(noise.abs().max()),
        "rms_packed_bf16_minus_fp32": rms((packed - fp32)[m].double()),
        "multiple": multiple,
    }
    if out["rms_bf16_minus_fp32"] == 0.0:
        out["ok"], out["why"] = (
            False,
            "bf16 compute left the log-probs bit-identical to fp32: autocast is not in effect",
        )
    else:
        out["ratio"] = out["rms_packed_minus_padded"] / out["rms_bf16_minus_fp32"]
        out["ok"] = out["ratio"] <= multiple
        out["why"] = (
            f"RMS(packed - padded) = {out['rms_packed_minus_padded']:.3g} is {out['ratio']:.2f}x the bf16 "
            f"noise RMS {out['rms_bf16_minus_fp32']:.3g} (bar {multiple:g}x)"
        )
    return out


# ------------------------------------------------------------------------------------------------
# plumbing
# ------------------------------------------------------------------------------------------------
class Report:
    """The checks' rows; the JSON is rewritten after every row, so a killed run keeps what it measured."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta, self.rows = path, meta, []
        self.t0 = time.perf_counter()

    def add(self, name: str, status: str, reason: str, **fields) -> dict:
        row = {"name": name, "status": status, "reason": reason, **fields}
        self.rows.append(row)
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {status:4s} {name}: {reason}", flush=True)
        self.flush()
        return row

    def flush(self) -> None:
        data = {
            **self.meta,
            "elapsed_s": time.perf_counter() - self.t0,
            "checks": self.rows,
            "failed": [r["name"] for r in self.rows if r["status"] == "FAIL"],
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)

    def table(self) -> str:
        lines = [
            f"{'check':22s} {'status':6s} {'step s':>8s} {'useful tok/s':>12s} {'eff MFU':>8s} {'peak GiB':>8s}  reason"
        ]
        for r in self.rows:

            def f(key, fmt):
                width = int(fmt.split(".")[0])
                return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-".rjust(width)

            lines.append(
                f"{r['name']:22s} {r['status']:6s} {f('step_s', '8.3f')} {f('useful_tok_per_s', '12.0f')} "
                f"{f('eff_mfu', '8.3f')} {f('peak_gib', '8.2f')}  {r['reason']}"
            )
        return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return str(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int:
    got = _status_bytes("VmRSS")
    return got if got is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (``VmHWM``) to the current one; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    got = _status_bytes("VmHWM")
    return got if got is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """CPU: glibc serves every allocation over ``nbytes`` with its own mapping, returned on free (``mallopt``
    M_MMAP_THRESHOLD, which also stops glibc raising the threshold as blocks are freed). With glibc's default
    the heap keeps freed same-sized blocks (the log-prob chunks), and at the tiny CPU shape that retention
    (~30 MB) outweighs the step itself; with it the resident set follows the live tensors that the memory
    plan counts. False where the C library has no ``mallopt`` (not glibc)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tokenizer(folder: Path) -> None:
    """A 3-token word-level tokenizer (pad/bos/eos): ``TrainerRank`` loads one from the model folder; the
    batches are token ids, never text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<s>": 1, "</s>": 2}, unk_token="<pad>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )


def warm_framework(hf_config, device: torch.device) -> None:
    """One train step of a 2-layer, width-32, 256-token-vocabulary copy of the architecture (packed and padded,
    both AdamW kernels): torch's first forward/backward maps kernels, thread pools and workspaces once per
    process (~60 MB of resident set on CPU), which the memory plan rightly leaves out. Done before the
    baseline of the ``memory`` check is read, so the check sees the step's own memory."""
    from transformers import AutoModelForCausalLM

    from oapl.trainer.attention import enable_varlen
    from oapl.trainer.batching import Sequence, collate
    from oapl.trainer.logprobs import token_logprobs

    base = {k: v for k, v in hf_config.to_dict().items() if k not in ("layer_types", "transformers_version")}
    small = hf_config.__class__.from_dict(
        {
            **base,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": 256,
        }
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
    enable_varlen(model, "auto")
    seqs = [Sequence([5, 6, 7], [8, 9, 10, 11], [-5.0] * 4), Sequence([5, 6], [9, 10], [-5.0] * 2)]
    for fused in (False, True):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
        for packed in (True, False):
            batch = collate(seqs, packed=packed).to(device)
            lp, _ = token_logprobs(model, batch, 1.0, 4, with_entropy=True)
            lp.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del model, opt
    cleanup(device)


class Bench:
    """The model, the batches and the config factory shared by the checks."""

    def __init__(self, a) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.a = a
        self.device = torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.mode = SimpleNamespace(**MODES[a.device])
        self.tmp = Path(tempfile.mkdtemp(prefix="oapl-gpu-acceptance-"))
        spec = json.loads(Path(a.config or HERE / "configs" / self.mode.config).read_text())
        self.spec = dict(spec)
        mtype = spec.pop("model_type")
        spec.pop("architectures", None)
        self.model_dir = self.tmp / "config"
        self.hf_config = AutoConfig.for_model(mtype, **spec)
        self.hf_config.save_pretrained(self.model_dir)  # model.name of the configs (the plan reads the shape)
        warm_framework(self.hf_config, self.device)
        self.rss_base = rss_now()
        torch.manual_seed(a.seed)
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        c = self.model.config
        self.vocab = c.vocab_size
        self.layers = c.num_hidden_layers
        self.d_attn = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.tok = SimpleNamespace(pad_token_id=0)
        m = self.mode
        rng = random.Random(a.seed)
        shape = SimpleNamespace(
            groups=m.groups,
            group_size=m.group_size,
            median=m.median,
            cap=m.cap,
            sigma=m.sigma,
            truncated=m.truncated,
            prompt=m.prompt,
        )
        self.lengths = lognormal_lengths(shape, rng)
        self.groups = make_groups(shape, self.lengths, self.vocab, rng)
        short = SimpleNamespace(
            groups=m.short_groups,
            group_size=m.short_size,
            median=m.short_cap / 4,
            cap=m.short_cap,
            sigma=0.8,
            truncated=1,
            prompt=m.prompt,
        )
        self.short = make_groups(short, lognormal_lengths(short, rng), self.vocab, rng)
        self.seq_lens = [len(g.prompt_token_ids) + len(r) for g in self.groups for r in g.response_token_ids]
        self.useful = sum(self.seq_lens)
        self.flops = train_flops(self.n_params, self.seq_lens, self.layers, self.d_attn)
        self.compute = "bfloat16" if self.cuda else "float32"
        self.budget = None

    def cfg(self, **over):
        from oapl.config import load_config

        m = self.mode
        base = {
            "output_dir": str(self.tmp / "run"),
            "model.name": str(self.model_dir),
            "model.device": str(self.device),
            "model.logprob_chunk_size": m.chunk,
            "optim.lr": 1e-6,
            "rollout.group_size": m.group_size,
            "rollout.prompts_per_step": m.groups,
            "optim.micro_batch_size": m.micro,
        }
        base.update(over)
        return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])

    def policy(self, cfg):
        from oapl.trainer.policy import Policy

        return Policy(cfg, total_steps=1000, model=self.model, tokenizer=self.tok)

    def shape(self):
        from oapl.memory_plan import shape_from_config

        return shape_from_config(self.model.config, "benchmark", params=self.n_params)

    def release(self, policy) -> None:
        if policy is not None:
            policy.optimizer = None
            policy.scheduler = None
        self.model.zero_grad(set_to_none=True)
        cleanup(self.device)


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def pick_budget(b: Bench) -> int:
    """Token budget of the ``packed+budget`` config: two capped sequences (+ prompt), or on a GPU the most
    the memory plan fits in 90 % of it (never below one capped sequence)."""
    from oapl.memory_plan import trainer_rank

    m = b.mode
    want = 2 * m.cap + m.prompt
    b.micro = m.micro
    if not b.cuda:
        return want
    total = torch.cuda.get_device_properties(b.device).total_memory
    cfg = b.cfg(**{"optim.max_tokens_per_micro_batch": want, "optim.micro_batch_size": 1024})
    shape = b.shape()
    t = want
    b.micro = m.micro
    while (
        b.micro > 1
        and trainer_rank(cfg, shape, m.cap + m.prompt, True, tokens=b.micro * (m.cap + m.prompt))["total"] > 0.9 * total
    ):
        b.micro //= 2  # packed/padded/reference configs: sequences per micro-batch the plan fits
    while t > m.cap + m.prompt and trainer_rank(cfg, shape, m.cap + m.prompt, True, tokens=t)["total"] > 0.9 * total:
        t -= 512
    return max(t, m.cap + m.prompt)


def time_steps(b: Bench, policy, groups, warmup: int, timed: int) -> tuple[list[float], list[dict], float]:
    t = time.perf_counter()
    for _ in range(warmup):
        policy.train_step(groups)
    sync(b.device)
    warm_s = time.perf_counter() - t
    times, ms = [], []
    for _ in range(timed):
        sync(b.device)
        t = time.perf_counter()
        ms.append(policy.train_step(groups))
        sync(b.device)
        times.append(time.perf_counter() - t)
    return times, ms, warm_s


def step_row(b: Bench, rep: Report, name: str, times: list[float], ms: list[dict], warm_s: float, peak, **extra):
    dt = min(times)
    loss = ms[-1]["loss"] if ms else float("nan")
    skipped = any(m.get("skipped") for m in ms)
    ok = all(math.isfinite(m["loss"]) for m in ms) and not skipped
    fields = {
        "step_s": dt,
        "step_s_all": times,
        "warmup_s": warm_s,
        "useful_tokens": b.useful,
        "useful_tok_per_s": b.useful / dt,
        "flops": b.flops,
        "eff_mfu": b.flops / dt / (b.peak * 1e12),
        "padding_frac": ms[-1].get("padding_frac") if ms else None,
        "loss": loss,
        "peak_gib": peak,
        **extra,
    }
    why = (
        f"{b.useful / dt:,.0f} useful tok/s, effective MFU {fields['eff_mfu']:.3f}"
        if ok
        else f"non-finite loss or skipped step (loss {loss})"
    )
    return rep.add(f"step:{name}", "PASS" if ok else "FAIL", why, **fields)


def run_config(b: Bench, rep: Report, name: str, over: dict, needs: str | None = None, measure_memory=False):
    """One trainer config on the variable-length batch: build the ``Policy`` (SKIP if it refuses), warm-up,
    timed steps; on CUDA the allocator's peak, on CPU the resident set's."""
    if needs:
        return rep.add(f"step:{name}", "SKIP", needs)
    if late(b):
        return rep.add(f"step:{name}", "SKIP", late(b))
    policy = None
    try:
        if b.cuda:
            cleanup(b.device)
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        try:
            policy = b.policy(b.cfg(**over))
        except ValueError as e:  # e.g. liger without CUDA or without liger-kernel: the Policy says why
            return rep.add(f"step:{name}", "SKIP", str(e).splitlines()[0])
        times, ms, warm_s = time_steps(b, policy, b.groups, b.mode.warmup, b.mode.timed)
        peak = (torch.cuda.max_memory_allocated() if b.cuda else peak_rss() - b.rss_base) / 2**30
        row = step_row(b, rep, name, times, ms, warm_s, peak, config=over, packing_active=policy.packing)
        if measure_memory:
            memory_check(b, rep, policy.cfg, peak)
        return row
    except torch.OutOfMemoryError as e:
        return rep.add(f"step:{name}", "FAIL", f"out of memory: {str(e).splitlines()[0][:200]}", config=over)
    finally:
        b.release(policy)
        del policy
        uncompile(b.model)


def late(b: Bench) -> str | None:
    """Why a step config is not started: the run is within 30 s of ``--time-limit-s`` (CUDA default 450 s, so
    that the command ends within 8 minutes with what it measured)."""
    limit = b.a.time_limit_s
    if limit and time.perf_counter() - b.t_start > limit - 30:
        return f"time limit: {time.perf_counter() - b.t_start:.0f} s of --time-limit-s {limit:g} spent"
    return None


def uncompile(model) -> None:
    """Undo ``model.compile`` (``nn.Module.compile`` only sets ``_compiled_call_impl``) so later configs run eager."""
    for mod in model.modules():
        if getattr(mod, "_compiled_call_impl", None) is not None:
            mod._compiled_call_impl = None


def memory_check(b: Bench, rep: Report, cfg, measured_gib: float) -> None:
    from oapl.memory_plan import trainer_rank

    from oapl.trainer.batching import plan_micro_batches

    m = b.mode
    o = cfg.optim
    largest = max(
        sum(b.seq_lens[i] for i in mb)
        for mb in plan_micro_batches(b.seq_lens, o.max_tokens_per_micro_batch, o.micro_batch_size)
    )
    at_budget = trainer_rank(cfg, b.shape(), m.cap + m.prompt, b.cuda)
    plan = trainer_rank(cfg, b.shape(), m.cap + m.prompt, b.cuda, tokens=largest)  # the micro-batch that ran
    planned = plan["total"] - plan["context"]  # the allocator does not see the CUDA context
    measured = measured_gib * 2**30
    ratio = measured / planned
    ok = 1 / MEMORY_BAND <= ratio <= MEMORY_BAND
    what = "torch.cuda.max_memory_allocated" if b.cuda else "peak resident set - resident set before the model"
    rep.add(
        "memory",
        "PASS" if ok else "FAIL",
        f"{what} {measured / 2**30:.3f} GiB vs plan {planned / 2**30:.3f} GiB for its largest micro-batch "
        f"({largest:,} tokens): ratio {ratio:.2f} "
        f"(band {1 / MEMORY_BAND:.2f}-{MEMORY_BAND:.2f})",
        measured_gib=measured / 2**30,
        planned_gib=planned / 2**30,
        ratio=ratio,
        peak_gib=measured / 2**30,
        plan_gib={
            k: plan[k] / 2**30
            for k in (
                "weights",
                "gradients",
                "optimizer",
                "gathered",
                "activations",
                "offloaded",
                "logits",
                "optimizer_temps",
                "context",
                "total",
            )
        },
        tokens_largest_micro_batch=largest,
        token_budget=o.max_tokens_per_micro_batch,
        planned_at_budget_gib=(at_budget["total"] - at_budget["context"]) / 2**30,
    )


def check_update_share(b: Bench, rep: Report) -> None:
    """One lr-1e-6 step under bf16 compute over fp32 masters: the share of weights it moves."""
    from oapl.trainer.precision import dropped_update_fraction

    lr = 1e-6
    policy = b.policy(b.cfg(**{"model.compute_dtype": "bfloat16", "optim.lr": lr, "optim.micro_batch_size": 8}))
    try:
        named = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in named.items()}
        nonzero: dict[str, torch.Tensor] = {}
        orig = policy.optimizer.step

        def spy(*args, **kw):
            nonzero.update({n: p.grad.detach() != 0 for n, p in named.items() if p.grad is not None})
            return orig(*args, **kw)

        policy.optimizer.step = spy
        with warnings.catch_warnings():  # the scheduler notices the spy; nothing else does
            warnings.simplefilter("ignore", UserWarning)
            m = policy.train_step(b.short)
        moved = total = 0
        for n, nz in nonzero.items():
            moved += int(((named[n].detach() != before[n]) & nz).sum())
            total += int(nz.sum())
        del before
        share = moved / max(total, 1)
        masters = sorted({str(p.dtype).replace("torch.", "") for p in named.values()})
        bf16_keeps = 1.0 - dropped_update_fraction(list(named.values()), lr, torch.bfloat16)
        ok = share >= UPDATE_SHARE_BAR and not m["skipped"] and policy.precision.mixed
        rep.add(
            "update_share",
            "PASS" if ok else "FAIL",
            f"{100 * share:.3f}% of {total:,} weights with a gradient moved (bar {100 * UPDATE_SHARE_BAR:.0f}%); "
            f"masters {'/'.join(masters)}; pure bf16 storage would keep ~{100 * bf16_keeps:.1f}%",
            share=share,
            weights_with_grad=total,
            moved=moved,
            lr=lr,
            masters=masters,
            bf16_storage_keeps_estimate=bf16_keeps,
            loss=m["loss"],
            skipped=bool(m["skipped"]),
        )
    finally:
        b.release(policy)


def check_packed_vs_padded(b: Bench, rep: Report) -> None:
    from oapl.trainer.batching import Sequence, collate
    from oapl.trainer.logprobs import token_logprobs

    policy = b.policy(b.cfg(**{"model.compute_dtype": "bfloat16", "optim.packing": True}))
    try:
        if not policy.packing:
            rep.add("packed_vs_padded", "FAIL", "the model refused packing (see the log)")
            return
        seqs = [
            Sequence(g.prompt_token_ids, r, lp)
            for g in b.short
            for r, lp in zip(g.response_token_ids, g.response_logprobs)
        ]
        packed = collate(seqs, packed=True, pad_token_id=0).to(b.device)
        padded = collate(seqs, packed=False, pad_token_id=0).to(b.device)
        chunk = policy.cfg.model.logprob_chunk_size
        with torch.no_grad():
            amp = policy.precision.autocast
            lp_pack = token_logprobs(policy.model, packed, policy.temperature, chunk, autocast=amp())[0]
            lp_pad = token_logprobs(policy.model, padded, policy.temperature, chunk, autocast=amp())[0]
            lp_fp32 = token_logprobs(policy.model, padded, policy.temperature, chunk)[0]
            lp_pack32 = token_logprobs(policy.model, packed, policy.temperature, chunk)[0]
        from oapl.trainer.attention import _BACKEND, available_backends

        backend = _BACKEND["name"]
        if backend == "auto":
            backend = available_backends(b.device, torch.bfloat16)[0]
        v = layout_verdict(lp_pack.cpu(), lp_pad.cpu(), lp_fp32.cpu(), padded.response_mask.cpu())
        m = padded.response_mask.bool().cpu()
        v["max_packed_minus_padded_fp32"] = float((lp_pack32.cpu() - lp_fp32.cpu())[m].abs().max())
        rep.add(
            "packed_vs_padded",
            "PASS" if v["ok"] else "FAIL",
            v["why"] + f"; varlen backend {backend}",
            varlen_backend=backend,
            padded_tokens=padded.computed_tokens,
            packed_tokens=packed.computed_tokens,
            **{k: x for k, x in v.items() if k not in ("ok", "why")},
        )
    finally:
        b.release(policy)


def check_fsdp2(b: Bench, rep: Report) -> None:
    """FSDP2 ``TrainerRank`` on one rank vs the local ``run_step``: same batch, same saved weights."""
    import torch.distributed as dist

    from oapl.distributed.sharded import full_tensor
    from oapl.distributed.trainer import TrainerRank
    from oapl.objectives import build_objective
    from oapl.trainer.policy import Policy
    from oapl.trainer.step import Parallel, plan_step, run_step

    folder = b.tmp / "fsdp-model"
    save_dtype = torch.bfloat16 if b.cuda else torch.float32  # halves the write at 1.7B; both sides load this file
    cast: dict[int, torch.Tensor] = {}  # tied tensors (embeddings = LM head) stay one tensor
    state = {k: cast.setdefault(v.data_ptr(), v.detach().to(save_dtype)) for k, v in b.model.state_dict().items()}
    b.model.save_pretrained(folder, state_dict=state)
    del state, cast
    save_tokenizer(folder)
    over = {
        "model.name": str(folder),
        "optim.share_prompts": "off",
        "optim.micro_batch_size": 4,
        "distributed.parallel": "fsdp",
        "distributed.trainer_workers": 1,
        "distributed.trainer_num_gpus": 1 if b.cuda else 0,
        "rollout.prompts_per_step": len(b.short),
        "rollout.group_size": b.short[0].n,
    }
    cfg = b.cfg(**over)
    works, _ = plan_step(b.short, build_objective(cfg.algorithm), cfg.optim, cfg.algorithm.mini_batches, world=1)

    def side(out, named):
        return {
            "loss": out["stats"]["loss"],
            "grad_norm": out["grad_norm"],
            "grads": out["grads"],
            "finite": out["finite"],
            "before": None,
            "after": {n: full_tensor(p.detach()).float().cpu() for n, p in named},
        }

    policy = Policy(cfg, total_steps=10)
    before = {n: p.detach().float().cpu().clone() for n, p in policy.model.named_parameters()}
    local = side(
        run_step(policy, works[0], Parallel(policy), capture_grads=True), list(policy.model.named_parameters())
    )
    local["before"] = before
    compute = policy.precision.compute_dtype
    b.release(policy)
    del policy
    cleanup(b.device)
    rank = TrainerRank(cfg.model_dump(mode="json"), 0, 1, torch.get_num_threads())
    try:
        rank.setup("127.0.0.1", free_port(), None)
        named = list(rank.policy.model.named_parameters())
        fbefore = {n: full_tensor(p.detach()).float().cpu().clone() for n, p in named}
        sharded = [n for n, p in named if hasattr(p, "to_local")]
        fs = side(rank.train_step(works[0], want_grads=True), named)
        fs["before"] = fbefore
        backend = dist.get_backend()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank.policy is not None:
            b.release(rank.policy)
        del rank
        cleanup(b.device)
    # the local loss is the stats' sum of per-micro-batch losses; so is the rank's (world 1: nothing to merge)
    cmp = compare_steps(local, fs, compute, b.layers, 1e-6)
    ok = cmp["ok"] and local["finite"] and fs["finite"] and rank_mode_ok(sharded)
    why = (
        f"{backend}, {len(sharded)} DTensor parameters; loss {fs['loss']:.6g} vs local {local['loss']:.6g}, "
        f"max grad rel diff {cmp['max_grad_rel_diff']:.2e} (bound {cmp['k'] * cmp['u']:.2e}), "
        f"max update diff {cmp['max_update_abs_diff']:.2e}"
    )
    if not rank_mode_ok(sharded):
        why = "the rank's parameters are not DTensors: FSDP2 did not wrap the model; " + why
    if cmp["problems"]:
        why += "; " + "; ".join(cmp["problems"][:3])
    rep.add(
        "fsdp2_one_rank",
        "PASS" if ok else "FAIL",
        why,
        backend=backend,
        compute_dtype=compute,
        dtensor_params=len(sharded),
        **{k: v for k, v in cmp.items() if k != "ok"},
    )


def rank_mode_ok(sharded: list[str]) -> bool:
    return len(sharded) > 0


def reference_step(b: Bench, rep: Report, micro: int) -> None:
    """A hand-written plain PyTorch step on the same tokens: HF forward on each padded micro-batch (full
    logits), cross-entropy log-probs of the response tokens, the OAPL loss, backward, clip, AdamW."""
    import torch.nn.functional as F

    cfg = b.cfg()
    beta1, beta2 = cfg.algorithm.beta1, cfg.algorithm.beta2
    model = b.model
    prev_impl = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("sdpa")  # plain transformers attention, not oapl's packed one
    model.train()
    rows, advs = [], []
    for g in b.groups:
        r = torch.tensor(g.rewards, dtype=torch.float64)
        v = beta1 * (torch.logsumexp(r / beta1, dim=0) - math.log(len(g.rewards)))
        advs += (r - v).tolist()
        for toks, lps in zip(g.response_token_ids, g.response_logprobs):
            rows.append((g.prompt_token_ids, toks, lps))
    n = len(rows)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if b.cuda else contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )

    def batch(lo, hi):
        part = rows[lo:hi]
        width = max(len(p) + len(t) for p, t, _ in part)
        ids = torch.zeros((len(part), width), dtype=torch.long)
        att = torch.zeros_like(ids)
        mask = torch.zeros((len(part), width - 1))
        ref = torch.zeros((len(part), width - 1))
        for i, (p, t, lp) in enumerate(part):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            att[i, : len(p) + len(t)] = 1
            mask[i, len(p) - 1 : len(p) - 1 + len(t)] = 1  # logits at position j predict token j + 1
            ref[i, len(p) - 1 : len(p) - 1 + len(t)] = torch.tensor(lp)
        d = b.device
        return ids.to(d), att.to(d), mask.to(d), ref.to(d), torch.tensor(advs[lo:hi], dtype=torch.float32, device=d)

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        computed = 0
        for lo in range(0, n, micro):
            ids, att, mask, ref, adv = batch(lo, lo + micro)
            computed += ids.numel()
            with amp:
                logits = model(input_ids=ids, attention_mask=att).logits
            logp = -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            s = ((logp.view_as(mask) - ref) * mask).sum(-1)
            loss = (beta2 * s - adv).pow(2).sum() / n
            loss.backward()
            total += float(loss.detach())
            del logits, logp, loss
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()
        return {"loss": total, "padding_frac": 1 - b.useful / computed, "skipped": 0.0}

    try:
        if b.cuda:
            cleanup(b.device)
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        t = time.perf_counter()
        for _ in range(b.mode.warmup):
            step()
        sync(b.device)
        warm_s = time.perf_counter() - t
        times, ms = [], []
        for _ in range(b.mode.timed):
            sync(b.device)
            t = time.perf_counter()
            ms.append(step())
            sync(b.device)
            times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() if b.cuda else peak_rss() - b.rss_base) / 2**30
        step_row(
            b,
            rep,
            "reference",
            times,
            ms,
            warm_s,
            peak,
            micro_batch=micro,
            config="plain HF forward (padded, full logits) + cross-entropy log-probs + torch.optim.AdamW",
        )
    finally:
        opt.state.clear()  # the AdamW moments (2 x 4 B/parameter) go now, not when the closure does
        model.zero_grad(set_to_none=True)
        if prev_impl:
            model.set_attn_implementation(prev_impl)
        cleanup(b.device)


def throughput(b: Bench, rep: Report, first_only: bool = False) -> None:
    budget = {"optim.max_tokens_per_micro_batch": b.budget, "optim.micro_batch_size": 1024}
    if first_only or not any(r["name"] == "step:packed+budget" for r in rep.rows):
        # the memory check's config runs first, in the fresh process (its resident set is the baseline)
        run_config(b, rep, "packed+budget", budget, measure_memory=first_only)
        if first_only:
            return
    run_config(b, rep, "packed", {"optim.micro_batch_size": b.micro})
    run_config(b, rep, "padded", {"optim.packing": False, "optim.micro_batch_size": b.micro})
    micro = b.micro
    while not late(b):
        oom = None
        try:
            reference_step(b, rep, micro)
            break
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:160]
        b.release(None)  # outside the handler: the traceback's frames (and their logits) are gone
        if micro == 1:
            rep.add("step:reference", "FAIL", f"out of memory at 1 sequence per micro-batch: {oom}")
            break
        micro //= 2  # full logits (B x T x V) are what a plain step pays for; halve and say so in the row
        print(f"reference: out of memory; retrying with {micro} sequence(s) per micro-batch", flush=True)
    else:
        rep.add("step:reference", "SKIP", late(b))
    run_config(b, rep, "fused-off", {**budget, "optim.fused": "off"})
    compile_skip = None
    if not b.cuda and not b.a.cpu_compile:
        compile_skip = (
            "CPU mode: inductor's first compile of the decoder layers takes minutes on a small CPU "
            "(138 s measured), past this mode's budget; --cpu-compile runs it"
        )
    run_config(b, rep, "compile", {**budget, "model.compile": True}, needs=compile_skip)
    run_config(b, rep, "liger", {**budget, "model.liger": True})  # patches the model for good: after the others
    on = {
        **budget,
        "optim.fused": "on",
        "model.compile": compile_skip is None,
        "model.liger": any(r["name"] == "step:liger" and r["status"] == "PASS" for r in rep.rows),
    }
    extra = [k for k in ("model.compile", "model.liger") if on[k]]
    run_config(
        b,
        rep,
        "all-on",
        on,
        needs=None
        if extra
        else "nothing beyond the base's fused AdamW is available here (compile and liger skipped above)",
    )


def mfu_target(b: Bench, rep: Report, bar: float) -> None:
    rows = [
        r for r in rep.rows if r["name"].startswith("step:") and r["name"] != "step:reference" and r["status"] == "PASS"
    ]
    if not b.cuda:
        rep.add("mfu_target", "SKIP", "the effective-MFU bar is a GPU target; CPU figures are reported only")
        return
    if not rows or bar <= 0:
        rep.add("mfu_target", "SKIP", "no oapl step ran" if not rows else "--mfu-bar 0")
        return
    best = max(rows, key=lambda r: r["eff_mfu"])
    ok = best["eff_mfu"] >= bar
    rep.add(
        "mfu_target",
        "PASS" if ok else "FAIL",
        f"best effective MFU {best['eff_mfu']:.3f} ({best['name']}) vs bar {bar:g}",
        best=best["name"],
        eff_mfu=best["eff_mfu"],
        bar=bar,
    )


# ------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="the JSON report (default gpu_acceptance_<device>.json)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)}")
    p.add_argument("--config", default=None, help="another architecture config.json (default: the shipped one)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the MFU denominator (default: measured here)")
    p.add_argument("--mfu-bar", type=float, default=MFU_BAR)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU, torch's on CUDA)")
    p.add_argument("--cpu-compile", action="store_true", help="CPU: run the compile configs too (minutes)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per config (default 1)")
    p.add_argument("--timed", type=int, default=None, help="timed steps per config, the best one counts (default 2)")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="start no step config past this many seconds less 30 (default 450 on CUDA, none on CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    wanted = [c for c in a.checks.split(",") if c]
    bad = [c for c in wanted if c not in CHECKS]
    if bad:
        print(f"--checks: unknown {', '.join(bad)} (known: {', '.join(CHECKS)})", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; run with --device cpu", file=sys.stderr)
        return 2
    mmap_fixed = a.device == "cpu" and fix_mmap_threshold()
    torch.set_num_threads(a.threads or (1 if a.device == "cpu" else torch.get_num_threads()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(a.out or f"gpu_acceptance_{a.device}.json")
    t0 = time.perf_counter()
    compute = torch.bfloat16 if a.device == "cuda" else torch.float32
    peak = a.peak_tflops or matmul_tflops(torch.device(a.device), compute)
    if a.time_limit_s is None:
        a.time_limit_s = 450.0 if a.device == "cuda" else 0.0
    b = Bench(a)
    b.t_start = t0
    b.mode.warmup = a.warmup if a.warmup is not None else b.mode.warmup
    b.mode.timed = max(1, a.timed) if a.timed is not None else b.mode.timed
    b.peak = peak
    b.budget = pick_budget(b)
    meta = {
        "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if b.cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "config": b.spec,
        "n_params": b.n_params,
        "layers": b.layers,
        "d_attn": b.d_attn,
        "compute_dtype": b.compute,
        "peak_tflops": peak,
        "peak_source": "flag" if a.peak_tflops else "measured",
        "cpu_malloc_mmap_threshold": 128 * 1024 if mmap_fixed else None,
        "batch": {
            "sequences": len(b.seq_lens),
            "prompt": b.mode.prompt,
            "cap": b.mode.cap,
            "median_target": b.mode.median,
            "response_lengths": sorted(b.lengths),
            "useful_tokens": b.useful,
            "flops_per_step": b.flops,
            "token_budget": b.budget,
        },
    }
    rep = Report(out, meta)
    print(
        f"device={a.device} ({meta['device_name']}) params={b.n_params / 1e6:.1f}M layers={b.layers} compute={b.compute} "
        f"peak={peak:.2f} TFLOP/s ({meta['peak_source']}) threads={torch.get_num_threads()}\n"
        f"batch: {len(b.seq_lens)} sequences, {b.useful:,} useful tokens, responses {sorted(b.lengths)}, "
        f"token budget {b.budget:,}",
        flush=True,
    )

    def guarded(name, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a check that crashes is a FAIL with its error; the others go on
            traceback.print_exc()
            rep.add(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            b.release(None)

    try:
        if "memory" in wanted:  # first: the fresh process's resident set is the baseline
            guarded("memory", throughput, b, rep, True)
        if "update_share" in wanted:
            guarded("update_share", check_update_share, b, rep)
        if "packed_vs_padded" in wanted:
            guarded("packed_vs_padded", check_packed_vs_padded, b, rep)
        if "fsdp2_one_rank" in wanted:
            guarded("fsdp2_one_rank", check_fsdp2, b, rep)
        if "throughput" in wanted:
            guarded("throughput", throughput, b, rep)
        if "mfu_target" in wanted:
            guarded("mfu_target", mfu_target, b, rep, a.mfu_bar)
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)  # the config folder and FSDP2's saved model (3.4 GB at 1.7B)
    rep.meta["elapsed_total_s"] = time.perf_counter() - t0
    rep.flush()
    print()
    print(rep.table())
    failed = [r["name"] for r in rep.rows if r["status"] == "FAIL"]
    print(
        f"\n{len(rep.rows)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
        f"{time.perf_counter() - t0:.0f} s; report: {out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
