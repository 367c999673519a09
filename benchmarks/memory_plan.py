"""The memory plan (``oapl.memory_plan``) against the measured peak of real CPU train steps.

For each shape (tiny random-init Llamas of different width, depth and vocabulary, built with
transformers' ``LlamaConfig``; no network; and the embedded SmolLM2-135M), a fresh child process
builds the model, wraps it in ``oapl.trainer.policy.Policy`` (fp32 on CPU), and runs ``--steps``
train steps on synthetic rollout groups (one group of G responses per micro-batch, packed). Measured: the peak resident set of the
steps (``VmHWM``, reset through ``/proc/self/clear_refs`` after the policy is built) less the resident
set after the imports, before the model existed. Planned: ``oapl.memory_plan.trainer_rank(...)["total"]``
for the same shape and settings on CPU (weights + gradients + AdamW + max(activations + logits,
AdamW's temporaries)); the framework's own memory is the baseline subtracted from both.

    python benchmarks/memory_plan.py                 # the default shapes, 2 steps each
    python benchmarks/memory_plan.py --json /tmp/memory_plan.json
    python benchmarks/memory_plan.py --ranks 2 --parallel fsdp   # each of 2 gloo trainer ranks (TrainerRank)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

#: name: (hidden, layers, intermediate, heads, kv_heads, vocab, response tokens, gradient checkpointing, chunk)
SHAPES = {
    "h256-L4-V32k": (256, 4, 768, 4, 2, 32000, 480, False, 1024),
    "h512-L8-V16k": (512, 8, 1536, 8, 4, 16000, 480, False, 1024),
    "h384-L12-V49k-gc": (384, 12, 1024, 6, 2, 49152, 992, True, 512),
    "h768-L6-V8k": (768, 6, 2048, 12, 4, 8000, 736, False, 1024),
    # the real SmolLM2-135M-Instruct (embedded: no network), 30 layers, GQA 9/3 heads of 64
    "smollm2-135m": (576, 30, 1536, 9, 3, 49152, 224, False, 1024),
}
GROUP, PROMPT = 4, 32


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _config(folder: str, spec):
    from oapl.config import TrainConfig

    hidden, layers, inter, heads, kv, vocab, resp, gc, chunk = spec
    return TrainConfig.model_validate(
        {
            "output_dir": folder,
            "steps": 4,
            "model": {
                "name": folder,
                "device": "cpu",
                "compute_dtype": "float32",
                "gradient_checkpointing": gc,
                "logprob_chunk_size": chunk,
            },
            "rollout": {"group_size": GROUP, "prompts_per_step": 1},
            "optim": {"micro_batch_size": GROUP, "packing": True},
            "sampling": {"max_tokens": resp},
        }
    )


def child(name: str, steps: int) -> dict:
    """One shape in this process: build, step, measure; returns plan and measurement (bytes)."""
    import types

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from oapl.memory_plan import shape_from_config, trainer_rank
    from oapl.rollout.buffer import RolloutGroup
    from oapl.trainer.policy import Policy

    torch.set_num_threads(1)
    base = _status("VmRSS")
    spec = SHAPES[name]
    hidden, layers, inter, heads, kv, vocab, resp, gc, chunk = spec
    mcfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if name == "smollm2-135m":
        from oapl.trainer.model import load_causal_lm, resolve_model_path

        model = load_causal_lm(resolve_model_path("embedded:smollm2-135m-instruct"), torch.float32, torch.device("cpu"))
        mcfg = model.config
        base = _status("VmRSS") - sum(p.numel() * 4 for p in model.parameters())  # loading's own mappings aside
    else:
        model = LlamaForCausalLM(mcfg)
    with tempfile.TemporaryDirectory() as folder:
        mcfg.save_pretrained(folder)
        cfg = _config(folder, spec)
        policy = Policy(cfg, total_steps=4, model=model, tokenizer=types.SimpleNamespace(pad_token_id=0))
        gen = torch.Generator().manual_seed(0)
        group = RolloutGroup(
            prompt_id="p0",
            prompt="p",
            prompt_token_ids=torch.randint(3, vocab, (PROMPT,), generator=gen).tolist(),
            responses=[""] * GROUP,
            response_token_ids=[torch.randint(3, vocab, (resp,), generator=gen).tolist() for _ in range(GROUP)],
            response_logprobs=[[-10.0] * resp for _ in range(GROUP)],
            rewards=[1.0, 0.0] * (GROUP // 2),
            finish_reasons=["length"] * GROUP,
            weights_id="synthetic",
            version=0,
        )
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        for _ in range(steps):
            policy.train_step([group])
        peak = _status("VmHWM")
    shape = shape_from_config(mcfg, "benchmark", params=sum(p.numel() for p in model.parameters()))
    plan = trainer_rank(cfg, shape, PROMPT + resp, on_gpu=False)
    return {
        "shape": name,
        "params": shape.params,
        "tokens": plan["tokens"],
        "checkpointing": gc,
        "measured": peak - base,
        "planned": plan["total"],
        "parts": {
            k: plan[k] for k in ("weights", "gradients", "optimizer", "activations", "logits", "optimizer_temps")
        },
    }


def rank_child(name: str, steps: int, rank: int, world: int, parallel: str, folder: str, port: int) -> dict:
    """One trainer rank of ``world`` (``oapl.distributed.trainer.TrainerRank`` over gloo, no Ray): its peak."""
    import torch

    from oapl.distributed.trainer import TrainerRank
    from oapl.memory_plan import shape_from_config, trainer_rank
    from oapl.objectives import build_objective
    from oapl.trainer.step import plan_step

    torch.set_num_threads(1)
    base = _status("VmRSS")
    cfg = _config(folder, SHAPES[name]).model_copy(deep=True)
    cfg = cfg.model_validate(
        {
            **cfg.model_dump(),
            "distributed": {"backend": "ray", "trainer_workers": world, "parallel": parallel},
            "rollout": {"group_size": GROUP, "prompts_per_step": world},
        }
    )
    r = TrainerRank(cfg.model_dump(mode="json"), rank, world, 1)
    r.setup("127.0.0.1", port, None)
    works, _ = plan_step(_groups(name, world), build_objective(cfg.algorithm), cfg.optim, 1, world=world)
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        r.train_step(works[rank])
    peak = _status("VmHWM")
    model = r.policy.model
    shape = shape_from_config(model.config, "benchmark", params=count_params_of(model.config))
    plan = trainer_rank(cfg, shape, PROMPT + SHAPES[name][6], on_gpu=False)
    return {
        "shape": name,
        "rank": rank,
        "world": world,
        "parallel": plan["parallel"],
        "measured": peak - base,
        "planned": plan["total"],
        "tokens": plan["tokens"],
    }


def count_params_of(mcfg) -> int:
    from oapl.memory_plan import count_params, shape_from_config

    return count_params(shape_from_config(mcfg, "benchmark", params=1))


def _groups(name: str, n: int):
    import torch

    from oapl.rollout.buffer import RolloutGroup

    vocab, resp = SHAPES[name][5], SHAPES[name][6]
    gen = torch.Generator().manual_seed(0)
    return [
        RolloutGroup(
            prompt_id=f"p{i}",
            prompt="p",
            prompt_token_ids=torch.randint(3, vocab, (PROMPT,), generator=gen).tolist(),
            responses=[""] * GROUP,
            response_token_ids=[torch.randint(3, vocab, (resp,), generator=gen).tolist() for _ in range(GROUP)],
            response_logprobs=[[-10.0] * resp for _ in range(GROUP)],
            rewards=[1.0, 0.0] * (GROUP // 2),
            finish_reasons=["length"] * GROUP,
            weights_id="synthetic",
            version=0,
        )
        for i in range(n)
    ]


def ranks_table(shapes: list[str], steps: int, world: int, parallel: str) -> list[dict]:
    """Each shape on ``world`` gloo ranks (fresh processes), saved as a model folder first."""
    import socket

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from oapl.trainer.model import resolve_model_path

    rows = []
    for name in shapes:
        hidden, layers, inter, heads, kv, vocab, *_ = SHAPES[name]
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=vocab,
                    hidden_size=hidden,
                    intermediate_size=inter,
                    num_hidden_layers=layers,
                    num_attention_heads=heads,
                    num_key_value_heads=kv,
                    max_position_embeddings=4096,
                    tie_word_embeddings=True,
                )
            ).save_pretrained(folder)
            AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct")).save_pretrained(folder)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        name,
                        "--steps",
                        str(steps),
                        "--rank",
                        str(r),
                        "--world",
                        str(world),
                        "--parallel",
                        parallel,
                        "--folder",
                        folder,
                        "--port",
                        str(port),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for r in range(world)
            ]
            for p in procs:
                out, _ = p.communicate()
                if p.returncode:
                    raise RuntimeError(f"{name}: a rank failed ({p.returncode})")
                rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--ranks", type=int, default=0, help="run each shape on this many gloo trainer ranks")
    ap.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp"], help="with --ranks")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for hidden in ("--rank", "--world", "--port"):
        ap.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(
            json.dumps(
                rank_child(a.child, a.steps, a.rank, a.world, a.parallel, a.folder, a.port)
                if a.world
                else child(a.child, a.steps)
            )
        )
        return
    if a.ranks:
        mib = 1 << 20
        print("| shape | ranks | rank | planned | measured | measured / planned |")
        print("|---|---|---:|---:|---:|---:|")
        rows = ranks_table([s for s in a.shapes if s != "smollm2-135m"], a.steps, a.ranks, a.parallel)
        for r in rows:
            print(
                f"| {r['shape']} | {r['parallel']} x {r['world']} | {r['rank']} | {r['planned'] / mib:,.0f} MiB | "
                f"{r['measured'] / mib:,.0f} MiB | {r['measured'] / r['planned']:.2f} |"
            )
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        return
    rows = []
    print("| shape | params | tokens / micro-batch | checkpointing | planned | measured | measured / planned |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name in a.shapes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--steps", str(a.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        mib = 1 << 20
        print(
            f"| {name} | {r['params'] / 1e6:.1f} M | {r['tokens']:,} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['planned'] / mib:,.0f} MiB | {r['measured'] / mib:,.0f} MiB | {r['measured'] / r['planned']:.2f} |",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
