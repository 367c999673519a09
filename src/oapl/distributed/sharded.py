"""Sharded checkpoints of FSDP2 trainer ranks: every rank writes its own part; none holds the whole state.

A checkpoint ``checkpoints/step-N/`` written by W FSDP2 ranks::

    model/              a Hugging Face folder: config, tokenizer, and the fp32 master weights in
                        ``model-rRRR-KKKKK.safetensors`` files written by rank R, indexed by
                        ``model.safetensors.index.json``. Every tensor is all-gathered from its shards
                        once, kept by the one rank that owns it (ownership balanced by bytes) until
                        that rank's file reaches about one decoder layer, then written and freed.
    optim/              ``torch.distributed.checkpoint`` of the AdamW state keyed by parameter name:
                        ``.metadata`` and one ``__R_0.distcp`` per rank, each holding that rank's shards.
    trainer_state.json  rank 0: step, schedule, RNG, counters; ``policy.optimizer_dcp = "optim"``
    trainer_state.safetensors   (with its tensors: JSON and safetensors, nothing pickled)
    config.yaml
    manifest.json       rank 0, last, once every rank has written: each file's size and checksum
                        (see :mod:`oapl.trainer.checkpoint`); DCP's pickled ``optim/.metadata`` is
                        read by :func:`read_dcp_metadata`, which unpickles DCP's own classes only

It is written into a ``.tmp-step-*`` sibling (named by rank 0, broadcast to the others) and renamed
into place by rank 0 after every rank has finished, so a kill during the save leaves the previous
checkpoint the latest one. The ranks share one file system (one node, or a shared mount).

Resume at any world size: the weights come from ``model/`` as for every checkpoint (so
``oapl eval``, ``save_model`` and the two-stage recipe read it unchanged) and DCP reshards the AdamW
state to the new layout: FSDP2 shards of another world size, or whole tensors for one process or
DDP replicas. A one-process checkpoint (the full optimiser state inside ``trainer_state.*``) loads
into FSDP2 ranks by :func:`load_policy_state` as well, so runs move 1 -> N and N -> 1 ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

OPTIM_DIR = "optim"
INDEX = "model.safetensors.index.json"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it in the same order); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_to(t: torch.Tensor, owner: int, rank: int, world: int) -> torch.Tensor | None:
    """The full value of ``t`` on rank ``owner``, ``None`` on the others (a collective for a DTensor).

    A DTensor sharded by rows over a 1-D mesh (FSDP2's layout) is gathered point to point: the owner
    allocates the one full buffer and every other rank sends its row shard straight into its slice,
    so the owner holds one copy and the others none (``full_tensor`` all-gathers to every rank and,
    over gloo, briefly holds two copies on each). Other layouts fall back to ``full_tensor``.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t if rank == owner else None

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or world == 1:
        full = t.full_tensor()
        return full if rank == owner else None
    import torch.distributed as dist

    group = t.device_mesh.get_group()
    local = t.to_local()
    n, step = t.shape[0], -(-t.shape[0] // world)  # torch.chunk's rows per rank, as FSDP2 shards
    rows = [(min(r * step, n), min((r + 1) * step, n)) for r in range(world)]
    if local.shape[0] != rows[rank][1] - rows[rank][0]:
        raise RuntimeError(f"unexpected FSDP2 shard of {tuple(t.shape)}: rank {rank} holds {local.shape[0]} rows")
    if rank != owner:
        if local.shape[0]:
            dist.send(local.contiguous(), dst=dist.get_global_rank(group, owner), group=group)
        return None
    out = torch.empty(tuple(t.shape), dtype=local.dtype, device=local.device)
    for r, (s, e) in enumerate(rows):
        if e == s:
            continue
        if r == rank:
            out[s:e].copy_(local)
        else:
            dist.recv(out[s:e], src=dist.get_global_rank(group, r), group=group)
    return out


def export_items(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a Hugging Face folder of ``model`` holds: parameters (tied ones once) and persistent buffers."""
    items: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    non_persistent = {
        f"{mod}.{b}" if mod else b
        for mod, m in model.named_modules()
        for b in getattr(m, "_non_persistent_buffers_set", ())
    }
    items += [(n, b) for n, b in model.named_buffers() if n not in non_persistent]
    return items


def _nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    size = torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size()
    return t.numel() * size


def owners(sizes: list[int], world: int) -> list[int]:
    """Rank owning each tensor: largest first onto the least-loaded rank (balanced bytes, deterministic)."""
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


def layer_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the largest decoder layer (``_no_split_modules``) in ``dtype``: the export's file size."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    # fully_shard swaps a module's class for a subclass (``FSDPLlamaDecoderLayer``): match the MRO
    sizes = [
        sum(_nbytes(p, dtype) for p in m.parameters())
        for m in model.modules()
        if any(c.__name__ in names for c in type(m).__mro__)
    ]
    return max(sizes, default=0)


def _aliases(value: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``value`` shares memory with ``t`` (its local shard for a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return value.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()


def export_hf(
    model: torch.nn.Module,
    tokenizer,
    path: str | Path,
    rank: int = 0,
    world: int = 1,
    dtype: torch.dtype = torch.float32,
    max_file_bytes: int | None = None,
) -> dict[str, str]:
    """Write ``model`` as a Hugging Face folder from its shards; a collective over the ``world`` ranks.

    Each tensor is gathered in turn to the one rank that owns it (:func:`gather_to`); the owner keeps
    it in ``dtype`` until its pending file reaches ``max_file_bytes`` (default: one decoder layer, or
    the largest tensor), writes it and frees it. A rank writes its pending file before gathering a
    tensor that would take it past the limit, so beyond its own shards it holds at most one file's
    worth: its pending tensors plus the one being gathered. Returns the weight map (rank 0).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    items = export_items(model)
    sizes = [_nbytes(t, dtype) for _, t in items]
    own = owners(sizes, world)
    limit = max_file_bytes or max(layer_bytes(model, dtype), max(sizes, default=0))
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, files = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes, files
        if pending:
            name = f"model-r{rank:03d}-{files:05d}.safetensors"
            save_file(pending, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, name))
            files += 1
        pending, pending_bytes = {}, 0

    for (name, t), owner, size in zip(items, own, sizes):
        # write the pending file before the gather, not after, so pending + gathered stays within a file
        if owner == rank and pending_bytes and pending_bytes + size > limit:
            flush()
        full = gather_to(t.detach(), owner, rank, world)
        if full is None:
            continue
        value = full.to("cpu", dtype if full.is_floating_point() else full.dtype)
        # an all-gathered value is already a fresh tensor; copy only one that aliases the live parameter
        pending[name] = value.clone() if _aliases(value, t) else value.contiguous()
        pending_bytes += size
        del full, value
    flush()
    maps = _gather_objects(weight_map, world)
    if rank != 0:
        return {}
    merged = {k: v for m in maps for k, v in m.items()}
    total = sum(sizes)
    (path / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}, indent=2)
    )
    _write_config(model, path, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return merged


def _gather_objects(obj: Any, world: int) -> list[Any]:
    dist = _dist()
    if dist is None or world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _write_config(model: Any, path: Path, dtype: torch.dtype) -> None:  # a transformers PreTrainedModel
    model.config.save_pretrained(path)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(path)
        except (ValueError, OSError) as e:  # an invalid generation config is not worth losing a checkpoint
            log.warning("generation_config not saved: %s", e)
    cfg_file = path / "config.json"
    conf = json.loads(cfg_file.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in conf:
            conf[key] = str(dtype).replace("torch.", "")
    cfg_file.write_text(json.dumps(conf, indent=2))


# -- the optimiser state --------------------------------------------------------------------------
def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Write the AdamW state by parameter name with DCP: each rank its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optim": osd}, checkpoint_id=str(path), no_dist=_dist() is None)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Read the AdamW state written by :func:`save_optimizer`, resharded to this process's layout.

    The template is this optimiser's own state dict (its states initialised), so DCP reads exactly
    the slices that this rank's parameters hold: FSDP2 shards of any world size, or whole tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(
            f"{path}: no sharded optimiser state (.metadata missing): the checkpoint is "
            "incomplete; resume from an earlier one"
        )
    osd = get_optimizer_state_dict(model, optimizer)
    state = {"optim": osd}
    read_dcp_metadata(path)  # refuses planted objects here, in one line (DCP would wrap the error)
    dcp.load(state, storage_reader=_SafeReader(path), no_dist=_dist() is None)
    set_optimizer_state_dict(model, optimizer, state["optim"])


#: What DCP's pickled ``.metadata`` may name: its own dataclasses, torch sizes, dtypes and layouts.
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


def read_dcp_metadata(path: str | Path):
    """DCP's ``.metadata`` unpickled with only the classes DCP writes there; anything else is refused.

    ``torch.distributed.checkpoint`` reads it with plain ``pickle.load``, which would run code planted
    in a checkpoint; this reader looks up no other global, so nothing can be called.
    """
    import pickle

    from oapl.trainer.checkpoint import CheckpointError

    file = Path(path) / ".metadata"

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            ok = (
                module.startswith("torch.distributed.checkpoint.")
                or (module, name) in _DCP_GLOBALS
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            )
            if not ok:
                raise CheckpointError(
                    f"{file}: holds pickled objects ({module}.{name}) that could run code; "
                    "oapl does not load it: delete this checkpoint folder and resume from another one"
                )
            return super().find_class(module, name)

    with file.open("rb") as f:
        try:
            return Restricted(f).load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{file}: unreadable ({type(e).__name__}); resume from an earlier checkpoint"
            ) from None


def _SafeReader(path: Path):
    """A DCP ``FileSystemReader`` whose ``.metadata`` goes through :func:`read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self):  # no **kwargs: DCP then never falls back to per-rank metadata files
            metadata = read_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def policy_state_sharded(scheduler) -> dict[str, Any]:
    """The ``policy`` entry of a sharded checkpoint's ``trainer_state.pt`` (the optimiser lives in optim/)."""
    return {"optimizer_dcp": OPTIM_DIR, "scheduler": scheduler.state_dict()}


def load_policy_state(policy, pstate: dict[str, Any], ckpt: str | Path) -> None:
    """Restore optimiser and schedule from either checkpoint format into ``policy`` (any layout).

    ``pstate["optimizer"]``: a one-process checkpoint's full state; into FSDP2 shards it goes through
    ``set_optimizer_state_dict`` with ``full_state_dict`` (each rank keeps its slice).
    ``pstate["optimizer_dcp"]``: a sharded checkpoint; DCP reads this rank's slices.
    """
    if "optimizer_dcp" in pstate:
        load_optimizer(policy.model, policy.optimizer, Path(ckpt) / pstate["optimizer_dcp"])
    elif _is_sharded(policy.model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        # the one-process format is keyed by parameter index (order of model.parameters()); name it
        names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
        full = pstate["optimizer"]
        named: dict[str, Any] = {
            "state": {names[int(i)]: st for i, st in full["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in full["param_groups"]],
        }
        get_optimizer_state_dict(policy.model, policy.optimizer)  # initialise the states to load into
        set_optimizer_state_dict(
            policy.model,
            policy.optimizer,
            named,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
    else:
        policy.optimizer.load_state_dict(pstate["optimizer"])
    policy.scheduler.load_state_dict(pstate["scheduler"])


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


# -- the whole checkpoint -------------------------------------------------------------------------
def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    policy,
    rank: int,
    world: int,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
) -> Path | None:
    """Write ``checkpoints/step-N`` from W ranks (a collective); rank 0 returns its path."""
    from oapl.atomic import fsync_dir
    from oapl.trainer.checkpoint import (
        checkpoint_dir,
        prune_checkpoints,
        rng_state,
        write_manifest,
        write_trainer_state,
    )

    final = checkpoint_dir(run_dir) / f"step-{step:08d}"
    with _shared_tmp(final, rank, world) as tmp:
        export_hf(policy.model, policy.tokenizer, tmp / "model", rank, world, dtype=policy.precision.param_dtype)
        save_optimizer(policy.model, policy.optimizer, tmp / OPTIM_DIR)
        if rank == 0:
            write_trainer_state(
                tmp,
                {**trainer_state, "policy": policy_state_sharded(policy.scheduler), "rng": rng_state(), "world": world},
            )
            (tmp / "config.yaml").write_text(config_yaml)
        _barrier()  # every rank's files are on disk before the manifest and the rename
        if rank == 0:
            write_manifest(tmp, step, f"sharded/{world}")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
    if rank != 0:
        return None
    prune_checkpoints(run_dir, final, keep)
    return final


class _shared_tmp:
    """A ``.tmp-step-*`` folder named by rank 0 and shared by every rank; removed if the save fails."""

    def __init__(self, final: Path, rank: int, world: int) -> None:
        self.final, self.rank, self.world = final, rank, world
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        name: list[Any] = [None]
        if self.rank == 0:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            name[0] = tempfile.mkdtemp(prefix=f".tmp-step-{self.final.name[5:]}-", dir=self.final.parent)
        dist = _dist()
        if dist is not None and self.world > 1:
            dist.broadcast_object_list(name, src=0)
        self.tmp = Path(name[0])
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.rank == 0 and self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def iter_checkpoint_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of an HF folder one file at a time (what a reader of a sharded export holds)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / INDEX
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


__all__ = [
    "export_hf",
    "export_items",
    "full_tensor",
    "iter_checkpoint_weights",
    "load_optimizer",
    "load_policy_state",
    "owners",
    "save_optimizer",
    "save_sharded_checkpoint",
]
