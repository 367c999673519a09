"""Reading rollout datasets (a file or a folder of shards), validated row by row."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oapl.data.rollouts.schema import (
    COLUMNS,
    ROLLOUT_SCHEMA,
    _TOKEN_COLUMNS,
    RolloutSchemaError,
    _group_from_rows,
    _list_shards,
)
from oapl.rollout.group import RolloutGroup


def _type_ok(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether ``actual`` can be read as ``expected`` without losing meaning."""

    def scalar_ok(a: pa.DataType, e: pa.DataType) -> bool:
        if pa.types.is_string(e):
            return pa.types.is_string(a) or pa.types.is_large_string(a)
        if pa.types.is_integer(e):
            return pa.types.is_integer(a)
        if pa.types.is_floating(e):
            return pa.types.is_floating(a) or pa.types.is_integer(a)
        return a == e

    if pa.types.is_list(expected):
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual) or pa.types.is_fixed_size_list(actual)):
            return False
        if pa.types.is_null(actual.value_type):  # only empty lists
            return True
        return scalar_ok(actual.value_type, expected.value_type)
    return scalar_ok(actual, expected)


def _validate_table(table: pa.Table, file: Path, columns: Sequence[str]) -> pa.Table:
    """Check presence/types/nulls of ``columns`` and cast them to :data:`ROLLOUT_SCHEMA`."""
    names = set(table.column_names)
    for col in COLUMNS:  # presence of every column, even those not loaded
        if col not in names:
            raise RolloutSchemaError(f"missing column (file has {sorted(names)})", file=file, column=col)
    arrays = {}
    for col in columns:
        expected = ROLLOUT_SCHEMA.field(col).type
        arr = table.column(col)
        if not _type_ok(arr.type, expected):
            raise RolloutSchemaError(f"has type {arr.type}, expected {expected}", file=file, column=col)
        if arr.null_count:
            mask = arr.is_null().to_pylist()
            raise RolloutSchemaError("null value", file=file, row=mask.index(True), column=col)
        if pa.types.is_list(expected) and pc.list_flatten(arr).null_count:
            bad = next(i for i, v in enumerate(arr.to_pylist()) if any(x is None for x in v))
            raise RolloutSchemaError("null inside a list", file=file, row=bad, column=col)
        if arr.type != expected:
            try:
                arr = arr.cast(expected)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise RolloutSchemaError(f"cannot cast {arr.type} to {expected} ({e})", file=file, column=col) from None
        arrays[col] = arr
    return pa.table(arrays)


def _read_file(file: Path, with_tokens: bool) -> list[tuple[RolloutGroup, int]]:
    """Groups of one Parquet file, each with the row number of its first row."""
    columns = [c for c in COLUMNS if with_tokens or c not in _TOKEN_COLUMNS]
    try:
        schema_names = pq.read_schema(file).names
        table = pq.read_table(file, columns=[c for c in columns if c in schema_names])
    except (pa.ArrowException, OSError) as e:
        raise RolloutSchemaError(f"cannot read Parquet file ({e})", file=file) from None
    if not with_tokens:  # presence check for the columns we skip
        for col in _TOKEN_COLUMNS:
            if col not in schema_names:
                raise RolloutSchemaError(f"missing column (file has {sorted(schema_names)})", file=file, column=col)
        table = table.append_column("prompt_token_ids", pa.array([[]] * table.num_rows, pa.list_(pa.int32())))
        for col in ("response_token_ids", "response_logprobs"):
            table = table.append_column(col, pa.array([[]] * table.num_rows, ROLLOUT_SCHEMA.field(col).type))
    table = _validate_table(table, file, COLUMNS)
    data = {col: table.column(col).to_pylist() for col in COLUMNS}
    num_rows = table.num_rows
    order: list[str] = []
    rows_by_pid: dict[str, list[int]] = {}
    for i, pid in enumerate(data["prompt_id"]):
        if pid not in rows_by_pid:
            rows_by_pid[pid] = []
            order.append(pid)
        rows_by_pid[pid].append(i)
    out = []
    for pid in order:
        idx = rows_by_pid[pid]
        rows = [{col: data[col][i] for col in COLUMNS} for i in idx]
        out.append((_group_from_rows(rows, idx, file=str(file)), idx[0]))
    assert sum(len(v) for v in rows_by_pid.values()) == num_rows
    return out


def read_rollouts(path_or_dir: str | os.PathLike[str], *, with_tokens: bool = True) -> list[RolloutGroup]:
    """Read a rollout dataset: a directory of ``part-*.parquet`` shards or one Parquet file.

    Groups come back in file order (shards by index, then first appearance), responses sorted by
    ``response_index``. The schema is validated: a missing, mistyped or null column, rows of a group
    that disagree on a group-level column (``group_rewards``, ``prompt``, ...), missing or duplicate
    response indices, or a prompt that appears in two files raise :class:`RolloutSchemaError` naming
    the file, row and column. Integer/float widths are cast to the canonical schema (so files
    written by pandas with int64 indices are accepted).

    ``with_tokens=False`` skips loading the token-id and log-prob columns (their lists come back
    empty), which is much faster and lighter for evaluation and plotting.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        files = [p for _, p in _list_shards(path)]
        if not files:
            raise FileNotFoundError(f"no part-*.parquet shards in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no rollout file or directory at {path}")
    groups: list[RolloutGroup] = []
    seen: dict[str, tuple[Path, int]] = {}
    for file in files:
        for group, first_row in _read_file(file, with_tokens):
            if group.prompt_id in seen:
                other_file, other_row = seen[group.prompt_id]
                raise RolloutSchemaError(
                    f"prompt_id {group.prompt_id!r} appears again (first in {other_file}, row "
                    f"{other_row}); a group must be stored in exactly one place",
                    file=file,
                    row=first_row,
                    column="prompt_id",
                )
            seen[group.prompt_id] = (file, first_row)
            groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------
