"""Checkpoints that cannot run code and are verified before a run resumes from them.

A checkpoint ``checkpoints/step-N/`` of one process::

    model/                      full fine-tuning: the Hugging Face folder (safetensors, config, tokenizer)
    adapter_config.json,        LoRA: the adapters in peft's layout at the root (and the tokenizer), so
    adapter_model.safetensors   ``PeftModel.from_pretrained(base, ckpt)`` loads them; the merged model
                                is written to ``model/`` only on export (:func:`checkpoint_model`)
    trainer_state.json          everything that is not a tensor: step counters, the schedule, the
                                optimiser's hyper-parameters, Python's RNG state, ...
    trainer_state.safetensors   every tensor of that state (AdamW moments, torch/NumPy RNG states),
                                referred to from the JSON by name
    config.yaml
    manifest.json               written last: every file with its size and a checksum (below)

Nothing in it is unpickled: JSON and safetensors hold data only, the model loads from safetensors.
A checkpoint of an older oapl (``trainer_state.pt``, no manifest) is read with
``torch.load(weights_only=True)``, which refuses pickled objects: one that holds any (beyond NumPy's
arrays in the RNG state) is refused in one line naming the file, and nothing in it runs.

**The manifest** lists each file's size and a SHA-256: of the whole file up to
:data:`FULL_HASH_BYTES`, and of :data:`SAMPLE_BLOCKS` blocks of 1 MiB spread over it (first and last
included) for larger files. Resuming a 30 GB checkpoint thus reads about 16 MiB per weight file, not
30 GB, and still catches a deleted or truncated file (sizes), a damaged header (first block) and a
cut tail; damage in the unsampled middle of a large file is caught when it fails to load.
:func:`verify_checkpoint` with ``full=True`` hashes every byte of the small files and reads every
byte of the large ones.

A checkpoint is written into a temporary folder beside its final name and renamed into place, so a
run killed mid-write never leaves a half checkpoint that ``resume`` would pick up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oapl.atomic import atomic_dir, atomic_write_text
from oapl.errors import UserError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
FORMAT = 2
#: Files up to this size are hashed whole in the manifest; larger ones by sampled blocks.
FULL_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS = 16
BLOCK_BYTES = 1 << 20


class CheckpointError(UserError):
    """A checkpoint cannot be used: damaged, or holding pickled objects."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the one seeding helper)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(ckpt: str | Path) -> int:
    m = _NAME.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt} is not a checkpoint folder (step-NNNNNNNN)")
    return int(m.group(1))


def _looks_like_checkpoint(p: Path) -> bool:
    return any((p / f).exists() for f in (MANIFEST, STATE_JSON, LEGACY_STATE))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``step-N`` folders under ``output_dir/checkpoints``, oldest first (intact or not)."""
    root = checkpoint_dir(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and _looks_like_checkpoint(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# -- the trainer state: JSON for data, safetensors for tensors -----------------------------------
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__")


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], ptrs: set[int] | None = None) -> Any:
    ptrs = set() if ptrs is None else ptrs
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:  # safetensors stores no shared memory: copy an alias
            t = t.clone()
        ptrs.add(t.untyped_storage().data_ptr())
        if path in tensors:  # two keys that print alike
            path = f"{path}#{len(tensors)}"
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        if path in tensors:
            path = f"{path}#{len(tensors)}"
        tensors[path] = torch.from_numpy(
            np.ascontiguousarray(obj).astype(np.int64) if obj.dtype == np.uint32 else np.ascontiguousarray(obj)
        ).clone()
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors, ptrs) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors, ptrs) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: _encode(v, f"{path}.{k}" if path else k, tensors, ptrs) for k, v in obj.items()}
        return {
            "__dict__": [
                [_encode(k, f"{path}.key{i}", tensors, ptrs), _encode(v, f"{path}.{k}", tensors, ptrs)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {path}: a {type(obj).__name__} cannot be stored (only data and tensors)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise CheckpointError(f"{where}: the tensor {key!r} named in {STATE_JSON} is missing from {STATE_TENSORS}")
        t = tensors[key]
        return t if "__tensor__" in obj else t.numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """``state`` as ``trainer_state.json`` (data) + ``trainer_state.safetensors`` (its tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": "pt"})
    (folder / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": tree}))


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """The trainer state of ``ckpt``; nothing in it is unpickled (see the module docstring)."""
    ckpt = Path(ckpt)
    if (ckpt / STATE_JSON).exists():
        from safetensors.torch import load_file

        try:
            tree = json.loads((ckpt / STATE_JSON).read_text())["state"]
            tensors = load_file(str(ckpt / STATE_TENSORS)) if (ckpt / STATE_TENSORS).exists() else {}
        except (OSError, ValueError, KeyError, TypeError) as e:  # safetensors raises its own SafetensorError too
            raise CheckpointError(
                f"{ckpt}: its trainer state cannot be read ({type(e).__name__}: {e}); resume from an earlier checkpoint"
            ) from None
        except Exception as e:
            if type(e).__name__ != "SafetensorError":
                raise
            raise CheckpointError(
                f"{ckpt / STATE_TENSORS}: unreadable ({e}); resume from an earlier checkpoint"
            ) from None
        return _decode(tree, tensors, ckpt)
    if (ckpt / LEGACY_STATE).exists():
        return _load_legacy(ckpt / LEGACY_STATE)
    raise CheckpointError(f"{ckpt}: no {STATE_JSON} (nor an older oapl's {LEGACY_STATE}): not a complete checkpoint")


#: What an older oapl's ``trainer_state.pt`` may hold besides tensors and plain data: NumPy's RNG array.
_LEGACY_NUMPY = (
    "numpy.ndarray",
    "numpy.dtype",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
)


def _legacy_safe_globals() -> list[Any]:
    out: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
        except (ImportError, AttributeError):
            pass
    return out


def refuse_pickled_objects(path: Path, allowed: tuple[str, ...] = _LEGACY_NUMPY) -> None:
    """Refuse (one line naming ``path``) a torch file whose pickle names any global outside ``allowed``.

    Reads the pickle's opcodes without executing them.
    """
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch zip file, or a damaged one
        raise CheckpointError(
            f"{path}: not a readable torch file ({type(e).__name__}); resume from an earlier checkpoint"
        ) from None
    bad = sorted(set(unsafe) - set(allowed))
    if bad:
        raise CheckpointError(
            f"{path}: holds pickled objects ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
            "that could run code; oapl does not load it: delete this checkpoint folder and resume "
            "from another one"
        )


def _load_legacy(path: Path) -> dict[str, Any]:
    refuse_pickled_objects(path)
    try:
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e) or type(e).__name__ == "UnpicklingError":
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(
                f"{path}: holds pickled objects ({found.group(1) if found else 'not plain data'}) "
                "that could run code; oapl does not load it: delete this checkpoint folder and "
                "resume from another one"
            ) from None
        raise CheckpointError(
            f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "resume from an earlier checkpoint"
        ) from None


# -- the manifest ---------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _sampled_sha256(path: Path, size: int) -> str:
    """SHA-256 of :data:`SAMPLE_BLOCKS` blocks spread evenly over the file, first and last included."""
    h = hashlib.sha256(str(size).encode())
    last = max(0, size - BLOCK_BYTES)
    with path.open("rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(last * i // (SAMPLE_BLOCKS - 1))
            h.update(f.read(BLOCK_BYTES))
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size <= FULL_HASH_BYTES:
        return {"size": size, "sha256": _sha256(path)}
    return {"size": size, "sampled_sha256": _sampled_sha256(path, size)}


def write_manifest(folder: Path, step: int, layout: str) -> Path:
    """List every file under ``folder`` (sizes, checksums) in ``manifest.json``; call it last."""
    files = {
        str(p.relative_to(folder)): _file_entry(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "step": step, "layout": layout, "files": files}
    return atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def verify_checkpoint(ckpt: str | Path, full: bool = False) -> str | None:
    """Why ``ckpt`` cannot be resumed from (one phrase), or ``None`` when it is intact.

    A checkpoint with a manifest: every listed file is there with its size and checksum. One of an
    older oapl (no manifest): its ``model/`` (or ``adapter/``) and a readable ``trainer_state.pt``.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "missing"
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        if (ckpt / LEGACY_STATE).exists():
            return _verify_legacy(ckpt)
        return f"no {MANIFEST} (an unfinished or foreign folder)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    outside = [rel for rel in files if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if outside:
        return f"{MANIFEST} lists a path outside the checkpoint ({outside[0]})"
    missing_dirs = sorted(
        {rel.split("/")[0] for rel in files if "/" in rel and not (ckpt / rel.split("/")[0]).is_dir()}
    )
    if missing_dirs:
        return f"{missing_dirs[0]}/ is missing"
    for rel, entry in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != entry.get("size"):
            return f"{rel} is {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
        if "sha256" in entry:
            if _sha256(p) != entry["sha256"]:
                return f"{rel} does not match its checksum"
        elif "sampled_sha256" in entry:
            if _sampled_sha256(p, size) != entry["sampled_sha256"]:
                return f"{rel} does not match its checksum"
            if full:
                _sha256(p)  # reads every byte: an I/O error surfaces here
        else:
            return f"{rel} has no checksum in the manifest"
    return None


def _verify_legacy(ckpt: Path) -> str | None:
    if not (ckpt / "model" / "config.json").is_file() and not (ckpt / "adapter").is_dir():  # (older LoRA layout)
        return "model/ is missing"
    try:
        with zipfile.ZipFile(ckpt / LEGACY_STATE) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile):
        return f"{LEGACY_STATE} is damaged (truncated?)"
    return None


def _rel(ckpt: Path) -> str:
    return f"{ckpt.parent.name}/{ckpt.name}"


def resume_checkpoint(output_dir: str | Path, wanted: bool | str | Path = True) -> Path | None:
    """The checkpoint a resumed run starts from; ``None`` when ``output_dir`` holds none.

    ``wanted=True``: the newest intact one; every newer one that is not intact is named, with why, in
    a warning line each. A path: that checkpoint, refused in one line if it is not intact. When every
    checkpoint is damaged the run is refused (:class:`CheckpointError`), since starting afresh would
    replace the run's metrics.
    """
    if wanted is not True and wanted is not None and not isinstance(wanted, bool):
        ckpt = Path(wanted)
        if not ckpt.is_dir():
            raise CheckpointError(
                f"{ckpt}: no such checkpoint; kept ones: "
                f"{', '.join(p.name for p in list_checkpoints(output_dir)) or 'none'}"
            )
        why = verify_checkpoint(ckpt)
        if why is not None:
            raise CheckpointError(f"{ckpt}: damaged checkpoint ({why}); resume from another one")
        return ckpt
    found = list_checkpoints(output_dir)
    skipped: list[str] = []
    for ckpt in reversed(found):
        why = verify_checkpoint(ckpt)
        if why is None:
            if skipped:
                log.warning("resuming from %s, the newest intact checkpoint", _rel(ckpt))
            return ckpt
        log.warning("skipping damaged checkpoint %s: %s", _rel(ckpt), why)
        skipped.append(f"{ckpt.name} ({why})")
    if skipped:
        raise CheckpointError(
            f"{checkpoint_dir(output_dir)}: no intact checkpoint to resume from: {'; '.join(skipped)}; "
            "restore one, or start a new run (--overwrite)"
        )
    return None


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_file(ckpt: str | Path) -> Path | None:
    """A LoRA checkpoint's adapter weights (at the root; ``adapter/`` in older checkpoints), else ``None``."""
    for p in (Path(ckpt) / ADAPTER_WEIGHTS, Path(ckpt) / "adapter" / ADAPTER_WEIGHTS):
        if p.is_file():
            return p
    return None


def checkpoint_model(ckpt: str | Path) -> Path:
    """The checkpoint's model as a Hugging Face folder: ``model/``, written on first use for LoRA.

    A LoRA checkpoint holds the adapters only; its merged model (the base from the checkpoint's
    ``config.yaml`` with the adapters merged out of place, as every weight sync, in
    ``model.export_dtype``) is exported into ``model/`` (atomically) the first time it is asked for.
    """
    ckpt = Path(ckpt)
    model = ckpt / "model"
    if (model / "config.json").is_file():
        return model
    if adapter_file(ckpt) is None:
        raise CheckpointError(f"{ckpt}: damaged checkpoint (model/ is missing)")
    from oapl.config import load_config
    from oapl.trainer.policy import load_policy

    cfg = load_config(str(ckpt / "config.yaml"), [])
    policy, _ = load_policy(cfg, 1, ckpt, load_optimizer=False)
    with atomic_dir(model, prefix=".tmp-model-") as tmp:
        policy.export(tmp)
    log.info("exported the merged LoRA model of %s to %s", ckpt.name, model)
    return model


# -- writing --------------------------------------------------------------------------------------
def save_checkpoint(
    output_dir: str | Path, step: int, policy, trainer_state: dict[str, Any], config_yaml: str, keep: int = 2
) -> Path:
    final = checkpoint_dir(output_dir) / f"step-{step:08d}"
    with atomic_dir(final, prefix=f".tmp-step-{step:08d}-") as tmp:
        if policy.lora:  # peft's layout at the root: PeftModel.from_pretrained(base, ckpt); merged on export
            policy.model.save_pretrained(tmp)
            policy.tokenizer.save_pretrained(tmp)
        else:
            policy.model.save_pretrained(tmp / "model", safe_serialization=True)
            policy.tokenizer.save_pretrained(tmp / "model")
        write_trainer_state(tmp, {**trainer_state, "policy": policy.state_dict(), "rng": rng_state()})
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp, step, "single")
    prune_checkpoints(output_dir, final, keep)
    return final


def prune_checkpoints(output_dir: str | Path, newest: Path, keep: int) -> list[Path]:
    """Delete all but ``keep`` checkpoints: ``newest`` (the one just written) and the latest before it.

    ``newest`` is never deleted, whatever the step numbers of other checkpoints in the directory;
    checkpoints of later steps than ``newest`` (another run's) are left alone, with a warning.
    """
    newest_step = step_of(newest)
    older: list[Path] = []
    later: list[Path] = []
    for p in list_checkpoints(output_dir):
        if p.name == newest.name:
            continue
        (later if step_of(p) > newest_step else older).append(p)
    if later:
        log.warning(
            "%s holds checkpoints of later steps than the one just written (%s): %s; left in place (another "
            "run's, or this run's from before it resumed an earlier checkpoint: replaced when the run gets there)",
            checkpoint_dir(output_dir),
            newest.name,
            ", ".join(p.name for p in later),
        )
    doomed = older[: max(0, len(older) - (keep - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed
