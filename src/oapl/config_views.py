"""What a :class:`~oapl.config.TrainConfig` implies, each decided in one place.

Several parts of the library need the same objects derived from a config: the sampling parameters of
training and of evaluation, the tokenizer, whether the run is offline, a value at a dotted key of a
config tree. Each is made here, so that a change to one of those rules is one change.

This module sits beside :mod:`oapl.config` rather than inside it or the packages that own the
objects (engines, trainer), because its callers span all of them (the loop, the CLI, the API, the
preflight, the Ray actors) and :mod:`oapl.config` must stay importable without torch: the heavy
imports here are made inside the functions that need them, and nothing here imports
:mod:`oapl.config` at run time, so :mod:`oapl.config` itself may import the dotted-key helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oapl.config import TrainConfig
    from oapl.engines.base import SamplingParams

__all__ = [
    "eval_sampling_params",
    "get_dotted",
    "is_offline",
    "load_config_tokenizer",
    "sampling_params",
    "set_dotted",
    "tokenizer_source",
    "with_updates",
]


# -- mode ------------------------------------------------------------------------------------------
def is_offline(cfg: TrainConfig) -> bool:
    """The run trains on a stored rollout dataset (``offline.data``), with no inference engine."""
    return bool(cfg.offline.data)


# -- sampling --------------------------------------------------------------------------------------
def sampling_params(
    cfg: TrainConfig,
    n: int = 1,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
) -> SamplingParams:
    """The training distribution (``sampling.*``), ``n`` responses per prompt.

    ``temperature`` / ``top_p`` override the configured ones when not ``None``; ``max_tokens`` when
    truthy (as everywhere a length is optional).
    """
    from oapl.engines.base import SamplingParams

    s = cfg.sampling
    return SamplingParams(
        s.temperature if temperature is None else temperature,
        s.top_p if top_p is None else top_p,
        max_tokens or s.max_tokens,
        tuple(s.stop),
        n=n,
    )


def eval_sampling_params(cfg: TrainConfig, n: int | None = None) -> SamplingParams:
    """The held-out evaluation's sampling (``eval.*``): ``eval.max_tokens`` defaults to
    ``sampling.max_tokens``, the stop strings are the training ones, ``n`` (when given) overrides
    ``eval.n``."""
    from oapl.engines.base import SamplingParams

    e = cfg.eval
    return SamplingParams(
        e.temperature, e.top_p, e.max_tokens or cfg.sampling.max_tokens, tuple(cfg.sampling.stop), n=n or e.n
    )


# -- tokenizer -------------------------------------------------------------------------------------
def tokenizer_source(cfg: TrainConfig, model_dir: str | None = None) -> str:
    """Where the tokenizer loads from.

    For the configured model: ``model.tokenizer`` when set, else ``model.name`` (both resolved, so
    ``embedded:`` names work). Another model (``model_dir``: a checkpoint or an export, which are
    saved with their tokenizer) brings its own.
    """
    if model_dir is not None:
        return str(model_dir)
    from oapl.trainer.model import resolve_model_path

    return resolve_model_path(cfg.model.tokenizer or cfg.model.name)


def load_config_tokenizer(cfg: TrainConfig, model_dir: str | None = None):
    """The tokenizer of ``cfg``'s model (or of ``model_dir``; see :func:`tokenizer_source`), with a pad token."""
    from oapl.trainer.model import load_tokenizer

    return load_tokenizer(tokenizer_source(cfg, model_dir), cfg.model.trust_remote_code)


# -- dotted keys -----------------------------------------------------------------------------------
def get_dotted(tree: Any, dotted: str, default: Any = None) -> Any:
    """The value at ``dotted`` (``a.b.c``; list items as ``a.0.b`` or ``a[0].b``), or ``default``."""
    node = tree
    for part in dotted.replace("]", "").replace("[", ".").split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return default
    return node


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in ``tree``, making missing sections; a ``ConfigError`` if a key on the way is a value."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            from oapl.config import ConfigError

            raise ConfigError(f"{dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def with_updates(cfg: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with ``{dotted key: value}`` set, validated again."""
    tree = cfg.model_dump()
    for dotted, value in updates.items():
        set_dotted(tree, dotted, value)
    return type(cfg).model_validate(tree)
