"""Datasets and reward functions given as Python objects, referred to from a config by a marker.

A configuration stays plain data (it is written to the run directory's ``config.yaml``, compared on
resume, sent to Ray workers), so a ``datasets.Dataset``, a list of dicts or a reward callable given to
:class:`oapl.OAPLTrainer` / :func:`oapl.train` is registered here, in this process, and the config
holds a marker that says where it came from:

* rows: ``<in-memory:train_dataset:n=200:sha256=1f0c...>``: the role, the row count and a hash of
  the rows' content, so a resume with other data is refused and one with the same data accepted;
* a reward callable that cannot be imported by name (defined in ``__main__``, a lambda, a closure,
  a callable object): ``<in-memory:reward:my_reward>``. One that can (a function at the top level
  of an importable module) is written as its ``module:function`` spec instead, which any process
  can load.

:func:`oapl.data.datasets.load_rows` and :func:`oapl.rewards.base.load_reward` resolve markers. A
marker this process does not hold (a resumed run in a new process that did not pass its data again,
``oapl train`` on such a run's ``config.yaml``) fails with a :class:`~oapl.errors.UserError` that
names the field and says what to pass.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from oapl.errors import UserError

_MARKER = re.compile(r"^<in-memory:([A-Za-z_]+):(.+)>$")
_lock = threading.Lock()
_rows: dict[str, list[dict[str, Any]]] = {}
_rewards: dict[str, Callable[..., Any]] = {}


def is_marker(value: Any) -> bool:
    """Whether ``value`` is an ``<in-memory:...>`` marker."""
    return isinstance(value, str) and _MARKER.match(value) is not None


def marker_kind(value: str) -> str:
    """``train_dataset``, ``eval_dataset``, ``reward``, ... of a marker."""
    m = _MARKER.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not an in-memory marker")
    return m.group(1)


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def as_rows(data: Any, field: str) -> list[dict[str, Any]]:
    """The rows of a ``datasets.Dataset``, a pandas ``DataFrame`` or a list of dicts, checked.

    ``field`` names the argument in errors (``train_dataset``, ``eval_dataset``).
    """
    name = _type_name(data)
    if name.startswith("datasets.") and "DatasetDict" in name:
        splits = ", ".join(repr(k) for k in list(data)[:4])
        raise UserError(f"{field}: a DatasetDict with splits {splits}; pass one split, e.g. {field}=ds['train']")
    if name.startswith("datasets.") and "Iterable" in name:
        raise UserError(
            f"{field}: an IterableDataset has no length; pass a datasets.Dataset (e.g. "
            f"Dataset.from_list(list(ds.take(n)))) or a list of dicts"
        )
    if name.startswith("datasets.") and hasattr(data, "to_list"):
        rows = data.to_list()
    elif name.startswith("pandas.") and hasattr(data, "to_dict"):
        rows = data.to_dict("records")
    elif isinstance(data, (list, tuple)):
        rows = list(data)
    else:
        raise UserError(
            f"{field}: expected a datasets.Dataset, a list of dicts or a path to a .jsonl/.parquet "
            f"file or Hub dataset, got {type(data).__name__}"
        )
    if not rows:
        raise UserError(f"{field}: no rows")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UserError(
                f"{field}: row {i} is a {type(row).__name__}, expected a dict of columns "
                f"(e.g. {{'prompt': ..., 'answer': ...}})"
            )
        out.append(dict(row))
    return out


def fingerprint(rows: list[dict[str, Any]]) -> str:
    """sha256 of the rows' content (JSON, keys sorted; non-JSON values by ``repr``)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=repr, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def register_rows(data: Any, role: str) -> str:
    """Register in-memory rows for ``role`` (``train_dataset``, ``eval_dataset``); returns their marker."""
    rows = as_rows(data, role)
    marker = f"<in-memory:{role}:n={len(rows)}:sha256={fingerprint(rows)[:16]}>"
    with _lock:
        _rows[marker] = rows
    return marker


def lookup_rows(marker: str, field: str, copy: bool = True) -> list[dict[str, Any]]:
    """The rows registered under ``marker`` (copies unless ``copy=False``: a task adds columns), or a
    UserError naming ``field``."""
    with _lock:
        rows = _rows.get(marker)
    if rows is None:
        raise UserError(
            f"{field}: {marker} is a dataset that was passed from Python to another process; this one does not "
            f"hold it. Pass the same data again (OAPLTrainer(train_dataset=..., eval_dataset=...)), or save it "
            f"as a .jsonl file and set {field} to its path"
        )
    return [dict(r) for r in rows] if copy else rows


def _import_spec(fn: Callable[..., Any]) -> str | None:
    """``module:function`` when ``fn`` is a top-level function any process can import by that name."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or module in ("__main__", "__mp_main__") or "." in qualname or "<" in qualname:
        return None
    if not hasattr(fn, "__code__"):  # a builtin or a callable object: not reloadable as module:function
        return None
    try:
        mod = sys.modules.get(module) or importlib.import_module(module)
    except Exception:  # noqa: BLE001 - not importable here: keep it in memory
        return None
    return f"{module}:{qualname}" if getattr(mod, qualname, None) is fn else None


def reward_spec(fn: Any, field: str = "reward_funcs") -> str:
    """The config spec of a reward: a ``module:function`` string as given, an importable function's
    ``module:function``, or the marker of a callable registered here."""
    if isinstance(fn, str):
        if is_marker(fn):
            return fn
        if ":" not in fn:
            raise UserError(
                f"{field}: {fn!r} is not of the form module:function (or path/to/file.py:function); "
                f"oapl's rewards are functions (it has no reward models)"
            )
        return fn
    if not callable(fn):
        raise UserError(f"{field}: {fn!r} ({type(fn).__name__}) is neither a callable nor a 'module:function' string")
    if _type_name(fn).startswith("transformers.") or hasattr(fn, "config") and hasattr(fn, "forward"):
        raise UserError(
            f"{field}: {type(fn).__name__} is a model; oapl's rewards are functions "
            f"fn(prompts, completions, **columns) -> list[float] (it has no reward models)"
        )
    spec = _import_spec(fn)
    if spec is not None:
        return spec
    base = re.sub(r"[^\w.+-]", "_", callable_name(fn)) or "reward"
    with _lock:
        for k in range(1, 10_000):
            marker = f"<in-memory:reward:{base}>" if k == 1 else f"<in-memory:reward:{base}#{k}>"
            held = _rewards.get(marker)
            if held is None or held is fn:
                _rewards[marker] = fn
                return marker
    raise RuntimeError(f"too many in-memory rewards named {base!r}")  # pragma: no cover


def lookup_reward(marker: str, field: str) -> Callable[..., Any]:
    """The callable registered under ``marker``, or a UserError naming ``field``."""
    with _lock:
        fn = _rewards.get(marker)
    if fn is None:
        raise UserError(
            f"{field}: {marker} is a reward function that was passed from Python to another process; this one "
            f"does not hold it. Pass it again (OAPLTrainer(reward_funcs=[...])), or put it in a module and set "
            f"{field} to 'module:function'"
        )
    return fn


def in_memory_fields(tree: Mapping[str, Any]) -> dict[str, str]:
    """``{dotted field: marker}`` for every marker in a config tree (a ``model_dump``/YAML mapping)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix[:-1]}[{i}].")
        elif is_marker(node):
            out[prefix[:-1]] = node

    walk(tree, "")
    return out


def callable_name(fn: Any) -> str:
    """A readable name of a callable (function, partial, callable object)."""
    name = getattr(fn, "__name__", None)
    if name is None and hasattr(fn, "func"):  # functools.partial
        name = getattr(fn.func, "__name__", None)
    return str(name or type(fn).__name__)
