"""`parquet` sink: Hive-style partitioned Parquet files, written exactly once, few and large;
and `pipeline compact`, which merges the small ones a long-running stream leaves.

Output layout
-------------
::

    <path>/<topic>/<layout dirs>/<topic>+<partition>+<first:020d>+<last:020d>.parquet
    e.g. out/activity/dt=2024-05-01/hour=13/activity+0+00000000000000000000+00000000000000004999.parquet

The directories come from a record-time field (`partition_by`, default `timestamp`)
formatted with `layout` (strftime, in UTC; default `dt=%Y-%m-%d/hour=%H`), so DuckDB,
Spark, polars or pandas read the tree with Hive partitioning
(`read_parquet('out/activity/**/*.parquet', hive_partitioning=true)`). Records whose time
is null go to the Hive null partition: every `name=%…` segment of the layout becomes
`name=__HIVE_DEFAULT_PARTITION__` (any other segment `__HIVE_DEFAULT_PARTITION__`), which
DuckDB and Spark read back as NULL. (DuckDB infers a Hive column's type from the
directory names: `hour=09` makes it VARCHAR, as DuckDB keeps leading zeros; pass
`hive_types={'hour': int}` to `read_parquet` to read it as an integer.) With `partition_by: null` files go straight under
`<path>/<topic>/`. The time field may be an Arrow timestamp (any unit; naive ones are taken
as UTC), a date, or an integer (epoch milliseconds). A topic whose schema lacks the field,
or has it as another type, is refused when the sink is built, so `pipeline validate` says
so at `partition_by` (or at the sink, when the default `timestamp` is meant); the task
checks each batch's schema again, as a registry's schema may change.

Exactly once: groups, naming, recovery
--------------------------------------
Records of one topic-partition (tp) go, in offset order, into its *open group*: offsets
`first..last`, streamed as they come into one file per layout directory (and
`rotate_interval` window) they fall in. When rotation says so (below) the group is
committed: its n files get final names carrying the group's range and size:
`<topic>+<partition>+<first>+<last>.parquet` when n == 1 (the usual case),
`<topic>+<partition>+<first>+<last>+<k>of<n>.parquet` otherwise. Together the n files hold
every record of the tp with an offset in `first..last` that reached the sink (the engine
may have dead-lettered or filtered some out); the next group starts after `last`. So the
output of a tp is a sequence of disjoint, contiguous groups, and its resume position is
`last + 1` of the last complete group.

While a group is open its files are `.<topic>+<partition>+<first>+open+<seq>.parquet.tmp`
(dot-prefixed, ending `.tmp`: never matched by `**/*.parquet`, ignored by Spark), rows
appended as Parquet row groups. A group is committed in two phases: (1) each file is
finished (footer), fsynced and renamed to `.<final name>.tmp`; every directory holding one
is fsynced (a new directory's parent was fsynced when it was made); (2) only then every temp
is renamed to its final name, and the directories fsynced again. Only after (2) does `flush`
report the group durable, and only then may the next group of that tp start.

On `open`, for each assigned tp the sink takes the topic's lock (below) and scans
`<path>/<topic>/**`:
- a group with all n final files is complete;
- a group with some but not all final files was cut inside phase 2, after every temp of it
  was durable: the missing files are still there as temps, so they are renamed (rolled
  forward) and the group is complete;
- temps of a group with no final file were cut inside phase 1, and files of a group that
  was open: deleted (their records come again from the resume position); any other
  leftover temp is deleted too;
- groups that a compaction cut between its renames and its deletions had merged (below)
  are deleted;
- resume = max `last` + 1 over complete groups (0 if none); `open` returns it and the engine
  seeks there.

So after a crash at any moment a reader sees only whole files, every record at most once
(groups are disjoint), and once the sink has reopened, every record up to the resume
position exactly once (a group is either rolled forward or its records are re-delivered).
Between a crash inside phase 2 and the next start a reader may see part of the interrupted
group, never a duplicate. A group that is incomplete with no temps to finish it cannot arise
from a crash; if it is the last group its files are deleted (its records come again), else
the sink stops and says so. Overlapping complete groups (two pipelines writing one
directory) also stop the sink rather than serve duplicates, unless the larger is a merged
file that names the smaller among the groups it merged.

Rotation: when a group is committed
-----------------------------------
- `rotate_records` (default 1,000,000): the group holds that many records. The put that
  reaches it is cut there, so no file holds more.
- `rotate_bytes` (default 128 MiB): the group's files take about that much *on disk*:
  bytes written so far plus the rows still pending times the Parquet/Arrow size ratio seen
  so far for the topic (measured exactly, by writing the pending rows, once that estimate
  reaches the limit). The put that reaches it is cut there too (by the same estimate).
- `max_open_seconds` (default 300): the group's first record arrived that long ago, checked
  at each `flush` (the engine flushes about every second). This is the time bound that
  lands the records of slow or idle input; a busy partition rotates by size long before.
- `close` after a clean stop (the end of a `--once` run), and a change of the records'
  Arrow schema (rare: a new schema starts new files).
- More than MAX_OPEN_FILES (256) files open in the task at once, which only input
  scattered over hundreds of directories at a time reaches: the group with the most files
  is committed.

Nothing else cuts a group, so a `--once` run writes a partition in as few groups as
`rotate_records`/`rotate_bytes` allow (one file per layout directory when they are not
reached), unless it lasts longer than `max_open_seconds`. A layout directory holds at least
one file per partition that has records in it: with the default hourly layout, a file per
hour per partition is the floor.

Memory: `buffer_bytes`
----------------------
A file's rows are held in Arrow memory only until they are written as a row group.
`buffer_bytes` (default 64 MiB) bounds the pending rows of every open file of every
assigned partition together: past it, the file with the most pending rows writes them out
as a row group. So memory stays about `buffer_bytes` however large the files grow, and a
smaller `buffer_bytes` makes smaller row groups, never more files. With the defaults and a
few partitions, row groups come out at 10-30 MiB of Arrow memory (about 1-4 MiB of zstd
Parquet, 50,000-200,000 access-log rows), which readers handle well; `row_group_size` caps
their rows.

- `rotate_interval` (e.g. `15m`): a file holds records of one aligned record-time window
  (windows start at multiples of the interval since the epoch, UTC), so records of
  different windows go to different files even in one directory.
- `flush` returns `{tp: next offset durable in files}` for every assigned tp; the engine
  commits only that. `close` after a clean stop (the last call was `flush`) commits the open
  groups and returns the new durable offsets, which the engine commits; after an abort (a
  `put` came after the last `flush`) it deletes their files. Either way the next start
  resumes from the files: the consumer group's committed offset is shown as lag, never used
  for resuming.
- If a write fails part-way the task writes nothing more (close discards); the next `open`
  repairs the output as after a crash.

All file I/O runs in the task's own worker thread (one, so that Arrow's allocator, which
keeps a heap per thread, reuses what the writes free) under one lock.

Compaction (`pipeline compact`)
-------------------------------
A stream that lands records every `max_open_seconds` leaves many small files per partition
and directory. `ParquetSink.compact` merges, per tp, runs of consecutive complete groups
(no other group of the tp between them) into one new group with one file per directory
(and `rotate_interval` window) they have files in: `<topic>+<partition>+<first>+<last>.parquet`
named by the run's first and last offsets (`...+<k>of<n>.parquet` when the run spans n
directories, e.g. groups written across an hour boundary). Each merged file holds its
directory's rows of the run in offset order, and its footer names the groups merged
(`pipeline.compacted`). Runs are chosen so that each merged file stays within
`rotate_records` and `rotate_bytes` (the inputs' sizes on disk) and holds one Arrow schema
(a schema change ends a run), and so that no file is rewritten for nothing: every file of
a run merges with another file of the run in its directory, except that a group at either
end of the run may bring one file that merges with nothing (the far side of a write that
spanned an hour boundary, copied once into the merged group) if it is not itself a merge.
A group being written or incomplete also ends a run. So a `--once` run leaves nothing to
merge; a stream's files merge into one file per partition and hour, plus one more in an
hour that an earlier compaction found still growing when its merged group also spans other
hours (such a group is not rewritten only to take the new files in; a merged file alone in
its hour is, as it grows).

A merge is committed like a group (temps, fsync, directories fsynced, renames, directories
fsynced) and only then are the merged groups' files deleted (and their directories fsynced).
A crash before the renames leaves temps that the next open deletes; among them, temps that
it renames; after them, the merged group and some of the files it holds: the next `open`
(or compaction) deletes every group (or what is left of one) that a complete merged group
names as merged, so resume and readers after it see every record once. Between the renames
and the deletions (milliseconds) a reader listing the directory may see a merged file and
its inputs together, and a reader that listed the inputs just before may find them gone.

`<path>/<topic>/.pipeline.lock` (flock) is taken by `open` while it scans and repairs, and
by compaction while it scans and merges (let go between merges after a couple of seconds,
then rescanned), so compaction may run while `pipeline run` writes: a running task never
reads or changes committed files, and compaction never touches a group being written.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from connectors.parquet import files
from connectors.parquet import compact as compaction
from connectors.parquet.files import file_name
from connectors.parquet.layout import (
    NULL_PARTITION,
    check_layout,
    layout_granularity,
    null_directory,
    parse_interval,
    partition_field_error,
)
from connectors.parquet.task import ParquetSinkTask
from runner.connector import (
    Config,
    ConfigError,
    ConnectorContext,
    Sink,
    SinkTask,
    setting,
)

__all__ = [
    "NULL_PARTITION",
    "ParquetSink",
    "ParquetSinkTask",
    "file_name",
    "files",
    "layout_granularity",
    "null_directory",
    "parse_interval",
]


class ParquetSink(Sink):
    name = "parquet"
    description = "Writes topics to Hive-partitioned Parquet files, exactly once, few and large; `pipeline compact` merges small ones."
    wants = "columns"

    class Config(Config):
        path: str = setting(help="Output directory; files go under <path>/<topic>/<layout dirs>/.")
        partition_by: str | None = setting(
            "timestamp",
            help="Record-time field the directories (and rotate_interval windows) come from: "
            "a timestamp, date or epoch-milliseconds integer; null or empty for no time "
            "partitioning.",
        )
        layout: str = setting(
            "dt=%Y-%m-%d/hour=%H",
            help="strftime pattern (UTC) of the partition_by field giving the directories "
            "under <path>/<topic>/; null times go to name=__HIVE_DEFAULT_PARTITION__.",
        )
        compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = setting(
            "zstd", help="Parquet compression codec."
        )
        rotate_records: int = setting(
            1_000_000,
            help="Records per file at most: a topic-partition's open files are completed "
            "once they hold this many together.",
            min=1,
            max=1_000_000_000,
        )
        rotate_bytes: int = setting(
            128 * 1024 * 1024,
            help="Bytes per file on disk, about: a topic-partition's open files are completed "
            "once they take this much Parquet (encoded, compressed) together.",
            min=1024,
            max=64 * 1024**3,
        )
        buffer_bytes: int = setting(
            64 * 1024 * 1024,
            help="Arrow memory that rows not yet written to their files may take, for all "
            "assigned partitions together; past it, the file with the most pending rows "
            "writes them as a row group (bounds memory; never makes more files).",
            min=1024,
            max=64 * 1024**3,
        )
        rotate_interval: str | None = setting(
            None,
            help="Record-time span of one file, like 30s, 15m, 1h or 1d (windows aligned to "
            "the epoch, UTC); null: files are split by layout directory only.",
        )
        max_open_seconds: float = setting(
            300.0,
            help="Wall-clock seconds a file may stay open: at the next flush after its first "
            "record arrived this long ago, a topic-partition's open files are completed, "
            "so slow or idle input lands too (0: at every flush).",
            min=0,
            max=7 * 86400,
        )
        row_group_size: int | None = setting(
            None,
            help="Rows per Parquet row group at most (null: pyarrow's default, about 1M; "
            "buffer_bytes makes them smaller when memory is short).",
            min=1,
            max=1_000_000_000,
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = []
            interval = given.get("rotate_interval")
            if isinstance(interval, str):
                try:
                    parse_interval(interval)
                except ValueError as exc:
                    problems.append(("rotate_interval", str(exc)))
            layout = given.get("layout")
            if isinstance(layout, str):
                problem = check_layout(layout)
                if problem:
                    problems.append(("layout", problem))
            return problems

    def __init__(self, config: ParquetSink.Config, context: ConnectorContext) -> None:
        super().__init__(config, context)
        # What only the topics' schemas tell, refused while the sink is built, so that
        # `pipeline validate` reports it (at partition_by) rather than the run's start.
        problems = []
        for topic, schema in context.schemas.items():
            if config.partition_by and isinstance(schema, dict) and "fields" in schema:
                error = partition_field_error(config.partition_by, topic, schema)
                if error is not None:
                    problems.append(("partition_by", f"{error} ({error.hint})"))
        if problems:
            raise ConfigError(problems)

    def target(self) -> str:
        topics = self.context.topics
        return os.path.join(self.context.display(self.config.path), topics[0] if len(topics) == 1 else "")

    def task(self) -> SinkTask:
        c = self.config
        return ParquetSinkTask(
            directory=self.context.resolve(c.path),
            partition_by=c.partition_by or None,
            layout=c.layout if c.partition_by else "",
            compression=None if c.compression == "none" else c.compression,
            rotate_records=c.rotate_records,
            rotate_bytes=c.rotate_bytes,
            buffer_bytes=c.buffer_bytes,
            rotate_interval=parse_interval(c.rotate_interval) if c.rotate_interval else None,
            max_open_seconds=c.max_open_seconds,
            row_group_size=c.row_group_size,
            schemas=dict(self.context.schemas),
        )

    def compact(self, *, dry_run: bool = False) -> list[str]:
        """Merge runs of consecutive small files of each topic-partition and directory into
        one (see "Compaction" in the module doc); one line per merge."""
        c = self.config
        limits = compaction.Limits(
            rotate_records=c.rotate_records,
            rotate_bytes=c.rotate_bytes,
            buffer_bytes=c.buffer_bytes,
            row_group_size=c.row_group_size,
            compression=None if c.compression == "none" else c.compression,
            partition_by=c.partition_by or None,
            rotate_interval=parse_interval(c.rotate_interval) if c.rotate_interval else None,
        )
        return compaction.compact(self.context.resolve(c.path), list(self.context.topics), limits, dry_run=dry_run)
