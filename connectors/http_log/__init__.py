"""`http_log` source: Apache / Nginx access logs into typed activity records.

    sources:
      - name: access-logs
        connector: http_log
        topic: activity
        config: {paths: ["logs/access.log*"], format: combined, follow: true}

Formats: `common`, `combined` (also Nginx's default), `vhost_combined`, or any Apache
`LogFormat` string (see `formats.py` for the directives and the field each one gives).
`avro_schema_for(format)` returns the Avro schema of the records a format produces.

Files: every regular file matching the globs, plain or `.gz`, oldest modification first.
Each file is known by its identity (device and inode) and its source offset is the byte
position reached in it (see `files.py`), so a restart continues exactly where it stopped,
even if the file was renamed meanwhile. With `follow: true` the source behaves like
`tail -F`: it picks up appended lines, new files and rotation by rename (the renamed file
is finished first, from the descriptor it holds open) or by truncation (`copytruncate`:
read again from the start); an unfinished last line waits until it is complete. Without
`follow` it reads what is there, unfinished last line included, and ends.

With `tasks: N` on the source, N tasks read side by side, each the logs whose name hashes to
it (`runner.connector.task_of` of the absolute path without its rotation suffix, see
`files.log_name`): `access.log`, `access.log.1`, `access.log.2.gz` and
`access.log-20240501.gz` are one log, so rotation by rename and the compressed copies stay
with the task that reads the live file. Only a file renamed out of its log while it is
followed (to a name that is not the log's plus a rotation suffix, e.g. into an `archive/`
the globs also match) is read again, from its start, by the task it moves to; between runs
its stored offset goes with it. `parse_processes: -1` divides the cores among the tasks.

Without `follow`, a file deleted or renamed away between the scan and its reading is
skipped with a warning naming it; one deleted or renamed while it is read is read to its
end from the descriptor held open. A file the pipeline may not read stops the run
(`FatalError` naming it, with a hint). Progress (`pipeline run`'s display) is bytes read
of the bytes this run has to read over the matched files (`.gz` in compressed bytes; what
earlier runs read is not counted); None when following, as a followed log has no end.

Rotated `.gz` files are read too, once per identity. A `.gz` whose first bytes are those
of a file already read is recognised as that file compressed by logrotate and continues
from its position, so `access.log*` works with `compress` and `delaycompress`. Only
uncompressed copies are not recognised: with `copytruncate`, let the globs match the live
file and the compressed copies, not `access.log.1`.

Escapes and bytes, losslessly: Apache and Nginx log `"`, `\\` and non-printable or
non-ASCII bytes as `\\"`, `\\\\`, `\\n`... and `\\xhh` (Apache lowercase hex, Nginx `\\xHH`).
Every string field, `request` included, is unescaped: runs of `\\xhh` that form valid
UTF-8 become those characters (`\\xc3\\xa4` -> `ä`); bytes that do not (Latin-1, CP1251,
a truncated sequence, garbage) stay exactly as written (`\\xe4`, `\\xE4`): never U+FFFD,
never a dropped byte; `\\xc3\\xa4\\xe4` -> `ä\\xe4`. Raw bytes of the file that are not
valid in `encoding` are read as `\\xhh` text (`backslashreplace`), under the same rule.
Lines without a backslash skip unescaping entirely (see `formats.py`).

Lines that do not match the format are data errors (`Batch.errors`, position
`path:line`); blank lines are skipped. Records are not keyed here: set `key:` on the topic
(`key: remote_host`).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from connectors.http_log.files import Chunk, FileSet
from connectors.http_log.formats import (
    NAMED_FORMATS,
    FormatError,
    LogFormat,
    avro_schema_for,
    compile_format,
)
from connectors.http_log.parallel import MIN_BYTES, ParsePool, parallel_workers
from runner.batch import Batch
from runner.connector import (
    Config,
    FatalError,
    Progress,
    RecordError,
    Source,
    SourceTask,
    setting,
)

log = logging.getLogger("pipeline.http_log")

OWN_SHARE = 4  # with parse processes, the engine parses at most 1 chunk in OWN_SHARE + 1

__all__ = ["HttpLogSource", "HttpLogSourceTask", "avro_schema_for", "compile_format", "encoding_problems"]


def encoding_problems(encoding: Any) -> list[tuple[str, str]]:
    """The `encoding` setting of a line-reading source: known, and ASCII-compatible (lines
    are split at b"\\n" before decoding)."""
    if not isinstance(encoding, str):
        return []
    try:
        if codecs.lookup(encoding).encode("\n")[0] != b"\n":
            return [("encoding", f"{encoding!r} is not ASCII-compatible (lines end in b'\\n')")]
    except LookupError:
        return [("encoding", f"unknown encoding {encoding!r}")]
    return []


class HttpLogSource(Source):
    name = "http_log"
    description = "Reads Apache/Nginx access logs (plain or .gz, optionally tailing) as typed records."

    class Config(Config):
        paths: list[str] = setting(
            help="Glob patterns of the log files, relative to the spec's directory "
            "(** allowed; .gz files are read too)."
        )
        format: str = setting(
            "combined",
            help=f"{', '.join(NAMED_FORMATS)} (Nginx's default is combined), or an Apache "
            'LogFormat string such as \'%h %l %u %t "%r" %>s %b %D "%{X-Forwarded-For}i"\'.',
        )
        follow: bool = setting(
            False,
            help="Keep reading like tail -F: appended lines, new files, rotation by rename or "
            "truncation. A following source never ends.",
        )
        batch_size: int = setting(10_000, help="Lines read per batch.", min=1, max=1_000_000)
        poll_interval: float = setting(
            0.1,
            help="Seconds to wait before looking again when following and nothing is new (a new line "
            "waits at most this long: measured p99 108 ms from append to topic at 0.1, 514 ms at 0.5).",
            min=0.01,
            max=60,
        )
        parse_processes: int = setting(
            -1,
            help="Worker processes (per task) that parse the lines while the engine moves what was parsed "
            "before: -1 for one per core but one, divided among the source's tasks (at least one each), "
            "when the task's files to read hold 32 MiB or more; 0 to parse in the engine's process.",
            min=-1,
            max=64,
        )
        encoding: str = setting(
            "utf-8",
            help="Text encoding of the logs (ASCII-compatible); bytes that are not valid in it are "
            "kept as \\xhh text, like the escapes the servers write.",
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = []
            fmt = given.get("format", "combined")
            if isinstance(fmt, str):
                try:
                    compile_format(fmt)
                except FormatError as exc:
                    problems.append(("format", str(exc)))
            problems += encoding_problems(given.get("encoding", "utf-8"))
            if isinstance(given.get("paths"), list) and not given["paths"]:
                problems.append(("paths", "give at least one glob pattern"))
            return problems

    def target(self) -> str:
        return " ".join(self.context.display(p) for p in self.config.paths)

    def preflight(self) -> list[tuple[str, str]]:
        return self.context.unmatched(self.config.paths)

    def produces(self) -> dict[str, Any]:
        return avro_schema_for(self.config.format)

    def tasks(self) -> list[SourceTask]:
        """`tasks: N`: N tasks, task i reading the logs whose name hashes to i (`task_of`
        of the absolute path without rotation suffix, see `files.log_name`): a log's
        rotated files are read by the task that reads the log."""
        n = self.context.max_tasks
        patterns = [str(self.context.resolve(p)) for p in self.config.paths]
        return [HttpLogSourceTask(self.config, patterns, self._format, share=(i, n)) for i in range(n)]

    @functools.cached_property
    def _format(self) -> LogFormat:
        return compile_format(self.config.format)  # once: the engine calls `tasks()` once per task


class HttpLogSourceTask(SourceTask):
    read_ahead = True  # reading files changes nothing outside the task

    def __init__(self, config: Any, patterns: list[str], format: LogFormat, share: tuple[int, int] = (0, 1)) -> None:
        self.config = config
        self.format = format
        self.share = share
        self.files = FileSet(patterns, config.follow, config.encoding, share)
        self.last_scan = 0.0
        # A long log is parsed in other processes (see parallel.py): chunks read and handed
        # over, in reading order, with where the file stood after each.
        self.pool: ParsePool | None = None
        # (result, chunk, source offsets after it, parsed here rather than by a worker)
        self.ahead: deque[tuple[concurrent.futures.Future, Chunk, dict[str, Any], bool]] = deque()
        self.parsed_here = self.parsed_by_workers = 0  # chunks

    async def open(self, offsets: dict[str, Any]) -> None:
        self.files.load(offsets)
        await asyncio.to_thread(self._scan)
        if not self.files.matched_any and not self.config.follow:
            raise FatalError(
                f"no file matches {', '.join(self.config.paths)}",
                hint="paths are globs relative to the spec's directory",
            )
        workers = self.config.parse_processes
        if workers < 0:
            done, total = self.files.progress()
            cores = parallel_workers()  # shared by the source's tasks
            workers = max(1, cores // self.share[1]) if cores and total - done >= MIN_BYTES else 0
        if workers:
            self.pool = ParsePool(self.config.format, workers)

    async def poll(self) -> Batch | None:
        if self.pool is not None:
            return await self._poll_parallel()
        batch = await asyncio.to_thread(self._step, False)
        if batch is not None or not self.config.follow:
            return batch
        await asyncio.sleep(self.config.poll_interval)
        batch = await asyncio.to_thread(self._step, True)
        return batch if batch is not None else Batch([])

    async def _poll_parallel(self) -> Batch | None:
        """`poll` with the parsing in other processes, up to `pool.depth` chunks ahead.

        When the next chunk is not parsed yet, the engine would wait for it: it parses a
        chunk of its own meanwhile (queued behind the workers' chunks, so the order stays
        the reading order), one at a time and at most one for every `OWN_SHARE` the
        workers parse: the engine has its own work (encoding, storing, writing) besides."""
        pool = self.pool
        while sum(1 for _, _, _, own in self.ahead if not own) < pool.depth:
            read = await asyncio.to_thread(self._read, False)
            if read is None:
                break
            chunk, offsets = read
            self.ahead.append((pool.submit(chunk.lines), chunk, offsets, False))
            self.parsed_by_workers += 1
        if (self.ahead and not self.ahead[0][0].done() and not any(own for *_, own in self.ahead)
                and self.parsed_here * OWN_SHARE < self.parsed_by_workers):
            read = await asyncio.to_thread(self._read, False)
            if read is not None:
                chunk, offsets = read
                parsed: concurrent.futures.Future = concurrent.futures.Future()
                parsed.set_result(await asyncio.to_thread(self.format.parse_columns, chunk.lines))
                self.ahead.append((parsed, chunk, offsets, True))
                self.parsed_here += 1
        if not self.ahead:
            if not self.config.follow:
                return None
            await asyncio.sleep(self.config.poll_interval)
            read = await asyncio.to_thread(self._read, True)
            if read is None:
                return Batch([])
            self.ahead.append((pool.submit(read[0].lines), *read, False))
        future, chunk, offsets, _ = self.ahead.popleft()
        records, bad, kept = await asyncio.wrap_future(future)
        return self._batch(chunk, offsets, records, bad, kept)

    async def close(self) -> None:
        if self.pool is not None:
            for future, *_ in self.ahead:
                future.cancel()
            self.ahead.clear()
            self.pool.close()
            self.pool = None
        self.files.close()

    def progress(self) -> Progress | None:
        """Bytes read of the bytes this run reads over the matched files (what earlier runs
        read counts in neither; `.gz` in compressed bytes), as the last scan and read left
        them (see `FileSet.progress`). None when following: a followed log has no end."""
        if self.config.follow:
            return None
        done, total = self.files.progress()
        return Progress(done, total, "bytes")

    # -- in a worker thread ------------------------------------------------------------------

    def _scan(self) -> None:
        self.files.scan()
        self.last_scan = time.monotonic()

    def _step(self, rescan: bool) -> Batch | None:
        """One batch from the next file with unread data, parsed here; None if there is none."""
        read = self._read(rescan)
        if read is None:
            return None
        chunk, offsets = read
        return self._batch(chunk, offsets, *self.format.parse_columns(chunk.lines))

    def _read(self, rescan: bool) -> tuple[Chunk, dict[str, Any]] | None:
        """The next chunk of lines from the next file with unread data, and the source offset
        after it (empty when the file's position did not move); None if there is none.

        A file deleted or renamed away while it is read is read to its end from the
        descriptor held open. One that vanishes between the scan and its opening is skipped:
        following, the next scan decides (rotation does that all the time); otherwise with a
        warning naming it. A file the pipeline may not read stops the run (FatalError)."""
        if self.config.follow and (rescan or time.monotonic() - self.last_scan >= self.config.poll_interval):
            self._scan()
        while True:
            tf = None
            try:
                tf = self.files.next_file()
                if tf is None:
                    return None
                before = tf.offset()
                chunk = self.files.read(tf, self.config.batch_size)
            except PermissionError as exc:
                raise FatalError(
                    f"cannot read {exc.filename or (tf.path if tf else '')}: {exc.strerror}",
                    hint="the pipeline needs read access to the logs (often the adm group)",
                ) from None
            except OSError as exc:
                if tf is None:
                    raise
                tf.close()  # vanished between looking and reading
                tf.matched = False
                if not self.config.follow:
                    log.warning("http_log: skipped %s: %s", tf.path, exc.strerror or exc)
                continue
            after = tf.offset()
            return chunk, ({tf.ident: after} if after != before else {})

    def _batch(
        self,
        chunk: Chunk,
        offsets: dict[str, Any],
        records: list[dict[str, Any]] | pa.RecordBatch,
        bad: list[tuple[int, str]],
        kept: list[int] | None,
    ) -> Batch:
        """The batch of a parsed chunk: its records (rows, or columns from a parse process),
        the lines that did not parse as errors naming path:line, and each record's line."""
        path = chunk.file.path
        first = chunk.first_line
        errors = [
            RecordError(
                error=message,
                stage="source",
                record=chunk.lines[i],
                position=f"{path}:{first + i}",
            )
            for i, message in bad
        ]
        if chunk.error:
            errors.append(RecordError(error=chunk.error, stage="source", position=path))
        count = len(records) if isinstance(records, list) else records.num_rows
        lines = range(first, first + count) if kept is None else [first + i for i in kept]
        columns = records if isinstance(records, pa.RecordBatch) else None
        return Batch(
            None if columns is not None else records,
            columns=columns,
            source_offsets=offsets,
            errors=errors,
            positions=Positions(path, lines),
        )


class Positions(Sequence[str]):
    """`path:line` of each row, made only when asked for (on an error), not per record."""

    __slots__ = ("path", "lines")

    def __init__(self, path: str, lines: Sequence[int]) -> None:
        self.path = path
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [f"{self.path}:{n}" for n in self.lines[index]]
        return f"{self.path}:{self.lines[index]}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Positions({self.path!r}, {self.lines!r})"
