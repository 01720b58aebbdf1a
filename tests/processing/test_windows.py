"""`runner.processing.windows`, a batch at a time with Arrow, against a plain-Python
reference that takes one record at a time: random streams with out-of-order records (some
inside grace, some past it), random batch splits, tumbling and hopping windows, every
aggregate, both emit modes."""

from __future__ import annotations

import math
import os
import random

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.processing.windows import Aggregate, Hopping, Tumbling, WindowedAggregation

AGGREGATES = [
    Aggregate("n", "count"), Aggregate("total", "sum", "v"), Aggregate("low", "min", "v"),
    Aggregate("high", "max", "v"), Aggregate("avg", "mean", "v"), Aggregate("kinds", "count_distinct", "v"),
    Aggregate("first_v", "first", "v"), Aggregate("last_v", "last", "v"), Aggregate("first_u", "first", "u"),
]


def reference(window, grace, emit, batches):
    """One record at a time: (emitted per batch, late per batch, windows missed, windows
    still open after each batch)."""
    size = window.size
    advance = getattr(window, "advance", size)
    state, stream = {}, None
    emitted, late, missed_total, open_windows = [], [], 0, []
    for batch in batches:
        changed, out, batch_late = set(), [], []
        for i, (k, t, v, u) in enumerate(batch):
            before = stream if stream is not None else -math.inf
            first = math.floor((t - size) / advance) * advance  # a multiple of advance, before any window of t
            starts = [s for s in range(first, t + 1, advance) if s <= t < s + size]
            missed = [s for s in starts if s + size + grace <= before]
            if len(missed) == len(starts):
                s = max(missed)
                batch_late.append((i, s, s + size, before - (s + size + grace)))
            else:
                missed_total += len(missed)
            for s in starts:
                if s in missed:
                    continue
                w = state.setdefault((s, k), {"n": 0, "vs": [], "us": []})
                w["n"] += 1
                w["vs"].append((t, len(w["vs"]), v))
                w["us"].append((t, len(w["us"]), u))
                changed.add((s, k))
            stream = t if stream is None else max(stream, t)
        if emit == "final":
            keys = sorted((key for key in state if key[0] + size + grace <= stream), key=order)
            out = [value(key, state.pop(key), size) for key in keys]
        else:
            out = [value(key, state[key], size) for key in sorted(changed, key=order)]
        emitted.append(out)
        late.append(batch_late)
        open_windows.append(sum(1 for s, _ in state if s + size + grace > stream))
    return emitted, late, missed_total, open_windows


def order(key):
    return (key[0], (key[1] is not None, key[1]))


def value(key, w, size):
    vs = [v for _, _, v in w["vs"] if v is not None]
    by_time = sorted(w["vs"], key=lambda x: (x[0], x[1]))
    us_by_time = sorted(w["us"], key=lambda x: (x[0], x[1]))
    return {
        "k": key[1], "window_start": key[0], "window_end": key[0] + size,
        "n": w["n"], "total": sum(vs) if vs else None, "low": min(vs) if vs else None,
        "high": max(vs) if vs else None, "avg": sum(vs) / len(vs) if vs else None, "kinds": len(set(vs)),
        "first_v": by_time[0][2], "last_v": by_time[-1][2], "first_u": us_by_time[0][2],
    }


@st.composite
def streams(draw):
    window = draw(st.one_of(
        st.builds(Tumbling, st.integers(1, 20)),
        st.integers(1, 20).flatmap(lambda size: st.builds(Hopping, st.just(size), st.integers(1, size))),
    ))
    grace = draw(st.integers(0, 15))
    n = draw(st.integers(0, 60))
    clock, records = draw(st.integers(-50, 50)), []
    for _ in range(n):
        clock += draw(st.integers(0, 6))
        t = clock - draw(st.sampled_from([0, 0, 0, 1, 3, 8, 20, 40]))  # out of order: inside grace or past it
        records.append((draw(st.sampled_from(["a", "b", None])), t,
                        draw(st.one_of(st.none(), st.integers(-5, 5))), draw(st.sampled_from(["x", "y", None]))))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=5))) if n > 1 else []
    batches = [records[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    return window, grace, draw(st.sampled_from(["final", "updates"])), batches


@settings(max_examples=int(os.environ.get("WINDOW_EXAMPLES", 100)), deadline=None)
@given(streams())
def test_batches_with_arrow_give_what_one_record_at_a_time_gives(stream) -> None:
    window, grace, emit, batches = stream
    expected_emitted, expected_late, expected_missed, expected_open = reference(window, grace, emit, batches)
    agg = WindowedAggregation(window, ["k"], AGGREGATES, grace=grace, emit=emit)
    missed = 0
    for batch, want_out, want_late, want_open in zip(batches, expected_emitted, expected_late, expected_open):
        columns = pa.table({"k": pa.array([r[0] for r in batch], pa.string()),
                            "v": pa.array([r[2] for r in batch], pa.int64()),
                            "u": pa.array([r[3] for r in batch], pa.string())})
        result = agg.process(columns, pa.array([r[1] for r in batch], pa.int64()))
        assert result.emitted.to_pylist() == want_out
        assert [(x.index, x.window_start, x.window_end, x.late_by) for x in result.late] == want_late
        assert agg.open_windows == want_open  # closed windows leave the state, in both emit modes
        missed += result.late_windows
    assert missed == expected_missed


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


@pytest.mark.parametrize("window", [Tumbling(7), Hopping(8, 3)], ids=repr)
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
