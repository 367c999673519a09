"""Atomic checkpoints: HF-loadable model + tokenizer, optimiser, schedule, RNG, step and config.

A checkpoint is written into a temporary folder beside its final name and renamed into place, so a
run killed mid-write never leaves a half checkpoint that ``resume`` would pick up.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oapl.atomic import atomic_dir

_NAME = re.compile(r"^step-(\d{8})$")


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
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)
             and (p / "trainer_state.pt").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, policy, trainer_state: dict[str, Any],
                    config_yaml: str, keep: int = 2) -> Path:
    final = checkpoint_dir(output_dir) / f"step-{step:08d}"
    with atomic_dir(final, prefix=f".tmp-step-{step:08d}-") as tmp:
        model = policy.hf_model()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp / "model")
        if policy.lora:
            policy.model.save_pretrained(tmp / "adapter")
        torch.save({**trainer_state, "policy": policy.state_dict(), "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    prune_checkpoints(output_dir, final, keep)
    return final


def prune_checkpoints(output_dir: str | Path, newest: Path, keep: int) -> list[Path]:
    """Delete all but ``keep`` checkpoints: ``newest`` (the one just written) and the latest before it.

    ``newest`` is never deleted, whatever the step numbers of other checkpoints in the directory;
    checkpoints of later steps than ``newest`` (another run's) are left alone, with a warning.
    """
    newest_step = int(_NAME.match(newest.name).group(1))
    older, later = [], []
    for p in list_checkpoints(output_dir):
        if p.name == newest.name:
            continue
        (later if int(_NAME.match(p.name).group(1)) > newest_step else older).append(p)
    if later:
        import logging

        logging.getLogger(__name__).warning(
            "%s holds checkpoints of later steps than the one just written (%s): %s; they are not this "
            "run's and are left in place", checkpoint_dir(output_dir), newest.name, ", ".join(p.name for p in later))
    doomed = older[: max(0, len(older) - (keep - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
