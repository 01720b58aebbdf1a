"""How `pipeline run` shows where it stands, on stderr.

On a terminal: a live bar per connector (tqdm), with done / total, rate and ETA for
sources that know their size (`SourceTask.progress`), records and rate for the rest.
Elsewhere (a log file, CI): one plain line every `PLAIN_EVERY` seconds. The engine calls
the display about once a second with every connector's counters.
"""

from __future__ import annotations

from typing import IO, Protocol

from runner.connector import Progress
from runner.worker import Counters

PLAIN_EVERY = 10.0  # seconds between plain progress lines


class Display(Protocol):
    def __call__(self, counters: list[Counters], elapsed: float) -> None: ...

    def clear(self) -> None: ...


def progress_display(stream: IO[str], *, live: bool) -> Display:
    return LiveDisplay(stream) if live else PlainDisplay(stream)


def source_progress(c: Counters) -> Progress | None:
    """A source's progress over all its tasks, when every task knows its size."""
    parts = list(c.progress.values())
    if c.kind != "source" or not parts or any(p is None for p in parts) or len({p.unit for p in parts}) != 1:
        return None
    return Progress(sum(p.done for p in parts), sum(p.total for p in parts), parts[0].unit)


def _amount(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{n:,.0f} {unit}"
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or suffix == "GiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainDisplay:
    """A line every PLAIN_EVERY seconds: each connector's count, rate, and for sources
    that know their size, the share done and the ETA."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.last_time = 0.0
        self.last: dict[str, tuple[int, int]] = {}  # name -> (records, progress done)

    def __call__(self, counters: list[Counters], elapsed: float) -> None:
        if elapsed - self.last_time < PLAIN_EVERY:
            return
        span = elapsed - self.last_time
        self.last_time = elapsed
        parts = []
        for c in counters:
            done = source_progress(c)
            records, before = self.last.get(c.name, (0, 0))
            rate = (c.records_in - records) / span
            self.last[c.name] = (c.records_in, done.done if done else 0)
            text = f"{c.name} {c.records_in:,} read ({rate:,.0f}/s)"
            if done is not None and done.total:
                text += f", {done.done / done.total:.0%} of {_amount(done.total, done.unit)}"
                speed = (done.done - before) / span
                if speed > 0 and done.done < done.total:
                    text += f", ETA {_duration((done.total - done.done) / speed)}"
            parts.append(text)
        self.stream.write(f"pipeline: [{_duration(elapsed)}] " + "; ".join(parts) + "\n")
        self.stream.flush()

    def clear(self) -> None:
        pass


class LiveDisplay:
    """One tqdm bar per connector, redrawn about once a second."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.bars: dict[str, object] = {}

    def __call__(self, counters: list[Counters], elapsed: float) -> None:
        from tqdm import tqdm  # only a terminal needs it

        for position, c in enumerate(counters):
            done = source_progress(c)
            bar = self.bars.get(c.name)
            if bar is None:
                sized = done is not None and done.unit == "bytes"
                bar = self.bars[c.name] = tqdm(
                    desc=c.name, total=done.total if done else None, position=position, file=self.stream,
                    leave=False, dynamic_ncols=True, unit="B" if sized else " rec", unit_scale=True,
                    unit_divisor=1024 if sized else 1000, mininterval=0,
                )
            if done is not None:
                bar.total = done.total
                bar.n = done.done
                bar.set_postfix_str(f"{c.records_in:,} read", refresh=False)
            else:
                bar.n = c.records_in
            bar.refresh()

    def clear(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
