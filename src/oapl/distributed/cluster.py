"""Ray plumbing shared by the engine pool and the trainer group: start/connect, placement groups, errors.

Nothing here knows about OAPL; ``import oapl.distributed.cluster`` imports Ray lazily (inside the
functions), so the local backend never needs it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

from oapl.config import TrainConfig

log = logging.getLogger(__name__)


class TrainerFailure(RuntimeError):
    """A trainer rank died (or the run lost state it cannot rebuild): resume from the latest checkpoint."""


class EngineRestartsExhausted(RuntimeError):
    """An engine slot died more than ``distributed.max_engine_restarts`` times."""


def require_ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError('distributed.backend=ray needs Ray: pip install -e ".[ray]"') from e
    return ray


def cpus_needed(cfg: TrainConfig) -> float:
    d = cfg.distributed
    return d.num_engines * d.engine_num_cpus + d.trainer_workers * d.trainer_num_cpus


def ensure_ray(cfg: TrainConfig) -> bool:
    """Connect to ``distributed.ray_address`` or start a local cluster; True if this call started it.

    A local cluster gets as many logical CPUs as the placement groups need (at least the machine's
    cores): logical CPUs are a scheduling unit, not a reservation of a physical core.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True}
    address = cfg.distributed.ray_address
    if address:
        ray.init(address=address, **kwargs)
        log.info("connected to the Ray cluster at %s: %s", address, ray.cluster_resources())
        return True
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(cfg)))
    ray.init(num_cpus=num_cpus, **kwargs)
    log.info("started a local Ray cluster: %s", ray.cluster_resources())
    return True


def bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """One placement-group bundle; Ray refuses empty bundles, so a 0-CPU/0-GPU actor gets a sliver."""
    b: dict[str, float] = {}
    if num_cpus > 0:
        b["CPU"] = float(num_cpus)
    if num_gpus > 0:
        b["GPU"] = float(num_gpus)
    return b or {"CPU": 0.01}


def make_placement_group(bundles: list[dict[str, float]], strategy: str, name: str, timeout_s: float = 600):
    """Reserve ``bundles`` and wait until they are placed (or fail with what the cluster has)."""
    ray = require_ray()
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
        raise RuntimeError(
            f"placement group {name!r} ({bundles}, {strategy}) could not be placed within "
            f"{timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
        )
    return pg


def remove_placement_group(pg) -> None:
    if pg is None:
        return
    from ray.util.placement_group import remove_placement_group as _remove

    try:
        _remove(pg)
    except Exception as e:  # noqa: BLE001 - cluster already gone
        log.debug("removing placement group: %s", e)


def actor_options(pg, index: int, num_cpus: float, num_gpus: float, **extra) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    b = bundle(num_cpus, num_gpus)
    return {
        "num_cpus": b.get("CPU", 0),
        "num_gpus": b.get("GPU", 0),
        "max_restarts": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index),
        **extra,
    }


def actor_threads(cfg: TrainConfig, num_cpus: float) -> int:
    """torch threads in an actor: its CPU share (at least 1), capped by ``threads`` when set."""
    n = max(1, int(num_cpus))
    return min(n, cfg.threads) if cfg.threads else n


def kill_actor(actor) -> None:
    if actor is None:
        return
    ray = require_ray()
    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # noqa: BLE001 - already dead
        log.debug("kill actor: %s", e)


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def is_actor_death(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def get_fail_fast(refs: list) -> list:
    """``ray.get(refs)`` that raises the first error as soon as it arrives, without waiting for the
    other calls (which may be stuck in a collective with a dead peer)."""
    ray = require_ray()
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def alive(actors: list, timeout_s: float = 30.0) -> list[bool]:
    """Ping every actor (each needs a ``ping`` method); False for the dead or unresponsive."""
    ray = require_ray()
    refs = [a.ping.remote() for a in actors]
    out = []
    for r in refs:
        try:
            ray.get(r, timeout=timeout_s)
            out.append(True)
        except Exception:  # noqa: BLE001 - dead, unreachable or hung
            out.append(False)
    return out
