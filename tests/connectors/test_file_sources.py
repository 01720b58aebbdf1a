"""What the two file-reading sources (`http_log`, and `files` with any format) share:
progress over the files they read, a file vanishing under them, and a file they may not
read. Real files, through the task API (no engine)."""

from __future__ import annotations

import asyncio
import builtins
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import connectors.files
from connectors.files import FilesSource
from connectors.http_log import HttpLogSource, avro_schema_for
from runner.batch import Batch
from runner.connector import FatalError, Progress
from tests.connectors.tasks import context, drain, write

pytestmark = pytest.mark.timeout(30)

UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"


def entry(n: int) -> str:
    """A combined line whose path names its number."""
    return f'192.0.2.{n % 250} - - [10/Oct/2023:13:{n // 60 % 60:02d}:{n % 60:02d} +0000] "GET /n/{n} HTTP/1.1" 200 {n} "-" "{UA}"\n'


def entries(start: int, stop: int) -> str:
    return "".join(entry(n) for n in range(start, stop))


def numbers(rows: list[dict]) -> list[int]:
    return sorted(int(r["path"].rsplit("/", 1)[1]) for r in rows)


def http_log_task(tmp: Path, **config: Any):
    (task,) = HttpLogSource(HttpLogSource.Config.parse(config), context(tmp)).tasks()
    return task


def files_task(tmp: Path, schema: dict | None = None, **config: Any):
    config.setdefault("format", "http_log")
    if schema is None and config["format"] == "http_log":
        schema = avro_schema_for(config.get("log_format", "combined"))
    ctx = context(tmp, schemas={"t": schema} if schema else {})
    (task,) = FilesSource(FilesSource.Config.parse(config), ctx).tasks()
    return task


SOURCES: dict[str, Callable[..., Any]] = {"http_log": http_log_task, "files": files_task}
both = pytest.mark.parametrize("make", list(SOURCES.values()), ids=list(SOURCES))


async def poll_all(task, limit: int = 1000) -> tuple[list[Batch], list[Progress | None]]:
    """Poll an opened task to its end: the batches, and `progress()` before the first poll
    and after each."""
    batches, seen = [], [task.progress()]
    for _ in range(limit):
        batch = await task.poll()
        seen.append(task.progress())
        if batch is None:
            return batches, seen
        batches.append(batch)
    raise AssertionError("poll never returned None")


def run(task, offsets: dict | None = None, between: Callable[[], None] | None = None, first: int = 0):
    """open(offsets); poll `first` batches; call `between`; poll to the end; close."""

    async def main() -> tuple[list[Batch], list[Progress | None]]:
        await task.open(offsets or {})
        try:
            head = [await task.poll() for _ in range(first)]
            if between is not None:
                between()
            batches, seen = await poll_all(task)
            return [b for b in head if b is not None] + batches, seen
        finally:
            await task.close()

    return asyncio.run(main())


def rows_of(batches: list[Batch]) -> list[dict]:
    return [r for b in batches for r in b.rows]


# -- progress --------------------------------------------------------------------------------


def write_logs(tmp: Path) -> int:
    """Two plain logs and a .gz; their size on disk."""
    write(tmp / "logs" / "access.log.1", entries(1, 301))
    with gzip.open(tmp / "logs" / "access.log.2.gz", "wt") as f:
        f.write(entries(301, 601))
    write(tmp / "logs" / "access.log", entries(601, 901))
    now = 1_700_000_000
    for age, name in enumerate(["access.log", "access.log.1", "access.log.2.gz"]):
        os.utime(tmp / "logs" / name, (now - age * 60, now - age * 60))
    return sum(p.stat().st_size for p in (tmp / "logs").iterdir())


@both
def test_progress_moves_from_zero_to_the_total_in_bytes(tmp_path: Path, make) -> None:
    size = write_logs(tmp_path)
    batches, seen = run(make(tmp_path, paths=["logs/access.log*"], batch_size=50))
    assert numbers(rows_of(batches)) == list(range(1, 901))
    assert all(isinstance(p, Progress) and p.unit == "bytes" for p in seen)
    assert (seen[0].done, seen[0].total) == (0, size)  # known from the scan, before any read
    done = [p.done for p in seen]
    assert done == sorted(done), "progress never goes back"
    assert all(p.done <= p.total == size for p in seen)
    assert any(0 < d < size for d in done)
    assert (seen[-1].done, seen[-1].total) == (size, size)


@both
def test_progress_of_a_resumed_run_counts_only_what_is_left(tmp_path: Path, make) -> None:
    write(tmp_path / "access.log", entries(1, 201))
    size = (tmp_path / "access.log").stat().st_size

    async def part() -> dict:
        task = make(tmp_path, paths=["access.log"], batch_size=50)
        await task.open({})
        try:
            return (await task.poll()).source_offsets
        finally:
            await task.close()

    offsets = asyncio.run(part())
    batches, seen = run(make(tmp_path, paths=["access.log"], batch_size=50), offsets)
    assert numbers(rows_of(batches)) == list(range(51, 201))
    read_before = len(entries(1, 51).encode())
    assert (seen[0].done, seen[0].total) == (0, size - read_before)  # known before any read
    assert (seen[-1].done, seen[-1].total) == (size - read_before,) * 2
    # Read to the end by an earlier run: nothing to do, nothing to show.
    final = {**offsets, **{k: v for b in batches for k, v in b.source_offsets.items()}}
    batches, seen = run(make(tmp_path, paths=["access.log"]), final)
    assert rows_of(batches) == [] and (seen[-1].done, seen[-1].total) == (0, 0)


def test_progress_is_none_for_a_followed_log(tmp_path: Path) -> None:
    write(tmp_path / "access.log", entries(1, 3))

    async def main() -> None:
        task = http_log_task(tmp_path, paths=["access.log"], follow=True, poll_interval=0.01)
        await task.open({})
        try:
            assert task.progress() is None
            await task.poll()
            assert task.progress() is None
        finally:
            await task.close()

    asyncio.run(main())


ORDER = {
    "type": "record",
    "name": "Order",
    "fields": [{"name": "id", "type": "int"}, {"name": "note", "type": ["null", "string"], "default": None}],
}


def test_files_progress_for_csv_jsonl_and_parquet(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.csv", "id,note\n" + "".join(f"{i},n{i}\n" for i in range(1, 101)))
    write(tmp_path / "in" / "b.jsonl", "".join(json.dumps({"id": i}) + "\n" for i in range(101, 201)))
    with gzip.open(tmp_path / "in" / "c.csv.gz", "wt") as f:
        f.write("id,note\n" + "".join(f"{i},n{i}\n" for i in range(201, 301)))
    pq.write_table(pa.table({"id": pa.array(range(301, 401), pa.int32())}), tmp_path / "in" / "d.parquet", row_group_size=25)
    for fmt, pattern in (("csv", "in/*.csv*"), ("jsonl", "in/*.jsonl"), ("parquet", "in/*.parquet")):
        files = [p for p in (tmp_path / "in").glob(pattern.split("/")[1])]
        size = sum(p.stat().st_size for p in files)
        batches, seen = run(files_task(tmp_path, ORDER, paths=[pattern], format=fmt, batch_size=30))
        assert len(rows_of(batches)) == 100 * len(files), fmt
        done = [p.done for p in seen]
        assert done == sorted(done) and any(0 < d < size for d in done), (fmt, done, size)
        assert (seen[0].total, seen[-1].done, seen[-1].total) == (size, size, size), fmt


# -- a file vanishing ------------------------------------------------------------------------


def two_logs(tmp: Path) -> tuple[Path, Path]:
    """a.log (older, read first by either source), b.log."""
    a, b = tmp / "logs" / "a.log", tmp / "logs" / "b.log"
    write(a, entries(1, 11))
    write(b, entries(11, 21))
    os.utime(a, (1_700_000_000, 1_700_000_000))
    return a, b


@both
@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_a_file_gone_between_the_scan_and_its_reading_is_skipped_with_a_warning(
    tmp_path: Path, make, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = two_logs(tmp_path)
    task = make(tmp_path, paths=["logs/*.log"])

    def vanish() -> None:
        if how == "deleted":
            b.unlink()
        else:
            b.rename(tmp_path / "logs" / "b.log.old")

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        batches, seen = run(task, between=vanish)  # open scans both; b vanishes before any read
    assert numbers(rows_of(batches)) == list(range(1, 11))
    assert not [e for b_ in batches for e in b_.errors]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.name.startswith("pipeline.") and f"skipped {b}" in warning.getMessage()
    assert "\n" not in warning.getMessage() and warning.exc_info is None
    assert seen[-1].done == seen[-1].total == a.stat().st_size


@both
@pytest.mark.parametrize("how", ["deleted", "renamed"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_a_file_gone_while_it_is_read_is_read_to_its_end(
    tmp_path: Path, make, how: str, gz: bool, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "logs" / ("access.log.1.gz" if gz else "access.log")
    log.parent.mkdir()
    if gz:
        with gzip.open(log, "wt") as f:
            f.write(entries(1, 101))
    else:
        write(log, entries(1, 101))

    def vanish() -> None:
        if how == "deleted":
            log.unlink()
        else:
            log.rename(tmp_path / "elsewhere")

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        batches, seen = run(make(tmp_path, paths=["logs/access.log*"], batch_size=10), between=vanish, first=1)
    assert numbers(rows_of(batches)) == list(range(1, 101))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert seen[-1].done == seen[-1].total > 0


def test_http_log_following_stays_quiet_about_a_vanished_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Following, files come and go with rotation: the next scan sorts them out, no warning.
    a, b = two_logs(tmp_path)

    async def main() -> list[dict]:
        task = http_log_task(tmp_path, paths=["logs/*.log"], follow=True, poll_interval=0.01)
        await task.open({})
        try:
            b.unlink()
            rows = []
            for _ in range(5):
                rows += (await task.poll()).rows
            return rows
        finally:
            await task.close()

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert numbers(asyncio.run(main())) == list(range(1, 11))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- a file the pipeline may not read --------------------------------------------------------


def deny(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Reading `path` fails with EACCES, as for a file of another user without read access
    (the tests may run as root, whom chmod does not stop)."""

    def denied(name: Any) -> None:
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", os.fspath(name))

    real_os_open, real_open = os.open, builtins.open

    def os_open(name: Any, *args: Any, **kwargs: Any) -> int:
        denied(name)
        return real_os_open(name, *args, **kwargs)

    def open_(name: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, (str, bytes, os.PathLike)):
            denied(name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)  # gzip.open, and the files source's open
    monkeypatch.setattr(connectors.files, "open", open_, raising=False)


@both
@pytest.mark.parametrize("name", ["access.log", "access.log.1.gz"])
def test_a_file_the_pipeline_may_not_read_is_fatal_naming_it_with_a_hint(
    tmp_path: Path, make, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "logs" / name
    log.parent.mkdir()
    if name.endswith(".gz"):
        with gzip.open(log, "wt") as f:
            f.write(entries(1, 3))
    else:
        write(log, entries(1, 3))
    write(tmp_path / "logs" / "access.log.0", entries(3, 5))  # another file: read or not, no matter
    deny(monkeypatch, log)
    with pytest.raises(FatalError) as exc:
        drain(make(tmp_path, paths=["logs/access.log*"]))
    assert str(log) in str(exc.value) and "Permission denied" in str(exc.value)
    assert "read access" in (exc.value.hint or "")

