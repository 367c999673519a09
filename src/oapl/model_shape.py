"""The architecture shape of a model, for the memory plan (:mod:`oapl.memory_plan`), without loading weights.

A shape comes from the shipped table (``oapl/configs/model_shapes.yaml``), else from the model's
``config.json`` (a local folder, or the Hub within a timeout); parameters are counted on the meta device,
else by formula (:func:`count_params`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from oapl.errors import UserError


class ShapeError(UserError):
    """The architecture of ``model.name`` cannot be known here."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    qk_norm: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int | None = None
    source: str = "table"

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.q, self.kv
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        return attn + 3 * h * self.intermediate + 2 * h

    def root_params(self) -> int:
        """Embeddings, LM head (once if tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def count_params(shape: ModelShape) -> int:
    """Distinct parameters of a Llama/Qwen2/Qwen3 decoder of this shape."""
    return shape.layers * shape.layer_params() + shape.root_params()


@functools.lru_cache(maxsize=1)
def shapes_table() -> dict[str, ModelShape]:
    """The shipped shapes (``oapl/configs/model_shapes.yaml``), by model name."""
    from importlib.resources import files

    import yaml

    tree = yaml.safe_load((files("oapl") / "configs" / "model_shapes.yaml").read_text())
    return {name: ModelShape(**row) for name, row in tree.items()}


def shape_from_config(mcfg, source: str, params: int | None = None) -> ModelShape:
    """A :class:`ModelShape` from a transformers config (``params`` counted by the caller, else by formula)."""
    text = getattr(mcfg, "text_config", None) or mcfg
    heads = text.num_attention_heads
    shape = ModelShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=bool(getattr(mcfg, "tie_word_embeddings", False)),
        params=0,
        qk_norm="qwen3" in str(getattr(text, "model_type", "")),
        qkv_bias=bool(getattr(text, "attention_bias", False)) or getattr(text, "model_type", "") == "qwen2",
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
        source=source,
    )
    return ModelShape(**{**asdict(shape), "params": params or count_params(shape)})


def _meta_params(mcfg, trust_remote_code: bool) -> int | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - the formula then counts them
        return None


def resolve_shape(
    name: str, path: str | None = None, trust_remote_code: bool = False, timeout_s: float | None = None
) -> ModelShape:
    """The shape of ``model.name``: the shipped table, else the config.json of ``path`` (a local folder, or a
    Hub name read within ``timeout_s``). Raises :class:`ShapeError` naming ``model.name``."""
    table = shapes_table()
    if name in table:
        return table[name]
    from oapl.preflight import HUB_TIMEOUT_S, _call_with_timeout

    target = path or name

    def load():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)

    mcfg, err, timed_out = _call_with_timeout(load, timeout_s or HUB_TIMEOUT_S)
    if mcfg is None:
        why = "no answer from the Hugging Face Hub" if timed_out else f"{type(err).__name__}: {err}".splitlines()[0]
        raise ShapeError(
            f"model.name: cannot plan the memory of {name!r}: its architecture is not in oapl's table "
            f"({', '.join(sorted(table))}) and its config.json cannot be read ({why[:200]}); give a "
            f"local folder with config.json, or check it where the Hub is reachable"
        )
    return shape_from_config(mcfg, source=f"config.json of {target}", params=_meta_params(mcfg, trust_remote_code))
