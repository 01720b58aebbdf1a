"""A table: the latest value per key of a topic, for enrichment joins, in Arrow.

`LatestByKey.update(keys, values, deleted, times)` takes a batch of a table topic's
records in offset order (a tombstone: `deleted`, its value row all nulls; `times`: their
topic timestamps) and keeps, per key, the latest; a tombstone deletes the key. With a
`retention` (ms), a key whose latest record is older than that against the table's newest
record is dropped too: the table stays bounded when keys stop coming (sessions, devices),
as a compacted topic with retention drops them. `LatestByKey.lookup(keys)` gives, for each key asked
(an Arrow binary array: the stream records' join field as the table's key bytes), the
table's fields of that key, or nulls, and whether it matched. Both are one Arrow
`group_by` or hash join per batch: no Python per record.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

_KEY, _ORDER, _DELETED, _PRESENT, _ROW, _TIME = "#key", "#order", "#deleted", "#present", "#row", "#time"


def positions(n: int) -> pa.Array:
    """0, 1, ..., n - 1 (int64), without a Python list."""
    return pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n)), 1) if n else pa.array([], pa.int64())


class LatestByKey:
    def __init__(self, schema: pa.Schema, retention: int | None = None) -> None:
        self.schema = schema  # the table's fields kept (the joined ones)
        self.retention = retention
        self.newest: int | None = None  # the newest record's timestamp
        self.table = schema.empty_table().append_column(_KEY, pa.array([], pa.binary())) \
            .append_column(_TIME, pa.array([], pa.int64()))

    def __len__(self) -> int:
        return self.table.num_rows

    def update(self, keys: pa.Array, values: pa.Table, deleted: pa.Array, times: pa.Array) -> None:
        """Records in offset order: `keys` (binary, none null), `values` (the schema's
        columns; anything for a tombstone), `deleted` (bool: a tombstone), `times` (ms)."""
        if not len(keys):
            return
        new = values.select(self.schema.names).cast(self.schema).append_column(_KEY, keys.cast(pa.binary())) \
            .append_column(_TIME, times.cast(pa.int64()))
        old = self.table
        both = pa.concat_tables([old.append_column(_DELETED, pa.repeat(pa.scalar(False), old.num_rows)),
                                 new.append_column(_DELETED, deleted)])
        both = both.append_column(_ORDER, positions(both.num_rows))
        latest = both.group_by(_KEY, use_threads=False).aggregate([(_ORDER, "max")])
        picked = both.take(latest.column(f"{_ORDER}_max")).sort_by(_ORDER)
        self.table = picked.filter(pc.invert(picked.column(_DELETED))).drop_columns([_DELETED, _ORDER])
        newest = pc.max(times).as_py()
        self.newest = newest if self.newest is None else max(self.newest, newest)
        if self.retention is not None:
            self.table = self.table.filter(pc.greater_equal(self.table.column(_TIME), self.newest - self.retention))

    def lookup(self, keys: pa.Array) -> tuple[pa.Table, pa.Array]:
        """Per key asked, in order: the table's fields (nulls where none) and whether one matched."""
        # The hash join carries row numbers only (it refuses lists, maps and records as
        # payload); the fields are taken by row number after (null where none matched).
        probe = pa.table({_KEY: keys.cast(pa.binary()), _ROW: positions(len(keys))})
        side = pa.table({_KEY: self.table.column(_KEY), _PRESENT: positions(self.table.num_rows)})
        joined = probe.join(side, _KEY, join_type="left outer", use_threads=False).sort_by(_ROW)
        rows = joined.column(_PRESENT).combine_chunks()
        return self.table.select(self.schema.names).take(rows), pc.is_valid(rows)
