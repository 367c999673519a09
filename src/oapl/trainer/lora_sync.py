"""LoRA-merged weights computed out of place: the frozen base is never written.

Merging the adapters into the base weights and unmerging them afterwards (peft's
``merge_adapter``/``unmerge_adapter``) does not round-trip in floating point: ``(W + D) - D != W``
once ``W + D`` is rounded to the base's dtype, so every sync used to move the frozen base a little.
:func:`merged_weights` instead yields, per adapted module, a new tensor
``W_base + sum_a delta_a`` where ``delta_a = scaling_a * (B_a @ A_a)`` is peft's own
``get_delta_weight(a)`` (which reads the adapters and returns a new tensor), added in fp32 and rounded
once to the base weight's dtype -- the same arithmetic as peft's ``merge_and_unload``. Tensors are
streamed one at a time, under the base model's parameter names (``.base_layer`` removed).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _lora_layers(base) -> dict[str, object]:
    """``{module name: LoraLayer}`` of the peft-injected base model."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _owner(name: str, layers: dict[str, object]) -> tuple[str | None, str]:
    """The LoRA module that owns parameter ``name`` (or None), and the name relative to it."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = ".".join(parts[:i])
        if mod in layers:
            return mod, ".".join(parts[i:])
    return None, name


def _adapters(module, mod_name: str) -> list[str]:
    """The active adapters of ``module`` whose delta goes into the merge; refuses what can't be merged here."""
    if getattr(module, "disable_adapters", False):
        return []
    if getattr(module, "merged_adapters", None):
        raise ValueError(
            f"model.lora: {mod_name} has adapters merged into its base weights "
            f"({module.merged_adapters}); the out-of-place sync needs them unmerged"
        )
    out = []
    for a in module.active_adapters:
        has = a in getattr(module, "lora_A", {}) or a in getattr(module, "lora_embedding_A", {})
        if not has:
            continue
        variant = (getattr(module, "lora_variant", None) or {}).get(a)
        if variant is not None or getattr(module, "use_dora", {}).get(a, False):
            kind = type(variant).__name__ if variant is not None else "DoRA"
            raise ValueError(
                f"model.lora: adapter {a!r} on {mod_name} is a LoRA variant ({kind}) whose merge "
                f"is not W + scaling * B @ A; the weight sync merges plain LoRA only (model.lora "
                f"configures plain LoRA: no DoRA or other variants)"
            )
        out.append(a)
    return out


def _merged(module, adapters: list[str], attr: str, p: torch.Tensor) -> torch.Tensor | None:
    """The merged ``attr`` (weight or bias) of a LoRA module as a new tensor in ``p``'s dtype, or None
    when no adapter changes it."""
    delta = None
    for a in adapters:
        if attr == "weight":
            d = module.get_delta_weight(a)
        elif attr == "bias" and module.lora_bias.get(a, False):
            d = module.lora_B[a].bias * module.scaling[a]
        else:
            continue
        d = d.detach().to(torch.float32)
        delta = d if delta is None else delta + d
    if delta is None:
        return None
    return (p.detach().to(torch.float32) + delta.to(p.device)).to(p.dtype)


@torch.no_grad()
def merged_weights(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the merged model under the base model's names, one tensor at a time.

    Adapted weights are new tensors ``W + delta`` in the base weight's dtype; every other parameter
    is the trainer's own tensor (not a copy: callers cast or copy it). Nothing of ``peft_model`` is
    written. Tied parameters are yielded once (``named_parameters``' deduplication).
    """
    base = peft_model.get_base_model()
    layers = _lora_layers(base)
    adapters = {name: _adapters(m, name) for name, m in layers.items()}
    for name, p in base.named_parameters():
        mod, rel = _owner(name, layers)
        if mod is None:
            yield name, p.detach()
            continue
        if not rel.startswith("base_layer."):
            continue  # an adapter parameter (lora_A/B, embeddings, magnitudes)
        attr = rel.removeprefix("base_layer.")
        out = f"{mod}.{attr}"
        merged = _merged(layers[mod], adapters[mod], attr, p) if "." not in attr else None
        yield out, (p.detach() if merged is None else merged)
