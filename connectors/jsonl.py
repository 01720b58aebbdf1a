"""`jsonl` source and sink: one JSON object per line.

The source reads files matching globs, in path order, and keeps a byte offset per file
as its source offset, so a restart continues at the next unread line. A file that shrinks
below its offset was truncated and is read again from the start.

The sink writes one file per topic-partition and keeps, beside each, the offset and size
it had reached at its last flush: on open it cuts anything written after that flush and
resumes from there, so its output holds every record exactly once even after a crash.
Readers of a file that is still being written should read only up to the size recorded in
its `.offset` file: bytes past it are not committed yet (and a crash may cut them).
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import json
import os
from pathlib import Path
from typing import Any

from runner.batch import Batch
from runner.connector import (
    Config,
    FatalError,
    Progress,
    RecordError,
    Sink,
    SinkTask,
    Source,
    SourceTask,
    TopicPartition,
    setting,
)

_json_decode = json.JSONDecoder().decode


class JsonlSource(Source):
    name = "jsonl"
    description = "Reads JSON objects, one per line, from files matching globs."

    class Config(Config):
        paths: list[str] = setting(help="Glob patterns of the files to read (** allowed).")
        batch_size: int = setting(5000, help="Lines read per batch.", min=1, max=1_000_000)
        follow: bool = setting(
            False,
            help="Keep watching the files for appended lines and new files, like tail -F "
            "(a following source never ends, so `run --once` does not either).",
        )

    def target(self) -> str:
        return " ".join(self.context.display(p) for p in self.config.paths)

    def preflight(self) -> list[tuple[str, str]]:
        return self.context.unmatched(self.config.paths)

    def tasks(self) -> list[SourceTask]:
        return [JsonlSourceTask(self.config, self.context.resolve)]


class JsonlSourceTask(SourceTask):
    read_ahead = True  # reading files changes nothing outside the task

    def __init__(self, config: Any, resolve: Any) -> None:
        self.config = config
        self.patterns = [str(resolve(p)) for p in config.paths]
        self.offsets: dict[str, dict[str, int]] = {}  # path -> {"pos": bytes, "line": n}
        self.files: list[str] = []
        self.current: Any = None  # open binary file
        self.current_path: str | None = None
        # path -> size when it was last seen ending in an unfinished line (follow mode):
        # such a file is skipped until it grows, so one half-written line neither spins
        # the source nor holds up the other files.
        self.waiting: dict[str, int] = {}
        self.sizes: dict[str, int] = {}  # path -> size when last looked at (for progress)

    async def open(self, offsets: dict[str, Any]) -> None:
        self.offsets = {path: dict(o) for path, o in offsets.items()}
        self._scan()
        if not self.files and not self.config.follow:
            raise FatalError(
                f"no file matches {', '.join(self.config.paths)}",
                hint="paths are globs relative to the spec's directory",
            )

    def _scan(self) -> None:
        found = set()
        for pattern in self.patterns:
            found.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        self.files = sorted(found)

    def _next_file(self) -> bool:
        """Open the first file with unread bytes; False if none."""
        for path in self.files:
            pos = self.offsets.get(path, {}).get("pos", 0)
            try:
                size = self.sizes[path] = os.path.getsize(path)
            except OSError:
                continue
            if size < pos:
                # Truncated (or replaced by a shorter file) since we read it: start over,
                # as `tail -F` does. Rotation by rename is the http_log source's business.
                self.offsets[path] = {"pos": 0, "line": 0}
                pos = 0
            if size > pos and self.waiting.get(path) != size:
                self.waiting.pop(path, None)
                if self.current is not None:
                    self.current.close()
                try:
                    self.current = open(path, "rb")
                except FileNotFoundError:  # gone since it was listed: the next scan forgets it
                    self.current = None
                    continue
                self.current.seek(pos)
                self.current_path = path
                return True
        return False

    async def poll(self) -> Batch | None:
        if self.current is None and not self._next_file():
            if not self.config.follow:
                return None
            await asyncio.sleep(0.5)
            self._scan()
            return Batch([])
        return await asyncio.to_thread(self._read_batch)

    def _read_batch(self) -> Batch:
        path = self.current_path
        assert path is not None
        state = self.offsets.setdefault(path, {"pos": 0, "line": 0})
        pos, line_no = state["pos"], state["line"]
        lines = list(itertools.islice(self.current, self.config.batch_size))
        if lines and not lines[-1].endswith(b"\n") and self.config.follow:
            lines.pop()  # a line still being written: take it when it is complete
            self.waiting[path] = os.fstat(self.current.fileno()).st_size
            self.current.seek(pos + sum(map(len, lines)))
        if len(lines) < self.config.batch_size:
            self.current.close()  # at the end for now; reopened when it grows
            self.current = None
        rows: list[dict[str, Any]] = []
        positions: list[str] = []
        errors: list[RecordError] = []
        for raw in lines:
            line_no += 1
            pos += len(raw)
            text = raw.strip()
            if not text:
                continue
            where = f"{path}:{line_no}"
            try:
                value = _json_decode(text.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                errors.append(_bad_line(raw, where, f"invalid JSON: {exc}"))
                continue
            if not isinstance(value, dict):
                errors.append(_bad_line(raw, where, f"expected a JSON object, got {type(value).__name__}"))
                continue
            rows.append(value)
            positions.append(where)
        moved = (pos, line_no) != (state["pos"], state["line"])
        state["pos"], state["line"] = pos, line_no
        return Batch(
            rows,
            source_offsets={path: dict(state)} if moved else {},
            errors=errors,
            positions=positions,
        )

    async def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def progress(self) -> Progress | None:
        if self.config.follow or not self.sizes:
            return None
        total = sum(self.sizes.get(path, 0) for path in self.files)
        done = sum(min(self.offsets.get(path, {}).get("pos", 0), self.sizes.get(path, 0)) for path in self.files)
        return Progress(done, total)


def _bad_line(raw: bytes, where: str, error: str) -> RecordError:
    return RecordError(
        error=error,
        stage="source",
        record=raw.decode("utf-8", "replace").rstrip("\n"),
        position=where,
    )


class JsonlSink(Sink):
    name = "jsonl"
    description = "Writes each topic-partition to a JSON-lines file, exactly once."

    class Config(Config):
        path: str = setting(help="Directory for the output files (<topic>-<partition>.jsonl).")

    def target(self) -> str:
        return os.path.join(self.context.display(self.config.path), "")

    def task(self) -> SinkTask:
        return JsonlSinkTask(self.context.resolve(self.config.path))


class JsonlSinkTask(SinkTask):
    """Appends to `<topic>-<partition>.jsonl`; `<...>.jsonl.offset` holds the committed
    state {"next_offset", "size"}, replaced atomically after each fsync of the data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[TopicPartition, Any] = {}
        self.next_offsets: dict[TopicPartition, int] = {}
        self.dirty: set[TopicPartition] = set()

    def _paths(self, tp: TopicPartition) -> tuple[Path, Path]:
        data = self.directory / f"{tp.topic}-{tp.partition}.jsonl"
        return data, data.with_name(data.name + ".offset")

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.directory.mkdir(parents=True, exist_ok=True)
        resume: dict[TopicPartition, int] = {}
        for tp in partitions:
            data, marker = self._paths(tp)
            state = {"next_offset": 0, "size": 0}
            if marker.exists():
                state = json.loads(marker.read_text())
                written = data.stat().st_size if data.exists() else 0
                if written < state["size"]:
                    raise FatalError(
                        f"{data} holds {written} bytes but {marker.name} records {state['size']} "
                        "flushed bytes: the output was changed outside the pipeline",
                        hint=f"move both {data.name} and {marker.name} away to rewrite this partition",
                    )
            if tp in self.files:
                self.files.pop(tp).close()
            f = open(data, "ab")
            # Anything past the last committed size was written after the last flush and
            # will be delivered again from next_offset: cut it so nothing appears twice.
            f.truncate(state["size"])
            f.seek(state["size"])
            self.files[tp] = f
            self.next_offsets[tp] = resume[tp] = state["next_offset"]
        return resume

    async def put(self, batch: Batch) -> None:
        if not len(batch):
            return None
        tp = TopicPartition(batch.topic, batch.partition)
        lines = batch.json_lines()
        self.files[tp].write(("\n".join(lines) + "\n").encode("utf-8"))
        self.next_offsets[tp] = batch.last_offset + 1
        self.dirty.add(tp)

    async def flush(self) -> None:
        dirty, self.dirty = self.dirty, set()
        await asyncio.to_thread(self._sync, dirty)

    def _sync(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            f = self.files[tp]
            f.flush()
            os.fsync(f.fileno())
            _, marker = self._paths(tp)
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(json.dumps({"next_offset": self.next_offsets[tp], "size": f.tell()}))
            with open(tmp, "rb+") as t:
                os.fsync(t.fileno())
            os.replace(tmp, marker)

    async def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
