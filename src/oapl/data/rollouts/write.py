"""Writing rollout datasets: atomic Parquet shards, resumable by prompt."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from oapl.atomic import atomic_write
from oapl.data.rollouts.schema import (
    META_FILENAME,
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    _TMP_RE,
    RolloutMetaMismatchError,
    RolloutSchemaError,
    _list_shards,
    _normalise,
    _short,
    group_to_rows,
)
from oapl.rollout.group import RolloutGroup


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
                    raise RolloutMetaMismatchError(self.out_dir, key, on_disk.get(key), self.meta[key])
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
        for key, value in (
            ("task", group.task),
            ("weights_id", group.weights_id),
            ("sampling", _normalise(dict(group.sampling))),
        ):
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
            raise ValueError(f"group {group.prompt_id!r} does not fit the rollout schema: {e}") from None
        self._buffer.append(table)
        self._buffer_rows += table.num_rows
        self._written.add(group.prompt_id)
        if self._buffer_rows >= self.shard_size:
            self.flush()

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

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # buffered groups are complete, so they are worth keeping even when the loop raised
        self.close()
