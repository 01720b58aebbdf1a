"""Partial aggregates per group as Arrow tables, and the Arrow helpers the window kinds share.

`Partials` holds one row per group (a window and key) of partial aggregates, and merges a
batch of records into them with `group_by` (no Python per record or per group); tumbling,
hopping, session and count windows keep their state in one. Sliding windows recompute
their windows from the records instead, with the same aggregate specs (`specs`).

Internal columns are named with a `#` (`#start`, `#time`, `#count`, `#sum:bytes`, ...):
no Avro field can be (Avro names match `[A-Za-z_][A-Za-z0-9_]*`), so a user's field never
collides with one. The aggregated fields themselves are read under `#f:<name>`, so that
the names `group_by` gives its results (`#f:bytes_sum`) cannot meet a key field either.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

KEEP_NULLS = pc.ScalarAggregateOptions(skip_nulls=False)


def value(field: str) -> str:
    """The internal name an aggregated field is read under."""
    return f"#f:{field}"


class Partials:
    """The partial aggregates of groups of records (`groups`: internal and key columns).

    `state`: one row per group, sorted by group (None first): the group columns, `#count`,
    and per field what its aggregates need (`#sum:f` and `#n:f` for sum and mean, `#min:f`,
    `#max:f`, `#first:f`, `#last:f`, `#nd:f` for count_distinct), with `#tmin` and `#tmax`
    (the earliest and latest record's event time) when first/last need them or `span` asks.
    `distinct`: per count_distinct field, the distinct (group, `#v`) rows seen."""

    def __init__(self, aggregates: list[Any], groups: list[str], *, span: bool = False) -> None:
        self.aggregates = list(aggregates)
        self.groups = list(groups)
        self.sums = fields_of(aggregates, "sum", "mean")
        self.mins, self.maxs = fields_of(aggregates, "min"), fields_of(aggregates, "max")
        self.firsts, self.lasts = fields_of(aggregates, "first"), fields_of(aggregates, "last")
        self.distincts = fields_of(aggregates, "count_distinct")
        self.fields = sorted({a.field for a in aggregates if a.field})
        self.tmin = span or bool(self.firsts)
        self.tmax = span or bool(self.lasts)
        self.state: pa.Table | None = None
        self.distinct: dict[str, pa.Table] = {}

    @property
    def rows(self) -> int:
        return 0 if self.state is None else self.state.num_rows

    def merge(self, rows: pa.Table, changed: pa.Array | None = None) -> pa.Array:
        """Merge `rows` (the group columns, `#time`, `#index` in arrival order, and the
        aggregated fields by their own names; records that came after the state's) into the
        state: the batch's partials by one group_by, then state and batch partials (and the
        distinct values) concatenated and grouped again. `changed`: which state rows count
        as changed already (default none). Returns which rows of the new state are (a
        boolean mask): the batch's groups, and groups that merged a changed row."""
        groups = self.groups
        rows = pa.table({**{g: rows.column(g) for g in groups}, "#time": rows.column("#time"),
                         "#index": rows.column("#index"), **{value(f): rows.column(f) for f in self.fields}})
        if self.firsts or self.lasts:  # first and last by event time, ties by arrival: group_by keeps order
            rows = rows.sort_by([("#time", "ascending"), ("#index", "ascending")])
        p = rows.group_by(groups, use_threads=False).aggregate(specs(self, "#time", state=True))
        batch = {g: p.column(g) for g in groups}
        batch["#count"] = p.column("count_all")
        batch["#changed"] = repeat(True, p.num_rows, pa.bool_())
        if self.tmin:
            batch["#tmin"] = p.column("#time_min")
        if self.tmax:
            batch["#tmax"] = p.column("#time_max")
        for f in self.sums:
            batch[f"#sum:{f}"], batch[f"#n:{f}"] = p.column(value(f) + "_sum"), p.column(value(f) + "_count")
        for kind, fs in (("min", self.mins), ("max", self.maxs), ("first", self.firsts), ("last", self.lasts)):
            for f in fs:
                batch[f"#{kind}:{f}"] = p.column(f"{value(f)}_{kind}")
        parts = [pa.table(batch)]
        if self.state is not None:
            state = self.state.drop_columns([c for c in self.state.column_names if c.startswith("#nd:")])
            mark = changed if changed is not None else repeat(False, state.num_rows, pa.bool_())
            parts.insert(0, state.append_column("#changed", mark))
        # The distinct values seen per group: one row each (new ones, and duplicates a
        # relabelling made, merged in).
        for f in self.distincts:
            seen = rows.select(groups).append_column("#v", rows.column(value(f))).filter(pc.is_valid(rows.column(value(f))))
            if f in self.distinct:
                seen = pa.concat_tables([self.distinct[f], seen])
            self.distinct[f] = seen.group_by([*groups, "#v"], use_threads=False).aggregate([])
            n = self.distinct[f].num_rows
            parts.append(self.distinct[f].select(groups).append_column(f"#nd:{f}", repeat(1, n, pa.int64())))
        merged = pa.concat_tables(parts, promote_options="default")
        # State rows come before batch rows within a group: ties in first/last go to the
        # earlier arrival (first) or the later one (last).
        merged = merged.append_column("#source", positions(merged.num_rows))
        main: list[tuple] = [("#count", "sum"), ("#changed", "max")]
        main += [("#tmin", "min")] if self.tmin else []
        main += [("#tmax", "max")] if self.tmax else []
        main += [s for f in self.sums for s in ((f"#sum:{f}", "sum"), (f"#n:{f}", "sum"))]
        main += [(f"#min:{f}", "min") for f in self.mins] + [(f"#max:{f}", "max") for f in self.maxs]
        main += [(f"#nd:{f}", "sum") for f in self.distincts]
        out = grouped(merged, groups, main)
        for edge, kind, fs in (("#tmin", "first", self.firsts), ("#tmax", "last", self.lasts)):
            if fs:
                picked = merged.filter(pc.is_valid(merged.column(edge)))
                picked = picked.sort_by([(edge, "ascending"), ("#source", "ascending")])
                ends = grouped(picked, groups, [(f"#{kind}:{f}", kind, KEEP_NULLS) for f in fs])
                for f in fs:
                    out = out.append_column(f"#{kind}:{f}", ends.column(f"#{kind}:{f}"))
        self.state = out.drop_columns(["#changed"])
        return out.column("#changed")

    def keep(self, mask: pa.Array, by: str) -> None:
        """Only the state rows `mask` selects; distinct rows whose `by` (a group column
        telling groups apart, as `#start` or an id) is still in the state."""
        if self.state is None or pc.all(mask).as_py():
            return
        self.state = self.state.filter(mask)
        live = pc.unique(self.state.column(by))
        for f, table in self.distinct.items():
            self.distinct[f] = table.filter(pc.is_in(table.column(by), value_set=live))

    def relabel(self, by: str, old: pa.Array, new: pa.Array) -> None:
        """In the state and the distinct rows, each `by` value found in `old` becomes the
        `new` one at its place (merging groups: the next `merge` groups them together)."""
        if self.state is None or len(old) == 0:
            return
        self.state = _relabelled(self.state, by, old, new)
        self.distinct = {f: _relabelled(t, by, old, new) for f, t in self.distinct.items()}

    def clear(self) -> None:
        if self.state is not None:
            self.state = self.state.slice(0, 0)
        self.distinct = {f: t.slice(0, 0) for f, t in self.distinct.items()}

    def values(self, state: pa.Table) -> dict[str, pa.Array]:
        """Each aggregate's output column (by `Aggregate.name`) of state rows."""
        columns: dict[str, pa.Array] = {}
        for a in self.aggregates:
            f = a.field
            if a.function == "count":
                columns[a.name] = state.column("#count")
            elif a.function == "sum":
                columns[a.name] = pc.if_else(pc.greater(state.column(f"#n:{f}"), 0), state.column(f"#sum:{f}"), None)
            elif a.function == "mean":
                n = state.column(f"#n:{f}")
                total = pc.cast(state.column(f"#sum:{f}"), pa.float64())
                columns[a.name] = pc.if_else(pc.greater(n, 0), pc.divide(total, pc.cast(n, pa.float64())), None)
            elif a.function in ("min", "max", "first", "last"):
                columns[a.name] = state.column(f"#{a.function}:{f}")
            elif a.function == "count_distinct":
                columns[a.name] = pc.fill_null(state.column(f"#nd:{f}"), 0)
        return columns

    # -- as tables, for a snapshot ------------------------------------------------------------

    def tables(self) -> dict[str, pa.Table]:
        out = {"": self.state} if self.state is not None else {}
        return {**out, **{f"distinct:{f}": t for f, t in self.distinct.items()}}

    def load(self, tables: dict[str, pa.Table]) -> None:
        tables = dict(tables)
        self.state = tables.pop("", None)
        strange = [name for name in tables if not name.startswith("distinct:")]
        if strange or self.state is not None and not set(self.groups) <= set(self.state.column_names):
            found = self.state.column_names if self.state is not None else strange
            raise ValueError(f"the stored window state holds {found}, not the groups {self.groups} of this "
                             "window: written for another kind of window, or by an older version")
        self.distinct = {name.split(":", 1)[1]: t for name, t in tables.items() if name.startswith("distinct:")}


def specs(partials: Partials, time: str, *, state: bool) -> list[tuple]:
    """The group_by aggregations of records for `partials`' aggregates: mergeable partials
    (`state`: sum and count per field) or final values (sum, mean, count_distinct, as the
    window's own, for sliding windows)."""
    out: list[tuple] = [([], "count_all")]
    out += [(time, "min")] if partials.tmin else []
    out += [(time, "max")] if partials.tmax else []
    out += [s for f in partials.sums for s in ((value(f), "sum"), (value(f), "count"))]
    out += [(value(f), "min") for f in partials.mins] + [(value(f), "max") for f in partials.maxs]
    if not state:
        out += [(value(f), "count_distinct") for f in partials.distincts]
    out += [(value(f), "first", KEEP_NULLS) for f in partials.firsts]
    out += [(value(f), "last", KEEP_NULLS) for f in partials.lasts]
    return out


def fields_of(aggregates: list[Any], *functions: str) -> list[str]:
    return sorted({a.field for a in aggregates if a.function in functions and a.field})


def grouped(table: pa.Table, groups: list[str], specs: list[tuple]) -> pa.Table:
    """`table` grouped (first and last in its row order), the aggregated columns named as
    their inputs, the groups sorted (None first): Arrow's group_by does not keep the order
    in which groups appear, and results of several group_bys must line up row by row."""
    out = table.group_by(groups, use_threads=False).aggregate(specs)
    out = out.select([f"{s[0]}_{s[1]}" for s in specs] + list(groups))
    out = out.rename_columns([s[0] for s in specs] + list(groups)).select(list(groups) + [s[0] for s in specs])
    return out.sort_by([(g, "ascending", "at_start") for g in groups])


def _relabelled(table: pa.Table, by: str, old: pa.Array, new: pa.Array) -> pa.Table:
    column = table.column(by)
    at = pc.index_in(column, value_set=old)
    relabelled = pc.if_else(pc.is_valid(at), pc.take(new, at), column)
    return table.set_column(table.schema.get_field_index(by), by, relabelled)


# -- Arrow helpers ----------------------------------------------------------------------------


def repeat(value: Any, n: int, arrow_type: pa.DataType) -> pa.Array:
    """`n` times `value`, without a Python list of them."""
    return pa.repeat(pa.scalar(value, arrow_type), n)


def positions(n: int) -> pa.Array:
    """0, 1, ..., n - 1."""
    return pc.subtract(pc.cumulative_sum(repeat(1, n, pa.int64())), 1)


def array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def run_ids(starts: pa.Array) -> pa.Array:
    """Per row, the number of the run it is in, from whether each row starts one."""
    return pc.subtract(pc.cumulative_sum(pc.cast(starts, pa.int64())), 1)


def changes(column: pa.Array) -> pa.Array:
    """Per row, whether its value differs from the row before's (the first row's does); a
    null equals a null."""
    column = array(column)
    n = len(column)
    if n == 0:
        return pa.array([], pa.bool_())
    this, previous = column.slice(1), column.slice(0, n - 1)
    differs = pc.coalesce(pc.not_equal(this, previous), pc.not_equal(pc.is_null(this), pc.is_null(previous)))
    return pa.concat_arrays([pa.array([True]), differs])


def steps_over(times: pa.Array, gap: int) -> pa.Array:
    """Per time (sorted), whether it is more than `gap` after the one before (the first is)."""
    return pc.fill_null(pc.greater(pc.pairwise_diff(array(times)), gap), True)


def key_ids(tables: list[pa.Table | None], keys: list[str]) -> list[pa.Array]:
    """The key values of several tables as int64 ids, equal ids for equal values (a null
    equals a null), ordered as the keys sort (None first): Arrow's joins never match a
    null, so the window kinds match keys across tables by id."""
    sizes = [0 if t is None else t.num_rows for t in tables]
    total = sum(sizes)
    if not keys or total == 0:
        return [repeat(0, n, pa.int64()) for n in sizes]
    both = pa.concat_tables([t.select(keys) for t in tables if t is not None and t.num_rows])
    both = both.append_column("#row", positions(total))
    both = both.sort_by([(k, "ascending", "at_start") for k in keys])
    new = repeat(False, total, pa.bool_())
    for k in keys:
        new = pc.or_(new, changes(both.column(k)))
    ids = pc.take(run_ids(new), pc.sort_indices(both.column("#row")))
    out, at = [], 0
    for n in sizes:
        out.append(ids.slice(at, n))
        at += n
    return out
