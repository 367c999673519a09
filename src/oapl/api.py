"""oapl's Python API, in the shape TRL users know.

.. code-block:: python

    from oapl import OAPLTrainer, OAPLConfig
    from oapl.rewards import math_reward

    trainer = OAPLTrainer(
        model="Qwen/Qwen3-0.6B",                        # a name, a path, or a PreTrainedModel
        reward_funcs=[math_reward],                     # callables or "module:function"
        train_dataset=dataset,                          # datasets.Dataset, list of dicts, or a path
        args=OAPLConfig(output_dir="runs/qwen", learning_rate=1e-6, num_generations=8),
        callbacks=[print],                              # fn(row) for every metrics row
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_model("models/qwen-oapl")

:class:`OAPLTrainer` turns its arguments into one plain :class:`~oapl.config.TrainConfig` (in-memory
data and rewards become markers, :mod:`oapl.data.memory`; a ``PreTrainedModel`` is saved once to a
content-addressed folder under ``~/.cache/oapl``) and runs :func:`oapl.loop.train` with it: the same
loop, engines, checkpoints and run directory as ``oapl train``.

:func:`train` and :func:`load_config` are the same for a config written by hand or read from YAML.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from oapl.config import ConfigError, TrainConfig
from oapl.config import load_config as _load_config
from oapl.errors import RunDirError, UserError
from oapl.rundir import refuse_multi_process_launch
from oapl.trl_compat import (
    Callback,
    TRLCallbacks,
    model_fields,
    split_callbacks,
    trainer_state,
    with_trl_names_callback,
)
from oapl.trl_config import OAPLConfig, warn_if_never_synced

log = logging.getLogger("oapl")

__all__ = ["OAPLTrainer", "OAPLConfig", "TrainOutput", "train", "load_config"]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (optional) and ``key=value`` overrides, as ``oapl train``.

    ``load_config("configs/arithmetic_cpu.yaml", ["optim.lr=2e-5", "steps=8"])``; errors are
    :class:`~oapl.config.ConfigError` naming the field.
    """
    return _load_config(path, overrides)


def train(
    config: TrainConfig | str | Path,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Iterable[Callback] | None = None,
):
    """Run one training job, as ``oapl train``: OAPL (or GRPO) online, or offline on stored rollouts.

    ``config`` is a :class:`TrainConfig` / :class:`OAPLConfig` or a YAML path. ``resume`` continues
    the run in ``output_dir`` from its latest checkpoint; ``overwrite`` replaces it (a non-empty
    ``output_dir`` is refused otherwise). Each ``callbacks`` function receives every metrics row (a
    dict: ``step``, ``loss``, ``reward_mean``, ..., or ``eval/pass@1`` rows) as it is logged;
    ``transformers.TrainerCallback`` objects get TRL's events (see :class:`OAPLTrainer`).
    Returns the run's :class:`~oapl.loop.RunResult` (``output_dir``, ``steps``, ``eval_before``,
    ``eval_after``, ``last_metrics``).
    """
    _refuse_in_worker_bootstrap("oapl.train()")
    refuse_multi_process_launch()
    if isinstance(config, (str, Path)):
        config = load_config(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"oapl.train: config must be a TrainConfig, an OAPLConfig or a YAML path, not {type(config).__name__}"
        )
    logging_steps = None
    if isinstance(config, OAPLConfig):
        overwrite = overwrite or config.overwrite_output_dir
        logging_steps = config.logging_steps
        config = _resolve_epochs(config, None)
        warn_if_never_synced(config)
    plain, trl = split_callbacks(callbacks)
    hooks: list[Any] = [with_trl_names_callback(cb) for cb in plain]
    if trl:
        adapter = TRLCallbacks(trl, config, trainer_state(config, logging_steps), None)
        adapter.event("on_init_end")
        hooks.insert(0, adapter)
    return _run(config, resume=resume, overwrite=overwrite, callbacks=hooks, how_to=("resume=True", "overwrite=True"))


class TrainOutput(NamedTuple):
    """What :meth:`OAPLTrainer.train` returns (TRL's ``TrainOutput``)."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


def __getattr__(name: str) -> Any:
    if name == "TrainerState":  # trainer.state is transformers' own (imported only when asked for)
        from transformers import TrainerState

        return TrainerState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OAPLTrainer:
    """Train a model with OAPL (or the GRPO baseline, ``OAPLConfig(algorithm="grpo")``), TRL-style.

    Args:
        model: a Hub name, a local path, ``embedded:smollm2-135m-instruct``, or a transformers
            ``PreTrainedModel`` (saved once under ``~/.cache/oapl/in-memory`` so the trainer and the
            engine can load it). ``None``: ``args.model.name``.
        reward_funcs: a reward or a list of them: callables ``fn(prompts, completions, **columns) ->
            list[float]`` (TRL's convention: every other dataset column arrives as a list; ``None``
            means "does not apply") or ``"module:function"`` strings. ``None``: the task's own reward
            (the built-in tasks); required with a ``train_dataset`` of the default task.
        args: an :class:`OAPLConfig` (TRL names or oapl's nested fields) or a ``TrainConfig``.
        train_dataset: a ``datasets.Dataset``, a list of dicts, or a path/Hub name, with a ``prompt``
            column: a string, or TRL's conversational list of messages. ``None``: the task in ``args``
            (by default the built-in arithmetic task).
        eval_dataset: held-out prompts, the same kinds; evaluated before and after training and every
            ``eval_steps`` (greedy pass@1 by default).
        processing_class: the tokenizer (object or name/path), when not the model's own.
        callbacks: ``transformers.TrainerCallback`` objects (or classes), as in TRL: ``on_init_end``,
            ``on_train_begin/end``, ``on_step_begin/end``, ``on_log`` (every ``logging_steps``), ``on_evaluate``,
            ``on_save`` with a ``TrainerState`` and a ``TrainerControl`` (``should_training_stop`` ends the
            run); or functions ``fn(row: dict)`` called with every metrics row as it is logged.
        peft_config: a ``peft.LoraConfig``: train LoRA adapters (``model.lora``).
        reward_weights: weights of ``reward_funcs`` (also ``OAPLConfig(reward_weights=...)``).
    """

    def __init__(
        self,
        model: Any = None,
        reward_funcs: Any = None,
        args: TrainConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        callbacks: Iterable[Callback] | None = None,
        peft_config: Any = None,
        reward_weights: list[float] | None = None,
    ) -> None:
        _refuse_in_worker_bootstrap("OAPLTrainer()")
        refuse_multi_process_launch()
        if args is None:
            args = OAPLConfig()
        if not isinstance(args, TrainConfig):
            raise TypeError(
                f"OAPLTrainer: args must be an OAPLConfig (or TrainConfig), not {type(args).__name__}; "
                "for a TRL GRPOConfig write OAPLConfig(...) with the same arguments (the names oapl "
                "maps: docs/coming-from-trl.md)"
            )
        extras = (
            {
                "num_train_epochs": args.num_train_epochs,
                "overwrite_output_dir": args.overwrite_output_dir,
                "logging_steps": args.logging_steps,
            }
            if isinstance(args, OAPLConfig)
            else {}
        )
        tree = args.model_dump(mode="json", exclude={"num_train_epochs", "overwrite_output_dir", "logging_steps"})
        if "steps" not in args.model_fields_set:
            del tree["steps"]  # unset: num_train_epochs (if given) decides
        m, task = tree["model"], tree["task"]
        model_fields(m, model, processing_class, peft_config)
        self._train_rows: int | None = None
        self._data_fields(task, train_dataset, eval_dataset)
        _reward_fields(task, reward_funcs, reward_weights)
        try:
            self.args = OAPLConfig(**tree, **extras)
        except ConfigError as e:
            raise ConfigError(str(e).replace("(in OAPLConfig)", "(in OAPLTrainer)")) from None
        self.config = _resolve_epochs(self.args, self._train_rows)
        self.callbacks, trl_callbacks = split_callbacks(callbacks)
        self.state = trainer_state(self.config, self.args.logging_steps)
        self._trl = TRLCallbacks(trl_callbacks, self.args, self.state, self._train_rows)
        self._result = None
        from oapl.preflight import check_config

        check_config(self.config)  # a wrong model or dataset name fails now, naming its field
        warn_if_never_synced(self.config)
        self._trl.event("on_init_end")

    def _data_fields(self, task: dict[str, Any], train_dataset: Any, eval_dataset: Any) -> None:
        """``task.dataset`` / ``task.eval_dataset`` from the datasets given (rows in memory become markers)."""
        from oapl.data import memory

        if train_dataset is not None:
            if task["name"] == "arithmetic":
                task["name"] = "dataset"
            task["dataset"] = self._source(train_dataset, "train_dataset")
            if task["name"] == "code" and memory.is_marker(task["dataset"]):
                raise UserError(
                    "train_dataset: task.name='code' reads DeepCoder-format data from a file or the Hub; "
                    "for rows in memory keep the default task and pass reward_funcs=[oapl.rewards."
                    "code_reward] with a 'tests' column"
                )
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                raise UserError("eval_dataset: one held-out dataset (a dict of several is not supported)")
            if task["name"] == "arithmetic":
                raise UserError(
                    "eval_dataset: the built-in arithmetic task has its own held-out split; pass a "
                    "train_dataset too, or set task.num_eval"
                )
            task["eval_dataset"] = self._source(eval_dataset, "eval_dataset")
            task["eval_benchmarks"] = []

    def _source(self, data: Any, role: str) -> str:
        from oapl.data import memory

        if isinstance(data, (str, os.PathLike)):
            return os.fspath(data)
        marker = memory.register_rows(data, role)
        if role == "train_dataset":
            self._train_rows = int(marker.split(":n=", 1)[1].split(":", 1)[0])
        return marker

    # -- TRL's methods ---------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Train; ``resume_from_checkpoint=True`` continues the run in ``output_dir`` from its newest intact
        checkpoint, ``resume_from_checkpoint=<path>`` from any checkpoint it keeps.

        Returns ``TrainOutput(global_step, training_loss, metrics)``; ``metrics`` holds the held-out
        results after training (``eval_pass@1``, ...) and ``train_runtime``.
        """
        resume = self._resume_flag(resume_from_checkpoint)
        self._trl.losses = []
        result = _run(
            self.config,
            resume=resume,
            overwrite=self.args.overwrite_output_dir,
            callbacks=[self._trl, *map(with_trl_names_callback, self.callbacks)],
            how_to=("train(resume_from_checkpoint=True)", "OAPLConfig(overwrite_output_dir=True)"),
        )
        self._result = result
        self.state.global_step = result.steps
        losses = self._trl.losses
        training_loss = sum(losses) / len(losses) if losses else float("nan")
        metrics: dict[str, float] = {}
        last = result.last_metrics or {}
        if "elapsed_s" in last:
            metrics["train_runtime"] = float(last["elapsed_s"])
        metrics["train_loss"] = training_loss
        self.state.log_history.append({**metrics, "step": result.steps})
        for k, v in (result.eval_after or {}).items():
            metrics[f"eval_{k.removeprefix('eval_')}"] = v
        return TrainOutput(result.steps, training_loss, metrics)

    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out results of the current model (the trained one after :meth:`train`), keys ``eval_pass@1``, ...

        ``eval_dataset`` (the same kinds as the trainer's) replaces the trainer's held-out prompts. Right
        after :meth:`train`, with no ``eval_dataset``, this is the evaluation the run made at its end.
        """
        cfg = self.config
        if eval_dataset is None and self._result is not None and self._result.eval_after:
            summary = dict(self._result.eval_after)
        else:
            if eval_dataset is not None:
                tree = cfg.model_dump(mode="json")
                tree["task"]["eval_dataset"] = self._source(eval_dataset, "eval_dataset")
                tree["task"]["eval_benchmarks"] = []
                if tree["task"]["name"] == "arithmetic":
                    raise UserError("eval_dataset: the built-in arithmetic task has its own held-out split")
                cfg = TrainConfig.model_validate(tree)
            summary = _evaluate(cfg, self._model_dir() if self._result is not None else None)
        return {
            f"{metric_key_prefix}_{k.removeprefix('eval_')}" if metric_key_prefix else k: v for k, v in summary.items()
        }

    def save_model(self, output_dir: str | Path | None = None, merged: bool = False) -> str:
        """Save the model (the trained one after :meth:`train`) and its tokenizer; returns the folder.

        Default folder: ``args.output_dir`` (as TRL). Full fine-tuning: a Hugging Face model folder. LoRA,
        as TRL (peft's ``save_pretrained``): the adapter in peft's layout at the folder's root
        (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer, so that
        ``PeftModel.from_pretrained(base, folder)`` loads it; ``merged=True`` exports the merged model
        instead (a plain Hugging Face folder, for vLLM, ``oapl eval`` or a Hub upload of full weights).
        """
        target = Path(output_dir or self.config.output_dir)
        target.mkdir(parents=True, exist_ok=True)
        if self._result is not None:
            from oapl.trainer.checkpoint import adapter_file

            ckpt = self._final_checkpoint()
            adapter = adapter_file(ckpt)
            if adapter is not None and not merged:  # peft's files (at the root; in adapter/ when older)
                for name in ("adapter_config.json", adapter.name):
                    shutil.copy2(adapter.parent / name, target / name)
                self._save_tokenizer(ckpt, target)
            else:
                shutil.copytree(self._model_dir(), target, dirs_exist_ok=True)
        else:
            from oapl.trainer.model import resolve_model_path

            path = resolve_model_path(self.config.model.name)
            if Path(path).is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:  # a Hub name: download and save
                from transformers import AutoModelForCausalLM, AutoTokenizer

                trc = self.config.model.trust_remote_code
                AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trc).save_pretrained(target)
                AutoTokenizer.from_pretrained(
                    self.config.model.tokenizer or path, trust_remote_code=trc
                ).save_pretrained(target)
        log.info("model saved to %s", target)
        return str(target)

    def push_to_hub(
        self,
        repo_id: str | None = None,
        commit_message: str = "End of training",
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the model (what :meth:`save_model` writes) to the Hub; returns the commit's URL.

        ``repo_id``: default the name of ``output_dir`` under your account (TRL's default). Only the model
        folder is uploaded, never the run's checkpoints. Offline, or without a token, it fails in one line.
        """
        from huggingface_hub import HfApi

        repo_id = repo_id or kwargs.pop("hub_model_id", None) or Path(self.config.output_dir).resolve().name
        with tempfile.TemporaryDirectory(prefix="oapl-push-") as tmp:
            folder = self.save_model(tmp)
            api = HfApi(token=token)
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
                )
            except Exception as e:  # noqa: BLE001 - network, auth, offline: one line that says which
                why = (str(e).strip().splitlines() or [""])[0][:300]
                raise UserError(
                    f"push_to_hub: cannot upload to the Hub repo {repo_id!r} ({type(e).__name__}: "
                    f"{why}); check the network, HF_HUB_OFFLINE and `hf auth login`; the model is "
                    f"in {self.config.output_dir} (save_model() writes it anywhere)"
                ) from e
        return str(getattr(info, "commit_url", info))

    # -- helpers ---------------------------------------------------------------------------------
    def _final_checkpoint(self) -> Path:
        from oapl.trainer.checkpoint import adapter_file, latest_checkpoint

        ckpt = latest_checkpoint(self.config.output_dir)
        if ckpt is None or not ((ckpt / "model").is_dir() or adapter_file(ckpt) is not None):
            raise UserError(
                f"output_dir: {self.config.output_dir} holds no checkpoint of the trained model "
                "(checkpoint.save_final was false); train with checkpoint={'save_final': True}"
            )
        return ckpt

    def _model_dir(self) -> Path:
        from oapl.trainer.checkpoint import checkpoint_model

        return checkpoint_model(self._final_checkpoint())  # a LoRA checkpoint's merged model is exported here, once

    def _save_tokenizer(self, ckpt: Path, target: Path) -> None:
        """The run's tokenizer beside an adapter (a LoRA checkpoint keeps it at its root)."""
        from oapl.config_views import load_config_tokenizer

        source = str(ckpt) if (ckpt / "tokenizer_config.json").is_file() else None
        load_config_tokenizer(self.config, source).save_pretrained(target)

    def _resume_flag(self, resume_from_checkpoint: bool | str | None) -> bool | str:
        """``True`` (the newest intact checkpoint) or the path of the kept checkpoint to resume from."""
        if resume_from_checkpoint is None or isinstance(resume_from_checkpoint, bool):
            return bool(resume_from_checkpoint)
        from oapl.trainer.checkpoint import checkpoint_dir, list_checkpoints

        wanted = Path(resume_from_checkpoint).resolve()
        run = Path(self.config.output_dir).resolve()
        if wanted == run:
            return True
        kept = list_checkpoints(run)
        if wanted.parent == checkpoint_dir(run) and any(p.resolve() == wanted for p in kept):
            return str(wanted)
        raise UserError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: not a checkpoint of this run; "
            f"kept ones in {checkpoint_dir(run)}: {', '.join(p.name for p in kept) or 'none'} "
            "(or pass True for the newest intact one)"
        )


# -- shared pieces ---------------------------------------------------------------------------------
def _refuse_in_worker_bootstrap(what: str) -> None:
    """Fail at once inside a worker process that re-imports an unguarded script (see oapl.rewards.math)."""
    from oapl.rewards.math import GUARD_HINT, bootstrapping

    if bootstrapping():
        raise RuntimeError(
            f"{what} ran while this process was starting as a multiprocessing worker, which "
            f"re-imports the main script: {GUARD_HINT}"
        )


def _resolve_epochs(cfg: TrainConfig, train_rows: int | None) -> TrainConfig:
    """The plain ``TrainConfig``; ``num_train_epochs`` (when ``max_steps`` is unset) becomes ``steps``."""
    epochs = getattr(cfg, "num_train_epochs", None)
    explicit_steps = "steps" in cfg.model_fields_set
    plain = cfg.to_train_config() if isinstance(cfg, OAPLConfig) else cfg
    if epochs is None or explicit_steps:
        return plain
    n = train_rows
    if n is None:
        from oapl.data.tasks import build_task

        n = len(build_task(plain.task, plain.seed).train)
    elif plain.task.max_prompts:
        n = min(n, plain.task.max_prompts)
    steps = max(1, math.ceil(epochs * n / plain.rollout.prompts_per_step))
    log.info(
        "num_train_epochs=%g over %d training prompts, %d per step: %d steps",
        epochs,
        n,
        plain.rollout.prompts_per_step,
        steps,
    )
    tree = plain.model_dump(mode="json")
    tree["steps"] = steps
    return TrainConfig.model_validate(tree)


def _run(cfg: TrainConfig, *, resume: bool | str, overwrite: bool, callbacks: list[Callback], how_to: tuple[str, str]):
    from oapl import loop
    from oapl.preflight import check_config
    from oapl.rundir import check_run_dir

    if resume and overwrite:
        raise UserError(f"{how_to[0]} continues the run in output_dir and {how_to[1]} replaces it: pass one")
    try:
        check_run_dir(cfg.output_dir, resume=resume, overwrite=overwrite)  # before any slow loading
    except RunDirError as e:
        if "is not empty" not in str(e):
            raise
        raise RunDirError(
            str(e).split("; pass", 1)[0] + f"; pass {how_to[0]} to continue that run, {how_to[1]} "
            "to replace it, or another output_dir"
        ) from None
    check_config(cfg)  # a resume that changes the run is refused by oapl.rundir.check_resume_config
    try:
        return loop.train(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks)
    except RuntimeError as e:
        # "the rollout worker failed" because of the user's reward or data: raise what to fix
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from e
        raise


def _evaluate(cfg: TrainConfig, model_dir: Path | None) -> dict[str, float]:
    """Generate on the held-out prompts of ``cfg`` with the model in ``model_dir`` (default: model.name)."""
    from oapl.config_views import eval_sampling_params, load_config_tokenizer
    from oapl.data.tasks import build_task
    from oapl.engines.factory import make_engine
    from oapl.evaluation.heldout import evaluate
    from oapl.trainer.model import resolve_model_path

    task = build_task(cfg.task, cfg.seed)
    if not task.eval:
        raise UserError(
            "eval_dataset: there are no held-out prompts to evaluate on; pass eval_dataset= (to "
            "evaluate() or OAPLTrainer)"
        )
    path = str(model_dir) if model_dir is not None else resolve_model_path(cfg.model.name)
    tokenizer = load_config_tokenizer(cfg, None if model_dir is None else str(model_dir))
    params = eval_sampling_params(cfg)
    engine = make_engine(cfg, path, tokenizer)
    try:
        summary, _ = evaluate(engine, task, tokenizer, params)
    finally:
        engine.close()
        close = getattr(task.reward_fn, "close", None)
        if callable(close):
            close()
    return summary


def _reward_fields(task: dict[str, Any], reward_funcs: Any, reward_weights: list[float] | None) -> None:
    """``task.reward`` / ``task.reward_weights`` from the trainer's ``reward_funcs`` and ``reward_weights``."""
    from oapl.data import memory

    if reward_funcs is not None:
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise UserError("reward_funcs: an empty list; give at least one reward function")
        task["reward"] = [memory.reward_spec(fn, f"reward_funcs[{i}]") for i, fn in enumerate(funcs)]
    elif task["name"] == "dataset" and not task.get("reward"):
        raise UserError(
            "reward_funcs: required with a train_dataset: oapl.rewards.math_reward, "
            "oapl.rewards.code_reward, or your own fn(prompts, completions, **columns) -> list[float]"
        )
    if reward_weights is not None:
        weights = [float(w) for w in reward_weights]
        if task.get("reward_weights") not in (None, weights):
            raise UserError(
                f"reward_weights={weights} and args.reward_weights={task['reward_weights']} differ; give one"
            )
        task["reward_weights"] = weights
