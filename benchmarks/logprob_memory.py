"""Peak memory of oapl's chunked token log-probs against a naive full log-softmax, at vocab 49,152.

The trainer needs ``log pi(y_t)`` of every response token, with gradients. The naive way materialises
the logits of every position (``B x T x V`` floats) and a full log-softmax of the same size, and
autograd keeps both for backward. ``oapl.trainer.logprobs.token_logprobs`` runs the decoder once,
keeps only the hidden states of response positions and applies the LM head + log-softmax to
``chunk_size`` tokens at a time under activation checkpointing (backward stores hidden states, not
logits). This script measures the extra peak memory of forward + backward of ``sum(log pi(y_t))``
for both, on the same batch, each case in a fresh child process:

* CPU: the rise of the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
  above its resident set just before the computation;
* CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before it.

The model has SmolLM2-135M's vocabulary (49,152) and width (576, tied embeddings) and ``--layers``
decoder layers (default 1: the decoder's own activations are the same for both methods; what differs
is the vocabulary-sized part). ``--model embedded`` uses the real 30-layer SmolLM2-135M instead.

    python benchmarks/logprob_memory.py                       # B x T in 4x512, 8x1024
    python benchmarks/logprob_memory.py --shapes 8x2048 --chunk 1024 --json /tmp/lp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VOCAB, HIDDEN = 49_152, 576


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if a.model == "embedded":
        from oapl.trainer.model import load_causal_lm, resolve_model_path

        return load_causal_lm(
            resolve_model_path("embedded:smollm2-135m-instruct"),
            torch.float32,
            torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=1536,
        num_hidden_layers=a.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    return model.to("cuda") if torch.cuda.is_available() else model


def child(a) -> dict:
    import torch

    from oapl.trainer.logprobs import TokenBatch, token_logprobs

    torch.set_num_threads(a.threads)
    b, t = (int(x) for x in a.shape.split("x"))
    model = _build(a)
    model.train()
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    prompt = min(a.prompt_len, t // 2)
    prompts = [torch.randint(3, VOCAB, (prompt,), generator=g).tolist() for _ in range(b)]
    responses = [torch.randint(3, VOCAB, (t - prompt,), generator=g).tolist() for _ in range(b)]
    batch = TokenBatch.from_sequences(prompts, responses, [[0.0] * (t - prompt)] * b, 0).to(dev)
    n_resp = int(batch.response_mask.sum())

    def naive():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float() / a.temperature, dim=-1)
        chosen = logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return chosen * batch.response_mask

    def chunked():
        lp, _ = token_logprobs(model, batch, a.temperature, a.chunk, with_entropy=True)
        return lp

    fn = naive if a.method == "naive" else chunked
    # warm-up on a tiny slice (allocator, kernels), then measure the real batch
    model.zero_grad(set_to_none=True)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = fn()
    total = out.sum()
    total.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    seconds = time.perf_counter() - t0
    grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    return {
        "method": a.method,
        "shape": a.shape,
        "response_tokens": n_resp,
        "chunk": a.chunk,
        "peak_extra_mib": (peak - before) / 2**20,
        "seconds": seconds,
        "value": float(total.detach()),
        "grad_norm": grad_norm,
        "device": str(dev),
        "logits_fp32_mib": b * (t - 1) * VOCAB * 4 / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x512,8x1024", help="comma-separated BxT (sequences x tokens)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (not scored)")
    p.add_argument("--chunk", type=int, default=1024, help="oapl's model.logprob_chunk_size")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--model", choices=["synthetic", "embedded"], default="synthetic")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--methods", default="naive,chunked", help="which of naive,chunked to run")
    p.add_argument("--json", default=None)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.method:
        print("RESULT " + json.dumps(child(a)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = []
    for shape in [s.strip() for s in a.shapes.split(",") if s.strip()]:
        for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *forwarded, "--method", method, "--shape", shape],
                capture_output=True,
                text=True,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                results.append({"method": method, "shape": shape, "error": err})
                print(f"[{shape} {method}] failed: {err}", file=sys.stderr)
                continue
            r = json.loads(line[len("RESULT ") :])
            results.append(r)
            print(f"[{shape} {method}] +{r['peak_extra_mib']:.0f} MiB in {r['seconds']:.1f} s", file=sys.stderr)
    print(
        f"| B x T | response tokens | full fp32 logits (MiB) | naive peak (MiB) | chunked peak (MiB, chunk "
        f"{a.chunk}) | saving | naive s | chunked s | max rel. diff of sum log p |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in dict.fromkeys(r["shape"] for r in results):
        n = next((r for r in results if r["shape"] == shape and r["method"] == "naive"), {})
        c = next((r for r in results if r["shape"] == shape and r["method"] == "chunked"), {})
        if not n or not c:
            r = n or c
            if "error" not in r:
                print(
                    f"| {shape} | {r['response_tokens']} | {r['logits_fp32_mib']:.0f} | "
                    f"{n.get('peak_extra_mib', float('nan')):.0f} | {c.get('peak_extra_mib', float('nan')):.0f} | "
                    f"| {n.get('seconds', float('nan')):.1f} | {c.get('seconds', float('nan')):.1f} | |"
                )
            continue
        if "error" in n or "error" in c:
            print(f"| {shape} | failed: {n.get('error') or c.get('error')} | | | | | | | |")
            continue
        diff = abs(n["value"] - c["value"]) / max(1e-9, abs(n["value"]))
        print(
            f"| {shape} | {c['response_tokens']} | {n['logits_fp32_mib']:.0f} | {n['peak_extra_mib']:.0f} | "
            f"{c['peak_extra_mib']:.0f} | {n['peak_extra_mib'] / max(c['peak_extra_mib'], 1e-9):.1f}x | "
            f"{n['seconds']:.1f} | {c['seconds']:.1f} | {diff:.1e} |"
        )
    if a.json:
        import torch

        Path(a.json).write_text(
            json.dumps(
                {
                    "meta": {
                        "machine": platform.machine(),
                        "cpus": os.cpu_count(),
                        "torch": torch.__version__,
                        "args": vars(a),
                    },
                    "results": results,
                },
                indent=2,
            )
        )
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
