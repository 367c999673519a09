"""Inference engines as Ray actors, and their driver-side proxies.

* :class:`EngineActor` (actor body): one :class:`~oapl.engines.base.InferenceEngine` built with
  :func:`oapl.engines.factory.make_engine` (vLLM or transformers) inside its own process.
* :class:`RemoteEngine`: the driver-side proxy of one engine slot; it implements the
  ``InferenceEngine`` protocol, so :class:`oapl.rollout.worker.RolloutWorker` drives it unchanged
  (prompt sampling, scoring with ``SafeReward``, version tagging, pushing into the shared buffer).
* :class:`EnginePool`: the N slots, their placement group, weight syncs and restarts. A slot whose
  actor dies is restarted (its in-flight generation is dropped, ``engine_restarts`` counts it) with
  the latest synced weights and version from the object-store copy, or, where no copy is kept (the
  collective transport with >= 2 engines in the background), it is *pending*: idle until the next
  sync's broadcast. A slot that dies more than ``distributed.max_engine_restarts`` times fails the run.
* :class:`PoolEngine` (the pool as one engine, for evaluation) and :class:`RankZeroEngine` (trainer
  rank 0's current weights, for a mid-window evaluation).

The rollout workers that drive the slots are in :mod:`oapl.distributed.fleet`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch

from oapl.config import TrainConfig
from oapl.distributed.cluster import (
    EngineRestartsExhausted,
    TrainerFailure,
    actor_options,
    actor_threads,
    alive,
    bundle,
    get_fail_fast,
    is_actor_death,
    kill_actor,
    make_placement_group,
    remove_placement_group,
    require_ray,
)
from oapl.distributed.weights import WeightGroup, cpu_state
from oapl.engines.base import GenerationOutput, SamplingParams, WeightIterator
from oapl.rollout.buffer import BufferClosed

log = logging.getLogger(__name__)

# A restarted actor builds its engine (loads the model) before it answers anything: restart() waits
# for that, up to this long (a model load on a loaded machine can take minutes), so that no later
# liveness ping can mistake a loading engine for a dead one.
ENGINE_BUILD_TIMEOUT_S = 1200.0
# The liveness ping before a collective sync. Every engine is idle then (the workers are paused and
# every restart has waited for its actor's build): a dead actor fails at once, a live one answers in
# milliseconds; the margin is for a heavily loaded machine.
LIVENESS_TIMEOUT_S = 120.0


def engine_seed(seed: int, index: int, restarts: int) -> int:
    """Slot 0 of a fresh run samples exactly as the local engine (``seed``); other slots and
    restarted actors get their own streams."""
    return seed + 7919 * index + 104_729 * restarts


class EngineDied(RuntimeError):
    """The actor of an engine slot died during a call (its in-flight result is lost)."""

    def __init__(self, index: int, actor=None) -> None:
        super().__init__(f"engine actor {index} died")
        self.index, self.actor = index, actor


class EnginePending(RuntimeError):
    """The slot's actor was restarted and waits for the next weight sync (it holds no synced weights)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"engine actor {index} waits for the next weight sync")
        self.index = index


class EngineActor:
    """One inference engine in its own process (the body of a Ray actor)."""

    def __init__(self, cfg_json: dict, index: int, seed: int, threads: int) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(threads)
        from oapl.config_views import load_config_tokenizer
        from oapl.engines.factory import make_engine
        from oapl.trainer.model import resolve_model_path

        cfg = TrainConfig.model_validate(cfg_json)
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPUs ("" when it has none)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        cfg = cfg.model_copy(update={"seed": seed, "model": cfg.model.model_copy(update={"device": str(self.device)})})
        path = resolve_model_path(cfg.model.name)
        tok = load_config_tokenizer(cfg)
        # the initial weights are the base model's; the trainer's arrive by load_weights right after
        self.engine = make_engine(cfg, path, tok)
        self.index = index
        self.group: WeightGroup | None = None

    def ping(self) -> int:
        return os.getpid()

    def version(self) -> int:
        return self.engine.version

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        return self.engine.generate(prompt_token_ids, params)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> float:
        return self.engine.load_weights(iter(weights.items()), version)

    def join_weight_group(self, host: str, port: int, rank: int, world: int, backend: str, epoch: int) -> None:
        if self.group is not None:
            self.group.close()
        self.group = WeightGroup(host, port, rank, world, backend, epoch)

    def receive_weights(self, meta: list[tuple[str, list[int], str]], version: int) -> float:
        if self.group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        it = self.group.receive_all(meta)
        try:
            return self.engine.load_weights(it, version)
        finally:
            for _ in it:  # every broadcast must be matched, even if loading failed half-way
                pass

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.engine.close()


class RemoteEngine:
    """Driver-side ``InferenceEngine`` for one slot of an :class:`EnginePool`."""

    def __init__(self, pool: EnginePool, index: int) -> None:
        self.pool, self.index = pool, index
        self.version = 0  # the weight version this slot holds (set by the pool at every load)

    @property
    def max_model_len(self) -> int | None:
        """The configured ``engine.max_model_len`` (prompts are checked against it on the driver)."""
        return self.pool.cfg.engine.max_model_len

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        if self.pool.is_pending(self.index):
            raise EnginePending(self.index)
        ray = require_ray()
        actor = self.pool.actor(self.index)
        try:
            return ray.get(actor.generate.remote([list(p) for p in prompt_token_ids], params))
        except Exception as e:
            if is_actor_death(e):
                raise EngineDied(self.index, actor) from e
            raise

    def load_weights(self, weights: WeightIterator, version: int) -> float:
        """Protocol method: ship an iterator of weights through the object store to this slot."""
        ray = require_ray()
        return float(ray.get(self.pool.actor(self.index).load_weights.remote(ray.put(cpu_state(weights)), version)))

    def close(self) -> None:
        pass


class EnginePool:
    """N engine actors in one placement group; weight syncs and restarts.

    The constructor starts the actors and returns; :meth:`wait_ready` waits for them.
    """

    def __init__(self, cfg: TrainConfig, transport: str) -> None:
        d = cfg.distributed
        self.cfg = cfg
        self.n = d.num_engines
        self.transport = transport
        self.collective_backend = "nccl" if (d.engine_num_gpus >= 1 and d.trainer_num_gpus >= 1) else "gloo"
        self.max_restarts = d.max_engine_restarts
        self.restarts = [0] * self.n
        self.total_restarts = 0
        self.weights_ref = None
        self.version = 0
        # Under the collective transport with >= 2 engines generating in the background, a sync is one
        # broadcast and no object-store copy is made: an engine restarted mid-window waits, idle, for
        # the next sync's broadcast while the others keep generating. With one engine, or synchronous
        # generation, nothing else could generate until then, so the copy is kept for restarts.
        self.lazy_copy = transport == "collective" and self.n >= 2 and cfg.rollout.asynchronous
        self.pending: set[int] = set()  # restarted slots waiting for the next broadcast (under _pending_lock)
        self._pending_lock = threading.Lock()  # not _lock: a restart holds that while its actor builds
        self._cfg_json = cfg.model_dump(mode="json")
        self._threads = actor_threads(cfg, d.engine_num_cpus)
        self._lock = threading.RLock()
        self._closed = False
        self.epoch = 0  # bumped whenever a slot's actor changes: the weight group must be rebuilt
        self._group_epoch: int | None = None
        self._meta = None
        self.actors: list = [None] * self.n
        self.pg = make_placement_group(
            [bundle(d.engine_num_cpus, d.engine_num_gpus)] * self.n, "SPREAD", "oapl-engines"
        )
        self._cls = require_ray().remote(EngineActor)
        for i in range(self.n):
            self.actors[i] = self._spawn(i)
        self.engines = [RemoteEngine(self, i) for i in range(self.n)]

    def wait_ready(self) -> None:
        """Wait until every actor has built its engine (construction errors surface here)."""
        require_ray().get([a.ping.remote() for a in self.actors])

    def _spawn(self, i: int):
        d = self.cfg.distributed
        seed = engine_seed(self.cfg.seed, i, self.restarts[i])
        return self._cls.options(**actor_options(self.pg, i, d.engine_num_cpus, d.engine_num_gpus)).remote(
            self._cfg_json, i, seed, self._threads
        )

    def actor(self, i: int):
        return self.actors[i]

    # -- weights ---------------------------------------------------------------------------------
    def load(self, trainers, version: int) -> float:
        """Give every engine the trainer's weights as ``version``; callers hold every slot (paused).

        Object store: rank 0 puts one CPU copy, each engine loads it, and it is kept as what a
        restarted engine loads. Collective: one broadcast from rank 0 to every engine; the copy is
        made too unless :attr:`lazy_copy` (then a sync moves the weights once).
        """
        import time

        t0 = time.perf_counter()
        collective = self.transport == "collective"
        self.weights_ref = None if (collective and self.lazy_copy) else trainers.publish_weights()
        self.version = version
        if collective:
            self._broadcast(trainers, version)
        else:
            ray = require_ray()
            refs = [a.load_weights.remote(self.weights_ref, version) for a in self.actors]
            for i, r in enumerate(refs):
                try:
                    ray.get(r)
                    self.engines[i].version = version
                except Exception as e:
                    if not is_actor_death(e):
                        raise
                    self.restart(i, self.actors[i])
        return time.perf_counter() - t0

    def _broadcast(self, trainers, version: int) -> None:
        actors = list(self.actors)
        for i, ok in enumerate(alive(actors, timeout_s=LIVENESS_TIMEOUT_S)):
            if not ok:  # a replacement joins the group and receives this broadcast
                self.restart(i, actors[i], load=False)
        if self._group_epoch != self.epoch:
            host, port = trainers.rank0("address")
            world = self.n + 1
            refs = [trainers.actors[0].join_weight_group.remote(host, port, world, self.collective_backend, self.epoch)]
            refs += [
                a.join_weight_group.remote(host, port, i + 1, world, self.collective_backend, self.epoch)
                for i, a in enumerate(self.actors)
            ]
            self._wait_collective(refs, trainers)
            self._group_epoch = self.epoch
        if self._meta is None:
            self._meta = trainers.rank0("weight_meta")
        refs = [a.broadcast_weights.remote() for a in trainers.actors]
        refs += [a.receive_weights.remote(self._meta, version) for a in self.actors]
        self._wait_collective(refs, trainers)
        for e in self.engines:
            e.version = version
        with self._pending_lock:
            self.pending.clear()

    def _wait_collective(self, refs, trainers) -> None:
        try:
            get_fail_fast(refs)
        except Exception as e:
            if all(alive(list(trainers.actors) + list(self.actors), timeout_s=10)):
                raise
            # a member died inside a collective: the group is unusable and the others may be wedged
            # in it; resume the whole run from the latest checkpoint
            raise TrainerFailure(f"weight broadcast failed: {type(e).__name__}: {e}") from e

    def restart(self, i: int, dead=None, load: bool = True) -> None:
        """Replace slot ``i``'s actor and give it the latest synced weights and version.

        ``dead``: the actor handle that was seen to fail; if the slot already has another actor
        (someone else restarted it meanwhile), nothing is done. Without an object-store copy
        (:attr:`lazy_copy`), or with ``load=False`` (a sync's broadcast follows), the new actor
        holds no synced weights yet: the slot is *pending* and generates nothing until the next
        broadcast. Every slot pending at once would stall the run: that is a :class:`TrainerFailure`
        (the run resumes from its latest checkpoint). Either way this returns once the new actor has
        built its engine (:data:`ENGINE_BUILD_TIMEOUT_S`), so that a liveness ping at the next sync
        finds it answering; an actor that dies or does not finish building meanwhile is replaced again
        (and counted).
        """
        ray = require_ray()
        with self._lock:
            if dead is not None and self.actors[i] is not dead:
                return
            while True:
                if self._closed:
                    raise BufferClosed("engine pool closed")
                self.restarts[i] += 1
                self.total_restarts += 1
                if self.restarts[i] > self.max_restarts:
                    raise EngineRestartsExhausted(
                        f"engine actor {i} died {self.restarts[i]} times (distributed.max_engine_restarts="
                        f"{self.max_restarts})"
                    )
                log.warning(
                    "engine actor %d died: restarting it (restart %d of at most %d) with weight version %d",
                    i,
                    self.restarts[i],
                    self.max_restarts,
                    self.version,
                )
                kill_actor(self.actors[i])
                self.actors[i] = self._spawn(i)
                self.epoch += 1
                if not load or self.weights_ref is None:
                    with self._pending_lock:
                        self.pending.add(i)
                        every = len(self.pending) == self.n
                    self.engines[i].version = -1
                    if load and every:
                        raise TrainerFailure(
                            "every engine actor died within one sync window under the collective "
                            "weight transport; no synced weights are left to restart them from"
                        )
                    if not self._built(i):
                        continue
                    if load:
                        log.warning(
                            "engine actor %d waits for the next weight sync (no object-store copy is "
                            "kept under the collective transport)",
                            i,
                        )
                    return
                try:
                    ray.get(self.actors[i].load_weights.remote(self.weights_ref, self.version))
                    self.engines[i].version = self.version
                    return
                except Exception as e:
                    if not is_actor_death(e):
                        raise

    def _built(self, i: int) -> bool:
        """Wait until slot ``i``'s new actor has built its engine; False if it died or did not finish
        within :data:`ENGINE_BUILD_TIMEOUT_S` (then it is to be replaced). Gives up when the pool closes."""
        import time

        ray = require_ray()
        ref = self.actors[i].ping.remote()
        deadline = time.monotonic() + ENGINE_BUILD_TIMEOUT_S
        while not ray.wait([ref], timeout=1.0)[0]:
            if self._closed:
                raise BufferClosed("engine pool closed")
            if time.monotonic() > deadline:
                log.warning(
                    "engine actor %d did not build its engine within %.0f s: replacing it", i, ENGINE_BUILD_TIMEOUT_S
                )
                return False
        try:
            ray.get(ref)
            return True
        except Exception as e:
            if not is_actor_death(e):
                raise
            return False

    def is_pending(self, i: int) -> bool:
        with self._pending_lock:
            return i in self.pending

    def pids(self) -> list[int]:
        return require_ray().get([a.ping.remote() for a in self.actors])

    def close(self) -> None:
        self._closed = True  # not under _lock: a restart waiting for its actor's build (holding it) gives up
        with self._lock:  # no restart is in progress, and none will spawn an actor after this
            actors, self.actors = list(self.actors), [None] * self.n
        for a in actors:
            kill_actor(a)
        remove_placement_group(self.pg)
        self.pg = None
        self.weights_ref = None


class PoolEngine:
    """``InferenceEngine`` over the whole pool (evaluation): prompts split across the slots."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    @property
    def version(self) -> int:
        return self.pool.version

    @property
    def max_model_len(self) -> int | None:
        """The configured ``engine.max_model_len`` (prompts are checked against it on the driver)."""
        return self.pool.cfg.engine.max_model_len

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        ray = require_ray()
        prompts = [list(p) for p in prompt_token_ids]
        ready = [i for i in range(self.pool.n) if not self.pool.is_pending(i)]  # slots holding synced weights
        if not ready:
            raise EnginePending(-1)
        k = max(1, min(len(ready), len(prompts)))
        size = math.ceil(len(prompts) / k)
        chunks = [
            (ready[j], prompts[j * size : (j + 1) * size]) for j in range(k) if prompts[j * size : (j + 1) * size]
        ]
        refs = [(i, self.pool.actor(i), self.pool.actor(i).generate.remote(c, params)) for i, c in chunks]
        out: list[GenerationOutput] = []
        for (_, c), (i, actor, ref) in zip(chunks, refs):
            while True:
                try:
                    out.extend(ray.get(ref))
                    break
                except Exception as e:
                    if not is_actor_death(e):
                        raise
                    self.pool.restart(i, actor)
                    if self.pool.is_pending(i):  # restarted without weights: another slot takes the chunk
                        free = next((j for j in range(self.pool.n) if not self.pool.is_pending(j)), None)
                        if free is None:
                            raise EnginePending(-1) from e
                        i = free
                    actor = self.pool.actor(i)
                    ref = actor.generate.remote(c, params)
        return out

    def load_weights(self, weights: WeightIterator, version: int) -> float:
        raise TypeError(
            "PoolEngine only samples for evaluation; the pool's weights are synced by the Ray trainer (EnginePool.load)"
        )

    def close(self) -> None:
        pass


class RankZeroEngine:
    """``InferenceEngine`` that samples from trainer rank 0's *current* weights (mid-window eval)."""

    def __init__(self, trainers, seed: int) -> None:
        self.trainers, self.seed = trainers, seed

    @contextlib.contextmanager
    def session(self) -> Iterator[RankZeroEngine]:
        self.trainers.rank0("begin_eval", self.seed)
        try:
            yield self
        finally:
            self.trainers.rank0("end_eval")

    @property
    def version(self) -> int:
        return -1

    def generate(self, prompt_token_ids, params):
        return self.trainers.rank0("eval_generate", [list(p) for p in prompt_token_ids], params)

    def load_weights(self, weights, version):
        raise TypeError("RankZeroEngine samples trainer rank 0's current weights; it holds none of its own")

    def close(self) -> None:
        pass
