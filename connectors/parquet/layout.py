"""Where a record goes: its layout directory (from a record-time field formatted with a
strftime layout) and its `rotate_interval` window, computed a batch at a time."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from runner.connector import FatalError, arrow_schema

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"

_INTERVAL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PER_SECOND = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}

# strftime directives whose value is fixed within a UTC minute / hour / day. A layout using
# only these is evaluated once per distinct minute/hour/day instead of once per record.
_MINUTE = set("MR")
_HOUR = set("HIp")
_DAY = set("dejaAuwDFxUWVmbBhyYCGgzZn%t")


def parse_interval(text: str) -> int:
    """Seconds in '30s', '15m', '1h', '1d'."""
    m = _INTERVAL.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"expected a positive number followed by s, m, h or d (like 15m), got {text!r}")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def layout_granularity(layout: str) -> int:
    """The coarsest span in seconds (86400, 3600, 60 or 1) within which `layout` formats
    every UTC time the same."""
    directives = set(re.findall(r"%[-_0^#EO]*(.)", layout))
    if directives <= _DAY:
        return 86400
    if directives <= _DAY | _HOUR:
        return 3600
    if directives <= _DAY | _HOUR | _MINUTE:
        return 60
    return 1


def null_directory(layout: str) -> str:
    """The directory for records whose time is null: Hive's null partition value in
    every segment of the layout that holds a time directive."""
    parts = []
    for seg in layout.split("/"):
        if "%" not in seg:
            parts.append(seg)
        elif "=" in seg and "%" not in seg.split("=", 1)[0]:
            parts.append(seg.split("=", 1)[0] + "=" + NULL_PARTITION)
        else:
            parts.append(NULL_PARTITION)
    return "/".join(parts)


def check_layout(layout: str) -> str | None:
    """A problem with `layout`, or None."""
    if not layout:
        return None
    sample = pa.array([0, 1_714_573_845, -1], pa.timestamp("s", tz="UTC"))
    try:
        dirs = pc.strftime(sample, format=layout).to_pylist()
    except (pa.ArrowException, ValueError) as exc:
        return f"not a valid strftime format: {exc}"
    for directive in set(re.findall(r"%[-_0^#EO]*.", layout.replace("%%", ""))):
        # Arrow copies a directive it does not know (like %-H or %k) as it is.
        if directive in pc.strftime(sample, format=directive).to_pylist()[0]:
            return f"{directive} is not a strftime directive Arrow supports"
    for d in [*dirs, null_directory(layout)]:
        if d.startswith("/") or "\\" in d or any(s in ("", ".", "..") for s in d.split("/")):
            return (
                f"must format to a relative path of non-empty names (got {d!r}); "
                "use / between directories"
            )
        if any(s.startswith((".", "_")) for s in d.split("/")):
            return f"directory names must not start with '.' or '_' (readers skip them): {d!r}"
    return None


def partition_field_error(partition_by: str, topic: str, schema: pa.Schema | dict) -> FatalError | None:
    """Why records of `topic` with `schema` (Arrow, or the topic's Avro record schema)
    cannot be partitioned by their field `partition_by`, or None if they can. One check
    for `pipeline validate` (the sink's build, from the spec's schemas) and for the run
    (the task's open, and each batch's schema, which a registry may have changed)."""
    if isinstance(schema, dict):
        names = [f.get("name") for f in schema.get("fields", [])]
        if partition_by not in names:
            return _no_field(partition_by, topic, names)
        try:
            schema = arrow_schema(schema)
        except FatalError:  # a schema Arrow cannot hold: the run says so itself
            return None
    idx = schema.get_field_index(partition_by)
    if idx < 0:
        return _no_field(partition_by, topic, schema.names)
    t = schema.field(idx).type
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_integer(t):
        return None
    return FatalError(
        f"parquet sink: field {partition_by!r} of topic {topic!r} is {t}; "
        "partition_by needs a timestamp, a date or epoch milliseconds",
        hint="give the field an Avro logicalType (timestamp-millis, date), or set "
        "partition_by to another field or null",
    )


def _no_field(partition_by: str, topic: str, names: list[str]) -> FatalError:
    return FatalError(
        f"parquet sink: topic {topic!r} has no field {partition_by!r} to partition by",
        hint=f"set partition_by to one of {', '.join(map(str, names))}, or to null for no "
        "time partitioning",
    )


def epoch(column: pa.Array | pa.ChunkedArray, field: str) -> pa.Array:
    """A record-time column as a timestamp array (UTC)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if pa.types.is_timestamp(t):
        return arr if t.tz == "UTC" else arr.cast(pa.timestamp(t.unit, tz="UTC"))
    if pa.types.is_date(t):
        return arr.cast(pa.timestamp("s", tz="UTC"))
    if pa.types.is_integer(t):
        return arr.cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    raise FatalError(f"parquet sink: partition_by field {field!r} is {t}, not a time")


class Splitter:
    """Cuts a batch into (directory, window, rows) pieces."""

    def __init__(self, partition_by: str | None, layout: str, rotate_interval: int | None) -> None:
        self.partition_by = partition_by
        self.layout = layout if partition_by else ""
        self.interval = rotate_interval if partition_by else None
        self.granularity = layout_granularity(layout) if self.layout else 0
        self.null_dir = null_directory(layout) if self.layout else ""

    def split(self, batch: pa.RecordBatch) -> list[tuple[str, int | None, pa.RecordBatch]]:
        """`batch` cut into (relative directory, window, rows) by layout directory and
        `rotate_interval` window (the window's number since the epoch; None without an
        interval or for null times), rows in offset order within each piece. Vectorised:
        the layout is formatted once per distinct hour (or day, minute...), not per record."""
        if not self.partition_by or (not self.layout and not self.interval):
            return [("", None, batch)]
        raw = epoch(batch.column(self.partition_by), self.partition_by)
        per_second = PER_SECOND[raw.type.unit]
        values = raw.view(pa.int64())
        lowest = pc.min(values).as_py()
        negative = lowest is not None and lowest < 0

        def floor_div(span: int) -> pa.Array:
            if not negative:  # integer divide truncates toward zero
                return pc.divide(values, span)
            return pc.divide(pc.subtract(values, pc.if_else(pc.less(values, 0), span - 1, 0)), span)

        # Directory id per row (null where the time is null), and the directory names.
        names = [""]
        if self.layout:
            g = self.granularity
            bucket = floor_div(g * per_second)
            bmin, bmax = pc.min_max(bucket).as_py().values()
            if bmin is None or bmin == bmax:  # all null, or one directory
                dir_ids = pc.multiply(bucket, 0)
                names = self._format([bmin * g]) if bmin is not None else []
            else:
                enc = bucket.dictionary_encode()
                index: dict[str, int] = {}
                # Distinct buckets may format alike (e.g. %Y-%m over days): merge them.
                remap = [index.setdefault(name, len(index)) for name in self._format(
                    [v * g for v in enc.dictionary.to_pylist()]
                )]
                names = list(index)
                dir_ids = pc.take(pa.array(remap, pa.int64()), enc.indices)
        else:
            dir_ids = pc.multiply(values, 0)

        # Combined with the rotate_interval window: one piece per (directory, window).
        key, windows = dir_ids.cast(pa.int64()), [None]
        if self.interval:
            window = floor_div(self.interval * per_second)
            wmin, wmax = pc.min_max(window).as_py().values()
            if wmin is not None and wmin == wmax:
                windows = [wmin]
            elif wmin is not None:
                wenc = window.dictionary_encode()
                windows = wenc.dictionary.to_pylist()
                key = pc.add(pc.multiply(key, len(windows)), wenc.indices.cast(pa.int64()))
        key = pc.fill_null(key, -1)

        kmin, kmax = pc.min_max(key).as_py().values()
        if kmin == kmax:
            groups = [(kmin, batch)]
        else:
            order = pc.sort_indices(key)  # stable: offset order is kept within a piece
            counts = pc.value_counts(key)
            pairs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
            ordered = batch.take(order)
            groups, start = [], 0
            for k, c in pairs:
                groups.append((k, ordered.slice(start, c)))
                start += c
        w = len(windows)
        return [
            (self.null_dir, None, piece) if k == -1 else (names[k // w], windows[k % w], piece)
            for k, piece in groups
        ]

    def _format(self, seconds: list[int]) -> list[str]:
        stamps = pa.array(seconds, pa.timestamp("s", tz="UTC"))
        return pc.strftime(stamps, format=self.layout).to_pylist()
