"""Windowed aggregation one record at a time, in plain Python: what `runner.processing.windows`
must give, batch or not, for every window kind (the rules are in its docstring).

`reference(window, grace, emit)` gives an object with the aggregation's interface in plain
values: `batch(records)` -> (emitted, late, windows missed), `advance(t)` and `close_all()`
-> emitted, `open()` (windows open) and `stream` (the stream time). A record is (k, t, v,
u): key, event time, and two aggregated fields; an emitted window is a dict as the
aggregation's output rows are (`AGGREGATES` in the tests: n, total, low, high, avg, kinds,
first_v, last_v, first_u); a late record is (index in its batch, window_start, window_end,
late_by).
"""

from __future__ import annotations

import math

from runner.processing.windows import Count, Session, Sliding


def reference(window, grace, emit):
    if isinstance(window, Session):
        return Sessions(window.gap, grace, emit)
    if isinstance(window, Count):
        return Counts(window.n, emit)
    if isinstance(window, Sliding):
        return SlidingWindows(window.size, grace, emit)
    return TimeWindows(window.size, getattr(window, "advance", window.size), grace, emit)


def key_order(k):
    return (k is not None, k)


def span_value(k, start, end, recs):
    """A window's output from its records (t, arrival, v, u)."""
    vs = [r[2] for r in recs if r[2] is not None]
    by_time = sorted(recs, key=lambda r: (r[0], r[1]))
    return {
        "k": k, "window_start": start, "window_end": end,
        "n": len(recs), "total": sum(vs) if vs else None, "low": min(vs) if vs else None,
        "high": max(vs) if vs else None, "avg": sum(vs) / len(vs) if vs else None, "kinds": len(set(vs)),
        "first_v": by_time[0][2], "last_v": by_time[-1][2], "first_u": by_time[0][3],
    }


class Reference:
    def __init__(self, grace, emit):
        self.grace, self.emit = grace, emit
        self.stream = None
        self.arrival = 0

    def _before(self):
        return self.stream if self.stream is not None else -math.inf

    def _saw(self, t):
        self.stream = t if self.stream is None else max(self.stream, t)

    def advance(self, t):
        if self.stream is None or t > self.stream:
            self.stream = t
        return self._close([])


class TimeWindows(Reference):
    """Tumbling (advance = size) and hopping: a record belongs to every window [s, s + size)
    holding it, s a multiple of advance; one late for all of them is late, else it counts in
    the open ones and the closed ones are missed."""

    def __init__(self, size, advance, grace, emit):
        super().__init__(grace, emit)
        self.size, self.step = size, advance
        self.windows = {}  # (start, k) -> records

    def batch(self, records):
        changed, late, missed = set(), [], 0
        for i, (k, t, v, u) in enumerate(records):
            before = self._before()
            first = math.floor((t - self.size) / self.step) * self.step  # a multiple of advance, before any window of t
            starts = [s for s in range(first, t + 1, self.step) if s <= t < s + self.size]
            closed = [s for s in starts if s + self.size + self.grace <= before]
            if len(closed) == len(starts):
                s = max(closed)
                late.append((i, s, s + self.size, before - (s + self.size + self.grace)))
            else:
                missed += len(closed)
            for s in starts:
                if s not in closed:
                    self.windows.setdefault((s, k), []).append((t, self.arrival, v, u))
                    changed.add((s, k))
            self.arrival += 1
            self._saw(t)
        return self._close(changed), late, missed

    def _value(self, key):
        s, k = key
        return span_value(k, s, s + self.size, self.windows[key])

    def _close(self, changed):
        order = sorted(changed if self.emit == "updates" else
                       [w for w in self.windows if w[0] + self.size + self.grace <= self.stream],
                       key=lambda w: (w[0], key_order(w[1])))
        out = [self._value(w) for w in order]
        self.windows = {w: r for w, r in self.windows.items() if w[0] + self.size + self.grace > self.stream}
        return out

    def close_all(self):
        if not self.windows:
            return []
        self.stream = max(self.stream, max(s for s, _ in self.windows) + self.size + self.grace)
        return self._close([])

    def open(self):
        return len(self.windows)


class Sessions(Reference):
    """A record joins (and bridges) every open session of its key whose [start - gap, end +
    gap] holds it; one that reaches none starts a session, unless that session would already
    be closed (end + gap + grace <= the stream time the record meets): then it is late."""

    def __init__(self, gap, grace, emit):
        super().__init__(grace, emit)
        self.gap = gap
        self.sessions = []  # {"k", "start", "end", "recs"}

    def _closes(self, s):
        return s["end"] + self.gap + self.grace

    def batch(self, records):
        changed, late = [], []
        for i, (k, t, v, u) in enumerate(records):
            before = self._before()
            reached = [s for s in self.sessions if s["k"] == k and self._closes(s) > before
                       and s["start"] - self.gap <= t <= s["end"] + self.gap]
            if not reached and t + self.gap + self.grace <= before:
                late.append((i, t, t, before - (t + self.gap + self.grace)))
            else:
                new = {"k": k, "start": t, "end": t, "recs": [(t, self.arrival, v, u)]}
                for s in reached:
                    self.sessions.remove(s)
                    new["start"], new["end"] = min(new["start"], s["start"]), max(new["end"], s["end"])
                    new["recs"] += s["recs"]
                self.sessions.append(new)
                changed = [s for s in changed if all(s is not r for r in reached)] + [new]
            self.arrival += 1
            self._saw(t)
        return self._close(changed), late, 0

    def _close(self, changed):
        closed = [s for s in self.sessions if self._closes(s) <= self.stream]
        out = sorted(closed if self.emit == "final" else changed,
                     key=lambda s: (s["start"], key_order(s["k"]), s["end"]))
        self.sessions = [s for s in self.sessions if all(s is not c for c in closed)]
        return [span_value(s["k"], s["start"], s["end"], s["recs"]) for s in out]

    def close_all(self):
        if not self.sessions:
            return []
        self.stream = max(self.stream, max(self._closes(s) for s in self.sessions))
        return self._close([])

    def open(self):
        return len(self.sessions)


class Counts(Reference):
    """A key's every n records in arrival order; final emits a window at its n-th record,
    updates every window a batch changed, both in the order of the last record each took from
    the batch. close_all ends the open windows (final: emitted in key order)."""

    def __init__(self, n, emit):
        super().__init__(0, emit)
        self.n = n
        self.windows = {}  # k -> records of its open window

    def batch(self, records):
        out, touched = [], {}
        for i, (k, t, v, u) in enumerate(records):
            recs = self.windows.setdefault(k, [])
            recs.append((t, self.arrival, v, u))
            self.arrival += 1
            self._saw(t)
            if len(recs) == self.n:
                out.append((i, k, self.windows.pop(k)))
                touched.pop(k, None)
            else:
                touched[k] = i
        if self.emit == "updates":
            out += [(i, k, self.windows[k]) for k, i in touched.items()]
        return [self._value(k, recs) for _, k, recs in sorted(out, key=lambda x: x[0])], [], 0

    def _value(self, k, recs):
        return span_value(k, min(r[0] for r in recs), max(r[0] for r in recs), recs)

    def _close(self, changed):
        return []

    def close_all(self):
        out = [self._value(k, self.windows[k]) for k in sorted(self.windows, key=key_order)]
        self.windows = {}
        return out if self.emit == "final" else []

    def open(self):
        return len(self.windows)


class SlidingWindows(Reference):
    """Each distinct (k, t) of a counted record defines the window [t - size, t] of k,
    holding every counted record of k within it; it closes at t + grace. A record whose own
    window is closed as it comes is late and counts nowhere."""

    def __init__(self, size, grace, emit):
        super().__init__(grace, emit)
        self.size = size
        self.records = {}  # k -> counted records, ever
        self.windows = set()  # (end, k), open or not yet emitted

    def batch(self, records):
        changed, late = set(), []
        for i, (k, t, v, u) in enumerate(records):
            before = self._before()
            if t + self.grace <= before:
                late.append((i, t - self.size, t, before - (t + self.grace)))
            else:
                self.records.setdefault(k, []).append((t, self.arrival, v, u))
                self.windows.add((t, k))
                changed |= {(e, kk) for e, kk in self.windows if kk == k and e - self.size <= t <= e}
            self.arrival += 1
            self._saw(t)
        return self._close(changed), late, 0

    def _close(self, changed):
        order = sorted(changed if self.emit == "updates" else
                       [w for w in self.windows if w[0] + self.grace <= self.stream],
                       key=lambda w: (w[0], key_order(w[1])))
        out = [span_value(k, e - self.size, e, [r for r in self.records[k] if e - self.size <= r[0] <= e])
               for e, k in order]
        self.windows = {w for w in self.windows if w[0] + self.grace > self.stream}
        return out

    def close_all(self):
        if not self.windows:
            return []
        self.stream = max(self.stream, max(e for e, _ in self.windows) + self.grace)
        return self._close([])

    def open(self):
        return len(self.windows)
