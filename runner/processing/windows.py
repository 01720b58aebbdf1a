"""Windowed aggregation on event time, a batch at a time, with Arrow.

`WindowedAggregation.process(columns, times)` takes a batch of records (an Arrow table
holding the group-by fields and the aggregated ones, and each record's event time in
epoch milliseconds) and returns what the batch emits. Per batch, no Python per record:

1. Each record's window(s): tumbling `[floor(t / size) * size, + size)`; hopping every
   window of `size` starting at a multiple of `advance` that holds `t`.
2. Lateness: the stream time a record meets is the largest event time seen before it (in
   arrival order: a cumulative max). A window closes when the stream time reaches its end
   plus `grace`; a record whose window has closed is late for it. A record late for every
   window it belongs to is handed back (`Result.late`, with the window it missed and by how
   much) for the dead-letter topic; one late for some of its windows only counts in the
   others (hopping), and the missed ones are counted.
3. One `group_by` over (window start, group-by fields) computes each group's partial
   aggregates in C; the partials merge into the state, one entry per open window and key.
4. `emit: final`: the windows the stream time has closed are emitted once, in window then
   key order, and dropped from the state. `emit: updates`: every window the batch changed
   is emitted with its value so far (one update per window per batch, not per record).

Aggregates: count() (records), sum, min, max, mean (of the non-null values),
count_distinct (non-null values), first and last (the value of the earliest and latest
record by event time, null included; ties go to the earlier arrival).

State is a dict of `Partial`s keyed by (window start, key values); `snapshot()` and
`restore()` give and take it as plain values, for a state store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

FUNCTIONS = ("count", "sum", "min", "max", "mean", "count_distinct", "first", "last")
NUMERIC = ("sum", "mean")  # need a numeric field


def _floor(times: pa.Array, unit: int) -> pa.Array:
    """Each time rounded down to a multiple of `unit` (before 1970 too: Arrow's integer
    division truncates toward zero)."""
    shifted = pc.if_else(pc.less(times, 0), pc.subtract(times, unit - 1), times)
    return pc.multiply(pc.divide(shifted, unit), unit)


@dataclass(frozen=True)
class Tumbling:
    size: int  # ms

    def starts(self, times: pa.Array) -> list[pa.Array]:
        """Per window a record may fall in, each record's window start (here: one)."""
        return [_floor(times, self.size)]


@dataclass(frozen=True)
class Hopping:
    size: int  # ms
    advance: int  # ms, at most size

    def starts(self, times: pa.Array) -> list[pa.Array]:
        """The k-th window back from the latest one starting at or before each record;
        a start whose window ends at or before the record is masked out later."""
        last = _floor(times, self.advance)
        return [pc.subtract(last, k * self.advance) for k in range(math.ceil(self.size / self.advance))]


@dataclass(frozen=True)
class Aggregate:
    name: str  # the output field
    function: str  # one of FUNCTIONS
    field: str | None = None  # None for count()


@dataclass
class Partial:
    """One window and key's aggregates so far."""

    count: int = 0
    sums: dict[str, Any] = field(default_factory=dict)  # field -> sum of non-null values
    counts: dict[str, int] = field(default_factory=dict)  # field -> non-null values
    mins: dict[str, Any] = field(default_factory=dict)
    maxs: dict[str, Any] = field(default_factory=dict)
    distinct: dict[str, set] = field(default_factory=dict)
    first: dict[str, tuple[int, Any]] = field(default_factory=dict)  # field -> (time, value)
    last: dict[str, tuple[int, Any]] = field(default_factory=dict)


@dataclass
class Late:
    """A record late for every window it belongs to: the last of them, and by how much
    the stream time had passed that window's close when the record came."""

    index: int
    window_start: int
    window_end: int
    late_by: int  # ms


@dataclass
class Result:
    emitted: list[dict[str, Any]]  # key fields, window_start, window_end (ms), aggregates
    late: list[Late]
    late_windows: int  # windows records missed while counting in others (hopping)


class WindowedAggregation:
    def __init__(self, window: Tumbling | Hopping, keys: list[str], aggregates: list[Aggregate],
                 *, grace: int = 0, emit: str = "final") -> None:
        self.window = window
        self.keys = list(keys)
        self.aggregates = list(aggregates)
        self.grace = grace
        self.emit = emit
        self.state: dict[tuple[int, tuple], Partial] = {}
        self.stream_time: int | None = None
        # Fields by what their partials need.
        by = {f: [a.field for a in aggregates if a.function in f_names and a.field]
              for f, f_names in (("sum", ("sum", "mean")), ("minmax", ("min",)), ("max", ("max",)),
                                 ("distinct", ("count_distinct",)), ("first", ("first",)), ("last", ("last",)))}
        self._sum_fields = sorted(set(by["sum"]))
        self._min_fields = sorted(set(by["minmax"]))
        self._max_fields = sorted(set(by["max"]))
        self._distinct_fields = sorted(set(by["distinct"]))
        self._first_fields = sorted(set(by["first"]))
        self._last_fields = sorted(set(by["last"]))

    # -- a batch ---------------------------------------------------------------------------

    def process(self, columns: pa.Table, times: pa.Array) -> Result:
        """Aggregate a batch (`columns`, with each record's event time in `times`, epoch ms,
        in arrival order); what it emits. Rows with a null time or key are the caller's to
        refuse before: they have no window."""
        times = times.cast(pa.int64())
        n = len(times)
        if n == 0:
            return Result([], [], 0)
        before = self._stream_times_before(times)
        latest = pc.max(times).as_py()
        self.stream_time = latest if self.stream_time is None else max(self.stream_time, latest)
        size = self.window.size
        index = pa.array(range(n), pa.int64())
        parts = []
        holding = missing = pa.array([0] * n, pa.int64())
        last_missed = pa.nulls(n, pa.int64())
        for starts in self.window.starts(times):
            holds = pc.greater(pc.add(starts, size), times)  # the window reaches the record
            closed = pc.less_equal(pc.add(starts, size + self.grace), before)
            missed = pc.and_(holds, closed)
            counted = pc.and_(holds, pc.invert(closed))
            holding = pc.add(holding, pc.cast(holds, pa.int64()))
            missing = pc.add(missing, pc.cast(missed, pa.int64()))
            last_missed = pc.max_element_wise(last_missed, pc.if_else(missed, starts, None))
            if pc.any(counted).as_py():
                part = columns.append_column("__start", starts).append_column("__time", times)
                parts.append(part.append_column("__index", index).filter(counted))
        wholly = pc.equal(missing, holding)
        late = [
            Late(i, start, start + size, stream - (start + size + self.grace))
            for i, start, stream in zip(
                pc.indices_nonzero(wholly).to_pylist(),
                last_missed.filter(wholly).to_pylist(),
                before.filter(wholly).to_pylist(),
            )
        ]
        late_windows = pc.sum(missing.filter(pc.invert(wholly))).as_py() or 0
        changed: set[tuple[int, tuple]] = set()
        if parts:
            rows = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            # First and last by event time, ties by arrival: the group_by keeps input order.
            rows = rows.sort_by([("__time", "ascending"), ("__index", "ascending")])
            changed = self._merge(rows)
        return Result(self._emit(changed), late, late_windows)

    def advance(self, stream_time: int) -> list[dict[str, Any]]:
        """Move the stream time to `stream_time` without records (idle close: wall-clock
        time passing); the windows that closes, for `emit: final`."""
        if self.stream_time is None or stream_time > self.stream_time:
            self.stream_time = stream_time
        return self._emit(set()) if self.emit == "final" else []

    # -- state as plain values ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"stream_time": self.stream_time,
                "windows": [[start, list(key), _partial_out(p)] for (start, key), p in self.state.items()]}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.stream_time = snapshot["stream_time"]
        self.state = {(start, tuple(key)): _partial_in(p) for start, key, p in snapshot["windows"]}

    # -- inside ---------------------------------------------------------------------------

    def _stream_times_before(self, times: pa.Array) -> pa.Array:
        """The stream time each record meets: the largest time before it (prior batches
        included); the first record ever meets its own time minus one (nothing is late)."""
        running = pc.cumulative_max(times)
        start = self.stream_time if self.stream_time is not None else pc.min(times).as_py() - 1 - self.grace - self.window.size
        shifted = pa.concat_arrays([pa.array([start], pa.int64()), running.slice(0, len(times) - 1)])
        return pc.max_element_wise(shifted, pa.scalar(start, pa.int64()))

    def _merge(self, rows: pa.Table) -> set[tuple[int, tuple]]:
        """Each (window, key) group's partials of `rows` merged into the state; the groups."""
        groups = ["__start", *self.keys]
        specs: list[tuple[Any, ...]] = [([], "count_all"), ("__time", "min"), ("__time", "max")]
        for f in self._sum_fields:
            specs += [(f, "sum"), (f, "count")]
        specs += [(f, "min") for f in self._min_fields] + [(f, "max") for f in self._max_fields]
        specs += [(f, "distinct") for f in self._distinct_fields]
        keep_nulls = pc.ScalarAggregateOptions(skip_nulls=False)
        specs += [(f, "first", keep_nulls) for f in self._first_fields]
        specs += [(f, "last", keep_nulls) for f in self._last_fields]
        table = rows.group_by(groups, use_threads=False).aggregate(specs)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        changed = set()
        for g in range(table.num_rows):
            key = (columns["__start"][g], tuple(columns[k][g] for k in self.keys))
            p = self.state.get(key)
            if p is None:
                p = self.state[key] = Partial()
            changed.add(key)
            p.count += columns["count_all"][g]
            first_time, last_time = columns["__time_min"][g], columns["__time_max"][g]
            for f in self._sum_fields:
                value, count = columns[f + "_sum"][g], columns[f + "_count"][g]
                if count:
                    p.sums[f] = value if f not in p.sums else p.sums[f] + value
                    p.counts[f] = p.counts.get(f, 0) + count
            for f in self._min_fields:
                value = columns[f + "_min"][g]
                if value is not None and (f not in p.mins or value < p.mins[f]):
                    p.mins[f] = value
            for f in self._max_fields:
                value = columns[f + "_max"][g]
                if value is not None and (f not in p.maxs or value > p.maxs[f]):
                    p.maxs[f] = value
            for f in self._distinct_fields:
                p.distinct.setdefault(f, set()).update(v for v in columns[f + "_distinct"][g] if v is not None)
            for f in self._first_fields:
                if f not in p.first or first_time < p.first[f][0]:
                    p.first[f] = (first_time, columns[f + "_first"][g])
            for f in self._last_fields:
                if f not in p.last or last_time >= p.last[f][0]:
                    p.last[f] = (last_time, columns[f + "_last"][g])
        return changed

    def _emit(self, changed: set[tuple[int, tuple]]) -> list[dict[str, Any]]:
        """`final`: the windows the stream time has closed, dropped from the state.
        `updates`: the windows in `changed`, kept."""
        if self.emit == "updates":
            return [self._record(key, self.state[key]) for key in sorted(changed, key=_order)]
        if self.stream_time is None:
            return []
        horizon = self.stream_time - self.window.size - self.grace  # windows starting at or before close
        closed = sorted((key for key in self.state if key[0] <= horizon), key=_order)
        return [self._record(key, self.state.pop(key)) for key in closed]

    def _record(self, key: tuple[int, tuple], p: Partial) -> dict[str, Any]:
        start, values = key
        out: dict[str, Any] = dict(zip(self.keys, values))
        out["window_start"], out["window_end"] = start, start + self.window.size
        for a in self.aggregates:
            f = a.field
            if a.function == "count":
                out[a.name] = p.count
            elif a.function == "sum":
                out[a.name] = p.sums.get(f)
            elif a.function == "mean":
                out[a.name] = p.sums[f] / p.counts[f] if p.counts.get(f) else None
            elif a.function == "min":
                out[a.name] = p.mins.get(f)
            elif a.function == "max":
                out[a.name] = p.maxs.get(f)
            elif a.function == "count_distinct":
                out[a.name] = len(p.distinct.get(f, ()))
            elif a.function == "first":
                out[a.name] = p.first[f][1] if f in p.first else None
            elif a.function == "last":
                out[a.name] = p.last[f][1] if f in p.last else None
        return out


def _order(key: tuple[int, tuple]) -> tuple:
    """Window start, then key values (None first)."""
    start, values = key
    return (start, tuple((v is not None, v) for v in values))


def _partial_out(p: Partial) -> dict[str, Any]:
    return {"count": p.count, "sums": p.sums, "counts": p.counts, "mins": p.mins, "maxs": p.maxs,
            "distinct": {f: sorted(v, key=repr) for f, v in p.distinct.items()},
            "first": {f: list(v) for f, v in p.first.items()}, "last": {f: list(v) for f, v in p.last.items()}}


def _partial_in(d: dict[str, Any]) -> Partial:
    return Partial(d["count"], dict(d["sums"]), dict(d["counts"]), dict(d["mins"]), dict(d["maxs"]),
                   {f: set(v) for f, v in d["distinct"].items()},
                   {f: tuple(v) for f, v in d["first"].items()}, {f: tuple(v) for f, v in d["last"].items()})
