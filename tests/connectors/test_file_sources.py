"""What the two file-reading sources (`http_log`, and `files` with any format) share:
a file vanishing under them, and a file they may not read. Real files, through the task
API (no engine)."""

from __future__ import annotations

import asyncio
import builtins
import gzip
import logging
import os
from pathlib import Path
from typing import Any, Callable

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

