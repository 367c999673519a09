"""One typed configuration for every command, from YAML plus ``key=value`` overrides.

Every field has a description; ``oapl train --help`` prints them all. Unknown keys and bad values
raise :class:`ConfigError` naming the field (``optim.lr``, ``rollout.group_size``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from oapl.config_sections import (
    TASK_NAMES,
    AlgorithmConfig,
    CheckpointConfig,
    DistributedConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OfflineConfig,
    Operation,
    OptimConfig,
    RolloutConfig,
    SamplingConfig,
    Section,
    TaskConfig,
)
from oapl.config_views import set_dotted
from oapl.errors import UserError


class ConfigError(UserError):
    """A configuration problem; the message names the field."""


__all__ = [
    "TASK_NAMES",
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DistributedConfig",
    "EngineConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OfflineConfig",
    "Operation",
    "OptimConfig",
    "RolloutConfig",
    "SamplingConfig",
    "Section",
    "TaskConfig",
    "TrainConfig",
    "config_yaml",
    "describe_fields",
    "format_errors",
    "load_config",
    "read_yaml",
    "save_config",
]


class TrainConfig(Section):
    """The whole run."""

    output_dir: str = Field("runs/oapl", description="Run directory: config, metrics.jsonl, checkpoints.")
    seed: int = Field(0, description="Seed for prompts, sampling and initialisation.")
    steps: int = Field(100, ge=1, description="Trainer steps.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    offline: OfflineConfig = Field(default_factory=OfflineConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.algorithm.name == "oapl" and self.sampling.top_p < 1.0:
            raise ValueError(
                "sampling.top_p must be 1.0 for OAPL training: the trainer's log-probs "
                "must be of the distribution the engine sampled from"
            )
        if self.engine.enable_sleep_mode and self.rollout.asynchronous:
            raise ValueError(
                "engine.enable_sleep_mode needs rollout.asynchronous=false: an engine that "
                "generates while the trainer trains cannot sleep"
            )
        if self.algorithm.name == "oapl" and self.rollout.max_staleness != 0:
            raise ValueError(
                "rollout.max_staleness must be 0 for OAPL: V* must come from one weight "
                "version, so the buffer is cleared at every sync"
            )
        if self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size={self.rollout.group_size}: {self.algorithm.name.upper()} needs at least 2 "
                "responses per prompt; with 1 every gradient is exactly 0 (OAPL's V* of one sample is its own "
                "reward, so r - V* = 0; GRPO's group-relative advantage is 0)"
            )
        if self.sampling.temperature == 0:
            raise ValueError(
                f"sampling.temperature=0: {self.algorithm.name.upper()} needs sampled responses; greedy decoding "
                "gives the G responses of a prompt the same text and reward, so every advantage is exactly 0 "
                "and nothing is learned (as with rollout.group_size=1); use a temperature > 0 (1.0 samples "
                "the policy itself). eval.temperature=0 (greedy evaluation) is fine"
            )
        if self.algorithm.mini_batches > self.rollout.prompts_per_step:
            raise ValueError(
                f"algorithm.mini_batches={self.algorithm.mini_batches} needs at least that many prompt groups per "
                f"batch, but rollout.prompts_per_step={self.rollout.prompts_per_step}: a mini-batch is whole "
                "groups (a group's advantages share its baseline); raise rollout.prompts_per_step"
            )
        if self.optim.share_prompts == "on" and self.model.gradient_checkpointing:
            raise ValueError(
                "optim.share_prompts=on needs model.gradient_checkpointing=false: the shared prompt's KV "
                "cache cannot be rebuilt by a recomputed layer; use optim.share_prompts=auto or off"
            )
        self._check_budgets_and_data()
        return self

    def _check_budgets_and_data(self) -> None:
        """Refuse what the engine would silently change, and held-out settings that cannot both hold."""
        if self.algorithm.name == "grpo" and self.algorithm.is_cap is not None and self.sampling.top_p < 1.0:
            raise ValueError(
                f"sampling.top_p={self.sampling.top_p} with GRPO's importance-sampling correction "
                f"(algorithm.is_cap={self.algorithm.is_cap}): the weight pi_old/pi_inf compares the trainer's "
                "full-distribution log-probs with the engine's top-p-truncated ones; use sampling.top_p=1.0 "
                "(or algorithm.is_cap=null for no correction)"
            )
        limit = self.engine.max_model_len
        if limit is not None:
            # a prompt has at least one token, so max_tokens must leave room for it (an unset
            # eval.max_tokens is sampling.max_tokens, checked as such)
            for name, value in (
                ("sampling.max_tokens", self.sampling.max_tokens),
                ("eval.max_tokens", self.eval.max_tokens),
            ):
                if value is not None and value >= limit:
                    raise ValueError(
                        f"{name}={value} does not fit engine.max_model_len={limit} (prompt + response): vLLM "
                        f"would stop every response at {limit} tokens minus its prompt; raise "
                        f"engine.max_model_len to {value} plus the longest prompt, or lower {name}"
                    )
        task = self.task
        if task.eval_benchmarks:
            from oapl.data.benchmarks import BENCHMARKS

            unknown = [b for b in task.eval_benchmarks if b not in BENCHMARKS]
            if unknown:
                raise ValueError(
                    f"task.eval_benchmarks: unknown benchmark(s) {unknown}; known: {', '.join(sorted(BENCHMARKS))}"
                )
            if task.eval_dataset is not None:
                raise ValueError(
                    f"task.eval_benchmarks={task.eval_benchmarks} and task.eval_dataset="
                    f"{task.eval_dataset!r} both name the held-out set; set only one"
                )
            if task.name not in ("math", "dataset"):
                raise ValueError(f"task.eval_benchmarks needs task.name=math or dataset (got {task.name!r})")


def _parse_value(raw: str) -> Any:
    """``key=value`` values are YAML scalars/lists: 1e-6, true, null, [a, b], "text"."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        # a whole-config check (loc "(root)") names its fields itself; echoing the whole input hides it
        if not e["loc"]:
            lines.append(msg)
            continue
        bare = e["type"] == "missing"
        lines.append(f"{loc}: {msg}" if bare else f"{loc}: {msg} (got {e.get('input')!r})")
    if len(lines) == 1:  # one mistake: one line, `oapl: <field>: <why> (in <source>)`
        return f"{lines[0]} (in {source})"
    return f"invalid configuration ({source}): " + "; ".join(lines)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a file that is not UTF-8 or not YAML is a :class:`ConfigError` naming
    the file and where (byte offset, or line and column)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} (line "
            f"{line}); save the file as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(str(what).split())}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[BaseModel] = TrainConfig
) -> Any:
    """Read YAML (optional) and apply ``a.b=value`` overrides, then validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of fields")
        tree = loaded or {}
        source = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), _parse_value(raw))
    if overrides:
        source += " + overrides"
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically): what ``load_config(path)`` reads back."""
    from oapl.atomic import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))


def config_yaml(cfg: BaseModel) -> str:
    """``cfg`` as YAML text (the form saved in run directories and checkpoints)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def describe_fields(cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted name, default, description)`` for every leaf field; used by ``--help``."""
    rows = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", json.dumps(default, default=str), field.description or ""))
    return rows
