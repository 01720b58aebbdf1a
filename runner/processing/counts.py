"""Count windows (`Count(n)`), a batch at a time: the rules are in `windows.py`.

The state is a `Partials` grouped by (key fields, `#window`), an id unique among the
windows held; each key has at most one open window, of fewer than `n` records. A batch,
sorted by key and arrival, gives each record its place in its key's sequence (the open
window's count plus its rank in the batch), hence its window: the open one (its id) or a new
one; one `group_by` merges the batch into the state, and complete windows leave it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from runner.processing.partials import (
    Partials,
    array,
    changes,
    key_ids,
    positions,
    run_ids,
)
from runner.processing.windows import Aggregate, Count, Result, WindowedAggregation


class CountAggregation(WindowedAggregation):
    window: Count

    def __init__(self, window: Count, keys: list[str], aggregates: list[Aggregate],
                 *, grace: int = 0, emit: str = "final") -> None:
        super().__init__(window, keys, aggregates, grace=grace, emit=emit)
        self._partials = Partials(self.aggregates, [*self.keys, "#window"], span=True)

    def process(self, columns: pa.Table, times: pa.Array) -> Result:
        times = self._times(times)
        n = len(times)
        state = self._partials.state
        if n == 0:
            return Result(self._records(None if state is None else state.slice(0, 0)), [], 0)
        self._seen(times)
        size = self.window.n
        key, state_key = key_ids([columns, state], self.keys)
        rows = columns.append_column("#time", times).append_column("#index", positions(n)).append_column("#key", key)
        rows = rows.sort_by([("#key", "ascending"), ("#index", "ascending")])
        key = array(rows.column("#key"))
        # Per key id, the open window's count and id (if the key has one).
        held = pa.nulls(0, pa.int64())
        open_id = pa.nulls(0, pa.int64())
        if state is not None and state.num_rows:
            at = pc.index_in(positions(max(pc.max(key).as_py(), pc.max(state_key).as_py()) + 1), value_set=state_key)
            held, open_id = pc.take(state.column("#count"), at), pc.take(state.column("#window"), at)
        new_key = changes(key)
        place = positions(n)
        rank = pc.subtract(place, pc.fill_null_forward(pc.if_else(new_key, place, None)))
        if len(held):
            held_here, open_here = pc.fill_null(pc.take(held, key), 0), pc.take(open_id, key)
        else:
            held_here, open_here = pc.multiply(rank, 0), pa.nulls(n, pa.int64())
        number = pc.divide(pc.add(rank, held_here), size)  # 0: the key's open window (or its first)
        fresh = 0 if state is None or state.num_rows == 0 else pc.max(state.column("#window")).as_py() + 1
        new_id = pc.add(run_ids(pc.or_(new_key, changes(number))), fresh)
        window = pc.if_else(pc.and_(pc.equal(number, 0), pc.is_valid(open_here)), open_here, new_id)
        rows = rows.append_column("#window", window)
        changed = self._partials.merge(rows)
        state = self._partials.state
        complete = pc.equal(state.column("#count"), size)
        last = rows.group_by("#window", use_threads=False).aggregate([("#index", "max")])
        at = pc.index_in(state.column("#window"), value_set=last.column("#window"))
        state = state.append_column("#last", pc.take(last.column("#index_max"), at))
        out = state.filter(complete if self.emit == "final" else changed).sort_by("#last")
        self._partials.keep(pc.invert(complete), "#window")
        return Result(self._records(out), [], 0)

    def advance(self, stream_time: int) -> pa.Table:
        if self.stream_time is None or stream_time > self.stream_time:
            self.stream_time = stream_time
        state = self._partials.state
        return self._records(None if state is None else state.slice(0, 0))

    def close_all(self) -> pa.Table:
        """Each key's open window ends as it stands; emitted (in key order) under `final`."""
        state = self._partials.state
        if state is None:
            return self._records(None)
        out = state if self.emit == "final" else state.slice(0, 0)
        self._partials.clear()
        if out.num_rows > 1:
            out = out.append_column("#key", key_ids([out], self.keys)[0]).sort_by("#key")
        return self._records(out)

    def _records(self, rows: pa.Table | None) -> pa.Table:
        if rows is None:
            return pa.table({})
        return self._output(rows, self._partials, rows.column("#tmin"), rows.column("#tmax"))
