"""Rollout datasets: one Parquet row per sampled response, grouped by prompt (see :mod:`.schema`).

:mod:`.schema` defines the columns and the row <-> group conversion, :mod:`.write` the atomic,
resumable writer, :mod:`.read` the validating reader.
"""

from oapl.data.rollouts.read import read_rollouts
from oapl.data.rollouts.schema import (
    COLUMNS,
    META_FILENAME,
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    RolloutMetaMismatchError,
    RolloutSchemaError,
    group_from_rows,
    group_to_rows,
)
from oapl.data.rollouts.write import RolloutWriter, groups_to_table, write_rollouts
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
