"""Windowed aggregation on event time, a batch at a time, with Arrow.

`WindowedAggregation(window, keys, aggregates, grace=0, emit="final")` aggregates records
per key (the group-by fields, `keys`) in windows of one of five kinds: `Tumbling(size)`,
`Hopping(size, advance)`, `Session(gap)`, `Sliding(size)` (all ms) and `Count(n)`
(records). Whatever the kind, the processor runner sees one interface:

- `process(columns, times) -> Result`: a batch of records (an Arrow table holding the
  group-by fields and the aggregated ones, and each record's event time in epoch ms, in
  arrival order) and what it emits: `Result.emitted`, an Arrow table of the key fields,
  `window_start`, `window_end` (epoch ms) and each aggregate under its `Aggregate.name`;
  `Result.late`, the records late for every window they belong to (for the dead-letter
  topic); `Result.late_windows`, windows records missed while counting in others (hopping).
- `advance(t)`: the stream time moves to `t` without records (idle); the windows that closes.
- `close_all()`: every open window closes (the input ended, or `idle_close`).
- `open_windows`, `stream_time`; `snapshot()` gives the state as `{"stream_time": ...,
  "tables": {name: Arrow IPC bytes}}` and `restore()` takes it back, for a state store.

No Python runs per record (for sessions, per session or run of records at most).

Time and lateness (every kind but count). The stream time a record meets is the largest
event time seen before it (in arrival order: a cumulative max, prior batches included; the
first record ever is not late); after a batch, the largest event time seen. A window closes
when the stream time reaches its close, its end plus `grace` (per kind below). A record late
for every window it belongs to is handed back (`Result.late`) with the last of them and by
how much the stream time had passed that window's close when the record came (`late_by`).

Emission. `emit: final`: after each batch (and on `advance`), the windows the stream time
has closed, emitted once and dropped from the state. `emit: updates`: every window the batch
changed, with its value so far (one update per window per batch, not per record); closed
windows leave the state without a further emission. Either way in (window_start, key)
order, None keys first, unless the kind says otherwise. `close_all` moves the stream time
just far enough that every open window is closed (a record that comes later for one of them
is late, one for a later window is not) and, under `final`, emits them.

Tumbling `Tumbling(size)` and hopping `Hopping(size, advance)` windows: a record at `t`
belongs to every window `[start, start + size)` holding `t` whose start is a multiple of
`advance` (tumbling: of `size`); `window_end` is the (exclusive) end, the close `end +
grace`. A record late for some of its windows only (hopping) counts in the others, and the
missed ones are counted in `Result.late_windows`. One `group_by` over (window start, key)
computes a batch's partial aggregates, merged into the state (`Partials`, an Arrow table
too): a batch of 10,000 activity records with about 5,000 (path, status, minute) groups
aggregates at about 1,000,000 records/s here, a dict loop over the same records as dicts
at 230,000.

Session windows `Session(gap)` (gap at least 0), per key:

- A session's `window_start` and `window_end` are its earliest and latest record's event
  time (both included); it closes when the stream time reaches `end + gap + grace`.
- A record at `t` reaches every open session of its key (open against the stream time the
  record meets) whose `[start - gap, end + gap]` holds `t`, and joins them all into one
  session (a record between two sessions bridges them). A record that reaches none starts
  the session `[t, t]`, unless that would already be closed (`t + gap + grace <=` the stream
  time it meets): then it is late, counts in nothing, and is handed back with the window
  `[t, t]` and `late_by = stream time - (t + gap + grace)`. A closed session never takes a
  record again: one within `gap` of it starts a session of its own (or is late).
- Emitted in (window_start, key, window_end) order; under `updates` every session the batch
  created or changed, as it stands after the batch (one merged into another is not emitted).

Sliding windows `Sliding(size)` (size at least 0), per key, as Kafka Streams' sliding
windows (the "left" ones):

- Each distinct event time `t` among a key's counted records defines the window `[t - size,
  t]` of that key (both ends included: `window_start = t - size`, `window_end = t`). It holds
  every counted record of the key whose time falls in it, those that come after the one
  that defined it (out of order, within grace) included. It closes when the stream time
  reaches `t + grace` (its end plus grace).
- A record at `u` is late when its own window `[u - size, u]` is closed as it comes (`u +
  grace <=` the stream time it meets): it counts nowhere and defines no window; it is handed
  back with the window `[u - size, u]` and `late_by = stream time - (u + grace)`. So a window
  holds exactly the records of its key and span that were not late, one rule. (Kafka Streams
  would still count such a record in the later windows, `t > u`, that are open; here they
  miss it.) A record that is not late meets only open windows: each window holding it ends
  at or after it, so it closes no sooner than the record's own.
- Why no "right" windows: Kafka Streams also creates, after a record followed by others
  within `size`, the window starting just after it (`[t + 1, t + 1 + size]`), so that every
  distinct set of records a window of `size` can hold has an output (for "the largest sum
  over any 5 minutes"). The question asked of sliding windows is mostly "in the `size`
  before each event" (views in the 5 minutes before each purchase): one output per event
  time, the left windows; the right ones end at no event and would have to be filtered out.

Count windows `Count(n)` (n at least 1), per key:

- A key's records in arrival order form windows of `n`: its 1st to n-th record, the (n+1)-th
  to 2n-th, and so on. `window_start` and `window_end` are the smallest and the largest event
  time among the window's records (both included).
- A window is complete at its n-th record. `emit: final`: a batch emits the windows it
  completed; `emit: updates`: every window the batch changed (completed, or still open with
  its value so far). Either way in the order of the last record each window took from the
  batch. Nothing is late and `grace` is ignored; `advance` emits nothing (an open window
  waits for its n-th record however long it takes). `close_all` ends each key's open window
  as it stands (fewer than `n` records; under `final` emitted, in key order): the key's
  next record starts a new window.

Aggregates: count() (records), sum, min, max, mean (of the non-null values),
count_distinct (non-null values), first and last (the value of the earliest and latest
record by event time, null included; among records of equal event time, the earlier arrival
counts as earlier: first takes the earlier arrival, last the later).

State: Arrow tables (see `partials.py`; sliding windows keep the records their open windows
can still need), whose internal columns are named with a `#`, which no Avro field name has.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Self

import pyarrow as pa
import pyarrow.compute as pc

from runner.processing.partials import Partials, array, positions, repeat

FUNCTIONS = ("count", "sum", "min", "max", "mean", "count_distinct", "first", "last")


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
class Session:
    gap: int  # ms, at least 0

    def __post_init__(self) -> None:
        if self.gap < 0:
            raise ValueError(f"a session gap is at least 0 ms, not {self.gap}")


@dataclass(frozen=True)
class Sliding:
    size: int  # ms, at least 0: a window is [t - size, t]

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"a sliding window's size is at least 0 ms, not {self.size}")


@dataclass(frozen=True)
class Count:
    n: int  # records per window, at least 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"a count window holds at least 1 record, not {self.n}")


Window = Tumbling | Hopping | Session | Sliding | Count


@dataclass(frozen=True)
class Aggregate:
    name: str  # the output field
    function: str  # one of FUNCTIONS
    field: str | None = None  # None for count()


@dataclass
class Late:
    """A record late for every window it belongs to: the last of them (sessions: the
    session `[t, t]` it would have started; sliding: its own window), and by how much the
    stream time had passed that window's close when the record came."""

    index: int
    window_start: int
    window_end: int
    late_by: int  # ms


@dataclass
class Result:
    emitted: pa.Table  # key fields, window_start, window_end (ms), aggregates
    late: list[Late]
    late_windows: int  # windows records missed while counting in others (hopping)


# Which class aggregates which window kind (module, class), imported when first used.
_KINDS = {Tumbling: (__name__, "TimeWindowAggregation"), Hopping: (__name__, "TimeWindowAggregation"),
          Session: ("runner.processing.sessions", "SessionAggregation"),
          Sliding: ("runner.processing.sliding", "SlidingAggregation"),
          Count: ("runner.processing.counts", "CountAggregation")}


class WindowedAggregation(ABC):
    """See the module docstring. `WindowedAggregation(window, ...)` makes the aggregation of
    the window's kind, a subclass. A kind implements `process`, `advance` and `close_all`;
    its state is a `Partials` (`self._partials`) unless it overrides `open_windows`,
    `_tables` and `_load` (sliding windows keep records instead)."""

    _partials: Partials

    def __new__(cls, window: Window, *args: Any, **kwargs: Any) -> Self:
        kind = cls
        if cls is WindowedAggregation:
            if type(window) not in _KINDS:
                raise TypeError(f"not a window: {window!r}")
            module, name = _KINDS[type(window)]
            kind = getattr(importlib.import_module(module), name)
        return super().__new__(kind)

    def __init__(self, window: Window, keys: list[str], aggregates: list[Aggregate],
                 *, grace: int = 0, emit: str = "final") -> None:
        if emit not in ("final", "updates"):
            raise ValueError(f"emit is final or updates, not {emit!r}")
        self.window = window
        self.keys = list(keys)
        self.aggregates = list(aggregates)
        self.grace = grace
        self.emit = emit
        self.stream_time: int | None = None

    @property
    def open_windows(self) -> int:
        """Windows (and keys) held in the state, open."""
        return self._partials.rows

    @abstractmethod
    def process(self, columns: pa.Table, times: pa.Array) -> Result:
        """Aggregate a batch (`columns`, with each record's event time in `times`, epoch ms,
        in arrival order); what it emits. Rows with a null time or key are the caller's to
        refuse before: they have no window."""

    @abstractmethod
    def advance(self, stream_time: int) -> pa.Table:
        """Move the stream time to `stream_time` without records (idle close: wall-clock
        time passing); the windows that closes, for `emit: final`."""

    @abstractmethod
    def close_all(self) -> pa.Table:
        """Close every open window (the input ended, or stayed idle: `idle_close`)."""

    # -- state as bytes ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The state: the stream time, and each state table as Arrow IPC bytes."""
        return {"stream_time": self.stream_time, "tables": {name: _ipc(t) for name, t in self._tables().items()}}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.stream_time = snapshot["stream_time"]
        self._load({name: _from_ipc(data) for name, data in snapshot["tables"].items()})

    def _tables(self) -> dict[str, pa.Table]:
        return self._partials.tables()

    def _load(self, tables: dict[str, pa.Table]) -> None:
        self._partials.load(tables)

    # -- shared -----------------------------------------------------------------------------

    def _times(self, times: pa.Array) -> pa.Array:
        return array(times.cast(pa.int64()))

    def _stream_times_before(self, times: pa.Array, reach: int) -> pa.Array:
        """The stream time each record meets: the largest time before it (prior batches
        included); before the first record ever, a time at which nothing is late (`reach`:
        from a record's time to the earliest close of a window it belongs to, less grace)."""
        running = pc.cumulative_max(times)
        start = self.stream_time
        if start is None:
            start = pc.min(times).as_py() - 1 - self.grace - reach
        shifted = pa.concat_arrays([pa.array([start], pa.int64()), running.slice(0, len(times) - 1)])
        return pc.max_element_wise(shifted, pa.scalar(start, pa.int64()))

    def _seen(self, times: pa.Array) -> None:
        latest = pc.max(times).as_py()
        self.stream_time = latest if self.stream_time is None else max(self.stream_time, latest)

    def _output(self, rows: pa.Table | None, partials: Partials, start: pa.Array | None = None,
                end: pa.Array | None = None) -> pa.Table:
        """Output records of state rows: key fields, window_start, window_end, aggregates."""
        if rows is None:
            return pa.table({})
        columns: dict[str, Any] = {k: rows.column(k) for k in self.keys}
        columns["window_start"], columns["window_end"] = start, end
        columns.update(partials.values(rows))
        return pa.table(columns)


class TimeWindowAggregation(WindowedAggregation):
    """Tumbling and hopping windows. The state (`Partials`) has one row per open window and
    key, grouped by (`#start`, key fields)."""

    window: Tumbling | Hopping

    def __init__(self, window: Tumbling | Hopping, keys: list[str], aggregates: list[Aggregate],
                 *, grace: int = 0, emit: str = "final") -> None:
        super().__init__(window, keys, aggregates, grace=grace, emit=emit)
        self._partials = Partials(self.aggregates, ["#start", *self.keys])

    def process(self, columns: pa.Table, times: pa.Array) -> Result:
        times = self._times(times)
        n = len(times)
        if n == 0:
            return Result(self._emit(None), [], 0)
        size = self.window.size
        before = self._stream_times_before(times, size)
        self._seen(times)
        index = positions(n)  # arrival order
        parts = []
        holding = missing = repeat(0, n, pa.int64())
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
                part = columns.append_column("#start", starts).append_column("#time", times)
                parts.append(part.append_column("#index", index).filter(counted))
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
        changed = None
        if parts:
            rows = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            changed = self._partials.merge(rows)
        return Result(self._emit(changed), late, late_windows)

    def advance(self, stream_time: int) -> pa.Table:
        if self.stream_time is None or stream_time > self.stream_time:
            self.stream_time = stream_time
        return self._emit(None)

    def close_all(self) -> pa.Table:
        state = self._partials.state
        if state is None or state.num_rows == 0:
            return self._emit(None)
        last = pc.max(state.column("#start")).as_py()
        self.stream_time = max(self.stream_time, last + self.window.size + self.grace)
        if self.emit == "final":
            return self._emit(None)
        self._partials.clear()  # updates were emitted as they came
        return self._records(self._partials.state)

    def _emit(self, changed: pa.Array | None) -> pa.Table:
        """`final`: the windows the stream time has closed, dropped from the state.
        `updates`: the windows the batch changed (`changed`), kept while open. In window
        then key order (the state's)."""
        state = self._partials.state
        if state is None or state.num_rows == 0:
            return self._records(state)
        horizon = self.stream_time - self.window.size - self.grace  # windows starting there or before are closed
        closed = pc.less_equal(state.column("#start"), horizon)
        if self.emit == "updates":
            out = self._records(state.filter(changed) if changed is not None else state.slice(0, 0))
        elif pc.any(closed).as_py():
            out = self._records(state.filter(closed))
        else:
            return self._records(state.slice(0, 0))
        self._partials.keep(pc.invert(closed), "#start")  # nothing can change a closed window now
        return out

    def _records(self, rows: pa.Table | None) -> pa.Table:
        if rows is None:
            return pa.table({})
        start = rows.column("#start")
        return self._output(rows, self._partials, start, pc.add(start, self.window.size))


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
