"""The trainer as ``torch.distributed`` ranks placed by Ray: DDP replicas or FSDP2 shards, on GPUs (NCCL)
or CPUs (gloo; FSDP2 too, which is how the test-suite runs it).

The driver plans the step (:func:`oapl.trainer.step.plan_step`): advantages from whole groups, the
mini-batches, and for every rank a token-balanced share of each mini-batch with its micro-batch
plan; each rank receives only its share and runs the same :func:`oapl.trainer.step.run_step` as the
single process, through :class:`RankParallel`. The OAPL loss is a mean over the N sequences of a
mini-batch, so each rank computes its share's part with the full denominator and multiplies it by
the world size W, because DDP and FSDP *average* gradients over ranks:

    grad = (1/W) * sum_r W * d/dw [ sum_{i in share r} (beta2 s_i - A_i)^2 / N ]
         = d/dw [ (1/N) * sum_i (beta2 s_i - A_i)^2 ]            (the single-process gradient)

Under DDP only the last micro-batch all-reduces (``no_sync`` before); under FSDP2 every rank runs
as many micro-batches as the busiest one (zero-weight extras), because every forward all-gathers.
A non-finite loss on any rank skips the step on every rank (the flag is all-reduced), so replicas
never diverge. The ranks' metric partial sums are merged by :mod:`oapl.trainer.stats`.

Precision, one path for 1 and N ranks: the fp32 masters are what FSDP2 all-gathers
(``MixedPrecisionPolicy(param_dtype=None, reduce_dtype=float32)``) and the forward runs under the
same autocast as the single process (bf16 matmuls, fp32 norms and residual stream); DDP keeps fp32
replicas and autocasts likewise (:mod:`oapl.trainer.precision`, docs/training.md).

Checkpoints: DDP rank 0 writes the one-process format; FSDP2 ranks write sharded checkpoints
(:mod:`oapl.distributed.sharded`), each rank its own part. Either resumes at any world size.

The model is called through :class:`LogProbModule` (whose ``forward`` is :func:`token_logprobs`)
so that DDP's and FSDP2's forward hooks run: the chunked log-prob path calls the decoder and the LM
head directly, never ``model.forward``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from oapl.config import TrainConfig
from oapl.distributed.cluster import (
    TrainerFailure,
    actor_options,
    actor_threads,
    alive,
    bundle,
    free_port,
    get_fail_fast,
    kill_actor,
    make_placement_group,
    node_ip,
    remove_placement_group,
    require_ray,
)
from oapl.distributed.sharded import full_tensor, gather_to, load_policy_state, save_sharded_checkpoint
from oapl.distributed.weights import WeightGroup, cpu_state, weight_meta
from oapl.errors import UserError
from oapl.trainer.checkpoint import seed_everything
from oapl.trainer.logprobs import TokenBatch, token_logprobs
from oapl.trainer.step import Parallel, RankWork, plan_step, run_step

if TYPE_CHECKING:
    from oapl.engines.transformers_engine import TransformersEngine
    from oapl.trainer.policy import Policy

log = logging.getLogger(__name__)


def parallel_mode(cfg: TrainConfig) -> str:
    """``distributed.parallel``; ``auto`` is ``fsdp`` on GPUs (full fine-tuning), ``ddp`` otherwise."""
    mode = cfg.distributed.parallel
    if mode == "auto":
        return "fsdp" if cfg.distributed.trainer_num_gpus > 0 and not cfg.model.lora.enabled else "ddp"
    if mode == "fsdp" and cfg.model.lora.enabled:
        raise ValueError(
            "distributed.parallel=fsdp with model.lora.enabled=true: LoRA trains on DDP replicas "
            "(the frozen base is stored in the compute dtype and the adapters are small, so "
            "sharding saves little); set distributed.parallel=ddp (or auto)"
        )
    return mode


class LogProbModule(torch.nn.Module):
    """``forward`` = :func:`token_logprobs` of the wrapped HF model (what DDP/FSDP2 wrap)."""

    def __init__(self, model: torch.nn.Module, temperature: float, chunk_size: int, autocast) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.autocast = autocast

    def forward(self, batch: TokenBatch, with_entropy: bool = True):
        return token_logprobs(
            self.model, batch, self.temperature, self.chunk_size, with_entropy=with_entropy, autocast=self.autocast()
        )


class RankParallel(Parallel):
    """How one of W ranks takes part in :func:`oapl.trainer.step.run_step`."""

    def __init__(self, rank_obj: TrainerRank) -> None:
        super().__init__(rank_obj.policy)
        self.r = rank_obj
        self.world, self.rank = rank_obj.world, rank_obj.rank
        self.pad_micro = rank_obj.fsdp

    def logprobs(self, batch, with_entropy: bool = True):
        return self.r.module(batch, with_entropy=with_entropy)

    def accumulate(self, last: bool):
        if self.r.fsdp or last:
            return contextlib.nullcontext()
        from torch.nn.parallel import DistributedDataParallel

        assert isinstance(self.r.module, DistributedDataParallel)
        return self.r.module.no_sync()

    def all_finite(self, local: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if local else 1.0], device=self.policy.device if self.r.cuda else "cpu")
        dist.all_reduce(flag)
        return float(flag.item()) == 0.0

    def grad_norm(self, params, max_norm: float) -> float:
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return full_tensor(t)


class TrainerRank:
    """One trainer rank (runs inside a Ray actor)."""

    def __init__(self, cfg_json: dict, rank: int, world: int, threads: int, total_steps: int | None = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        cfg = TrainConfig.model_validate(cfg_json)
        self.total_steps = total_steps or cfg.steps  # trainer steps of the schedule (offline: epochs x batches)
        self.cuda = cfg.distributed.trainer_num_gpus > 0 and torch.cuda.is_available()
        if cfg.distributed.trainer_num_gpus > 0 and not self.cuda:
            raise RuntimeError("distributed.trainer_num_gpus > 0 but this trainer actor sees no CUDA device")
        device = "cuda:0" if self.cuda else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})
        self.mode = parallel_mode(self.cfg)
        self.fsdp = self.mode == "fsdp"
        self.policy: Policy  # set by setup()
        self.module: torch.nn.Module  # LogProbModule, wrapped by DDP or FSDP2 in setup()
        self.weight_group: WeightGroup | None = None
        self._eval_engine: TransformersEngine | None = None
        self._eval_model: torch.nn.Module | None = None
        self._eval_was_training = True

    # -- plumbing ------------------------------------------------------------------------------
    def ping(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def find_checkpoint(self, run_dir: str, wanted: bool | str = True) -> str | None:
        from oapl.trainer.checkpoint import resume_checkpoint

        p = resume_checkpoint(run_dir, wanted)  # the newest intact one (or ``wanted``), damaged ones named
        return str(p) if p is not None else None

    def setup(self, master_addr: str, master_port: int, ckpt: str | None) -> dict[str, Any] | None:
        """Join the trainer group, build the policy (from ``ckpt`` when resuming), wrap it.

        Returns (rank 0) the checkpoint's trainer state without the optimiser part.
        """
        import torch.distributed as dist

        from oapl.trainer.checkpoint import set_rng_state
        from oapl.trainer.policy import load_policy

        cfg = self.cfg
        if self.cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl" if self.cuda else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world,
            timeout=datetime.timedelta(seconds=600),
        )
        if self.fsdp and cfg.algorithm.reference_logprobs == "recompute":
            raise ValueError(
                "algorithm.reference_logprobs=recompute is not supported with FSDP2 trainer ranks "
                "(use reference_logprobs=engine)"
            )
        seed_everything(cfg.seed)
        # FSDP2 loads its optimiser state after sharding (below); DDP like the single process
        policy, state = load_policy(cfg, self.total_steps, ckpt, load_optimizer=not self.fsdp)
        self.policy = policy
        self.module = LogProbModule(
            policy.model, policy.temperature, cfg.model.logprob_chunk_size, policy.precision.autocast
        )
        if self.fsdp:
            # every rank must call each FSDP2 unit the same number of times (each call all-gathers);
            # the shared-prompt layout calls the decoder twice, so a rank choosing it while another
            # packs would deadlock: FSDP2 ranks pack or pad
            if cfg.optim.share_prompts == "on":
                raise ValueError(
                    "optim.share_prompts=on is not supported with FSDP2 trainer ranks "
                    "(distributed.parallel=fsdp): set it to auto or off"
                )
            policy.share_prompts = "off"
            self._wrap_fsdp2()
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(self.module, device_ids=[0] if self.cuda else None, broadcast_buffers=False)
        if state:
            assert ckpt is not None  # a trainer state comes from a checkpoint
            if self.fsdp:  # either checkpoint format, resharded to this world size
                load_policy_state(policy, state["policy"], ckpt)
            set_rng_state(state["rng"])
        if self.rank != 0:
            return None
        return {k: v for k, v in state.items() if k != "policy"}

    # -- FSDP2 ---------------------------------------------------------------------------------
    def _wrap_fsdp2(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from oapl.trainer.optim import build_optimizer, build_scheduler

        cfg, policy = self.cfg, self.policy
        # shards hold the fp32 masters; each forward all-gathers them as they are and computes under
        # the single process's autocast (one precision path), gradients are reduce-scattered in fp32
        # and the AdamW state stays fp32 on the shards
        mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        mesh = init_device_mesh("cuda" if self.cuda else "cpu", (self.world,))
        names = set(getattr(policy.model, "_no_split_modules", None) or [])
        layers = [m for m in policy.model.modules() if type(m).__name__ in names]
        if not layers:
            raise RuntimeError(f"{type(policy.model).__name__} names no _no_split_modules (decoder layers) to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        # the root unit holds embeddings, final norm and the (possibly tied) LM head; it keeps them
        # gathered between forward and backward because token_logprobs uses the head weight directly
        fully_shard(self.module, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
        # fully_shard replaced the parameters by DTensors: the optimiser must see the new ones
        policy.optimizer = build_optimizer(policy.model.parameters(), cfg.optim, policy.device)
        policy.scheduler = build_scheduler(policy.optimizer, cfg.optim, self.total_steps * cfg.algorithm.mini_batches)

    # -- one optimiser step ------------------------------------------------------------------
    def _weights(self):
        """(name, full tensor) of the engine-facing weights on rank 0 (``None`` on the others); under
        FSDP2 every rank must iterate: each tensor is gathered to rank 0 alone (:func:`gather_to`)."""
        for name, t in self.policy.engine_weights():
            yield name, gather_to(t, 0, self.rank, self.world)

    def score(self, batch: TokenBatch) -> torch.Tensor:
        """Log-probs ``(n, R)`` of ``batch`` under the current weights, no gradient (every FSDP2 rank must
        call it: the forward all-gathers); what one process computes for the same batch, bit for bit."""
        with torch.no_grad():
            return self.module(batch, with_entropy=False)[0].float().cpu()

    def train_step(self, work: RankWork, want_grads: bool = False) -> dict[str, Any]:
        """Run this rank's share of one step (planned by the driver); returns its partial results."""
        return run_step(self.policy, work, RankParallel(self), capture_grads=want_grads)

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
            if self.weight_group is None:
                raise RuntimeError("broadcast_weights before join_weight_group")
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
        path = save_sharded_checkpoint(run_dir, step, self.policy, self.rank, self.world, state, config_yaml, keep)
        return str(path) if path is not None else None

    # -- evaluation of the trainer's current weights (mid-window; DDP only) --------------------
    def begin_eval(self, seed: int) -> None:
        from oapl.engines.transformers_engine import TransformersEngine

        if self.fsdp:
            raise ValueError(
                "mid-window evaluation needs full weights on one rank, which FSDP2 ranks do not "
                "hold: set eval.every to a multiple of rollout.sync_interval"
            )
        model = self.policy.hf_model()
        self._eval_was_training = model.training
        model.eval()
        self._eval_model = model
        self._eval_engine = TransformersEngine(model, self.policy.tokenizer, self.cfg.engine.max_batch_size, seed=seed)

    def eval_generate(self, prompts, params):
        return self._eval_engine.generate(prompts, params)

    def end_eval(self) -> None:
        if self._eval_model is not None:
            self._eval_model.train(self._eval_was_training)
        self._eval_engine = None
        self._eval_model = None


class TrainerGroup:
    """Driver-side handle of the W trainer ranks (one placement group, PACK strategy)."""

    def __init__(self, cfg: TrainConfig, total_steps: int | None = None) -> None:
        """Reserve the placement group and start the rank actors (returns before they are up);
        ``total_steps``: the schedule's trainer steps when not ``cfg.steps`` (offline runs)."""
        ray = require_ray()
        d = cfg.distributed
        self.cfg = cfg
        self.world = d.trainer_workers
        self.mode = parallel_mode(cfg)
        self.pg = None
        self.actors: list = []
        self.pg = make_placement_group(
            [bundle(d.trainer_num_cpus, d.trainer_num_gpus)] * self.world, "PACK", "oapl-trainer"
        )
        cls = ray.remote(TrainerRank)
        threads = actor_threads(cfg, d.trainer_num_cpus)
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [
            cls.options(**actor_options(self.pg, r, d.trainer_num_cpus, d.trainer_num_gpus)).remote(
                cfg_json, r, self.world, threads, total_steps
            )
            for r in range(self.world)
        ]
        self.ckpt: str | None = None
        self.state: dict[str, Any] = {}

    def setup(self, resume: bool | str, run_dir: str | None = None) -> None:
        """Join the ranks into one process group and build the policies (from the newest intact
        checkpoint in ``run_dir`` when ``resume``, or the checkpoint ``resume`` names); ``state`` is
        then the checkpoint's trainer state."""
        addr, port = self._get([self.actors[0].address.remote()])[0]
        run_dir = run_dir or self.cfg.output_dir
        wanted = str(resume) if resume and not isinstance(resume, bool) else True
        try:
            self.ckpt = self._get([self.actors[0].find_checkpoint.remote(run_dir, wanted)])[0] if resume else None
            self.state = self.call("setup", addr, port, self.ckpt)[0] or {}
        except UserError as e:  # a damaged or planted checkpoint, found by a rank: its one line, not Ray's
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, UserError) else e) from None

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
        """Plan the step here, send every rank only its token-balanced share, merge their sums."""
        from oapl.objectives import build_objective
        from oapl.trainer.stats import StepStats, metrics_row

        cfg = self.cfg
        works, batch = plan_step(
            groups, build_objective(cfg.algorithm), cfg.optim, cfg.algorithm.mini_batches, world=self.world
        )
        parts = self._get([a.train_step.remote(w, want_grads) for a, w in zip(self.actors, works)])
        stats = StepStats()
        for p in parts:
            stats.merge(p["stats"])
        p0 = parts[0]
        row = metrics_row(
            batch,
            stats,
            finite=p0["finite"],
            grad_norm=p0["grad_norm"],
            lr=p0["lr"],
            seconds=max(p["seconds"] for p in parts),
            mini_batches=p0["mini_batches"],
        )
        return row, parts

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
