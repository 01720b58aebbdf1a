"""Session windows (`Session(gap)`), a batch at a time: the rules are in `windows.py`.

The state is a `Partials` grouped by (key fields, `#session`), an id telling a key's
sessions apart; `#tmin` and `#tmax` are a session's start and end. A batch, sorted by key
and time, is cut into runs where the key changes or the time steps more than `gap`; the runs
and the open sessions of their keys are merged wherever within `gap` of each other (one sort
over both, all in Arrow: `_piece`), each merged group taking the smallest id among its
sessions (or a new one), and the batch's records merge into the sessions by one `group_by`.

Merged at once, a batch gives what one record at a time gives unless a record meets a
session that closed earlier in the batch, or may be late: such records (found with Arrow:
`_risks`) are taken one at a time, cutting the batch there; records that are late whatever
their order are dropped without a cut.
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
    repeat,
    run_ids,
    steps_over,
)
from runner.processing.windows import (
    Aggregate,
    Late,
    Result,
    Session,
    WindowedAggregation,
)


class SessionAggregation(WindowedAggregation):
    window: Session

    def __init__(self, window: Session, keys: list[str], aggregates: list[Aggregate],
                 *, grace: int = 0, emit: str = "final") -> None:
        super().__init__(window, keys, aggregates, grace=grace, emit=emit)
        self._partials = Partials(self.aggregates, [*self.keys, "#session"], span=True)

    def process(self, columns: pa.Table, times: pa.Array) -> Result:
        times = self._times(times)
        n = len(times)
        if n == 0:
            return Result(self._emit(None), [], 0)
        before = self._stream_times_before(times, self.window.gap)
        self._seen(times)
        rows = columns.append_column("#time", times).append_column("#index", positions(n)).append_column("#before", before)
        late: list[Late] = []
        counts: pa.Array | None = None
        alone: list[int] = []
        if pc.any(pc.less_equal(pc.add(times, self.grace), before)).as_py():  # else nothing is behind
            counts, alone, late = self._risks(rows)
        # Records in arrival order between the ones that must go alone, each run merged at
        # once; a record that must go alone is a piece of its own, meeting the stream time
        # and the sessions exactly as one record at a time would.
        pieces, start = [], 0
        for i in alone:
            if i > start:
                pieces.append((start, i, False))
            pieces.append((i, i + 1, True))
            start = i + 1
        if start < n:
            pieces.append((start, n, False))
        changed: pa.Array | None = None
        for a, b, lone in pieces:
            piece = rows.slice(a, b - a)
            if counts is not None and not lone:
                piece = piece.filter(counts.slice(a, b - a))
            if piece.num_rows:
                changed = self._piece(piece, lone, changed, late)
        late.sort(key=lambda x: x.index)
        return Result(self._emit(changed), late, 0)

    def advance(self, stream_time: int) -> pa.Table:
        if self.stream_time is None or stream_time > self.stream_time:
            self.stream_time = stream_time
        return self._emit(None)

    def close_all(self) -> pa.Table:
        state = self._partials.state
        if state is None or state.num_rows == 0:
            return self._emit(None)
        last = pc.max(state.column("#tmax")).as_py()
        self.stream_time = max(self.stream_time, last + self.window.gap + self.grace)
        return self._emit(None)

    # -- inside ---------------------------------------------------------------------------

    def _risks(self, rows: pa.Table) -> tuple[pa.Array, list[int], list[Late]]:
        """Where merging the batch at once could differ from taking it one record at a
        time, which happens only to records behind the stream time (`t + grace <=` the
        stream time they meet, `before`):

        - A record with `t + gap + grace <= before` is late unless it joins an open session.
          If its cluster in the batch (the key's records, all arrivals, chained by `gap`)
          holds only such records and no session of the key is within `gap` of it, none of
          them can start or reach a session: they are all late, and dropped from the batch.
          Otherwise it goes alone.
        - Any other record could only meet a closed session whose end is in
          `[t - gap, before - gap - grace]`; a session's end is one of the batch's times or
          a state session's end, so a record with such a time of its key goes alone.

        The state's sessions (all open at the previous batch's end) are more than `gap`
        apart per key, so each question about them is one sorted pass: the first session
        of the key ending at or after a time. Returns the counting records (a mask in
        arrival order), the records that go alone, the dropped late."""
        gap, grace = self.window.gap, self.grace
        state = self._partials.state
        key, state_key = key_ids([rows, state], self.keys)
        rows = pa.table({"k": key, "t": rows.column("#time"), "i": rows.column("#index"),
                         "b": rows.column("#before")}).sort_by([("k", "ascending"), ("t", "ascending"), ("i", "ascending")])
        key, times, index, before = (array(rows.column(c)) for c in ("k", "t", "i", "b"))
        cluster = run_ids(pc.or_(changes(key), steps_over(times, gap)))
        maybe_late = pc.less_equal(pc.add(times, gap + grace), before)
        clusters = pa.table({"c": cluster, "k": key, "late": maybe_late, "t": times}).group_by(
            ["c", "k"], use_threads=False).aggregate([("late", "all"), ("t", "min"), ("t", "max")])
        clusters = clusters.filter(clusters.column("late_all"))
        dead = repeat(False, len(times), pa.bool_())
        if clusters.num_rows:
            low, high = array(clusters.column("t_min")), array(clusters.column("t_max"))
            if state is not None and state.num_rows:
                start, _ = _next_at_or_after(clusters.column("k"), pc.subtract(low, gap), state_key,
                                             state.column("#tmax"), state.column("#tmin"))
                near = pc.fill_null(pc.less_equal(start, pc.add(high, gap)), False)
            else:
                near = repeat(False, clusters.num_rows, pa.bool_())
            hopeless = array(clusters.column("c")).filter(pc.invert(near))
            dead = pc.is_in(cluster, value_set=hopeless)
        late = [Late(i, t, t, b - (t + gap + grace))
                for i, t, b in zip(*(x.filter(dead).to_pylist() for x in (index, times, before)))]
        alone = set(index.filter(pc.and_(maybe_late, pc.invert(dead))).to_pylist())
        behind = pc.and_(pc.less_equal(pc.add(times, grace), before), pc.invert(maybe_late))
        if pc.any(behind).as_py():
            # Per record behind, the smallest end candidate of its key at or after `t - gap`.
            ends_key = key if state is None else pa.concat_arrays([key, state_key])
            ends = times if state is None else pa.concat_arrays([times, array(state.column("#tmax"))])
            asked = pc.indices_nonzero(behind)
            end, _ = _next_at_or_after(key.take(asked), pc.subtract(times.take(asked), gap), ends_key, ends, ends)
            upto = pc.subtract(before.take(asked), gap + grace)
            hit = pc.fill_null(pc.less_equal(end, upto), False)
            alone.update(index.take(asked).filter(hit).to_pylist())
        counts = pa.table({"i": index, "counts": pc.invert(dead)}).sort_by("i").column("counts")
        return array(counts), sorted(alone), late

    def _piece(self, rows: pa.Table, lone: bool, changed: pa.Array | None, late: list[Late]) -> pa.Array | None:
        """Records that merge at once (or one record alone) into the sessions open at the
        stream time the piece's first record meets: the piece's runs (sorted by key and
        time, cut where the key changes or the next time is more than `gap` on) and those
        sessions, sorted together, merge wherever within `gap` (open sessions of a key are
        more than `gap` apart, and so are its runs: the latest end so far is the later of
        the last session's and the last run's); the records then merge into their groups
        by one group_by. `changed`: the state rows changed so far in the batch, and after.
        A record alone that reaches no open session and whose own session would be closed
        is late (appended to `late`)."""
        gap, grace = self.window.gap, self.grace
        before = rows.column("#before")[0].as_py()
        state = self._partials.state
        sessions = None
        if state is not None and state.num_rows:
            open_ = pc.greater(pc.add(state.column("#tmax"), gap + grace), before)
            sessions = state.select([*self.keys, "#tmin", "#tmax", "#session"]).filter(open_)
        key, session_key = key_ids([rows, sessions], self.keys)
        rows = rows.append_column("#key", key).sort_by(
            [("#key", "ascending"), ("#time", "ascending"), ("#index", "ascending")])
        key, times = array(rows.column("#key")), array(rows.column("#time"))
        first = pc.or_(changes(key), steps_over(times, gap))  # a run starts
        run = run_ids(first)
        last = pa.concat_arrays([first.slice(1), pa.array([True])])
        runs = len(key.filter(first))
        m = 0 if sessions is None else sessions.num_rows
        # The runs and the open sessions as intervals, merged where within gap.
        spans = pa.table({
            "k": pa.concat_arrays([key.filter(first), *([session_key] if m else [])]),
            "lo": pa.concat_arrays([times.filter(first), *([array(sessions.column("#tmin"))] if m else [])]),
            "hi": pa.concat_arrays([times.filter(last), *([array(sessions.column("#tmax"))] if m else [])]),
            "session": pa.concat_arrays([pa.nulls(runs, pa.int64()), *([array(sessions.column("#session"))] if m else [])]),
            "at": positions(runs + m),  # runs first, then sessions in state order
        }).sort_by([("k", "ascending"), ("lo", "ascending")])
        k, lo, hi, session = (array(spans.column(c)) for c in ("k", "lo", "hi", "session"))
        is_run = pc.is_null(session)
        reach = None
        for family in (is_run, pc.invert(is_run)):  # the latest end before each span, of its key
            end = _previous(pc.if_else(family, hi, None), pc.if_else(family, k, None), k)
            reach = end if reach is None else pc.max_element_wise(reach, end)
        joins = pc.fill_null(pc.less_equal(lo, pc.add(reach, gap)), False)
        group = run_ids(pc.invert(joins))
        groups = pa.table({"g": group, "session": session}).group_by("g", use_threads=False).aggregate(
            [("session", "min")]).sort_by("g")
        fresh = 0 if state is None or state.num_rows == 0 else pc.max(state.column("#session")).as_py() + 1
        target = pc.coalesce(groups.column("session_min"), pc.add(array(groups.column("g")), fresh))
        span_target = pc.take(target, group)
        if lone:  # one record, one run: late if it reaches no open session and its own would be closed
            (own,) = group.filter(pc.equal(spans.column("at"), 0)).to_pylist()
            t = times[0].as_py()
            if not groups.column("session_min")[own].is_valid and t + gap + grace <= before:
                late.append(Late(rows.column("#index")[0].as_py(), t, t, before - (t + gap + grace)))
                return changed
        by_at = pa.table({"at": spans.column("at"), "target": span_target}).sort_by("at").column("target")
        if m:
            self._partials.relabel("#session", array(sessions.column("#session")), array(by_at.slice(runs)))
        rows = rows.append_column("#session", pc.take(array(by_at.slice(0, runs)), run))
        return self._partials.merge(rows, changed)

    def _emit(self, changed: pa.Array | None) -> pa.Table:
        """`final`: the sessions the stream time has closed. `updates`: the sessions in
        `changed`. Either way the closed sessions leave the state (nothing can change them)."""
        state = self._partials.state
        if state is None or state.num_rows == 0:
            return self._records(state)
        closed = pc.less_equal(pc.add(state.column("#tmax"), self.window.gap + self.grace), self.stream_time)
        if self.emit == "updates":
            out = state.filter(changed) if changed is not None else state.slice(0, 0)
        else:
            out = state.filter(closed)
        self._partials.keep(pc.invert(closed), "#session")
        if out.num_rows > 1:
            out = out.append_column("#key", key_ids([out], self.keys)[0]).sort_by(
                [("#tmin", "ascending"), ("#key", "ascending"), ("#tmax", "ascending")])
        return self._records(out)

    def _records(self, rows: pa.Table | None) -> pa.Table:
        if rows is None:
            return pa.table({})
        return self._output(rows, self._partials, rows.column("#tmin"), rows.column("#tmax"))


def _previous(values: pa.Array, value_keys: pa.Array, keys: pa.Array) -> pa.Array:
    """Per row, the last non-null of `values` in the rows before it, if it has the row's key
    (`value_keys`: the key of each non-null value); else null."""
    n = len(keys)
    if n == 0:
        return values
    last = pc.fill_null_forward(values)
    last_key = pc.fill_null_forward(value_keys)
    shifted = pa.concat_arrays([pa.nulls(1, last.type), last.slice(0, n - 1)])
    shifted_key = pa.concat_arrays([pa.nulls(1, last_key.type), last_key.slice(0, n - 1)])
    return pc.if_else(pc.fill_null(pc.equal(shifted_key, keys), False), shifted, None)


def _next_at_or_after(keys: pa.Array, at: pa.Array, candidate_keys: pa.Array, candidate_at: pa.Array,
                      candidate_value: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Per query (`keys`, `at`), the candidate of the same key with the smallest
    `candidate_at` at or after `at`: its `candidate_value` and its `candidate_at` (null if
    none). Queries and candidates sorted together by (key, time), a query before a candidate
    of equal time; each query reads the next candidate row."""
    q, c = len(keys), len(candidate_keys)
    both = pa.table({
        "k": pa.concat_arrays([array(keys), array(candidate_keys)]),
        "at": pa.concat_arrays([array(at), array(candidate_at)]),
        "kind": pa.concat_arrays([repeat(0, q, pa.int8()), repeat(1, c, pa.int8())]),
        "q": pa.concat_arrays([positions(q), pa.nulls(c, pa.int64())]),
        "ck": pa.concat_arrays([pa.nulls(q, pa.int64()), array(candidate_keys)]),
        "cat": pa.concat_arrays([pa.nulls(q, pa.int64()), array(candidate_at)]),
        "cv": pa.concat_arrays([pa.nulls(q, pa.int64()), array(candidate_value)]),
    }).sort_by([("k", "ascending"), ("at", "ascending"), ("kind", "ascending")])
    same = pc.equal(pc.fill_null_backward(both.column("ck")), both.column("k"))
    value = pc.if_else(same, pc.fill_null_backward(both.column("cv")), None)
    found_at = pc.if_else(same, pc.fill_null_backward(both.column("cat")), None)
    picked = pa.table({"q": both.column("q"), "v": value, "a": found_at}).filter(
        pc.equal(both.column("kind"), 0)).sort_by("q")
    return array(picked.column("v")), array(picked.column("a"))
