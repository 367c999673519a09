"""Prompt datasets: local JSONL/Parquet files or Hub names, with a column mapping and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from oapl.errors import UserError


class DatasetError(UserError):
    """Bad dataset input; the message names the file, row and column."""


def _json(text: str, kind: type, where: str, what: str) -> Any:
    """``text`` parsed as JSON of type ``kind``; a :class:`DatasetError` at ``where`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise DatasetError(f"{where}: not valid JSON at {at}: {e.msg}") from None
    if not isinstance(value, kind):
        raise DatasetError(f"{where}: expected {what}, got {type(value).__name__}")
    return value


def _read_local(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DatasetError(
                f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} (line {line})"
            ) from None
    if suffix in (".jsonl", ".ndjson"):
        rows = [
            _json(text_line, dict, f"{path}: row {lineno}", "a JSON object")
            for lineno, text_line in enumerate(text.split("\n"), start=1)
            if text_line.strip()
        ]
        return rows
    if suffix == ".json":
        return _json(text, list, str(path), "a JSON list of objects")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def load_rows(source: str, split: str = "train", config: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local file (``.jsonl``/``.json``/``.parquet``), a Hub dataset, or rows passed from Python
    (an ``<in-memory:...>`` marker, :mod:`oapl.data.memory`); returns (rows, label)."""
    from oapl.data import memory

    if memory.is_marker(source):
        kind = memory.marker_kind(source)
        field = {"train_dataset": "task.dataset", "eval_dataset": "task.eval_dataset"}.get(kind, "task.dataset")
        return memory.lookup_rows(source, field), kind  # errors read "train_dataset: row 3: ..."
    path = Path(source)
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet", ".json"))
            if not files:
                raise DatasetError(f"{path}: directory holds no .jsonl/.parquet/.json files")
            rows: list[dict[str, Any]] = []
            for f in files:
                rows.extend(_read_local(f))
            return rows, str(path)
        return _read_local(path), str(path)
    if source.endswith((".jsonl", ".parquet", ".json", ".ndjson")):
        raise DatasetError(f"dataset file not found: {source}")
    from oapl.preflight import looks_like_path

    if looks_like_path(source):
        raise DatasetError(f"dataset path not found: {source}")
    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        # DatasetNotFoundError (a FileNotFoundError), no network / offline without a cached copy,
        # an unknown split or config: all about the name the user gave
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(
            f"dataset {source!r} (split {split!r}{f', config {config!r}' if config else ''}): "
            f"cannot load it from the Hugging Face Hub: {first}"
        ) from e
    return [dict(r) for r in ds], f"{source}[{split}]"


def map_columns(
    rows: list[dict[str, Any]], mapping: dict[str, str], required: list[str], label: str, id_column: str = "prompt_id"
) -> list[dict[str, Any]]:
    """Rename dataset columns to the names a task uses and check every row has what is required.

    ``mapping`` is ``{task_name: dataset_column}``. Every row gets a ``prompt_id`` (kept if present).
    """
    out = []
    for i, row in enumerate(rows):
        new = dict(row)
        for task_name, col in mapping.items():
            if col not in row:
                raise DatasetError(
                    f"{label}: row {i}: missing column {col!r} (mapped to {task_name!r}); row has columns {sorted(row)}"
                )
            new[task_name] = row[col]
        for col in required:
            if col not in new:
                raise DatasetError(
                    f"{label}: row {i}: missing column {col!r}; row has columns {sorted(row)}"
                    + (f" (map one with task.columns.{col}=<column>)" if col not in mapping else "")
                )
            value = new[col]
            if value is None or (
                col == "prompt"
                and isinstance(value, (str, list))
                and not (value.strip() if isinstance(value, str) else value)
            ):
                source = mapping.get(col, col)
                mapped = f" (mapped to {col!r})" if source != col else ""
                state = "None (null)" if value is None else "empty"
                raise DatasetError(
                    f"{label}: row {i}: column {source!r}{mapped} is {state}; every row needs a "
                    f"{col} (fill it in or remove the row)"
                )
        new.setdefault(id_column, f"{Path(label).stem}-{i}")
        new[id_column] = str(new[id_column])
        out.append(new)
    return out
