"""Trainer throughput on realistic RL batches: padded vs packed, fixed vs variable length.

One ``Policy.train_step`` (the project's real step: chunked fp32 log-probs, OAPL loss, AdamW on
the masters) on a batch of G x groups responses whose lengths follow a seeded lognormal (median,
sigma, cap as flags; ``--truncated`` of them at the cap, as long reasoning traces are), with a fixed
prompt. Every layout sees the same sequences. Reported per layout:

* step time (best of ``--steps`` after ``--warmup``), useful tokens/s (prompt + response tokens),
* effective MFU = 6 N useful_tokens / time / peak, with ``peak`` the dense matmul rate measured on
  this device in the compute dtype at the start (``--peak-tflops`` overrides), N = parameters,
* padding fraction (tokens computed that carry no sequence), peak memory during the step (CUDA:
  allocator peak; CPU: resident-set growth over the step, sampled every 5 ms).

Layouts: ``padded-global`` is the trainer before packing (every micro-batch right-padded to the
longest sequence of the whole batch, rebuilt here by padding each micro-batch to the batch's longest);
``padded`` pads each micro-batch to its own longest; ``packed`` packs each micro-batch into one row;
``packed-budget`` packs token-budget micro-batches; ``shared`` runs each group's prompt once and its
responses on its KV cache (``optim.share_prompts=on``; the other layouts run with it off). For
``shared`` the effective MFU counts each distinct prompt once (what that layout must compute);
``seq_tok/s`` counts every sequence's prompt + response tokens in every layout, so it compares
layouts on the same work. Layouts are timed in turn, ``--steps`` rounds,
and the best step of each is reported, so a machine shared with other work disturbs them alike.

Modes: ``--device cpu`` (default) trains the embedded SmolLM2-135M in fp32 with lengths scaled to a
512-token cap; ``--device cuda`` builds a random-init model from ``--config`` (default: the
Qwen3-1.7B shape) in bf16 compute over fp32 masters, so the casts count.

    python benchmarks/trainer_throughput.py                       # CPU, embedded model
    python benchmarks/trainer_throughput.py --device cuda         # 1.7B shape, 8K cap
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from types import SimpleNamespace

import torch

QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--config", default=None, help="CUDA: a config.json to build a random-init model (default: Qwen3-1.7B shape)"
    )
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128 CUDA, 32 CPU)")
    p.add_argument("--cap", type=int, default=None, help="max response tokens (default 8192 CUDA, 512 CPU)")
    p.add_argument("--median", type=float, default=None, help="median response length (default cap*1500/8192)")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of response lengths")
    p.add_argument("--truncated", type=int, default=3, help="responses cut at the cap")
    p.add_argument(
        "--layouts",
        default="padded-global,padded,packed,packed-budget",
        help="comma list of padded-global, padded, packed, packed-budget (token budget = --budget), "
        "shared (packed, prompts shared by their group)",
    )
    p.add_argument("--budget", type=int, default=None, help="max tokens per micro-batch (default: 2 x cap + prompt)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (padded/packed)")
    p.add_argument("--fixed", action="store_true", help="also run every response at the mean length")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    p.add_argument("--compute-dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (best step per layout)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def lengths(a, rng: random.Random) -> list[int]:
    n = a.groups * a.group_size
    median = a.median or a.cap * 1500 / 8192
    out = [
        min(a.cap, max(a.cap // 64, int(rng.lognormvariate(math.log(median), a.sigma)))) for _ in range(n - a.truncated)
    ]
    out += [a.cap] * a.truncated
    rng.shuffle(out)
    return out


def make_groups(a, lens: list[int], vocab: int, rng: random.Random):
    from oapl.rollout.buffer import RolloutGroup

    gs = []
    for gi in range(a.groups):
        ls = lens[gi * a.group_size : (gi + 1) * a.group_size]
        toks = [[rng.randrange(3, vocab) for _ in range(n)] for n in ls]
        gs.append(
            RolloutGroup(
                prompt_id=f"b{gi}",
                prompt="",
                prompt_token_ids=[rng.randrange(3, vocab) for _ in range(a.prompt)],
                responses=[""] * len(ls),
                response_token_ids=toks,
                response_logprobs=[[-math.log(vocab) + rng.uniform(-0.5, 0.5) for _ in range(n)] for n in ls],
                rewards=[float(i % 3 == 0) for i in range(len(ls))],
                finish_reasons=["length" if n == a.cap else "stop" for n in ls],
                weights_id="bench",
                version=0,
            )
        )
    return gs


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    reps = 50 if device.type == "cuda" else 5
    for _ in range(3):
        x @ y
    best = 0.0
    for _ in range(5):  # the best of 5 trials: a busy machine only ever slows a trial down
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            x @ y
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(a, device: torch.device):
    """(model, tokenizer stand-in, model name for the config, vocab, n_params)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if device.type == "cpu":
        from oapl.trainer.model import load_causal_lm, resolve_model_path

        path = resolve_model_path("embedded:smollm2-135m-instruct")
        model = load_causal_lm(path, torch.float32, device)
        name = path
    else:
        spec = json.load(open(a.config)) if a.config else dict(QWEN3_1_7B)
        cfg = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "architectures"})
        torch.manual_seed(a.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        name = "random-init"
    n_params = sum(p.numel() for p in model.parameters())
    return model, SimpleNamespace(pad_token_id=0), name, model.config.vocab_size, n_params


class MemorySampler:
    """Peak memory of one step: CUDA allocator peak, or on CPU the resident-set growth (sampled)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def __enter__(self):
        import threading

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self._rss())

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self._stop.set()
            self._t.join()
            self.gib = (max(self.peak, self._rss()) - self.base) / 2**30


def make_policy(a, model, tok, name: str, layout: str, device: torch.device):
    from oapl.config import load_config
    from oapl.trainer.policy import Policy

    over = [
        f"model.name={name}",
        f"model.device={device.type}",
        f"model.compute_dtype={a.compute_dtype}",
        f"model.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
        f"model.compile={str(a.compile).lower()}",
        "model.logprob_chunk_size=1024",
        "optim.lr=1e-6",
        "algorithm.beta2=0.001",
        f"rollout.group_size={a.group_size}",
        f"rollout.prompts_per_step={a.groups}",
        f"optim.packing={str(layout.startswith('packed') or layout == 'shared').lower()}",
        f"optim.share_prompts={'on' if layout == 'shared' else 'off'}",
        f"optim.micro_batch_size={a.micro_batch if layout != 'packed-budget' else 1024}",
    ]
    if layout == "packed-budget":
        over.append(f"optim.max_tokens_per_micro_batch={a.budget}")
    return Policy(load_config(None, over), total_steps=1000, model=model, tokenizer=tok)


def step(policy, groups, layout: str, device: torch.device) -> tuple[float, dict, float]:
    """One timed train step; ``padded-global`` pads every micro-batch to the batch's longest sequence."""
    import oapl.trainer.step as step_mod

    orig = step_mod.collate_auto
    if layout == "padded-global":
        from oapl.trainer.batching import collate

        width = max(len(g.prompt_token_ids) + len(r) for g in groups for r in g.response_token_ids)
        step_mod.collate_auto = lambda seqs, packed, pad_token_id=0, share=None: collate(
            seqs, False, pad_token_id, pad_to=width
        )
    try:
        sync(device)
        with MemorySampler(device) as mem:
            t = time.perf_counter()
            m = policy.train_step(groups)
            sync(device)
            dt = time.perf_counter() - t
    finally:
        step_mod.collate_auto = orig
    return dt, m, mem.gib


def main() -> None:
    a = parse()
    sys.path.insert(0, "src")
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = device.type == "cuda"
    a.prompt = a.prompt or (128 if cuda else 32)
    a.cap = a.cap or (8192 if cuda else 512)
    a.budget = a.budget or (2 * a.cap + a.prompt)
    a.compute_dtype = a.compute_dtype or ("bfloat16" if cuda else "float32")
    from oapl.trainer.precision import parse_dtype

    peak = a.peak_tflops or matmul_tflops(device, parse_dtype(a.compute_dtype, "--compute-dtype"))
    model, tok, name, vocab, n_params = build(a, device)
    rng = random.Random(a.seed)
    lens = lengths(a, rng)
    batches = {"variable": make_groups(a, lens, vocab, rng)}
    if a.fixed:
        mean = int(sum(lens) / len(lens))
        batches["fixed"] = make_groups(a, [mean] * len(lens), vocab, rng)
    print(
        f"device={a.device} params={n_params / 1e6:.1f}M compute={a.compute_dtype} peak={peak:.2f} TFLOP/s "
        f"(measured matmul) threads={torch.get_num_threads()}"
    )
    print(
        f"responses: n={len(lens)} mean={sum(lens) / len(lens):.0f} cap={a.cap} prompt={a.prompt} sorted={sorted(lens)}"
    )
    results = []
    layouts = a.layouts.split(",")
    print(
        f"{'batch':9s} {'layout':14s} {'step_s':>8s} {'seq_tok/s':>13s} {'eff_MFU':>8s} {'padding':>8s} "
        f"{'peak_mem':>9s}"
    )
    for bname, groups in batches.items():
        useful = sum(len(g.prompt_token_ids) + len(r) for g in groups for r in g.response_token_ids)
        distinct = sum(len(g.prompt_token_ids) + sum(map(len, g.response_token_ids)) for g in groups)
        policies = {lay: make_policy(a, model, tok, name, lay, device) for lay in layouts}
        best: dict[str, tuple[float, dict, float]] = {}
        for _ in range(a.warmup):
            for lay in layouts:
                step(policies[lay], groups, lay, device)
        for _ in range(a.steps):  # layouts in turn: a busy machine slows them alike
            for lay in layouts:
                dt, m, gib = step(policies[lay], groups, lay, device)
                if lay not in best or dt < best[lay][0]:
                    best[lay] = (dt, m, max(gib, best.get(lay, (0, 0, 0.0))[2]))
        for lay in layouts:
            dt, m, gib = best[lay]
            r = {
                "batch": bname,
                "layout": lay,
                "packing_active": policies[lay].packing,
                "step_s": dt,
                "useful_tokens": useful,
                "useful_tok_per_s": useful / dt,
                "padding_frac": m["padding_frac"],
                "peak_mem_gib": gib,
                "loss": m["loss"],
                "eff_mfu": 6 * n_params * (distinct if lay == "shared" else useful) / dt / (peak * 1e12),
            }
            results.append(r)
            print(
                f"{bname:9s} {lay:14s} {dt:8.3f} {r['useful_tok_per_s']:13.1f} {r['eff_mfu']:8.3f} "
                f"{r['padding_frac']:8.3f} {gib:6.2f} GiB",
                flush=True,
            )
        del policies
    base = {r["batch"]: r for r in results if r["layout"] == layouts[0]}
    for r in results:
        if r["layout"] != layouts[0] and r["batch"] in base:
            print(
                f"{r['batch']} {r['layout']}: {r['useful_tok_per_s'] / base[r['batch']]['useful_tok_per_s']:.2f}x "
                f"the {layouts[0]} path's useful tokens/s"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"args": vars(a), "peak_tflops": peak, "n_params": n_params, "lengths": lens, "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
