"""Peak host memory of each FSDP2 trainer rank while it writes a sharded checkpoint.

W gloo ranks (``oapl.distributed.trainer.TrainerRank``, no Ray) load a random-init Llama, run one
train step (so gradients and the AdamW state exist), then save a checkpoint with
``TrainerRank.save_checkpoint`` (``save_sharded_checkpoint``: the HF export of the weights, then
the DCP write of the optimiser state). Each rank reads its resident set (``VmRSS``) just before the
save, resets its peak (``/proc/self/clear_refs`` <- 5 resets ``VmHWM`` to the current resident
set) and reads ``VmHWM`` after each phase of the save (export, optimiser, the rest), resetting it
between phases, so the save's peak is the largest of the three and the table says which phase set it.

Per rank it reports: its shard (the bytes of its local DTensor pieces of the parameters, gradients,
``exp_avg`` and ``exp_avg_sq``), one decoder layer in fp32, the export's file limit (the larger of
one layer and the largest tensor, what ``export_hf`` batches into one file), and

    extra = peak during save - RSS before          (what the save adds on top of the resident rank)
    extra / (0.2 x shard + layer)                  (<= 1: the target "at most 1.2x its shard plus
                                                    one layer", read as: the shard is resident anyway,
                                                    the save may add 0.2 x shard + one layer)
    peak / (1.2 x shard + layer)                   (the literal reading on the whole resident set,
                                                    which also holds the process's Python/torch baseline)

    python benchmarks/sharded_save_memory.py                      # h1024-L12-V32k, 2 ranks
    python benchmarks/sharded_save_memory.py --world 1            # the same on one rank, for reference
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- VmRSS (Linux)


def build_model(folder: str, hidden: int, layers: int, vocab: int, inter: int) -> int:
    """A random-init Llama (untied embeddings) and a character tokenizer saved into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_char_tokenizer

    tok = build_char_tokenizer()
    assert len(tok) <= vocab
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
        )
    )
    model.generation_config.eos_token_id = tok.eos_token_id
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return n


def _groups(world: int):
    import torch

    from oapl.rollout.buffer import RolloutGroup

    gen = torch.Generator().manual_seed(0)
    out = []
    for j in range(2 * world):
        toks = [torch.randint(3, 60, (24,), generator=gen).tolist() for _ in range(4)]
        out.append(
            RolloutGroup(
                prompt_id=f"p{j}",
                prompt="x",
                prompt_token_ids=torch.randint(3, 60, (8,), generator=gen).tolist(),
                responses=["y"] * 4,
                response_token_ids=toks,
                response_logprobs=[(-torch.rand(len(t), generator=gen) * 4 - 1).tolist() for t in toks],
                rewards=[float((i + j) % 3 == 0) for i in range(4)],
                finish_reasons=["length"] * 4,
                weights_id="bench",
                version=0,
            )
        )
    return out


def _local_bytes(t) -> int:
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def rank_main(rank: int, world: int, folder: str, out: str, port: int, threads: int, q) -> None:
    import torch

    import oapl.distributed.sharded as sharded
    from oapl.config import load_config
    from oapl.distributed.trainer import TrainerRank
    from oapl.objectives import build_objective
    from oapl.trainer.step import plan_step

    over = {
        "output_dir": out,
        "model.name": folder,
        "model.logprob_chunk_size": 64,
        "optim.lr": 1e-5,
        "optim.max_grad_norm": None,
        "algorithm.beta2": 0.1,
        "optim.micro_batch_size": 8,
        "threads": threads,
        "distributed.backend": "ray",
        "distributed.trainer_workers": world,
        "distributed.parallel": "fsdp",
    }
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    r = TrainerRank(cfg.model_dump(mode="json"), rank, world, threads)
    r.setup("127.0.0.1", port, None)
    works, _ = plan_step(
        _groups(world), build_objective(cfg.algorithm), cfg.optim, cfg.algorithm.mini_batches, world=world
    )
    t0 = time.time()
    r.train_step(works[rank])
    step_s = time.time() - t0

    model, opt = r.policy.model, r.policy.optimizer
    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p.grad) for p in model.parameters())
    states = sum(_local_bytes(st.get(k)) for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    shard = params + grads + states
    layer = sharded.layer_bytes(model, torch.float32)
    largest = max(sharded._nbytes(t, torch.float32) for _, t in sharded.export_items(model))

    # phase peaks: reset VmHWM at each boundary, read it at the next
    phases: dict[str, int] = {}

    def boundary(name: str) -> None:
        phases[name] = _status("VmHWM")
        _reset_peak()

    def timed(fn, name):
        def wrapper(*a, **k):
            boundary(f"before_{name}")
            try:
                return fn(*a, **k)
            finally:
                boundary(name)

        return wrapper

    sharded.export_hf = timed(sharded.export_hf, "export")
    sharded.save_optimizer = timed(sharded.save_optimizer, "optim")
    # RSS is quiet here: read it, then reset the peak
    before = _status("VmRSS")
    _reset_peak()
    t0 = time.time()
    r.save_checkpoint(out, 1, {"step": 1}, "{}", 2)
    save_s = time.time() - t0
    phases["rest"] = _status("VmHWM")
    peak = max(phases.values())
    which = max(("export", "optim", "rest"), key=lambda k: phases[k])
    q.put(
        {
            "rank": rank,
            "world": world,
            "before": before,
            "peak": peak,
            "shard": shard,
            "params": params,
            "grads": grads,
            "states": states,
            "layer": layer,
            "largest": largest,
            "export_peak": phases["export"],
            "optim_peak": phases["optim"],
            "rest_peak": phases["rest"],
            "phase": which,
            "step_s": step_s,
            "save_s": save_s,
        }
    )
    import torch.distributed as dist

    dist.destroy_process_group()


def run(world: int, folder: str, threads: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as out:
        procs = [ctx.Process(target=rank_main, args=(r, world, folder, out, port, threads, q)) for r in range(world)]
        for p in procs:
            p.start()
        rows = [q.get(timeout=1800) for _ in range(world)]
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a rank failed ({p.exitcode})")
    return sorted(rows, key=lambda r: r["rank"])


def table(rows: list[dict], name: str) -> str:
    lines = [
        "| shape | W | rank | RSS before | peak in save | extra | shard | layer | file limit | "
        "extra / (0.2 shard + layer) | peak / (1.2 shard + layer) | extra in export / optim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = r["peak"] - r["before"]
        lines.append(
            f"| {name} | {r['world']} | {r['rank']} | {r['before'] / MiB:,.0f} MiB | {r['peak'] / MiB:,.0f} MiB | "
            f"{extra / MiB:,.0f} MiB | {r['shard'] / MiB:,.0f} MiB | {r['layer'] / MiB:,.0f} MiB | "
            f"{max(r['layer'], r['largest']) / MiB:,.0f} MiB | {extra / (0.2 * r['shard'] + r['layer']):.2f} | "
            f"{r['peak'] / (1.2 * r['shard'] + r['layer']):.2f} | "
            f"{(r['export_peak'] - r['before']) / MiB:,.0f} / {(r['optim_peak'] - r['before']) / MiB:,.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    name = f"h{a.hidden}-L{a.layers}-V{a.vocab // 1000}k"
    with tempfile.TemporaryDirectory() as folder:
        n = build_model(folder, a.hidden, a.layers, a.vocab, a.intermediate)
        print(f"{name}: {n / 1e6:.1f}M parameters, {a.world} rank(s)", flush=True)
        rows = run(a.world, folder, a.threads)
    for r in rows:
        print(json.dumps(r), flush=True)
    print(table(rows, name))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
