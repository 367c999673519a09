"""The pieces of TRL's and transformers' API that :class:`~oapl.api.OAPLTrainer` speaks.

- ``transformers.TrainerCallback`` objects driven by oapl's run (:class:`TRLCallbacks`), with a
  ``transformers.TrainerState`` (:func:`trainer_state`) and TRL's metric names (:data:`TRL_METRIC_NAMES`);
- a ``peft.LoraConfig`` as oapl's ``model.lora`` (:func:`lora_fields`);
- a ``PreTrainedModel`` / tokenizer object as oapl's ``model.name`` / ``model.tokenizer``, saved once to a
  content-addressed folder under ``~/.cache/oapl/in-memory`` (:func:`model_fields`).

The TRL *argument* names (``GRPOConfig``'s) are :mod:`oapl.trl_names` / :mod:`oapl.trl_config`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from oapl.config import TrainConfig
from oapl.errors import UserError

log = logging.getLogger("oapl")

#: A plain callback: called with every metrics row as it is logged.
Callback = Callable[[dict[str, Any]], None]

__all__ = [
    "Callback",
    "TRLCallbacks",
    "TRL_METRIC_NAMES",
    "lora_fields",
    "model_fields",
    "split_callbacks",
    "trainer_state",
    "with_trl_names",
    "with_trl_names_callback",
]


# -- TRL's callbacks and metric names ---------------------------------------------------------------
#: oapl's metric names -> TRL's, in what TrainerCallbacks, ``trainer.state.log_history`` and plain callbacks see
#: (plain callbacks and metrics.jsonl keep oapl's names too).
TRL_METRIC_NAMES = {
    "reward_mean": "reward",
    "lr": "learning_rate",
    "response_len_mean": "completions/mean_length",
    "truncated_frac": "completions/clipped_ratio",
}
#: Row fields that are counters, not metrics: ``on_log`` gets their last value, not the window's mean.
_COUNTERS = {
    "step",
    "samples_seen",
    "weight_version",
    "lag",
    "elapsed_s",
    "synced_to_version",
    "reward_errors",
    "stale_dropped",
}


def with_trl_names(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` plus TRL's names of oapl's metrics (``reward``, ``learning_rate``, ``completions/mean_length``)."""
    out = dict(row)
    for ours, theirs in TRL_METRIC_NAMES.items():
        if ours in row and theirs not in row:
            out[theirs] = row[ours]
    return out


def _trl_view(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as TRL logs it: TRL's names (not both), held-out results as ``eval_<metric>``."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k.startswith("eval/"):
            out[f"eval_{k[5:].removeprefix('eval_')}"] = v
        else:
            out[TRL_METRIC_NAMES.get(k, k)] = v
    return out


def _is_trainer_callback(cb: Any) -> bool:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(cb, TrainerCallback) or isinstance(cb, type) and issubclass(cb, TrainerCallback)


class TRLCallbacks:
    """``transformers.TrainerCallback`` objects driven by the run: a row callback with ``on_run_event``.

    Events: ``on_init_end`` (by the trainer), ``on_train_begin``, ``on_step_begin``, ``on_step_end`` (each
    step's row), ``on_log`` (every ``logging_steps`` steps: the mean of those steps' metrics, TRL's names;
    and the held-out results), ``on_evaluate``, ``on_save`` (after a checkpoint), ``on_train_end``.
    ``control.should_training_stop`` ends the run after the current step, as a run that reached
    ``max_steps`` ends: final evaluation and checkpoint.
    """

    def __init__(self, callbacks: list[Any], args: Any, state: Any, train_rows: int | None) -> None:
        from transformers import TrainerControl

        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in callbacks]
        self.args, self.state, self.control = args, state, TrainerControl()
        self.train_rows = train_rows
        self.run: Any = None
        self._window: list[dict[str, Any]] = []
        self.losses: list[float] = []

    def event(self, name: str, **kwargs: Any) -> None:
        kwargs.setdefault("processing_class", getattr(getattr(self.run, "backend", None), "tokenizer", None))
        kwargs.setdefault("model", None)  # the model lives in the trainer (a process of its own under Ray)
        for cb in self.callbacks:
            result = getattr(cb, name)(self.args, self.state, self.control, **kwargs)
            if result is not None:
                self.control = result

    def _sync_state(self, step: int) -> None:
        self.state.global_step = step
        if self.train_rows and self.run is not None:
            p = self.run.cfg.rollout.prompts_per_step
            self.state.epoch = step * p / self.train_rows

    def on_run_event(self, name: str, run: Any, **kw: Any) -> None:
        self.run = run
        if name == "train_begin":
            self.state.max_steps = run.backend.total_steps
            self._sync_state(run.step)
            self.control.should_training_stop = False  # a new train() call
            self.event("on_train_begin")
        elif name == "step_begin":
            self.event("on_step_begin")
        elif name == "save":
            self.event("on_save", checkpoint=kw.get("path"))
            self.control.should_save = False
        elif name == "train_end":
            self.event("on_train_end")
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self.control.should_training_stop and self.run is not None and not self.run.stop_requested:
            log.info(
                "a callback set control.should_training_stop at step %d: the run ends after this step",
                self.state.global_step,
            )
            self.run.stop_requested = True

    def __call__(self, row: dict[str, Any]) -> None:
        view = _trl_view(row)
        evals = {k: v for k, v in view.items() if k.startswith("eval_")}
        if "loss" in row:
            self._sync_state(int(row["step"]))
            self.losses.append(float(row["loss"]))
            self._window.append({k: v for k, v in view.items() if not k.startswith("eval_")})
            self.event("on_step_end")
            every = self.state.logging_steps
            if every and (self.state.global_step % every == 0):
                self._log(self._mean(self._window))
                self._window = []
        if evals:
            self._log(evals)
            self.event("on_evaluate", metrics=evals)
            self.control.should_evaluate = False
        self._maybe_stop()

    def _log(self, logs: dict[str, Any]) -> None:
        logs = dict(logs)
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.event("on_log", logs=logs)
        self.control.should_log = False

    @staticmethod
    def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in rows[-1].items():
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            if k in _COUNTERS or k == "step" or len(vals) != len(rows):
                out[k] = v
            else:
                out[k] = sum(vals) / len(vals)
        out.pop("step", None)
        return out


def trainer_state(cfg: TrainConfig, logging_steps: float | None):
    from transformers import TrainerState

    steps = cfg.steps

    def share(x: float | int | None) -> int | None:
        if x is None:
            return None
        return max(1, math.ceil(x * steps)) if isinstance(x, float) and x < 1 else int(x)

    # None: no evaluation / checkpoint cadence (transformers annotates these int, and reads None as "never")
    return TrainerState(
        max_steps=steps,
        logging_steps=share(logging_steps) or 10,
        eval_steps=cfg.eval.every or None,  # type: ignore[arg-type]
        save_steps=cfg.checkpoint.every or None,  # type: ignore[arg-type]
        train_batch_size=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
    )


def split_callbacks(callbacks: Iterable[Any] | None) -> tuple[list[Callback], list[Any]]:
    """(plain functions, ``transformers.TrainerCallback`` objects or classes)."""
    plain, trl = [], []
    for i, cb in enumerate(list(callbacks or [])):
        if _is_trainer_callback(cb):
            trl.append(cb)
        elif isinstance(cb, type) or not callable(cb):
            raise UserError(
                f"callbacks[{i}]: {getattr(cb, '__name__', type(cb).__name__)} is neither a "
                "transformers TrainerCallback nor a function fn(row: dict) called with every metrics row"
            )
        else:
            plain.append(cb)
    return plain, trl


def with_trl_names_callback(cb: Callback) -> Callback:
    """``cb`` called with every row plus TRL's names of oapl's metrics (:func:`with_trl_names`)."""

    def call(row: dict[str, Any]) -> None:
        cb(with_trl_names(row))

    return call


# -- peft's LoraConfig ------------------------------------------------------------------------------
#: ``peft.LoraConfig`` fields oapl honours (the rest must keep peft's default, or are refused by name).
_LORA_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules"}
#: Fields that describe the adapter's bookkeeping, not the adapter: ignored.
_LORA_IGNORED = {
    "task_type",
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
}


def lora_fields(peft_config: Any, model_name: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """``model.lora`` from a ``peft.LoraConfig``; a field set to anything but peft's default that oapl does not
    implement is refused by name. ``target_modules=None``: peft's default modules for the model's architecture."""
    import dataclasses

    if type(peft_config).__name__ != "LoraConfig" or not dataclasses.is_dataclass(peft_config):
        raise UserError(
            f"peft_config: {type(peft_config).__name__} is not supported; oapl trains LoRA adapters (peft.LoraConfig)"
        )
    lora: Any = peft_config  # a peft.LoraConfig
    default = type(lora)()
    changed = {
        f.name: getattr(peft_config, f.name)
        for f in dataclasses.fields(peft_config)
        if f.name not in _LORA_HONOURED | _LORA_IGNORED
        and getattr(peft_config, f.name) != getattr(default, f.name, None)
    }
    if changed:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
        raise UserError(
            f"peft_config: {shown} not supported (oapl's LoRA: r, lora_alpha, lora_dropout, "
            "target_modules, with peft's defaults for the rest)"
        )
    targets = lora.target_modules
    if targets is None:
        targets = _peft_default_targets(model_name, trust_remote_code)
    elif not isinstance(targets, str):
        targets = sorted(targets)
    return {
        "enabled": True,
        "r": int(lora.r),
        "alpha": int(lora.lora_alpha),
        "dropout": float(lora.lora_dropout),
        "target_modules": targets,
    }


def _peft_default_targets(model_name: str | None, trust_remote_code: bool) -> list[str]:
    """What peft adapts when ``target_modules`` is None: its table's modules for the model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING
    from transformers import AutoConfig

    from oapl.trainer.model import resolve_model_path

    if model_name is None:
        raise UserError(
            "peft_config.target_modules: None means peft's default modules for the model's "
            "architecture, which needs the model: pass model=, or give target_modules"
        )
    try:
        model_type = AutoConfig.from_pretrained(
            resolve_model_path(model_name), trust_remote_code=trust_remote_code
        ).model_type
    except Exception as e:  # noqa: BLE001 - said below
        raise UserError(
            f"peft_config.target_modules: None means peft's default modules for the model's "
            f"architecture, but the config of {model_name!r} cannot be read ({type(e).__name__}); "
            "give target_modules"
        ) from e
    if model_type not in MAPPING:
        raise UserError(
            f"peft_config.target_modules: peft has no default modules for model type {model_type!r}; "
            "give target_modules (e.g. 'all-linear')"
        )
    return sorted(MAPPING[model_type])


# -- models and tokenizers given as objects -----------------------------------------------------------
def model_fields(m: dict[str, Any], model: Any, processing_class: Any, peft_config: Any) -> None:
    """``model.name`` / ``model.tokenizer`` / ``model.lora`` from the trainer's model, tokenizer and ``peft_config``."""
    if model is not None:
        m["name"] = _model_source(model, processing_class)
    if processing_class is not None:
        m["tokenizer"] = (
            str(processing_class)
            if isinstance(processing_class, (str, os.PathLike))
            else m["name"]
            if not isinstance(model, (str, os.PathLike, type(None)))
            else _save_tokenizer(processing_class)
        )
    if peft_config is not None:
        m["lora"] = lora_fields(peft_config, m["name"], m.get("trust_remote_code", False))


def _store_dir() -> Path:
    from oapl.trainer.model import cache_dir

    root = cache_dir() / "in-memory"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _content_addressed(tmp: Path, label: str) -> str:
    """Move the saved folder ``tmp`` to ``<cache>/in-memory/<label>-<sha256 of its files>``; return that path."""
    h = hashlib.sha256()
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(tmp)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)[-48:].strip("-.") or "model"
    target = tmp.parent / f"{safe}-{h.hexdigest()[:16]}"
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return str(target)


def _model_source(model: Any, processing_class: Any) -> str:
    """``model.name`` for a name/path, or the folder an in-memory ``PreTrainedModel`` is saved to."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise UserError(
            "model: a PEFT model; pass the base model and peft_config=LoraConfig(...) (oapl adds the adapters itself)"
        )
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise UserError(
            f"model: expected a model name, a path or a transformers PreTrainedModel, got {type(model).__name__}"
        )
    tokenizer = (
        processing_class
        if processing_class is not None and not isinstance(processing_class, (str, os.PathLike))
        else None
    )
    source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if tokenizer is None:
        tok_name = os.fspath(processing_class) if processing_class is not None else source
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_name) if tok_name else None
        except Exception as e:  # noqa: BLE001 - said below
            raise UserError(
                f"processing_class: the tokenizer of the in-memory model ({tok_name!r}) cannot be "
                f"loaded ({type(e).__name__}); pass processing_class=<tokenizer>"
            ) from e
        if tokenizer is None:
            raise UserError("processing_class: required with an in-memory model that has no name_or_path")
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=_store_dir()))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        path = _content_addressed(tmp, Path(str(source)).name or type(model).__name__)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("in-memory model saved to %s (model.name)", path)
    return path


def _save_tokenizer(tokenizer: Any) -> str:
    if not hasattr(tokenizer, "save_pretrained"):
        raise UserError(f"processing_class: expected a tokenizer or its name/path, got {type(tokenizer).__name__}")
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=_store_dir()))
    try:
        tokenizer.save_pretrained(tmp)
        return _content_addressed(tmp, "tokenizer-" + Path(str(getattr(tokenizer, "name_or_path", ""))).name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
