"""The trainer as ``torch.distributed`` ranks placed by Ray: DDP (gloo) on CPU, FSDP2 (NCCL) on GPUs.

Every rank holds a :class:`oapl.trainer.policy.Policy` and receives the *whole* batch of groups;
advantages (V* per group, Eq. 2) are computed from whole groups, then each rank takes a contiguous
shard of the batch's sequences. The OAPL loss is a mean over the N sequences of the batch, so each
rank computes its shard's share with the full-batch denominator (``oapl_loss(..., num_sequences=N)``)
and multiplies it by the world size W, because DDP and FSDP *average* gradients over ranks:

    grad = (1/W) * sum_r W * d/dw [ sum_{i in shard r} (beta2 s_i - A_i)^2 / N ]
         = d/dw [ (1/N) * sum_i (beta2 s_i - A_i)^2 ]            (the single-process gradient)

Micro-batches (gradient accumulation) work as in the local trainer; under DDP only the last one
all-reduces (``no_sync`` before). A non-finite loss on any rank skips the step on every rank (the
flag is all-reduced), so replicas never diverge.

:class:`TrainerRank` is the actor body (a plain class; :class:`TrainerGroup` wraps it with
``ray.remote``); :func:`combine_rank_metrics` turns the ranks' partial sums into the same metric
row the local ``Policy.train_step`` returns.

The model is called through :class:`LogProbModule` (whose ``forward`` is :func:`token_logprobs`)
so that DDP's and FSDP2's forward hooks run: the chunked log-prob path calls the decoder and the LM
head directly, never ``model.forward``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch

from oapl.config import TrainConfig
from oapl.distributed.cluster import (TrainerFailure, actor_options, actor_threads, alive, bundle, free_port,
                                      get_fail_fast, kill_actor, make_placement_group, node_ip,
                                      remove_placement_group, require_ray)
from oapl.distributed.weights import WeightGroup, cpu_state, weight_meta
from oapl.objectives import grpo_loss, oapl_loss, sequence_log_ratio
from oapl.trainer.logprobs import TokenBatch, token_logprobs

log = logging.getLogger(__name__)


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` sequence ranges, sizes differing by at most one (rank order)."""
    base, rem = divmod(n, world)
    out, lo = [], 0
    for r in range(world):
        hi = lo + base + (1 if r < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


def parallel_mode(cfg: TrainConfig) -> str:
    """``fsdp`` on GPUs (full fine-tuning), ``ddp`` otherwise (CPU, or LoRA on GPUs)."""
    return "fsdp" if cfg.distributed.trainer_num_gpus > 0 and not cfg.model.lora.enabled else "ddp"


class LogProbModule(torch.nn.Module):
    """``forward`` = :func:`token_logprobs` of the wrapped HF model (what DDP/FSDP2 wrap)."""

    def __init__(self, model: torch.nn.Module, temperature: float, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, response_mask, ref_logprobs):
        batch = TokenBatch(input_ids, attention_mask, response_mask, ref_logprobs)
        return token_logprobs(self.model, batch, self.temperature, self.chunk_size, with_entropy=True)


class RankStats:
    """Partial sums of one rank's micro-batches, enough to rebuild the full-batch metrics exactly."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.seqs = 0
        self.tokens = 0
        self.kl = 0.0
        self.absdiff = 0.0
        self.absdiff_max = 0.0
        self.s_sum = 0.0
        self.s_sq = 0.0
        self.s_absmax = 0.0
        self.ent = 0.0
        self.mask = 0.0
        self.seq_nll = 0.0
        self.extra: dict[str, float] = {}

    @torch.no_grad()
    def add(self, loss, logp, ref, mask, ent, extra: dict, rows: int, n: int) -> None:
        self.loss += float(loss.detach())
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v) * rows / n
        logp, ref, mask = logp.detach().float().cpu(), ref.detach().float().cpu(), mask.float().cpu()
        m = mask.bool()
        d = (logp - ref)[m].double()
        if d.numel():
            rho = torch.exp(d.clamp(max=50))
            self.tokens += d.numel()
            self.kl += float(((rho - 1) - d).sum())
            self.absdiff += float(d.abs().sum())
            self.absdiff_max = max(self.absdiff_max, float(d.abs().max()))
        s = sequence_log_ratio(logp, ref, mask).double()
        self.seqs += s.numel()
        self.s_sum += float(s.sum())
        self.s_sq += float((s * s).sum())
        self.s_absmax = max(self.s_absmax, float(s.abs().max()))
        self.ent += float((ent.detach().float().cpu() * mask).sum())
        self.mask += float(mask.sum())
        self.seq_nll += float((-(ref * mask).sum(-1)).sum())

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def batch_metrics(cfg: TrainConfig, groups, adv: torch.Tensor, values: torch.Tensor, n: int) -> dict[str, float]:
    """The batch-level part of ``Policy.train_step``'s metrics (same definitions)."""
    rewards = torch.tensor([r for g in groups for r in g.rewards])
    lengths = torch.tensor([len(t) for g in groups for t in g.response_token_ids], dtype=torch.float32)
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "v_star_mean" if cfg.algorithm.name == "oapl" else "baseline_mean": float(values.mean()),
        "adv_mean": float(adv.mean()),
        "adv_std": float(adv.std(unbiased=False)),
        "response_len_mean": float(lengths.mean()),
        "truncated_frac": sum(f == "length" for g in groups for f in g.finish_reasons) / max(1, n),
    }


def combine_rank_metrics(parts: list[dict[str, Any]]) -> dict[str, float]:
    """Merge the ranks' results into ``Policy.train_step``'s metric dict (same keys, same order)."""
    p0 = parts[0]
    b = p0["batch"]
    finite = p0["finite"]
    seconds = max(p["seconds"] for p in parts)
    vkey = "v_star_mean" if "v_star_mean" in b else "baseline_mean"
    metrics: dict[str, float] = {
        "loss": sum(p["stats"]["loss"] for p in parts) if finite else float("nan"),
        "skipped": 0.0 if finite else 1.0,
        "reward_mean": b["reward_mean"], "reward_std": b["reward_std"], vkey: b[vkey],
        "adv_mean": b["adv_mean"], "adv_std": b["adv_std"],
        "grad_norm": p0["grad_norm"], "lr": p0["lr"],
        "response_len_mean": b["response_len_mean"], "truncated_frac": b["truncated_frac"],
        "train_seconds": seconds,
        "train_tokens_per_s": sum(p["tokens"] for p in parts) / max(seconds, 1e-9),
    }
    for p in parts:
        for k, v in p["stats"]["extra"].items():
            metrics[k] = metrics.get(k, 0.0) + v
    st = [p["stats"] for p in parts]
    seqs = sum(s["seqs"] for s in st)
    if seqs:
        tokens = sum(s["tokens"] for s in st)
        if tokens == 0:
            metrics.update({"kl": 0.0, "logprob_absdiff_mean": 0.0, "logprob_absdiff_max": 0.0,
                            "log_ratio_mean": 0.0, "log_ratio_std": 0.0, "log_ratio_absmax": 0.0})
        else:
            mean_s = sum(s["s_sum"] for s in st) / seqs
            var_s = max(sum(s["s_sq"] for s in st) / seqs - mean_s * mean_s, 0.0)
            metrics.update({
                "kl": sum(s["kl"] for s in st) / tokens,
                "logprob_absdiff_mean": sum(s["absdiff"] for s in st) / tokens,
                "logprob_absdiff_max": max(s["absdiff_max"] for s in st),
                "log_ratio_mean": mean_s,
                "log_ratio_std": math.sqrt(var_s),
                "log_ratio_absmax": max(s["s_absmax"] for s in st),
            })
        metrics["entropy"] = sum(s["ent"] for s in st) / max(sum(s["mask"] for s in st), 1.0)
        metrics["seq_entropy"] = sum(s["seq_nll"] for s in st) / seqs
    return metrics


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainerRank:
    """One trainer rank (runs inside a Ray actor)."""

    def __init__(self, cfg_json: dict, rank: int, world: int, threads: int) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        cfg = TrainConfig.model_validate(cfg_json)
        self.cuda = cfg.distributed.trainer_num_gpus > 0 and torch.cuda.is_available()
        if cfg.distributed.trainer_num_gpus > 0 and not self.cuda:
            raise RuntimeError("distributed.trainer_num_gpus > 0 but this trainer actor sees no CUDA device")
        device = "cuda:0" if self.cuda else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})
        self.mode = parallel_mode(self.cfg)
        self.fsdp = self.mode == "fsdp"
        self.policy = None
        self.module = None
        self.weight_group: WeightGroup | None = None
        self._eval_engine = None
        self._eval_was_training = True

    # -- plumbing ------------------------------------------------------------------------------
    def ping(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def find_checkpoint(self, run_dir: str) -> str | None:
        from oapl.trainer.checkpoint import latest_checkpoint

        p = latest_checkpoint(run_dir)
        return str(p) if p is not None else None

    def setup(self, master_addr: str, master_port: int, ckpt: str | None) -> dict[str, Any] | None:
        """Join the trainer group, build the policy (from ``ckpt`` when resuming), wrap it.

        Returns (rank 0) the checkpoint's trainer state without the optimiser part.
        """
        import torch.distributed as dist

        from oapl.trainer.checkpoint import load_trainer_state, set_rng_state
        from oapl.trainer.model import load_causal_lm, pick_device, pick_dtype
        from oapl.trainer.policy import Policy

        cfg = self.cfg
        if self.cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if self.cuda else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world, timeout=datetime.timedelta(seconds=600))
        if self.fsdp and cfg.algorithm.reference_logprobs == "recompute":
            raise ValueError("algorithm.reference_logprobs=recompute is not supported with FSDP2 trainer ranks "
                             "(use reference_logprobs=engine)")
        _seed_everything(cfg.seed)
        state: dict[str, Any] = {}
        model = None
        if ckpt is not None:
            from pathlib import Path

            state = load_trainer_state(Path(ckpt))
            if not cfg.model.lora.enabled:
                dev = pick_device(cfg.model.device)
                model = load_causal_lm(str(Path(ckpt) / "model"), pick_dtype(cfg.model.dtype, dev), dev,
                                       cfg.model.trust_remote_code)
        policy = Policy(cfg, total_steps=cfg.steps, model=model)
        if ckpt is not None and cfg.model.lora.enabled:
            from pathlib import Path

            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = Path(ckpt) / "adapter" / "adapter_model.safetensors"
            set_peft_model_state_dict(policy.model, load_file(str(adapter)))
        self.policy = policy
        temp = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
        self.module = LogProbModule(policy.model, temp, cfg.model.logprob_chunk_size)
        if self.fsdp:
            self._wrap_fsdp2()
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(self.module, device_ids=[0] if self.cuda else None, broadcast_buffers=False)
        if state:
            if self.fsdp:
                self._load_fsdp_policy_state(state["policy"])
            else:
                policy.load_state_dict(state["policy"])
            set_rng_state(state["rng"])
        if self.rank != 0:
            return None
        return {k: v for k, v in state.items() if k != "policy"}

    # -- FSDP2 (GPU; not exercised by the CPU test-suite) ---------------------------------------
    def _wrap_fsdp2(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from oapl.trainer.optim import build_optimizer, build_scheduler

        cfg, policy = self.cfg, self.policy
        mesh = init_device_mesh("cuda", (self.world,))
        names = set(getattr(policy.model, "_no_split_modules", None) or [])
        layers = [m for m in policy.model.modules() if type(m).__name__ in names]
        if not layers:
            raise RuntimeError(f"{type(policy.model).__name__} names no _no_split_modules (decoder layers) to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        # the root unit holds embeddings, final norm and the (possibly tied) LM head; it keeps them
        # gathered between forward and backward because token_logprobs uses the head weight directly
        fully_shard(self.module, mesh=mesh, reshard_after_forward=False)
        # fully_shard replaced the parameters by DTensors: the optimiser must see the new ones
        policy.optimizer = build_optimizer(policy.model.parameters(), cfg.optim)
        policy.scheduler = build_scheduler(policy.optimizer, cfg.optim, cfg.steps)

    def _fsdp_full_policy_state(self) -> dict[str, Any]:
        """The optimiser state in the local (single-process) format: collective on every rank."""
        osd = self.policy.optimizer.state_dict()
        full_state = {pid: {k: (_full(v).cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                      for pid, st in sorted(osd["state"].items())}
        return {"optimizer": {"state": full_state, "param_groups": osd["param_groups"]},
                "scheduler": self.policy.scheduler.state_dict()}

    def _load_fsdp_policy_state(self, pstate: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        osd = pstate["optimizer"]
        sharded = {}
        for pid, st in osd["state"].items():
            p = params[int(pid)]
            sharded[pid] = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                                if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v)
                            for k, v in st.items()}
        self.policy.optimizer.load_state_dict({"state": sharded, "param_groups": osd["param_groups"]})
        self.policy.scheduler.load_state_dict(pstate["scheduler"])

    # -- one optimiser step ------------------------------------------------------------------
    def _weights(self):
        """(name, full tensor) of the engine-facing weights; under FSDP2 every rank must iterate."""
        for name, t in self.policy.engine_weights():
            yield name, _full(t)

    def train_step(self, groups, want_grads: bool = False) -> dict[str, Any]:
        import torch.distributed as dist

        policy, cfg = self.policy, self.cfg
        algo = cfg.algorithm
        t0 = time.perf_counter()
        batch = policy._batch(groups)
        adv, values = policy._advantages(groups)
        n = batch.input_ids.shape[0]
        if n < self.world:
            raise ValueError(f"a batch of {n} sequences cannot be split over {self.world} trainer ranks")
        bounds = shard_bounds(n, self.world)
        lo, hi = bounds[self.rank]
        mb = cfg.optim.micro_batch_size
        counts = [math.ceil((h - l) / mb) for l, h in bounds]
        # FSDP all-gathers in every forward: every rank runs the same number of micro-batches
        # (padding with zero-weight ones); DDP communicates only in the last backward
        n_micro = max(counts) if self.fsdp else counts[self.rank]
        temp = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
        chunk = cfg.model.logprob_chunk_size
        policy.model.train()
        policy.optimizer.zero_grad(set_to_none=True)
        stats = RankStats()
        local_finite = True
        for j in range(n_micro):
            start = lo + j * mb
            dummy = start >= hi
            sl = slice(lo, lo + 1) if dummy else slice(start, min(start + mb, hi))
            mbatch = batch.slice(sl).to(policy.device)
            mask = mbatch.response_mask
            ref_lp = mbatch.ref_logprobs
            if algo.reference_logprobs == "recompute" and policy.reference is not None:
                with torch.no_grad():
                    ref_lp, _ = token_logprobs(policy.reference, mbatch, temp, chunk)
            last = j == n_micro - 1
            ctx = self.module.no_sync() if (not self.fsdp and not last) else contextlib.nullcontext()
            with ctx:
                logp, ent = self.module(mbatch.input_ids, mbatch.attention_mask, mbatch.response_mask,
                                        mbatch.ref_logprobs)
                a = adv[sl].to(policy.device)
                extra: dict[str, Any] = {}
                if algo.name == "oapl":
                    loss = oapl_loss(logp, ref_lp, mask, a, algo.beta2, num_sequences=n)
                else:
                    inf = ref_lp if algo.is_cap is not None else None
                    loss, extra = grpo_loss(logp, logp.detach(), inf, mask, a, algo.clip_eps, algo.is_cap,
                                            num_sequences=n)
                # gradients are averaged over ranks: x W makes the reduced gradient the full-batch one
                (loss * (0.0 if dummy else float(self.world))).backward()
            if dummy:
                continue
            if not torch.isfinite(loss):
                local_finite = False  # keep going: every rank must run the same collectives
                continue
            stats.add(loss, logp, ref_lp, mask, ent, extra, sl.stop - sl.start, n)
        flag = torch.tensor([0.0 if local_finite else 1.0], device=policy.device if self.cuda else "cpu")
        dist.all_reduce(flag)
        finite = float(flag.item()) == 0.0
        grads = None
        grad_norm = float("nan")
        if finite:
            params = [p for p in policy.model.parameters() if p.requires_grad]
            if want_grads:
                named = [(k, p) for k, p in policy.model.named_parameters() if p.requires_grad]
                full = {k: _full(p.grad).detach().cpu().clone() for k, p in named if p.grad is not None}
                grads = full if self.rank == 0 else None
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
            grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            finite = math.isfinite(grad_norm)
        lr = policy.scheduler.get_last_lr()[0]
        if finite:
            policy.optimizer.step()
        elif self.rank == 0:
            log.warning("non-finite loss or gradient: step skipped on every rank, weights untouched")
        policy.optimizer.zero_grad(set_to_none=True)
        policy.scheduler.step()
        return {
            "rank": self.rank, "finite": finite, "grad_norm": grad_norm, "lr": lr,
            "stats": stats.as_dict(), "tokens": float(batch.attention_mask[lo:hi].sum()),
            "seconds": time.perf_counter() - t0,
            "batch": batch_metrics(cfg, groups, adv, values, n) if self.rank == 0 else None,
            "grads": grads,
        }

    # -- weights for the engines ---------------------------------------------------------------
    def publish_weights(self) -> list | None:
        """Rank 0: ``[ObjectRef]`` of a CPU ``{name: tensor}`` copy of the weights (others: None)."""
        state = cpu_state(self._weights()) if self.rank == 0 else None
        if state is None:
            if self.fsdp:
                for _ in self._weights():  # the all-gathers need every rank
                    pass
            return None
        import ray

        return [ray.put(state)]

    def weight_meta(self) -> list[tuple[str, list[int], str]]:
        return weight_meta(self.policy.engine_weights())

    def join_weight_group(self, host: str, port: int, world: int, backend: str, epoch: int) -> None:
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = WeightGroup(host, port, 0, world, backend, epoch)

    def broadcast_weights(self) -> int:
        it = self._weights()
        if self.rank == 0:
            return self.weight_group.send_all(it)
        for _ in it:
            pass
        return 0

    def snapshot_reference(self) -> None:
        self.policy.snapshot_reference()

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, run_dir: str, step: int, state: dict, config_yaml: str, keep: int) -> str | None:
        from oapl.trainer.checkpoint import save_checkpoint

        if not self.fsdp:
            if self.rank != 0:
                return None
            return str(save_checkpoint(run_dir, step, self.policy, state, config_yaml, keep=keep))
        msd = {k: _full(v).detach().cpu() for k, v in self.policy.model.state_dict().items()}
        pstate = self._fsdp_full_policy_state()
        if self.rank != 0:
            return None
        return str(save_checkpoint(run_dir, step, _FullStateView(self.policy, msd, pstate), state, config_yaml,
                                   keep=keep))

    # -- evaluation of the trainer's current weights (mid-window; DDP only) --------------------
    def begin_eval(self, seed: int) -> None:
        from oapl.engines.transformers_engine import TransformersEngine

        if self.fsdp:
            raise ValueError("mid-window evaluation needs full weights on one rank, which FSDP2 ranks do not "
                             "hold: set eval.every to a multiple of rollout.sync_interval")
        model = self.policy.hf_model()
        self._eval_was_training = model.training
        model.eval()
        self._eval_model = model
        self._eval_engine = TransformersEngine(model, self.policy.tokenizer, self.cfg.engine.max_batch_size, seed=seed)

    def eval_generate(self, prompts, params):
        return self._eval_engine.generate(prompts, params)

    def end_eval(self) -> None:
        self._eval_model.train(self._eval_was_training)
        self._eval_engine = None
        self._eval_model = None


class _FullStateView:
    """What ``save_checkpoint`` needs from a policy, for FSDP2 ranks: full state gathered on rank 0."""

    lora = False

    def __init__(self, policy, model_state: dict[str, torch.Tensor], policy_state: dict[str, Any]) -> None:
        self.tokenizer = policy.tokenizer
        self._model, self._msd, self._pstate = policy.model, model_state, policy_state

    def hf_model(self):
        view = self

        class _Saver:
            def save_pretrained(self, path, **kw):
                view._model.save_pretrained(path, state_dict=view._msd, **kw)

        return _Saver()

    def state_dict(self) -> dict[str, Any]:
        return self._pstate


class TrainerGroup:
    """Driver-side handle of the W trainer ranks (one placement group, PACK strategy)."""

    def __init__(self, cfg: TrainConfig) -> None:
        """Reserve the placement group and start the rank actors (returns before they are up)."""
        ray = require_ray()
        d = cfg.distributed
        self.cfg = cfg
        self.world = d.trainer_workers
        self.mode = parallel_mode(cfg)
        self.pg = None
        self.actors: list = []
        self.pg = make_placement_group([bundle(d.trainer_num_cpus, d.trainer_num_gpus)] * self.world, "PACK",
                                       "oapl-trainer")
        cls = ray.remote(TrainerRank)
        threads = actor_threads(cfg, d.trainer_num_cpus)
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [cls.options(**actor_options(self.pg, r, d.trainer_num_cpus, d.trainer_num_gpus))
                       .remote(cfg_json, r, self.world, threads) for r in range(self.world)]
        self.ckpt: str | None = None
        self.state: dict[str, Any] = {}

    def setup(self, resume: bool) -> None:
        """Join the ranks into one process group and build the policies (from the latest
        checkpoint when ``resume``); ``state`` is then the checkpoint's trainer state."""
        addr, port = self._get([self.actors[0].address.remote()])[0]
        self.ckpt = self._get([self.actors[0].find_checkpoint.remote(self.cfg.output_dir)])[0] if resume else None
        self.state = self.call("setup", addr, port, self.ckpt)[0] or {}

    def _get(self, refs: list) -> list:
        """``ray.get`` that fails fast: the first rank's error is raised without waiting for the
        others (a surviving rank may be stuck in a collective with the dead one)."""
        try:
            return get_fail_fast(refs)
        except Exception as e:
            if not all(alive(self.actors, timeout_s=20)):
                raise TrainerFailure(f"a trainer rank died: {type(e).__name__}: {e}") from e
            raise

    def call(self, method: str, *args, **kwargs) -> list:
        return self._get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def rank0(self, method: str, *args, **kwargs):
        return self._get([getattr(self.actors[0], method).remote(*args, **kwargs)])[0]

    def train_step(self, groups, want_grads: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
        ray = require_ray()
        ref = ray.put(groups)
        parts = self.call("train_step", ref, want_grads)
        return combine_rank_metrics(parts), parts

    def publish_weights(self):
        """ObjectRef of rank 0's CPU weights (every rank takes part under FSDP2)."""
        return self.call("publish_weights")[0][0]

    def pids(self) -> list[int]:
        return self.call("ping")

    def close(self) -> None:
        for a in self.actors:
            kill_actor(a)
        self.actors = []
        remove_placement_group(self.pg)
        self.pg = None
