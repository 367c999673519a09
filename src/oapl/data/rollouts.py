"""Rollout datasets: one Parquet row per sampled response, grouped by prompt.

A *rollout group* is the ``n`` responses sampled for one prompt, together with their rewards, the
engine log-probabilities of the sampled tokens and the provenance of the weights that sampled them.
On disk a group is ``n`` rows (one per response) of the schema :data:`ROLLOUT_SCHEMA`; the columns
that describe the prompt (``prompt``, ``group_rewards``, ``weights_id``, ...) are repeated on every
row of the group, so a single row is self-contained and the files can be read with any Parquet tool.

Layout of a dataset directory written by :class:`RolloutWriter`::

    out_dir/
        _meta.json            schema version, sampling params, weights_id, task (resume guard)
        part-00000.parquet    whole groups only; a group is never split across shards
        part-00001.parquet
        ...

Every file (shards and ``_meta.json``) is first written to a hidden temporary file in the same
directory, flushed and fsync'ed, then moved into place with :func:`os.replace`, which is atomic on
POSIX: a reader (or a resumed writer) sees either a complete shard or no shard. A generation that
is killed loses at most the groups buffered since the last shard, and
:meth:`RolloutWriter.done_prompt_ids` tells the resumed run exactly which prompts are already on
disk, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oapl.atomic import atomic_write
from oapl.errors import UserError
from oapl.rollout.group import RolloutGroup, filter_groups, is_correct

__all__ = [
    "COLUMNS",
    "META_FILENAME",
    "ROLLOUT_SCHEMA",
    "SCHEMA_VERSION",
    "RolloutGroup",
    "RolloutMetaMismatchError",
    "RolloutSchemaError",
    "RolloutWriter",
    "filter_groups",
    "group_from_rows",
    "group_to_rows",
    "groups_to_table",
    "is_correct",
    "read_rollouts",
    "write_rollouts",
]

#: Bumped whenever a column is added, removed or changes meaning.
SCHEMA_VERSION = 1

META_FILENAME = "_meta.json"

#: The on-disk schema, one row per response.
ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_index", pa.int32(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("group_rewards", pa.list_(pa.float64()), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("weights_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("extra", pa.string(), nullable=False),
    ],
    metadata={b"oapl.rollouts.schema_version": str(SCHEMA_VERSION).encode()},
)

COLUMNS: tuple[str, ...] = tuple(ROLLOUT_SCHEMA.names)

#: Columns that describe the prompt/group and must be identical on every row of a group.
_GROUP_COLUMNS = (
    "prompt",
    "prompt_token_ids",
    "group_rewards",
    "weights_id",
    "version",
    "sampling",
    "task",
    "benchmark",
    "extra",
)
#: Heavy columns that ``read_rollouts(..., with_tokens=False)`` does not load.
_TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids", "response_logprobs")

_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
_TMP_RE = re.compile(r"^\.(part-\d{5,}\.parquet|_meta\.json)\.tmp(-\d+)?$")


class RolloutSchemaError(UserError):
    """A rollout file or group violates the schema.

    ``file``, ``row`` (0-based row number inside ``file``) and ``column`` locate the problem when
    they are known; they also appear in the message.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike[str] | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.row = row
        self.column = column
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class RolloutMetaMismatchError(UserError):
    """A :class:`RolloutWriter` was asked to resume into a directory written with other settings."""

    def __init__(self, out_dir: Path, field_name: str, on_disk: Any, requested: Any) -> None:
        self.field = field_name
        self.on_disk = on_disk
        self.requested = requested
        super().__init__(
            f"cannot resume into {out_dir}: field {field_name!r} of {out_dir / META_FILENAME} is "
            f"{_short(on_disk)} but this run has {_short(requested)}; use a new output directory "
            f"(or delete {out_dir}) to start over"
        )


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and tuples show up in dataset columns and sampling params
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def _dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys) so that equal dicts give equal strings."""
    return json.dumps(obj, sort_keys=True, default=_json_default, ensure_ascii=False)


def _normalise(obj: Any) -> Any:
    """JSON round trip: tuples become lists, numpy scalars become Python numbers."""
    return json.loads(_dumps(obj))


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def group_to_rows(group: RolloutGroup) -> list[dict[str, Any]]:
    """``group`` as ``n`` row dicts with the columns of :data:`ROLLOUT_SCHEMA`."""
    sampling = _dumps(group.sampling)
    extra = _dumps(group.extra)
    prompt_ids = list(group.prompt_token_ids)
    group_rewards = list(group.rewards)
    return [
        {
            "prompt_id": group.prompt_id,
            "prompt": group.prompt,
            "prompt_token_ids": prompt_ids,
            "response_index": i,
            "response": group.responses[i],
            "response_token_ids": list(group.response_token_ids[i]),
            "response_logprobs": list(group.response_logprobs[i]),
            "reward": group.rewards[i],
            "group_rewards": group_rewards,
            "finish_reason": group.finish_reasons[i],
            "weights_id": group.weights_id,
            "version": group.version,
            "sampling": sampling,
            "task": group.task,
            "benchmark": group.benchmark,
            "extra": extra,
        }
        for i in range(group.n)
    ]

def group_from_rows(rows: Sequence[Mapping[str, Any]]) -> RolloutGroup:
    """Rebuild one group from its rows (any order).

    Raises :class:`RolloutSchemaError` (naming the row index in ``rows`` and the column) when a
    column is missing or mistyped, when the rows belong to several prompts, disagree on a
    group-level column (``group_rewards``, ``prompt``, ...), or the response indices are not
    exactly ``0..n-1``.
    """
    rows = list(rows)
    if not rows:
        raise RolloutSchemaError("no rows given")
    for i, row in enumerate(rows):
        _check_row_types(row, row_number=i, file=None)
    return _group_from_rows(rows, list(range(len(rows))), file=None)


# scalar type checks for rows that did not come from a typed Arrow table
_STR_COLUMNS = ("prompt_id", "prompt", "response", "finish_reason", "weights_id", "sampling",
                "task", "benchmark", "extra")
_INT_COLUMNS = ("response_index", "version")
_INT_LIST_COLUMNS = ("prompt_token_ids", "response_token_ids")
_FLOAT_LIST_COLUMNS = ("response_logprobs", "group_rewards")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_row_types(row: Mapping[str, Any], *, row_number: int, file: str | None) -> None:
    for col in COLUMNS:
        if col not in row:
            raise RolloutSchemaError("missing column", file=file, row=row_number, column=col)
        value = row[col]
        if col in _STR_COLUMNS:
            ok, expected = isinstance(value, str), "a string"
        elif col in _INT_COLUMNS:
            ok, expected = _is_int(value), "an integer"
        elif col == "reward":
            ok, expected = _is_number(value), "a number"
        elif col in _INT_LIST_COLUMNS:
            ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
            expected = "a list of integers"
        else:  # float lists
            ok = isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
            expected = "a list of numbers"
        if not ok:
            raise RolloutSchemaError(
                f"expected {expected}, got {type(value).__name__} {_short(value, 80)}",
                file=file, row=row_number, column=col,
            )


def _group_from_rows(
    rows: list[Mapping[str, Any]], row_numbers: list[int], *, file: str | None
) -> RolloutGroup:
    """Assemble one group; ``row_numbers[j]`` is the position of ``rows[j]`` for error messages."""
    first, first_row = rows[0], row_numbers[0]
    pid = first["prompt_id"]
    for row, rn in zip(rows, row_numbers):
        if row["prompt_id"] != pid:
            raise RolloutSchemaError(
                f"rows of several prompts given to one group ({pid!r} and {row['prompt_id']!r})",
                file=file, row=rn, column="prompt_id",
            )
    # group-level columns must agree on every row
    for col in _GROUP_COLUMNS:
        ref = first[col]
        for row, rn in zip(rows[1:], row_numbers[1:]):
            value = row[col]
            if col == "group_rewards":
                same = len(value) == len(ref) and all(
                    _same_float(float(a), float(b)) for a, b in zip(value, ref)
                )
            else:
                same = value == ref
            if not same:
                raise RolloutSchemaError(
                    f"prompt {pid!r}: rows disagree on {col} ({_short(value, 80)} here, "
                    f"{_short(ref, 80)} on row {first_row})",
                    file=file, row=rn, column=col,
                )
    # response indices must be exactly 0..n-1
    by_index: dict[int, tuple[Mapping[str, Any], int]] = {}
    for row, rn in zip(rows, row_numbers):
        idx = int(row["response_index"])
        if idx in by_index:
            raise RolloutSchemaError(
                f"prompt {pid!r}: duplicate response_index {idx} (also on row {by_index[idx][1]})",
                file=file, row=rn, column="response_index",
            )
        by_index[idx] = (row, rn)
    n = len(rows)
    group_rewards = [float(r) for r in first["group_rewards"]]
    expected_n = max(n, len(group_rewards))
    missing = sorted(set(range(expected_n)) - set(by_index))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise RolloutSchemaError(
            f"prompt {pid!r}: missing response_index {shown} (group has {n} rows, group_rewards "
            f"has {len(group_rewards)} entries; indices must be 0..n-1)",
            file=file, row=first_row, column="response_index",
        )
    if len(group_rewards) != n:
        raise RolloutSchemaError(
            f"prompt {pid!r}: group_rewards has {len(group_rewards)} entries but the group has "
            f"{n} rows", file=file, row=first_row, column="group_rewards",
        )
    ordered = [by_index[i] for i in range(n)]
    if not isinstance(pid, str) or not pid:
        raise RolloutSchemaError("prompt_id must be a non-empty string", file=file, row=first_row,
                                 column="prompt_id")
    for i, (row, rn) in enumerate(ordered):
        n_ids, n_lps = len(row["response_token_ids"]), len(row["response_logprobs"])
        if n_ids != n_lps:
            raise RolloutSchemaError(
                f"prompt {pid!r}, response {i}: {n_lps} log-probs for {n_ids} response_token_ids",
                file=file, row=rn, column="response_logprobs",
            )
        reward = float(row["reward"])
        if not _same_float(reward, group_rewards[i]):
            raise RolloutSchemaError(
                f"prompt {pid!r}: reward {reward} of response {i} != group_rewards[{i}] = "
                f"{group_rewards[i]}",
                file=file, row=rn, column="reward",
            )
    for col in ("sampling", "extra"):
        try:
            decoded = json.loads(first[col])
        except json.JSONDecodeError as e:
            raise RolloutSchemaError(
                f"not valid JSON ({e})", file=file, row=first_row, column=col
            ) from None
        if not isinstance(decoded, dict):
            raise RolloutSchemaError(
                "must be a JSON object", file=file, row=first_row, column=col
            )
    try:
        return RolloutGroup(
            prompt_id=pid,
            prompt=first["prompt"],
            prompt_token_ids=list(first["prompt_token_ids"]),
            responses=[r["response"] for r, _ in ordered],
            response_token_ids=[list(r["response_token_ids"]) for r, _ in ordered],
            response_logprobs=[list(r["response_logprobs"]) for r, _ in ordered],
            rewards=[float(r["reward"]) for r, _ in ordered],
            finish_reasons=[r["finish_reason"] for r, _ in ordered],
            weights_id=first["weights_id"],
            version=int(first["version"]),
            sampling=json.loads(first["sampling"]),
            task=first["task"],
            benchmark=first["benchmark"],
            extra=json.loads(first["extra"]),
        )
    except (ValueError, TypeError) as e:
        raise RolloutSchemaError(str(e), file=file, row=first_row) from None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def groups_to_table(groups: Iterable[RolloutGroup]) -> pa.Table:
    """Arrow table (schema :data:`ROLLOUT_SCHEMA`) with the rows of ``groups``."""
    rows = [row for g in groups for row in group_to_rows(g)]
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def write_rollouts(groups: Iterable[RolloutGroup], path: str | os.PathLike[str]) -> Path:
    """Write ``groups`` to one Parquet file atomically (e.g. a filtered copy of a dataset)."""
    path = Path(path)
    groups = list(groups)
    seen: set[str] = set()
    for g in groups:
        if g.prompt_id in seen:
            raise ValueError(f"duplicate prompt_id {g.prompt_id!r}")
        seen.add(g.prompt_id)
    table = groups_to_table(groups)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


class RolloutWriter:
    """Append rollout groups to ``out_dir`` as atomically written Parquet shards, resumably.

    ``shard_size`` is the target number of *rows* (responses) per shard: buffered groups are
    flushed to a new ``part-NNNNN.parquet`` once they hold at least ``shard_size`` rows. Groups are
    never split, so a shard may exceed ``shard_size`` by less than one group (a group larger than
    ``shard_size`` gets a shard of its own). A kill loses at most the buffered groups.

    ``sampling``, ``weights_id`` and ``task`` are recorded in ``_meta.json`` on first use;
    opening an existing directory whose meta differs raises :class:`RolloutMetaMismatchError`
    naming the field. Every written group must carry the same ``sampling``, ``weights_id`` and
    ``task``. On open, stray temporary files left by a killed writer are removed. Only one writer
    per directory may run at a time.

    Typical resumable loop::

        with RolloutWriter(out, sampling=params, weights_id=model, task="math") as w:
            todo = [p for p in prompts if p.id not in w.done_prompt_ids()]
            for p in todo:
                w.write(generate_group(p))
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        sampling: Mapping[str, Any],
        weights_id: str,
        task: str,
        shard_size: int = 4096,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = int(shard_size)
        self.meta: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "sampling": _normalise(dict(sampling)),
            "weights_id": str(weights_id),
            "task": str(task),
        }
        self._buffer: list[pa.Table] = []  # one table per buffered group
        self._buffer_rows = 0
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stray_temp_files()
        self._check_or_write_meta()
        shards = _list_shards(self.out_dir)
        self._next_index = (max(i for i, _ in shards) + 1) if shards else 0
        self._on_disk: set[str] = set()
        for _, shard in shards:
            try:
                ids = pq.read_table(shard, columns=["prompt_id"]).column("prompt_id").to_pylist()
            except (pa.ArrowException, OSError, KeyError) as e:
                raise RolloutSchemaError(f"cannot read shard ({e})", file=shard) from None
            self._on_disk.update(ids)
        self.resumed_groups = len(self._on_disk)
        self._written: set[str] = set()

    # -- setup -------------------------------------------------------------------------------

    def _remove_stray_temp_files(self) -> None:
        for p in self.out_dir.iterdir():
            if _TMP_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)

    def _check_or_write_meta(self) -> None:
        meta_path = self.out_dir / META_FILENAME
        if meta_path.exists():
            try:
                on_disk = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {meta_path}: {e}") from None
            for key in ("schema_version", "task", "weights_id", "sampling"):
                if on_disk.get(key) != self.meta[key]:
                    raise RolloutMetaMismatchError(self.out_dir, key, on_disk.get(key),
                                                   self.meta[key])
            return
        if _list_shards(self.out_dir):
            raise ValueError(
                f"{self.out_dir} holds rollout shards but no {META_FILENAME}; refusing to append "
                f"to a dataset of unknown provenance (use a new output directory)"
            )
        text = json.dumps(self.meta, indent=2, sort_keys=True) + "\n"
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text))

    # -- API ---------------------------------------------------------------------------------

    def done_prompt_ids(self) -> set[str]:
        """Prompt ids already accepted: on disk when the writer was opened, or written since.

        Groups passed to :meth:`write` count as done even while still buffered, because they will
        be on disk after :meth:`flush`/:meth:`close`; after a kill, a new writer only reports what
        actually reached disk.
        """
        return self._on_disk | self._written

    def write(self, group: RolloutGroup) -> None:
        """Buffer one group; flush a shard when the buffer reaches ``shard_size`` rows."""
        if self._closed:
            raise ValueError("RolloutWriter is closed")
        if group.prompt_id in self._on_disk or group.prompt_id in self._written:
            raise ValueError(
                f"prompt_id {group.prompt_id!r} is already in {self.out_dir}; skip the ids in "
                f"done_prompt_ids() when resuming"
            )
        for key, value in (("task", group.task), ("weights_id", group.weights_id),
                           ("sampling", _normalise(dict(group.sampling)))):
            if value != self.meta[key]:
                raise ValueError(
                    f"group {group.prompt_id!r} has {key}={_short(value)} but this dataset has "
                    f"{key}={_short(self.meta[key])}"
                )
        # converting now validates types/ranges (e.g. token ids beyond int32) at the offending
        # group rather than at flush time
        try:
            table = groups_to_table([group])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise ValueError(
                f"group {group.prompt_id!r} does not fit the rollout schema: {e}"
            ) from None
        self._buffer.append(table)
        self._buffer_rows += table.num_rows
        self._written.add(group.prompt_id)
        if self._buffer_rows >= self.shard_size:
            self.flush()

    def write_many(self, groups: Iterable[RolloutGroup]) -> None:
        for g in groups:
            self.write(g)

    def flush(self) -> Path | None:
        """Write the buffered groups as one new shard; return its path (``None`` if empty)."""
        if not self._buffer:
            return None
        table = pa.concat_tables(self._buffer)
        path = self.out_dir / f"part-{self._next_index:05d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        self._next_index += 1
        self._buffer = []
        self._buffer_rows = 0
        return path

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if not self._closed:
            self.flush()
            self._closed = True

    @property
    def num_shards(self) -> int:
        return self._next_index

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # buffered groups are complete, so they are worth keeping even when the loop raised
        self.close()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _list_shards(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


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
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual)
                or pa.types.is_fixed_size_list(actual)):
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
            raise RolloutSchemaError(
                f"missing column (file has {sorted(names)})", file=file, column=col
            )
    arrays = {}
    for col in columns:
        expected = ROLLOUT_SCHEMA.field(col).type
        arr = table.column(col)
        if not _type_ok(arr.type, expected):
            raise RolloutSchemaError(f"has type {arr.type}, expected {expected}", file=file,
                                     column=col)
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
                raise RolloutSchemaError(f"cannot cast {arr.type} to {expected} ({e})", file=file,
                                         column=col) from None
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
                raise RolloutSchemaError(f"missing column (file has {sorted(schema_names)})",
                                         file=file, column=col)
        table = table.append_column("prompt_token_ids", pa.array([[]] * table.num_rows,
                                                                 pa.list_(pa.int32())))
        for col in ("response_token_ids", "response_logprobs"):
            table = table.append_column(
                col, pa.array([[]] * table.num_rows, ROLLOUT_SCHEMA.field(col).type)
            )
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


def read_rollouts(
    path_or_dir: str | os.PathLike[str], *, with_tokens: bool = True
) -> list[RolloutGroup]:
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
                    file=file, row=first_row, column="prompt_id",
                )
            seen[group.prompt_id] = (file, first_row)
            groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------
