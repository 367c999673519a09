"""Inference-engine throughput: raw ``vllm.LLM.generate`` vs ``VLLMEngine`` vs ``TransformersEngine``.

All three sample the same chat-templated short math prompts from the embedded SmolLM2-135M-Instruct
(n samples per prompt, temperature 1.0, up to ``--max-tokens`` tokens) and are timed after one
warm-up call; the figure is generated tokens per second (median of ``--repeats`` calls). The raw
path reuses the engine's own ``vllm.LLM``, so the gap between it and ``VLLMEngine`` is exactly the
wrapper's cost (per-token log-probs, RNG isolation, conversion). Weight sync is the time of
``load_weights`` with the full trainer state (``model.named_parameters()``).

    python benchmarks/engine_throughput.py                       # fp32, as the CPU trainer runs
    python benchmarks/engine_throughput.py --dtype bfloat16 --skip-transformers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

QUESTIONS = [
    "What is {a} + {b}?",
    "What is {a} * {b}? Answer with a number.",
    "Compute {a} - {b} and explain briefly.",
    "If I have {a} apples and buy {b} more, how many apples do I have?",
]


def build_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        q = QUESTIONS[i % len(QUESTIONS)].format(a=7 + 3 * i, b=5 + 2 * i)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def timed(fn, repeats: int) -> tuple[float, float]:
    """Run ``fn`` (returning generated-token count) once to warm up, then ``repeats`` times;
    return (median tokens/s, median seconds)."""
    fn()
    rates, secs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        elapsed = time.perf_counter() - start
        rates.append(tokens / elapsed)
        secs.append(elapsed)
    return statistics.median(rates), statistics.median(secs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (vLLM and transformers alike)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--syncs", type=int, default=5, help="weight syncs to time")
    ap.add_argument("--threads", type=int, help="torch threads for every path (default: torch's)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from oapl.engines.base import SamplingParams
    from oapl.engines.transformers_engine import TransformersEngine
    from oapl.engines.vllm_engine import VLLMEngine, vllm_import_error
    from oapl.trainer.model import load_tokenizer, resolve_model_path

    if (reason := vllm_import_error()) is not None:
        sys.exit(f"engine_throughput needs vLLM: {reason}")
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    prompts = build_prompts(tokenizer, args.prompts)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, n=args.n)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rows: list[tuple[str, float, float]] = []
    results: dict = {
        "model": args.model,
        "prompts": args.prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
    }

    start = time.perf_counter()
    engine = VLLMEngine(path, seed=0, dtype=args.dtype, max_model_len=1024)
    results["vllm_startup_s"] = time.perf_counter() - start
    results["vllm_kwargs"] = {k: v for k, v in engine.llm_kwargs.items()}
    from vllm import SamplingParams as VSamplingParams

    vprompts = [{"prompt_token_ids": p} for p in prompts]
    for label, logprobs in (("vllm.LLM.generate (raw)", None), ("vllm.LLM.generate (raw, logprobs=0)", 0)):
        vparams = VSamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, logprobs=logprobs)

        def raw(vparams=vparams) -> int:
            outs = engine.llm.generate(vprompts, vparams, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        rows.append((label, *timed(raw, args.repeats)))
        print(f"{label}: {rows[-1][1]:.1f} tokens/s", flush=True)

    def wrapped() -> int:
        return int(engine.generate(prompts, params)[0].stats["gen_tokens"])

    rows.append(("VLLMEngine.generate", *timed(wrapped, args.repeats)))
    print(f"VLLMEngine.generate: {rows[-1][1]:.1f} tokens/s", flush=True)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval().requires_grad_(False)
    syncs = []
    for version in range(1, args.syncs + 1):
        syncs.append(engine.load_weights(((n, p.detach()) for n, p in model.named_parameters()), version))
    results["vllm_sync_s"] = {"median": statistics.median(syncs), "min": min(syncs), "max": max(syncs)}
    print(f"VLLMEngine.load_weights: {syncs}", flush=True)
    engine.close()

    if not args.skip_transformers:
        hf_engine = TransformersEngine(model, tokenizer, max_batch_size=args.prompts * args.n, seed=0)

        def hf() -> int:
            return int(hf_engine.generate(prompts, params)[0].stats["gen_tokens"])

        rows.append(("TransformersEngine.generate", *timed(hf, args.repeats)))
        print(f"TransformersEngine.generate: {rows[-1][1]:.1f} tokens/s", flush=True)
        hf_syncs = [
            hf_engine.load_weights(((n, p.detach().clone()) for n, p in model.named_parameters()), v)
            for v in range(1, args.syncs + 1)
        ]
        results["transformers_sync_s"] = {
            "median": statistics.median(hf_syncs),
            "min": min(hf_syncs),
            "max": max(hf_syncs),
        }

    results["rows"] = [{"path": p, "tokens_per_s": r, "seconds": s} for p, r, s in rows]
    print(
        f"\n{args.model}  dtype={args.dtype}  {args.prompts} prompts x n={args.n}  "
        f"max_tokens={args.max_tokens}  T={args.temperature}  ({results['machine']})"
    )
    print(f"| {'path':<38} | {'tokens/s':>9} | {'s/call':>7} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 9}|")
    for p, r, s in rows:
        print(f"| {p:<38} | {r:>9.1f} | {s:>7.2f} |")
    sync = results["vllm_sync_s"]
    print(
        f"\nVLLMEngine.load_weights: median {sync['median']:.3f}s "
        f"(min {sync['min']:.3f}, max {sync['max']:.3f}) over {args.syncs} syncs; "
        f"vLLM start-up {results['vllm_startup_s']:.1f}s"
    )
    if "transformers_sync_s" in results:
        print(f"TransformersEngine.load_weights: median {results['transformers_sync_s']['median']:.3f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
