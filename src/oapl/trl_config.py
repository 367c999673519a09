"""``OAPLConfig``: oapl's :class:`~oapl.config.TrainConfig`, also spoken in TRL's ``GRPOConfig`` names.

``OAPLConfig(learning_rate=1e-5, num_generations=8, max_completion_length=256, ...)`` sets the same
nested fields as ``TrainConfig(optim={"lr": 1e-5}, rollout={"group_size": 8}, ...)``. Where TRL has
the same concept the TRL name is accepted (:data:`TRL_FIELDS`, in :mod:`oapl.trl_names`; the table
in docs/coming-from-trl.md is generated from it); every oapl field is also accepted nested
(``optim={"lr": 1e-5}``) or dotted (``**{"algorithm.beta2": 1e-3}``). A TRL name whose value
would change what oapl cannot do is refused with the reason (``beta=0.04``: oapl has no frozen
reference model); at the value that means what oapl does anyway (``beta=0.0``) it is accepted. Any
other name is refused with the nearest valid name.

The result is a ``TrainConfig`` (a subclass): ``oapl.train`` and the CLI's ``config.yaml`` see only
the nested fields.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from typing import Any, Optional, cast

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, model_validator

from oapl.config import ConfigError, TrainConfig, format_errors
from oapl.config_views import get_dotted, set_dotted
from oapl.trl_names import TRL_DEFAULTS, TRL_FIELDS, TRL_NOOP, TRL_READ, TRL_TABLE, UNSET, TRLField, docs_table

_MISSING = object()


_EXTRA = (
    "num_train_epochs",
    "overwrite_output_dir",
    "logging_steps",
)  # OAPLConfig's own fields (not written to config.yaml)


def _leaf_fields(cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_leaf_fields(ann, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def _trl_argument_names() -> set[str]:
    """Names of TRL's GRPOConfig / transformers' TrainingArguments (only when a name is unknown: slow import)."""
    import dataclasses

    names: set[str] = set()
    for mod, cls in (("trl", "GRPOConfig"), ("transformers", "TrainingArguments")):
        try:
            import importlib

            names |= {f.name for f in dataclasses.fields(getattr(importlib.import_module(mod), cls))}
        except Exception:  # noqa: BLE001 - not installed / not importable: no such hint
            continue
    return names


def suggest(name: str) -> str:
    """``did you mean ...`` for an unknown ``OAPLConfig`` name (TRL names, oapl fields, dotted fields)."""
    leaves = _leaf_fields()
    by_leaf: dict[str, list[str]] = {}
    for dotted in leaves:
        by_leaf.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    trl_for = {f.target: f.name for f in TRL_FIELDS.values()}
    if name in by_leaf:  # an oapl field given without its section: lr, group_size, beta2
        dotted = by_leaf[name][0]
        trl = trl_for.get(dotted)
        return f"did you mean {trl!r} ({dotted})?" if trl else f"did you mean {dotted!r}?"
    candidates = list(TRL_FIELDS) + list(TrainConfig.model_fields) + leaves + list(by_leaf)
    near = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not near:
        return ""
    hit = near[0]
    if hit in by_leaf and hit not in TRL_FIELDS and hit not in TrainConfig.model_fields:
        hit = by_leaf[hit][0]
    return f"did you mean {hit!r}?"


def _unknown(name: str) -> ValueError:
    if name in _trl_argument_names():
        what, hint = "a TRL/transformers training argument with no oapl equivalent", ""
    else:
        what, hint = "an unknown field", suggest(name)
    return ValueError(
        f"{name!r} is {what}"
        + (f"; {hint}" if hint else "")
        + " (oapl fields go nested, optim={'lr': 1e-5}, or dotted, **{'optim.lr': 1e-5}; "
        "the TRL names oapl maps are in docs/coming-from-trl.md)"
    )


def _same(value: Any, allowed: Any) -> bool:
    """``value`` is ``allowed`` (``False`` is not ``0``; ``0`` is ``0.0``)."""
    if value is allowed:
        return True
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return False
    return value == allowed


def _set(tree: dict, dotted: str, value: Any, source: str, sources: dict[str, str]) -> None:
    """Set ``dotted``; a different value set by another name (or given nested) is a conflict."""
    current = get_dotted(tree, dotted, _MISSING)
    if current is not _MISSING and current != value:
        other = sources.get(dotted, dotted)
        raise ValueError(f"{source}={value!r} and {other} (={current!r}) both set {dotted}; give one")
    set_dotted(tree, dotted, value)  # a ConfigError (a ValueError) when a key on the way is not a section
    sources.setdefault(dotted, source)


def _default(dotted: str) -> Any:
    node: Any = TrainConfig
    parts = dotted.split(".")
    for key in parts[:-1]:
        node = node.model_fields[key].annotation
    return node.model_fields[parts[-1]].get_default(call_default_factory=True)


def _value(tree: dict, dotted: str) -> Any:
    got = get_dotted(tree, dotted, _MISSING)
    return _default(dotted) if got is _MISSING else got


def _int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return int(value)


def _steps_or_share(name: str, value: Any, tree: dict, given: dict) -> int:
    """An interval in steps; a float in (0, 1) is a share of the run (TRL/transformers), needing max_steps."""
    if isinstance(value, float) and 0 < value < 1:
        steps = get_dotted(tree, "steps", _MISSING)
        if steps is _MISSING:
            if given.get("num_train_epochs") is not None:
                raise ValueError(
                    f"{name}={value} is a share of the run, which is only known once "
                    f"num_train_epochs is counted; give max_steps, or {name} in steps"
                )
            steps = _default("steps")
        return max(1, math.ceil(value * steps))
    return _int(name, value)


class _Translation:
    """The ``TrainConfig`` tree being built from ``OAPLConfig``'s arguments, with who set each field.

    ``given``: the TRL names given (mapped ones, :data:`TRL_FIELDS`), for the steps below to translate.
    """

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.given: dict[str, Any] = {}

    def put(self, dotted: str, value: Any, source: str) -> None:
        _set(self.tree, dotted, value, source, self.sources)

    def get(self, dotted: str) -> Any:
        return get_dotted(self.tree, dotted, _MISSING)


def _translate(data: dict[str, Any], defaults: bool = True) -> dict[str, Any]:
    """The nested ``TrainConfig`` tree for ``OAPLConfig`` keyword arguments (TRL names, nested, dotted).

    ``defaults``: apply TRL's defaults where neither the TRL name nor the oapl field is given (at
    construction; not when one name is set on an existing config).
    """
    t = _sort_arguments(data)
    for name, f in TRL_FIELDS.items():
        if f.simple and name in t.given:
            t.put(f.target, t.given[name], name)
    _steps_and_optimiser(t, defaults)
    _batch(t, defaults)
    _engine_and_algorithm(t)
    _evaluation_and_checkpoints(t)
    _logging(t)
    return t.tree


def _sort_arguments(data: dict[str, Any]) -> _Translation:
    """oapl fields (nested or dotted) into the tree; mapped TRL names into ``given``; accepted-only TRL
    names checked; anything else refused with the nearest valid name."""
    t = _Translation()
    tree, sources = t.tree, t.sources
    leaves = set(_leaf_fields())
    for key, value in data.items():
        if value is UNSET or value is None and key in TRL_TABLE:
            continue  # TRL's "unset" (what HfArgumentParser passes for a name not on the command line)
        if key in TrainConfig.model_fields or key in _EXTRA:
            if isinstance(value, BaseModel):
                value = value.model_dump(exclude_unset=True)
            if key == "algorithm" and isinstance(value, str):  # OAPLConfig(algorithm="grpo")
                value = {"name": value}
            if isinstance(value, dict) and isinstance(tree.get(key), dict):
                for k, v in value.items():
                    _set(tree, f"{key}.{k}", copy.deepcopy(v), f"{key}.{k}", sources)
            else:
                tree[key] = copy.deepcopy(value)
                sources[key] = key
        elif "." in key:
            if key not in leaves and not any(d.startswith(key + ".") for d in leaves):
                raise _unknown(key)
            _set(tree, key, value, key, sources)
        elif key in TRL_FIELDS:
            t.given[key] = value
        elif key in TRL_NOOP:
            values, reason = TRL_NOOP[key]
            if not any(_same(value, v) for v in values):
                raise ValueError(f"{key}={value!r} is not supported: {reason}")
        else:
            raise _unknown(key)
    return t


def _steps_and_optimiser(t: _Translation, defaults: bool) -> None:
    """``max_steps``, the learning-rate schedule and warm-up, Adam's betas, gradient clipping."""
    given, put = t.given, t.put
    # TRL's default schedule, where neither the TRL name nor the oapl field is given
    if defaults and "lr_scheduler_type" not in given and t.get("optim.schedule") is _MISSING:
        given["lr_scheduler_type"] = TRL_DEFAULTS["lr_scheduler_type"]
    max_steps = given.get("max_steps")
    if max_steps is not None and max_steps != -1:  # TRL's -1: "use num_train_epochs"
        put("steps", _int("max_steps", max_steps, 1), "max_steps")
    if "lr_scheduler_type" in given:
        kind = str(getattr(given["lr_scheduler_type"], "value", given["lr_scheduler_type"]))
        schedules = {
            "linear": "linear",
            "constant": "constant",
            "constant_with_warmup": "constant",
            "cosine": "cosine",
            "cosine_with_min_lr": "cosine",
        }
        if kind not in schedules:
            raise ValueError(
                f"lr_scheduler_type={kind!r} is not supported: oapl has linear, constant "
                f"(constant, constant_with_warmup) and cosine (cosine, cosine_with_min_lr) schedules"
            )
        put("optim.schedule", schedules[kind], "lr_scheduler_type")
    if "warmup_steps" in given:
        w = given["warmup_steps"]
        if isinstance(w, float) and 0 < w < 1:
            put("optim.warmup_ratio", w, "warmup_steps")
        else:
            put("optim.warmup_steps", _int("warmup_steps", w), "warmup_steps")
    if "adam_beta1" in given or "adam_beta2" in given:
        b1, b2 = _value(t.tree, "optim.betas")
        put(
            "optim.betas",
            (float(given.get("adam_beta1", b1)), float(given.get("adam_beta2", b2))),
            "adam_beta1/adam_beta2",
        )
    if "max_grad_norm" in given:
        g = given["max_grad_norm"]
        put("optim.max_grad_norm", None if g in (None, 0, 0.0) else g, "max_grad_norm")


def _batch(t: _Translation, defaults: bool) -> None:
    """Completions per step and per forward/backward, and per engine call, in whole groups of ``num_generations``."""
    given, put = t.given, t.put
    group = _value(t.tree, "rollout.group_size")
    batch_names = {"per_device_train_batch_size", "gradient_accumulation_steps"} & set(given)
    if batch_names or defaults and t.get("rollout.prompts_per_step") is _MISSING:
        # unset: TRL's per_device_train_batch_size=8, gradient_accumulation_steps=1 (8 completions per step)
        micro = t.get("optim.micro_batch_size")
        per_device = _int(
            "per_device_train_batch_size",
            given.get(
                "per_device_train_batch_size",
                micro if batch_names and micro is not _MISSING else TRL_DEFAULTS["per_device_train_batch_size"],
            ),
            1,
        )
        accumulation = _int(
            "gradient_accumulation_steps",
            given.get("gradient_accumulation_steps", TRL_DEFAULTS["gradient_accumulation_steps"]),
            1,
        )
        total = per_device * accumulation
        if total % group:
            unset = "" if batch_names else " (TRL's defaults, as neither is given)"
            raise ValueError(
                f"OAPLConfig: per_device_train_batch_size x gradient_accumulation_steps = {per_device} x "
                f"{accumulation} = {total} completions per step{unset} is not a multiple of num_generations = "
                f"{group}: a step takes whole groups of responses to one prompt (TRL requires the same)"
            )
        put("rollout.prompts_per_step", total // group, "per_device_train_batch_size x gradient_accumulation_steps")
        if "per_device_train_batch_size" in given or micro is _MISSING:
            put("optim.micro_batch_size", per_device, "per_device_train_batch_size")
    if (
        defaults
        and "generation_batch_size" not in given
        and t.get("rollout.prompts_per_generate") is _MISSING
        and t.get("rollout.prompts_per_step") is not _MISSING
    ):
        # TRL: one generation batch per optimiser step (per_device_train_batch_size x gradient_accumulation_steps)
        put("rollout.prompts_per_generate", t.get("rollout.prompts_per_step"), "generation_batch_size")
    if given.get("generation_batch_size") is not None:
        gen = _int("generation_batch_size", given["generation_batch_size"], 1)
        if gen % group:
            raise ValueError(
                f"generation_batch_size={gen} is not a multiple of num_generations = "
                f"{group} (the engine generates whole groups)"
            )
        put("rollout.prompts_per_generate", gen // group, "generation_batch_size")


def _engine_and_algorithm(t: _Translation) -> None:
    """``use_vllm``, ``use_cpu``, ``bf16``; ``scale_rewards`` and the importance-sampling correction (GRPO)."""
    given, put = t.given, t.put
    if "use_vllm" in given:
        put("engine.kind", "vllm" if given["use_vllm"] else "transformers", "use_vllm")
    if given.get("use_cpu"):
        put("model.device", "cpu", "use_cpu")
    if "bf16" in given and given["bf16"] is not None:
        put("model.compute_dtype", "bfloat16" if given["bf16"] else "float32", "bf16")
    if "scale_rewards" in given:
        s = given["scale_rewards"]
        if s in (True, "group"):
            put("algorithm.scale_advantages", True, "scale_rewards")
        elif s in (False, "none", None):
            put("algorithm.scale_advantages", False, "scale_rewards")
        else:
            raise ValueError(
                f"scale_rewards={s!r} is not supported: advantages are scaled by their "
                "group's std ('group'/True) or not at all ('none'/False)"
            )
    if "vllm_importance_sampling_correction" in given and not given["vllm_importance_sampling_correction"]:
        put("algorithm.is_cap", None, "vllm_importance_sampling_correction")


def _strategy(given: dict[str, Any], name: str) -> str | None:
    """An ``IntervalStrategy`` (or its string) as a string; ``None`` when not given."""
    strategy = given.get(name)
    return None if strategy is None else str(getattr(strategy, "value", strategy))


def _evaluation_and_checkpoints(t: _Translation) -> None:
    """``eval_strategy`` / ``eval_steps`` / ``eval_on_start`` and ``save_strategy`` / ``save_steps``."""
    tree, given, put = t.tree, t.given, t.put
    strategy = _strategy(given, "eval_strategy")
    if strategy == "no":
        put("eval.every", 0, "eval_strategy")
        if "eval_on_start" not in given:
            put("eval.at_start", False, "eval_strategy")
        put("eval.at_end", False, "eval_strategy")
    elif strategy not in (None, "steps"):
        raise ValueError(
            f"eval_strategy={strategy!r} is not supported: use 'steps' (with "
            "eval_steps) or 'no'; oapl has no epochs of a fixed dataset"
        )
    every = given.get("eval_steps")
    if every is None and strategy == "steps":
        every = tree.get("logging_steps", TRL_DEFAULTS["logging_steps"])  # transformers' default
    if every is not None and strategy != "no":
        put("eval.every", _steps_or_share("eval_steps", every, tree, given), "eval_steps")
    strategy = _strategy(given, "save_strategy")
    if strategy == "no":
        put("checkpoint.every", 0, "save_strategy")
    elif strategy not in (None, "steps"):
        raise ValueError(f"save_strategy={strategy!r} is not supported: use 'steps' (with save_steps) or 'no'")
    if given.get("save_steps") is not None and strategy != "no":
        put("checkpoint.every", _steps_or_share("save_steps", given["save_steps"], tree, given), "save_steps")


def _logging(t: _Translation) -> None:
    """``log_completions``, ``report_to``, ``disable_tqdm``."""
    tree, given, put = t.tree, t.given, t.put
    if "log_completions" in given:
        every = tree.get("logging_steps", TRL_DEFAULTS["logging_steps"])
        every = _steps_or_share("logging_steps", every, tree, given)
        put("logging.log_samples_every", every if given["log_completions"] else 0, "log_completions")
    if "report_to" in given:
        report = given["report_to"]
        names = [] if report in (None, "none") else [report] if isinstance(report, str) else list(report)
        if "all" in names:
            names = ["tensorboard", "wandb"]
        unknown = [n for n in names if n not in ("tensorboard", "wandb", "none")]
        if unknown:
            raise ValueError(
                f"report_to={report!r}: oapl reports to tensorboard and wandb (and "
                f"always metrics.jsonl), not {', '.join(map(repr, unknown))}"
            )
        put("logging.tensorboard", "tensorboard" in names, "report_to")
        put("logging.wandb", "wandb" in names, "report_to")
    if "disable_tqdm" in given and given["disable_tqdm"] is not None:
        put("logging.progress", not given["disable_tqdm"], "disable_tqdm")


def _rename(message: str, data: dict[str, Any]) -> str:
    """Name the TRL argument the user gave next to the oapl field an error is about."""
    for name in data:
        field = TRL_FIELDS.get(name)
        if field is None:
            continue
        for target in field.target.replace("[0]", "").replace("[1]", "").split(", "):
            if f"{target}:" in message and f"({name})" not in message:
                message = message.replace(f"{target}:", f"{name} ({target}):", 1)
    return message


class OAPLConfig(TrainConfig):
    """oapl's configuration with TRL's ``GRPOConfig`` names (see the module docstring).

    ``OAPLConfig(output_dir="runs/x", learning_rate=1e-5, num_generations=8, max_steps=100)`` is
    ``TrainConfig`` with ``optim.lr``, ``rollout.group_size`` and ``steps`` set. Read the nested fields
    (``cfg.optim.lr``) or the TRL names (``cfg.learning_rate``); setting a TRL name after construction
    (``cfg.max_steps = 8``) means what it means at construction. ``HfArgumentParser(OAPLConfig)`` and
    TRL's ``TrlParser`` parse it: every TRL name of :data:`TRL_TABLE`, and oapl's own fields dotted
    (``--algorithm.beta2 0.05``).
    """

    num_train_epochs: float | None = Field(
        None,
        gt=0,
        exclude=True,
        description=("Passes over the training prompts; OAPLTrainer turns it into steps (max_steps wins)."),
    )
    overwrite_output_dir: bool = Field(
        False, exclude=True, description=("Replace the run in a non-empty output_dir (oapl train --overwrite).")
    )
    logging_steps: float = Field(
        TRL_DEFAULTS["logging_steps"],
        gt=0,
        exclude=True,
        description=(
            "TrainerCallback.on_log and trainer.state.log_history every this many steps (TRL's logging_steps)."
        ),
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_rename(format_errors(e, "OAPLConfig"), data)) from None

    @model_validator(mode="before")
    @classmethod
    def _trl_names(cls, data: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None:  # an assignment (cfg.seed = 3): pydantic passes the fields as they are
            return data
        return _translate(dict(data)) if isinstance(data, dict) else data

    def to_train_config(self) -> TrainConfig:
        """The plain :class:`TrainConfig` (what is written to ``config.yaml``)."""
        return TrainConfig.model_validate(self.model_dump(mode="json"))

    def __getattr__(self, name: str) -> Any:
        if "." in name and not name.startswith("_"):  # a dotted oapl field (HfArgumentParser's names)
            return _attribute(self, name)
        return super().__getattr__(name)  # type: ignore[misc]

    def _set_trl(self, name: str, value: Any) -> None:
        """``cfg.<TRL name> = value``: the construction's translation of that one name, applied to the fields."""
        context: dict[str, Any] = {}
        if name in ("per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size"):
            context["rollout"] = {"group_size": self.rollout.group_size}
            if name != "generation_batch_size":
                context["per_device_train_batch_size"] = self.optim.micro_batch_size
                context["gradient_accumulation_steps"] = _trl_get(self, "gradient_accumulation_steps")
        if name in ("eval_steps", "save_steps", "logging_steps", "log_completions"):
            context["steps"] = self.steps
        try:
            tree = _translate({**context, name: value}, defaults=False)
        except ValueError as e:
            raise ConfigError(f"{e} (in OAPLConfig)") from None
        for dotted, leaf in _leaves(tree):
            if dotted in ("steps", "rollout.group_size") and context:
                continue  # context for the translation, not what is being set
            section, _, last = dotted.rpartition(".")
            setattr(_attribute(self, section) if section else self, last, leaf)


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and k in TrainConfig.model_fields:
            out.extend(_leaves(v, f"{prefix}{k}."))
        elif isinstance(v, dict) and prefix:
            out.extend(_leaves(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _trl_get(cfg: OAPLConfig, name: str) -> Any:
    f = TRL_TABLE[name]
    if name in TRL_READ:
        return TRL_READ[name](cfg)
    if f.accepted is not None:
        return f.accepted[0] if f.accepted else None
    return _attribute(cfg, f.target)


def _attribute(obj: Any, dotted: str) -> Any:
    """``obj.a.b.c`` for ``dotted`` = ``a.b.c`` (a field of a config's section)."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _trl_property(name: str) -> property:
    return property(
        lambda self: _trl_get(self, name),
        lambda self, v: self._set_trl(name, v),
        doc=f"TRL's ``{name}``: {TRL_TABLE[name].note or TRL_TABLE[name].target}",
    )


for _name in TRL_TABLE:
    if _name not in OAPLConfig.model_fields:  # output_dir, seed, ...: the fields themselves
        setattr(OAPLConfig, _name, _trl_property(_name))


def _parser_fields() -> dict[str, dataclasses.Field]:
    """``OAPLConfig``'s arguments as dataclass fields, for ``HfArgumentParser``/``TrlParser`` (default
    :data:`UNSET`, so only what the command line gives reaches ``OAPLConfig``)."""
    import types
    import typing

    out: dict[str, dataclasses.Field] = {}

    def add(name: str, typ: Any, help_: str) -> None:
        f = cast(dataclasses.Field, dataclasses.field(default=UNSET, metadata={"help": help_}))
        f.name, f.type = name, typ
        f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
        out[name] = f

    for f in TRL_TABLE.values():
        note = f.note if f.accepted is None else f"accepted only as {f.accepted}: {f.note}"
        add(f.name, f.type, (f"-> {f.target}. " if f.target else "") + note)
    node_types: list[tuple[str, type[BaseModel]]] = [("", TrainConfig)]
    while node_types:
        prefix, cls = node_types.pop(0)
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                node_types.append((f"{prefix}{name}.", ann))
                continue
            dotted = f"{prefix}{name}"
            if dotted in out or not prefix:
                continue
            args = (
                [a for a in typing.get_args(ann) if a is not type(None)]
                if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union
                else [ann]
            )
            if len(args) == 1 and args[0] in (int, float, str, bool):
                add(dotted, Optional[args[0]], field.description or "")  # noqa: UP045 - a runtime type for argparse
            elif len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
                help_ = (field.description or "") + f" One of {typing.get_args(args[0])}."
                add(dotted, Optional[str], help_)  # noqa: UP045
    return out


_PARSER_FIELDS = _parser_fields()
OAPLConfig.__dataclass_fields__ = _PARSER_FIELDS  # type: ignore[attr-defined]
OAPLConfig.__annotations__.update({n: f.type for n, f in _PARSER_FIELDS.items() if n not in OAPLConfig.__annotations__})


def warn_if_never_synced(cfg: TrainConfig) -> bool:
    """Warn when the run is too short for a weight sync (``steps <= L``): the sampler never changes."""
    if cfg.offline.data or cfg.rollout.sync_interval < cfg.steps:
        return False
    import logging

    logging.getLogger("oapl").warning(
        "max_steps=%d <= weight_sync_steps=%d (L, rollout.sync_interval; oapl's default 50): the engine samples "
        "with the initial weights for the whole run; set weight_sync_steps below max_steps (a few syncs per "
        'run; docs/coming-from-trl.md, "Choosing L and beta2")',
        cfg.steps,
        cfg.rollout.sync_interval,
    )
    return True


__all__ = [
    "OAPLConfig",
    "TRL_DEFAULTS",
    "TRL_FIELDS",
    "TRL_NOOP",
    "TRL_TABLE",
    "TRLField",
    "UNSET",
    "docs_table",
    "suggest",
    "warn_if_never_synced",
]
