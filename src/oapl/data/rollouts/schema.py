"""Rollout datasets: the Parquet schema, and one row per sampled response, grouped by prompt.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from oapl.errors import UserError
from oapl.rollout.group import RolloutGroup


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
_STR_COLUMNS = (
    "prompt_id",
    "prompt",
    "response",
    "finish_reason",
    "weights_id",
    "sampling",
    "task",
    "benchmark",
    "extra",
)
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
                file=file,
                row=row_number,
                column=col,
            )


def _group_from_rows(rows: Sequence[Mapping[str, Any]], row_numbers: list[int], *, file: str | None) -> RolloutGroup:
    """Assemble one group; ``row_numbers[j]`` is the position of ``rows[j]`` for error messages."""
    located = list(zip(rows, row_numbers))
    pid = _one_prompt(located, file)
    _check_group_columns_agree(located, pid, file)
    ordered, group_rewards = _responses_in_order(located, pid, file)
    first, first_row = located[0]
    if not isinstance(pid, str) or not pid:
        raise RolloutSchemaError("prompt_id must be a non-empty string", file=file, row=first_row, column="prompt_id")
    _check_responses(ordered, group_rewards, pid, file)
    _check_json_objects(first, first_row, file)
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


# A row with the position it is reported at.
_Located = list[tuple[Mapping[str, Any], int]]


def _one_prompt(located: _Located, file: str | None) -> Any:
    """The prompt id all rows share."""
    pid = located[0][0]["prompt_id"]
    for row, rn in located:
        if row["prompt_id"] != pid:
            raise RolloutSchemaError(
                f"rows of several prompts given to one group ({pid!r} and {row['prompt_id']!r})",
                file=file,
                row=rn,
                column="prompt_id",
            )
    return pid


def _check_group_columns_agree(located: _Located, pid: Any, file: str | None) -> None:
    """Group-level columns (``prompt``, ``group_rewards``, ...) are the same on every row."""
    (first, first_row), rest = located[0], located[1:]
    for col in _GROUP_COLUMNS:
        ref = first[col]
        for row, rn in rest:
            value = row[col]
            if col == "group_rewards":
                same = len(value) == len(ref) and all(_same_float(float(a), float(b)) for a, b in zip(value, ref))
            else:
                same = value == ref
            if not same:
                raise RolloutSchemaError(
                    f"prompt {pid!r}: rows disagree on {col} ({_short(value, 80)} here, "
                    f"{_short(ref, 80)} on row {first_row})",
                    file=file,
                    row=rn,
                    column=col,
                )


def _responses_in_order(located: _Located, pid: Any, file: str | None) -> tuple[_Located, list[float]]:
    """The rows by ``response_index``, which must be exactly ``0..n-1`` with one reward each in
    ``group_rewards``; and those group rewards."""
    first, first_row = located[0]
    by_index: dict[int, tuple[Mapping[str, Any], int]] = {}
    for row, rn in located:
        idx = int(row["response_index"])
        if idx in by_index:
            raise RolloutSchemaError(
                f"prompt {pid!r}: duplicate response_index {idx} (also on row {by_index[idx][1]})",
                file=file,
                row=rn,
                column="response_index",
            )
        by_index[idx] = (row, rn)
    n = len(located)
    group_rewards = [float(r) for r in first["group_rewards"]]
    expected_n = max(n, len(group_rewards))
    missing = sorted(set(range(expected_n)) - set(by_index))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise RolloutSchemaError(
            f"prompt {pid!r}: missing response_index {shown} (group has {n} rows, group_rewards "
            f"has {len(group_rewards)} entries; indices must be 0..n-1)",
            file=file,
            row=first_row,
            column="response_index",
        )
    if len(group_rewards) != n:
        raise RolloutSchemaError(
            f"prompt {pid!r}: group_rewards has {len(group_rewards)} entries but the group has {n} rows",
            file=file,
            row=first_row,
            column="group_rewards",
        )
    return [by_index[i] for i in range(n)], group_rewards


def _check_responses(ordered: _Located, group_rewards: list[float], pid: Any, file: str | None) -> None:
    """Each response has one log-prob per token, and its reward is its entry in ``group_rewards``."""
    for i, (row, rn) in enumerate(ordered):
        n_ids, n_lps = len(row["response_token_ids"]), len(row["response_logprobs"])
        if n_ids != n_lps:
            raise RolloutSchemaError(
                f"prompt {pid!r}, response {i}: {n_lps} log-probs for {n_ids} response_token_ids",
                file=file,
                row=rn,
                column="response_logprobs",
            )
        reward = float(row["reward"])
        if not _same_float(reward, group_rewards[i]):
            raise RolloutSchemaError(
                f"prompt {pid!r}: reward {reward} of response {i} != group_rewards[{i}] = {group_rewards[i]}",
                file=file,
                row=rn,
                column="reward",
            )


def _check_json_objects(first: Mapping[str, Any], first_row: int, file: str | None) -> None:
    """``sampling`` and ``extra`` hold JSON objects."""
    for col in ("sampling", "extra"):
        try:
            decoded = json.loads(first[col])
        except json.JSONDecodeError as e:
            raise RolloutSchemaError(f"not valid JSON ({e})", file=file, row=first_row, column=col) from None
        if not isinstance(decoded, dict):
            raise RolloutSchemaError("must be a JSON object", file=file, row=first_row, column=col)


def _list_shards(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)
