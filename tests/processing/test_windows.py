"""`runner.processing.windows`, a batch at a time with Arrow, against a plain-Python
reference that takes one record at a time (`reference.py`): random streams with out-of-order
records (some inside grace, some past it), null keys and values, random batch splits,
`advance` and `close_all` between batches, every window kind and aggregate, both emit modes,
the windows left open after each step, and a snapshot restored into a fresh aggregation at a
random step."""

from __future__ import annotations

import base64
import json
import os
import random

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.processing.windows import (
    Aggregate,
    Count,
    Hopping,
    Session,
    Sliding,
    Tumbling,
    WindowedAggregation,
)
from tests.processing.reference import reference

AGGREGATES = [
    Aggregate("n", "count"), Aggregate("total", "sum", "v"), Aggregate("low", "min", "v"),
    Aggregate("high", "max", "v"), Aggregate("avg", "mean", "v"), Aggregate("kinds", "count_distinct", "v"),
    Aggregate("first_v", "first", "v"), Aggregate("last_v", "last", "v"), Aggregate("first_u", "first", "u"),
]
KINDS = {
    "tumbling": st.builds(Tumbling, st.integers(1, 20)),
    "hopping": st.integers(1, 20).flatmap(lambda size: st.builds(Hopping, st.just(size), st.integers(1, size))),
    "session": st.builds(Session, st.integers(0, 20)),
    "sliding": st.builds(Sliding, st.integers(0, 20)),
    "count": st.builds(Count, st.integers(1, 8)),
}
EXAMPLES = int(os.environ.get("WINDOW_EXAMPLES", "25"))  # per kind; the dev loop's budget


@st.composite
def runs(draw, kind):
    """A window of `kind`, grace, emit mode, and steps: ("batch", records), ("advance", t),
    ("close_all",); and the step before which the aggregation is snapshot and restored (or None)."""
    window = draw(KINDS[kind])
    grace = draw(st.integers(0, 15))
    n = draw(st.integers(0, 60))
    clock, records = draw(st.integers(-50, 50)), []
    for _ in range(n):
        clock += draw(st.integers(0, 6))
        t = clock - draw(st.sampled_from([0, 0, 0, 1, 3, 8, 20, 40]))  # out of order: inside grace or past it
        records.append((draw(st.sampled_from(["a", "b", None])), t,
                        draw(st.one_of(st.none(), st.integers(-5, 5))), draw(st.sampled_from(["x", "y", None]))))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=5))) if n > 1 else []
    steps = []
    for a, b in zip([0, *cuts], [*cuts, n]):
        steps.append(("batch", records[a:b]))
        extra = draw(st.sampled_from([None, None, None, "advance", "close_all"]))
        if extra == "advance":
            steps.append(("advance", (records[b - 1][1] if b else clock) + draw(st.integers(-10, 30))))
        elif extra == "close_all":
            steps.append(("close_all",))
    split = draw(st.one_of(st.none(), st.integers(0, len(steps))))
    return window, grace, draw(st.sampled_from(["final", "updates"])), steps, split


def restored(agg: WindowedAggregation) -> WindowedAggregation:
    """A fresh aggregation given `agg`'s snapshot, through JSON as the processor runner keeps it."""
    snapshot = agg.snapshot()
    assert set(snapshot) == {"stream_time", "tables"} and all(isinstance(v, bytes) for v in snapshot["tables"].values())
    stored = json.loads(json.dumps({"stream_time": snapshot["stream_time"],
                                    "tables": {k: base64.b64encode(v).decode() for k, v in snapshot["tables"].items()}}))
    fresh = WindowedAggregation(agg.window, agg.keys, agg.aggregates, grace=agg.grace, emit=agg.emit)
    fresh.restore({"stream_time": stored["stream_time"],
                   "tables": {k: base64.b64decode(v) for k, v in stored["tables"].items()}})
    return fresh


def batch_columns(batch):
    columns = pa.table({"k": pa.array([r[0] for r in batch], pa.string()),
                        "v": pa.array([r[2] for r in batch], pa.int64()),
                        "u": pa.array([r[3] for r in batch], pa.string())})
    return columns, pa.array([r[1] for r in batch], pa.int64())


def check_against_reference(run) -> None:
    """The aggregation (and, when the run is split, one snapshot and restored into a fresh
    object before step `split`) gives at every step what the reference gives."""
    window, grace, emit, steps, split = run
    ref = reference(window, grace, emit)
    whole = WindowedAggregation(window, ["k"], AGGREGATES, grace=grace, emit=emit)
    aggs = [whole] if split is None else [whole, WindowedAggregation(window, ["k"], AGGREGATES, grace=grace, emit=emit)]
    for i, step in enumerate(steps):
        if i == split:
            aggs[1] = restored(aggs[1])
        if step[0] == "batch":
            want_out, want_late, want_missed = ref.batch(step[1])
            for agg in aggs:
                result = agg.process(*batch_columns(step[1]))
                assert result.emitted.to_pylist() == want_out
                assert [(x.index, x.window_start, x.window_end, x.late_by) for x in result.late] == want_late
                assert result.late_windows == want_missed
        else:
            want_out = ref.advance(step[1]) if step[0] == "advance" else ref.close_all()
            for agg in aggs:
                out = agg.advance(step[1]) if step[0] == "advance" else agg.close_all()
                assert out.to_pylist() == want_out
        for agg in aggs:
            assert agg.open_windows == ref.open()  # closed windows leave the state, in both emit modes
            assert agg.stream_time == ref.stream
    if split == len(steps):
        assert restored(aggs[1]).open_windows == ref.open()


def _property_test(kind):
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(runs(kind))
    def test(run) -> None:
        check_against_reference(run)

    test.__name__ = f"test_{kind}_batches_with_arrow_give_what_one_record_at_a_time_gives"
    return test


test_tumbling_batches_with_arrow_give_what_one_record_at_a_time_gives = _property_test("tumbling")
test_hopping_batches_with_arrow_give_what_one_record_at_a_time_gives = _property_test("hopping")
test_session_batches_with_arrow_give_what_one_record_at_a_time_gives = _property_test("session")
test_sliding_batches_with_arrow_give_what_one_record_at_a_time_gives = _property_test("sliding")
test_count_batches_with_arrow_give_what_one_record_at_a_time_gives = _property_test("count")


def test_idle_close_emits_what_the_stream_time_would_have_closed() -> None:
    agg = WindowedAggregation(Tumbling(60_000), ["k"], [Aggregate("n", "count")], grace=5_000)
    result = agg.process(pa.table({"k": ["a", "b", "a"]}), pa.array([1_000, 2_000, 59_000]))
    assert result.emitted.to_pylist() == []
    assert agg.advance(64_999).to_pylist() == []
    assert agg.advance(65_000).to_pylist() == [{"k": "a", "window_start": 0, "window_end": 60_000, "n": 2},
                                               {"k": "b", "window_start": 0, "window_end": 60_000, "n": 1}]
    assert agg.open_windows == 0


def test_state_survives_a_snapshot() -> None:
    aggregates = [Aggregate("n", "count"), Aggregate("kinds", "count_distinct", "v"), Aggregate("f", "first", "v"),
                  Aggregate("l", "last", "v"), Aggregate("s", "sum", "v"), Aggregate("lo", "min", "v")]
    one = WindowedAggregation(Hopping(10, 5), ["k"], aggregates, grace=3)
    one.process(pa.table({"k": ["a", "a"], "v": [1, 2]}), pa.array([1, 7]))
    two = WindowedAggregation(Hopping(10, 5), ["k"], aggregates, grace=3)
    two.restore(one.snapshot())
    rest = (pa.table({"k": ["a", "b"], "v": [3, None]}), pa.array([4, 30]))
    mine, theirs = one.process(*rest), two.process(*rest)
    assert mine.emitted.to_pylist() == theirs.emitted.to_pylist() != []
    assert (mine.late, mine.late_windows) == (theirs.late, theirs.late_windows)


def _collision_stream(seed: int) -> list[tuple]:
    rng = random.Random(seed)
    clock, records = 0, []
    for _ in range(200):
        clock += rng.randrange(0, 4)
        records.append((rng.choice(["a", "b", None]), rng.choice([1, 2]), clock - rng.choice([0, 0, 2, 9]),
                        rng.choice([None, 1, 2, 3]), rng.choice(["x", None])))
    return records


@pytest.mark.parametrize("window", [Tumbling(7), Hopping(8, 3), Session(3), Sliding(5), Count(4)], ids=repr)
@pytest.mark.parametrize("emit", ["final", "updates"])
def test_user_fields_named_like_internal_columns_do_not_collide(window, emit) -> None:
    """Key and aggregated fields named as the internal columns were (`__start`, `count`, ...)
    or as group_by names its results (`v_sum`) aggregate as plain names do."""
    plain = (["k", "j"], "v", "u")
    clashing = (["__start", "__index_sum"], "__index", "count")  # "__time", "changed", "__source" ride along
    outputs = []
    for keys, v, u in (plain, clashing):
        aggregates = [Aggregate("n", "count"), Aggregate("s", "sum", v), Aggregate("m", "mean", v),
                      Aggregate("lo", "min", v), Aggregate("hi", "max", v), Aggregate("d", "count_distinct", v),
                      Aggregate("f", "first", u), Aggregate("l", "last", v), Aggregate("ku", "count_distinct", keys[1])]
        agg = WindowedAggregation(window, keys, aggregates, grace=4, emit=emit)
        records, out = _collision_stream(7), []
        for a, b in ((0, 70), (70, 150), (150, 200)):
            batch = records[a:b]
            extra = {"__time": [1] * len(batch), "changed": [2] * len(batch), "__source": [3] * len(batch)}
            columns = pa.table({keys[0]: [r[0] for r in batch], keys[1]: [r[1] for r in batch],
                                v: pa.array([r[3] for r in batch], pa.int64()), u: [r[4] for r in batch], **extra})
            out += agg.process(columns, pa.array([r[2] for r in batch], pa.int64())).emitted.to_pylist()
        out += agg.close_all().to_pylist()
        outputs.append([{("k" if f == keys[0] else "j" if f == keys[1] else f): x for f, x in row.items()} for row in out])
    assert outputs[0] == outputs[1] != []


def _same(one, two) -> None:
    assert one.emitted.to_pylist() == two.emitted.to_pylist()
    assert (one.late, one.late_windows) == (two.late, two.late_windows)


def test_session_state_survives_a_snapshot() -> None:
    aggregates = [Aggregate("n", "count"), Aggregate("kinds", "count_distinct", "v"), Aggregate("f", "first", "v"),
                  Aggregate("l", "last", "v"), Aggregate("s", "sum", "v"), Aggregate("lo", "min", "v")]
    one = WindowedAggregation(Session(10), ["k"], aggregates, grace=20, emit="updates")
    one.process(pa.table({"k": ["a", "a", "b", "a"], "v": [1, 2, 5, 2]}), pa.array([1, 7, 8, 25]))
    two = restored(one)
    rest = (pa.table({"k": ["a", "b", "a"], "v": [3, None, 4]}), pa.array([16, 12, 50]))
    result = two.process(*rest)
    _same(one.process(*rest), result)
    assert result.emitted.to_pylist() == [  # a at 16 bridges a's [1, 7] and [25, 25]
        {"k": "a", "window_start": 1, "window_end": 25, "n": 4, "kinds": 3, "f": 1, "l": 2, "s": 8, "lo": 1},
        {"k": "b", "window_start": 8, "window_end": 12, "n": 2, "kinds": 1, "f": 5, "l": None, "s": 5, "lo": 5},
        {"k": "a", "window_start": 50, "window_end": 50, "n": 1, "kinds": 1, "f": 4, "l": 4, "s": 4, "lo": 4}]
    assert two.snapshot() == one.snapshot()
    assert two.advance(1_000).to_pylist() == [] and two.open_windows == 0  # updates: closed sessions just leave


def test_session_closes_at_its_end_plus_gap_plus_grace() -> None:
    agg = WindowedAggregation(Session(5_000), ["k"], [Aggregate("n", "count")], grace=1_000)
    result = agg.process(pa.table({"k": ["a", "a", "a", "c", "b"]}), pa.array([1_000, 4_000, 2_000, 4_000, 9_000]))
    assert result.emitted.to_pylist() == [] and result.late == []
    # a's [1_000, 4_000] and c's [4_000, 4_000] close at 10_000, which b's 10_000 brings:
    # then a's 8_000 (within the gap of a's closed session) starts a session of its own, a's
    # 2_500 is late (by 1_500), and so is c's 4_000 (its own session would close at 10_000).
    result = agg.process(pa.table({"k": ["b", "a", "a", "c", "b"]}), pa.array([10_000, 8_000, 2_500, 4_000, 14_000]))
    assert [(x.index, x.window_start, x.window_end, x.late_by) for x in result.late] == [(2, 2_500, 2_500, 1_500),
                                                                                       (3, 4_000, 4_000, 0)]
    assert result.emitted.to_pylist() == [{"k": "a", "window_start": 1_000, "window_end": 4_000, "n": 3},
                                          {"k": "c", "window_start": 4_000, "window_end": 4_000, "n": 1},
                                          {"k": "a", "window_start": 8_000, "window_end": 8_000, "n": 1}]
    assert agg.advance(19_999).to_pylist() == []
    assert agg.advance(20_000).to_pylist() == [{"k": "b", "window_start": 9_000, "window_end": 14_000, "n": 3}]
    assert agg.open_windows == 0


def test_count_state_survives_a_snapshot() -> None:
    aggregates = [Aggregate("n", "count"), Aggregate("kinds", "count_distinct", "v"), Aggregate("f", "first", "v"),
                  Aggregate("l", "last", "v"), Aggregate("s", "sum", "v"), Aggregate("lo", "min", "v")]
    one = WindowedAggregation(Count(3), ["k"], aggregates)
    assert one.process(pa.table({"k": ["a", "a", "b", "a", "a"], "v": [1, 2, 5, 2, 7]}),
                       pa.array([5, 1, 8, 3, 9])).emitted.to_pylist() == [
        {"k": "a", "window_start": 1, "window_end": 5, "n": 3, "kinds": 2, "f": 2, "l": 1, "s": 5, "lo": 1}]
    two = restored(one)
    rest = (pa.table({"k": ["b", "a", "b", "b"], "v": [None, 4, 6, 1]}), pa.array([2, 0, 4, 6]))
    result = two.process(*rest)
    _same(one.process(*rest), result)
    assert result.emitted.to_pylist() == [  # b's first window is complete at its third record; a's second stays open
        {"k": "b", "window_start": 2, "window_end": 8, "n": 3, "kinds": 2, "f": None, "l": 5, "s": 11, "lo": 5}]
    assert two.advance(100).to_pylist() == [] and two.open_windows == 2
    assert two.close_all().to_pylist() == [  # the end of the input: the open windows as they stand
        {"k": "a", "window_start": 0, "window_end": 9, "n": 2, "kinds": 2, "f": 4, "l": 7, "s": 11, "lo": 4},
        {"k": "b", "window_start": 6, "window_end": 6, "n": 1, "kinds": 1, "f": 1, "l": 1, "s": 1, "lo": 1}]
    assert two.open_windows == 0


def test_sliding_windows_end_at_each_record_and_a_late_record_counts_nowhere() -> None:
    agg = WindowedAggregation(Sliding(10), ["k"], [Aggregate("n", "count"), Aggregate("f", "first", "v")], grace=5)
    # a@103 comes after a@105, within grace: it defines [93, 103] and counts in [95, 105].
    result = agg.process(pa.table({"k": ["a", "a", "a"], "v": [1, 2, 3]}), pa.array([100, 105, 103]))
    assert result.emitted.to_pylist() == [{"k": "a", "window_start": 90, "window_end": 100, "n": 1, "f": 1}]
    assert agg.open_windows == 2  # [93, 103] closes at 108, [95, 105] at 110
    # a@101 meets the stream time 112: its own window [91, 101] closed at 106, so it is late and
    # counts nowhere, not even in [98, 108], still open, which would hold it.
    result = agg.process(pa.table({"k": ["a", "a", "a"], "v": [4, 5, 6]}), pa.array([112, 108, 101]))
    assert [(x.index, x.window_start, x.window_end, x.late_by) for x in result.late] == [(2, 91, 101, 6)]
    assert result.emitted.to_pylist() == [{"k": "a", "window_start": 93, "window_end": 103, "n": 2, "f": 1},
                                          {"k": "a", "window_start": 95, "window_end": 105, "n": 3, "f": 1}]
    assert agg.advance(116).to_pylist() == [{"k": "a", "window_start": 98, "window_end": 108, "n": 4, "f": 1}]
    assert agg.close_all().to_pylist() == [{"k": "a", "window_start": 102, "window_end": 112, "n": 4, "f": 3}]
    assert agg.open_windows == 0 and agg.stream_time == 117


def test_a_state_written_for_another_kind_of_window_is_refused() -> None:
    batch = (pa.table({"k": ["a"], "v": [1]}), pa.array([5]))
    aggregates = [Aggregate("n", "count"), Aggregate("d", "count_distinct", "v")]
    windows = [Tumbling(10), Session(10), Sliding(10), Count(3)]
    for one in windows:
        agg = WindowedAggregation(one, ["k"], aggregates)
        agg.process(*batch)
        for other in windows:
            fresh = WindowedAggregation(other, ["k"], aggregates)
            if type(other) is type(one):
                fresh.restore(agg.snapshot())
            else:
                with pytest.raises(ValueError, match="another kind of window"):
                    fresh.restore(agg.snapshot())
