"""Sliding windows (`Sliding(size)`), a batch at a time: the rules are in `windows.py`.

A window is defined by its records, so the state is the records (`#buffer`: the key
fields, `#time`, `#seq` their arrival order across batches, and the aggregated fields) that
an open window, or one a record to come could define, may still hold: those at or after
`stream time - grace - size` (a later record defines a window ending after `stream time -
grace`). Its windows are the distinct (key, `#time`) of its records; those ending after
`stream time - grace` are open.

Per batch, all in Arrow: the records late on arrival (their own window closed) are handed
back; the others join the buffer. The windows to emit (`final`: closed since the last
batch; `updates`: those the batch's records fall in, found by one sort of windows and new
records together) are recomputed from the buffer: a hash join on (key, bucket) with the
buffer's records (a window `[t - size, t]` spans buckets `t // size - 1` and `t // size` of
`size` ms), a filter to the window's span, one `group_by`. So a window's aggregates cost
its records (about twice, with the bucket's neighbours) each time it is emitted.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from runner.processing.partials import Partials, array, key_ids, positions, specs, value
from runner.processing.windows import (
    Aggregate,
    Late,
    Result,
    Sliding,
    WindowedAggregation,
    _floor,
)


class SlidingAggregation(WindowedAggregation):
    window: Sliding

    def __init__(self, window: Sliding, keys: list[str], aggregates: list[Aggregate],
                 *, grace: int = 0, emit: str = "final") -> None:
        super().__init__(window, keys, aggregates, grace=grace, emit=emit)
        self._partials = Partials(self.aggregates, ["#w"])  # its aggregate specs and output only
        self._fields = [f for f in self._partials.fields if f not in self.keys]
        self._buffer: pa.Table | None = None

    @property
    def open_windows(self) -> int:
        if self._buffer is None or self._buffer.num_rows == 0:
            return 0
        open_ = self._buffer.filter(pc.greater(pc.add(self._buffer.column("#time"), self.grace), self.stream_time))
        return open_.group_by([*self.keys, "#time"], use_threads=False).aggregate([]).num_rows

    def process(self, columns: pa.Table, times: pa.Array) -> Result:
        times = self._times(times)
        n = len(times)
        if n == 0:
            return Result(self._emit(self.stream_time, None), [], 0)
        size, grace = self.window.size, self.grace
        before = self._stream_times_before(times, 0)
        since = self.stream_time
        self._seen(times)
        late_mask = pc.less_equal(pc.add(times, grace), before)
        late = [Late(i, t - size, t, b - (t + grace)) for i, t, b in zip(
            pc.indices_nonzero(late_mask).to_pylist(), times.filter(late_mask).to_pylist(),
            before.filter(late_mask).to_pylist())]
        seq = 0 if self._buffer is None or self._buffer.num_rows == 0 else pc.max(self._buffer.column("#seq")).as_py() + 1
        new = pa.table({**{f: columns.column(f) for f in [*self.keys, *self._fields]},
                        "#time": times, "#seq": pc.add(positions(n), seq)}).filter(pc.invert(late_mask))
        if self._buffer is None:
            self._buffer = new
        elif new.num_rows:
            self._buffer = pa.concat_tables([self._buffer, new]).combine_chunks()
        return Result(self._emit(since, new), late, 0)

    def advance(self, stream_time: int) -> pa.Table:
        since = self.stream_time
        if self.stream_time is None or stream_time > self.stream_time:
            self.stream_time = stream_time
        return self._emit(since, None)

    def close_all(self) -> pa.Table:
        if self._buffer is None or self._buffer.num_rows == 0:
            return self._emit(self.stream_time, None)
        since = self.stream_time
        last = pc.max(self._buffer.column("#time")).as_py()
        self.stream_time = max(self.stream_time, last + self.grace)
        return self._emit(since, None)

    def _tables(self) -> dict[str, pa.Table]:
        return {} if self._buffer is None else {"#buffer": self._buffer}

    def _load(self, tables: dict[str, pa.Table]) -> None:
        self._buffer = tables.get("#buffer")
        if set(tables) - {"#buffer"} or self._buffer is not None and "#seq" not in self._buffer.column_names:
            raise ValueError(f"the stored window state holds {sorted(tables)}, not a sliding window's records: "
                             "written for another kind of window")

    # -- inside ---------------------------------------------------------------------------

    def _emit(self, since: int | None, new: pa.Table | None) -> pa.Table:
        """`final`: the windows closed since the stream time was `since`. `updates`: the
        windows the `new` records fall in. Then the buffer keeps only what open windows and
        records to come can need."""
        buffer = self._buffer
        if buffer is None or buffer.num_rows == 0:
            return self._output(None, self._partials)
        size, grace = self.window.size, self.grace
        key = key_ids([buffer], self.keys)[0]
        windows = pa.table({"#key": key, "#end": buffer.column("#time"), "#row": positions(buffer.num_rows)})
        windows = windows.group_by(["#key", "#end"], use_threads=False).aggregate([("#row", "min")])
        end = windows.column("#end")
        if self.emit == "final":
            closes = pc.add(end, grace)
            emit = pc.less_equal(closes, self.stream_time)
            if since is not None:
                emit = pc.and_(emit, pc.greater(closes, since))
        elif new is not None and new.num_rows:
            # Per window, the first new record of its key at or after its start: in it if
            # not after its end. Windows and new records sorted together by (key, time), a
            # window before a record of equal time; each window reads the next record row.
            w, m = windows.num_rows, new.num_rows
            both = pa.table({
                "k": pa.concat_arrays([array(windows.column("#key")), key.slice(buffer.num_rows - m)]),
                "at": pa.concat_arrays([array(pc.subtract(end, size)), array(new.column("#time"))]),
                "kind": pa.concat_arrays([pa.repeat(pa.scalar(0, pa.int8()), w), pa.repeat(pa.scalar(1, pa.int8()), m)]),
                "w": pa.concat_arrays([positions(w), pa.nulls(m, pa.int64())]),
                "end": pa.concat_arrays([array(end), pa.nulls(m, pa.int64())]),
                "rk": pa.concat_arrays([pa.nulls(w, pa.int64()), key.slice(buffer.num_rows - m)]),
                "rt": pa.concat_arrays([pa.nulls(w, pa.int64()), array(new.column("#time"))]),
            }).sort_by([("k", "ascending"), ("at", "ascending"), ("kind", "ascending")])
            hit = pc.and_(pc.equal(pc.fill_null_backward(both.column("rk")), both.column("k")),
                          pc.less_equal(pc.fill_null_backward(both.column("rt")), both.column("end")))
            picked = pa.table({"w": both.column("w"), "hit": pc.fill_null(hit, False)}).filter(
                pc.equal(both.column("kind"), 0)).sort_by("w")
            emit = array(picked.column("hit"))
        else:
            emit = None
        out = self._windows(buffer, key, windows.filter(emit)) if emit is not None else None
        keep = pc.greater(pc.add(buffer.column("#time"), size + grace), self.stream_time)
        if not pc.all(keep).as_py():
            self._buffer = buffer.filter(keep)
        return out if out is not None else self._output(None, self._partials)

    def _windows(self, buffer: pa.Table, key: pa.Array, windows: pa.Table) -> pa.Table | None:
        """The output records of `windows` (`#key`, `#end`, `#row_min`: a buffer row of the
        key), from the buffer's records: in (window_start, key) order."""
        if windows.num_rows == 0:
            return None
        size = self.window.size
        unit = max(size, 1)
        windows = windows.sort_by([("#end", "ascending"), ("#key", "ascending")])
        w = windows.num_rows
        end = array(windows.column("#end"))
        bucket = _floor(end, unit)
        asked = pa.table({"#key": pa.concat_arrays([array(windows.column("#key"))] * 2),
                          "#bucket": pa.concat_arrays([bucket, pc.subtract(bucket, unit)]),
                          "#w": pa.concat_arrays([positions(w)] * 2),
                          "#end": pa.concat_arrays([end, end])})
        records = pa.table({"#key": key, "#bucket": _floor(array(buffer.column("#time")), unit),
                            "#time": buffer.column("#time"), "#seq": buffer.column("#seq"),
                            **{value(f): buffer.column(f) for f in self._partials.fields}})
        rows = asked.join(records, ["#key", "#bucket"], join_type="inner", use_threads=False)
        t = rows.column("#time")
        rows = rows.filter(pc.and_(pc.greater_equal(t, pc.subtract(rows.column("#end"), size)),
                                   pc.less_equal(t, rows.column("#end"))))
        p = self._partials
        if p.firsts or p.lasts:  # first and last by event time, ties by arrival: group_by keeps order
            rows = rows.sort_by([("#time", "ascending"), ("#seq", "ascending")])
        g = rows.group_by("#w", use_threads=False).aggregate(specs(p, "#time", state=False)).sort_by("#w")
        state = {"#count": g.column("count_all")}
        for f in p.sums:
            state[f"#sum:{f}"], state[f"#n:{f}"] = g.column(value(f) + "_sum"), g.column(value(f) + "_count")
        for kind, fs in (("min", p.mins), ("max", p.maxs), ("first", p.firsts), ("last", p.lasts)):
            for f in fs:
                state[f"#{kind}:{f}"] = g.column(f"{value(f)}_{kind}")
        for f in p.distincts:
            state[f"#nd:{f}"] = g.column(value(f) + "_count_distinct")
        rows = buffer.select(self.keys).take(windows.column("#row_min"))
        for name, column in state.items():
            rows = rows.append_column(name, column)
        return self._output(rows, p, pc.subtract(end, size), end)
