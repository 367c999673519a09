"""Ray backend throughput with 1, 2, ... engine actors (``distributed.backend: ray``).

Runs the real training loop (asynchronous rollout, OAPL, one DDP trainer rank) on a local Ray
cluster for each engine count and reports, over the steady state (after ``--warmup`` steps):

* train samples/s: responses the trainer consumed per second (``samples_seen`` / time),
* generated samples/s: responses the engines produced per second (including those generated with
  an old version and dropped at a sync),
* engine tokens/s: ``gen_tokens_per_s`` of the last row (summed over engines),
* train s/step: mean ``train_seconds``.

Models: ``tiny`` (the test-suite's random 2-layer Llama with a character tokenizer: measures the
pipeline's own overhead), ``embedded`` (SmolLM2-135M-Instruct, converted from the package's GGUF), or
any HF path / Hub name.

    python benchmarks/ray_scaling.py                                  # tiny, 1 and 2 engines
    python benchmarks/ray_scaling.py --model embedded --max-tokens 32 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tiny_model_dir(root: Path) -> str:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_char_tokenizer, build_tiny_model  # the test-suite's tiny Llama

    path = root / "tiny-llama"
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_cfg(args, model: str, engines: int, out: Path):
    from oapl.config import load_config

    over = {
        "output_dir": str(out),
        "seed": 0,
        "steps": args.steps,
        "threads": 1,
        "model.name": model,
        "engine.kind": "transformers",
        "sampling.max_tokens": args.max_tokens,
        "sampling.temperature": 1.0,
        "task.name": "arithmetic",
        "task.system_prompt": "",
        "task.num_train": 2000,
        "rollout.group_size": args.group_size,
        "rollout.prompts_per_step": args.prompts_per_step,
        "rollout.prompts_per_generate": args.prompts_per_generate,
        "rollout.sync_interval": args.sync_interval,
        "rollout.asynchronous": True,
        "rollout.buffer_groups": 64,
        "optim.lr": 1e-5,
        "optim.micro_batch_size": 64,
        "eval.at_start": False,
        "eval.at_end": False,
        "logging.progress": False,
        "checkpoint.save_final": False,
        "distributed.backend": "ray",
        "distributed.num_engines": engines,
        "distributed.trainer_workers": args.trainer_workers,
        "distributed.engine_num_cpus": 1,
        "distributed.trainer_num_cpus": 1,
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def run_one(args, model: str, engines: int, root: Path) -> dict:
    from oapl.loop import Run

    out = root / f"run-{engines}"
    cfg = make_cfg(args, model, engines, out)
    t0 = time.perf_counter()
    run = Run.for_config(cfg)
    startup = time.perf_counter() - t0
    try:
        run.train()
        generated = run.rollout.groups_generated * cfg.rollout.group_size
    finally:
        run.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    w = min(args.warmup, len(rows) - 2)
    a, b = rows[w], rows[-1]
    span = b["elapsed_s"] - a["elapsed_s"]
    return {
        "engines": engines,
        "steps": len(rows),
        "startup_s": startup,
        "loop_s": b["elapsed_s"],
        "train_samples_per_s": (b["samples_seen"] - a["samples_seen"]) / span,
        "generated_samples_per_s": generated / b["elapsed_s"],
        "engine_tokens_per_s": b["gen_tokens_per_s"],
        "train_s_per_step": sum(r["train_seconds"] for r in rows[w:]) / len(rows[w:]),
        "stale_dropped": b["stale_dropped"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | embedded | an HF path or Hub name")
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trainer-workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state figures")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--prompts-per-generate", type=int, default=2)
    ap.add_argument("--sync-interval", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    torch.set_num_threads(1)
    need = max(args.engines) + args.trainer_workers
    ray.init(
        num_cpus=args.num_cpus or max(need, os.cpu_count() or 1),
        include_dashboard=False,
        object_store_memory=500 * 1024**2,
        log_to_driver=False,
    )
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="oapl-ray-bench-") as tmp:
            root = Path(tmp)
            if args.model == "tiny":
                model, label = tiny_model_dir(root), "tiny random Llama (2 layers, hidden 32, char tokenizer)"
            elif args.model == "embedded":
                model, label = "embedded:smollm2-135m-instruct", "SmolLM2-135M-Instruct (embedded, fp32)"
            else:
                model, label = args.model, args.model
            for n in args.engines:
                r = run_one(args, model, n, root)
                r["model"] = label
                results.append(r)
                print(f"engines={n}: {r['train_samples_per_s']:.1f} train samples/s", flush=True)
    finally:
        ray.shutdown()

    print()
    print(
        f"model: {results[0]['model']}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}; G={args.group_size}, {args.prompts_per_step} prompts/step, "
        f"max_tokens={args.max_tokens}, L={args.sync_interval}, {args.trainer_workers} trainer rank(s), "
        f"{args.steps} steps ({args.warmup} warm-up)"
    )
    print()
    print(
        "| engine actors | train samples/s | generated samples/s | engine tokens/s | train s/step | "
        "loop s | start-up s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['engines']} | {r['train_samples_per_s']:.1f} | {r['generated_samples_per_s']:.1f} | "
            f"{r['engine_tokens_per_s']:.0f} | {r['train_s_per_step']:.3f} | {r['loop_s']:.1f} | "
            f"{r['startup_s']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
