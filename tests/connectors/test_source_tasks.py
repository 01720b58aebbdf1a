"""Sources split into tasks (`tasks: N`): the `files` and `http_log` sources give each task
its own files, the same files in every build, rotated logs with their live file; a run
with several tasks reads every line exactly once, and the next run nothing again. Real
files, through the task API and through the engine on the embedded broker."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from connectors.files import FilesSource
from connectors.http_log import HttpLogSource
from connectors.http_log.files import log_name
from runner import admin, engine
from runner.batch import Batch
from runner.connector import FatalError, task_of
from runner.plugins import load_plugins
from tests.connectors.tasks import context, drain, write
from tests.connectors.test_file_sources import entries, numbers

pytestmark = pytest.mark.timeout(60)

EVENT = {"type": "record", "name": "Event", "fields": [{"name": "id", "type": "long"}]}


def landing(tmp: Path, files: int = 12, lines: int = 5, start: int = 0) -> dict[str, set[int]]:
    """`files` jsonl files of `lines` ids each under landing/: absolute path -> its ids."""
    out = {}
    for f in range(start, start + files):
        ids = range(f * lines, (f + 1) * lines)
        path = tmp / "landing" / f"part-{f:03d}.jsonl"
        write(path, "".join(json.dumps({"id": i}) + "\n" for i in ids))
        out[str(path)] = set(ids)
    return out


def files_source(tmp: Path, tasks: int, **config: Any) -> FilesSource:
    config = {"paths": ["landing/*.jsonl"], "format": "jsonl", "batch_size": 4, **config}
    return FilesSource(FilesSource.Config.parse(config), context(tmp, schemas={"t": EVENT}, max_tasks=tasks))


def read_by_task(tasks: list) -> list[tuple[set[str], list[int], Any]]:
    """Each task drained: the files it gave offsets for, the ids it read, its last progress."""
    out = []
    for task in tasks:
        batches = drain(task)
        files = {path for b in batches for path in b.source_offsets}
        out.append((files, [r["id"] for b in batches for r in b.rows], task.progress()))
    return out


def test_files_tasks_split_the_files_stably_and_read_each_line_once(tmp_path: Path) -> None:
    files = landing(tmp_path)
    source = files_source(tmp_path, 3)
    first, second = (read_by_task(source.tasks()) for _ in range(2))  # two builds of the tasks
    assert [f for f, _, _ in first] == [f for f, _, _ in second], "the same files go to the same task"
    owned = [f for f, _, _ in first]
    assert all(owned), "twelve files spread over three tasks"
    assert sorted(p for f in owned for p in f) == sorted(files), "each file is one task's"
    for index, (paths, ids, progress) in enumerate(first):
        assert paths == {p for p in files if task_of(p, 3) == index}
        assert sorted(ids) == sorted(i for p in paths for i in files[p])
        size = sum(os.path.getsize(p) for p in paths)
        assert (progress.done, progress.total) == (size, size), "a task's progress covers its own files"
    assert sorted(i for _, ids, _ in first for i in ids) == list(range(60))

    (one,) = files_source(tmp_path, 1).tasks()
    assert sorted(r["id"] for b in drain(one) for r in b.rows) == list(range(60)), "one task reads all"


def test_files_tasks_resume_from_the_merged_offsets(tmp_path: Path) -> None:
    """Every task is opened with the offsets of all; a file read by one task under N=3 is
    skipped by whichever task owns it under N=2."""
    landing(tmp_path)
    offsets: dict[str, Any] = {}
    for task in files_source(tmp_path, 3).tasks():
        for batch in drain(task):
            offsets.update(batch.source_offsets)
    for task in files_source(tmp_path, 2).tasks():
        assert [r for b in drain(task, offsets) for r in b.rows] == []


def write_rotated_logs(tmp: Path, logs: list[str]) -> dict[str, list[int]]:
    """For each log directory: access.log.2.gz, access.log.1 and access.log, oldest first,
    30 lines each; directory -> the numbers its lines carry."""
    out = {}
    for n, name in enumerate(logs):
        base = 1000 * n
        d = tmp / "logs" / name
        d.mkdir(parents=True)
        with gzip.open(d / "access.log.2.gz", "wt") as f:
            f.write(entries(base, base + 30))
        write(d / "access.log.1", entries(base + 30, base + 60))
        write(d / "access.log", entries(base + 60, base + 90))
        for age, file in enumerate(["access.log", "access.log.1", "access.log.2.gz"]):
            os.utime(d / file, (1_700_000_000 - age * 60,) * 2)
        out[name] = list(range(base, base + 90))
    return out


def http_log_source(tmp: Path, tasks: int, **config: Any) -> HttpLogSource:
    config = {"paths": ["logs/*/access.log*"], "parse_processes": 0, "batch_size": 8, **config}
    return HttpLogSource(HttpLogSource.Config.parse(config), context(tmp, max_tasks=tasks))


def test_http_log_rotated_files_stay_with_their_logs_task(tmp_path: Path) -> None:
    logs = write_rotated_logs(tmp_path, [f"site{i}" for i in range(6)])
    paths = [str(tmp_path / "logs" / d / f) for d in logs for f in ("access.log", "access.log.1", "access.log.2.gz")]
    assert len({task_of(p, 3) for p in paths}) > 1, "hashing each file's own name would split the logs"
    assert {log_name(p) for p in paths} == {str(tmp_path / "logs" / d / "access.log") for d in logs}

    runs = [[drain(t) for t in http_log_source(tmp_path, 3).tasks()] for _ in range(2)]
    read = [[{o["path"] for b in batches for o in b.source_offsets.values()} for batches in run] for run in runs]
    assert read[0] == read[1], "the same logs go to the same task"
    for name in logs:
        files = {str(tmp_path / "logs" / name / f) for f in ("access.log", "access.log.1", "access.log.2.gz")}
        holders = [i for i, got in enumerate(read[0]) if got & files]
        assert len(holders) == 1 and files <= read[0][holders[0]], f"{name}: one task reads all of its files"
        assert holders == [task_of(str(tmp_path / "logs" / name / "access.log"), 3)]
    assert sum(1 for got in read[0] if got) > 1, "six logs spread over more than one task"
    every = [n for batches in runs[0] for b in batches for n in numbers(b.rows)]
    assert sorted(every) == sorted(n for ns in logs.values() for n in ns), "every line once"


def test_http_log_tasks_without_a_log_of_their_own_end_quietly(tmp_path: Path) -> None:
    write(tmp_path / "logs" / "one" / "access.log", entries(1, 11))
    tasks = http_log_source(tmp_path, 4).tasks()
    assert sorted(n for t in tasks for b in drain(t) for n in numbers(b.rows)) == list(range(1, 11))
    (nothing,) = http_log_source(tmp_path, 4, paths=["nowhere/*.log"]).tasks()[:1]
    with pytest.raises(FatalError, match="no file matches"):
        drain(nothing)


def test_http_log_following_a_rotation_across_two_tasks_reads_each_line_once(tmp_path: Path) -> None:
    """`access.log` renamed to `access.log.1` and a new `access.log` while two tasks follow:
    the task of that log finishes the renamed file and reads the new one; the other task,
    to which `access.log.1` would hash by its own name, never takes it."""
    names = [f"site{i}" for i in range(20)]
    # a log of task 0 whose rotated name, hashed by itself, would be task 1's, and a log of task 1
    rotating = next(n for n in names if task_of(str(tmp_path / "logs" / n / "access.log"), 2) == 0
                    and task_of(str(tmp_path / "logs" / n / "access.log.1"), 2) == 1)
    other = next(n for n in names if task_of(str(tmp_path / "logs" / n / "access.log"), 2) == 1)
    live, still = tmp_path / "logs" / rotating / "access.log", tmp_path / "logs" / other / "access.log"
    write(live, entries(1, 51))
    write(still, entries(1001, 1051))

    async def main() -> list[list[int]]:
        tasks = http_log_source(tmp_path, 2, paths=["logs/*/access.log*"], follow=True, poll_interval=0.01).tasks()
        got: list[list[int]] = [[] for _ in tasks]

        async def poll_each(times: int) -> None:
            for _ in range(times):
                for i, task in enumerate(tasks):
                    batch: Batch | None = await task.poll()
                    assert batch is not None, "a following task never ends"
                    got[i] += numbers(batch.rows)

        for task in tasks:
            await task.open({})
        try:
            await poll_each(10)
            live.rename(live.with_name("access.log.1"))
            write(live.with_name("access.log.1"), entries(51, 61), "a")  # the server wrote on before reopening
            write(live, entries(61, 101))
            write(still, entries(1051, 1061), "a")
            await poll_each(20)
        finally:
            for task in tasks:
                await task.close()
        return got

    got = asyncio.run(main())
    assert sorted(got[0]) == list(range(1, 101))
    assert sorted(got[1]) == list(range(1001, 1061))


# -- through the engine ------------------------------------------------------------------------


def write_spec(tmp: Path, tasks: int) -> Path:
    (tmp / "event.avsc").write_text(json.dumps(EVENT))
    spec = tmp / "spec.yaml"
    spec.write_text(f"""\
name: split
topics:
  events: {{partitions: 2, schema: event.avsc}}
sources:
  - name: landing
    connector: files
    topic: events
    tasks: {tasks}
    config: {{paths: ["landing/*.jsonl"], format: jsonl, batch_size: 7}}
""")
    return spec


def run_spec(path: Path) -> tuple[Any, list[int]]:
    host = load_plugins()
    spec = engine.check_spec(path, host)
    (counters,) = engine.run(spec, host, once=True).counters
    out: list[str] = []
    admin.consume(spec, "events", out.append, from_beginning=True, meta=True)
    return counters, [json.loads(line)["value"]["id"] for line in out]


def test_a_run_with_three_tasks_reads_every_line_once_and_the_next_run_nothing(tmp_path: Path) -> None:
    landing(tmp_path, files=12, lines=25)
    counters, ids = run_spec(write_spec(tmp_path, 3))
    assert Counter(ids) == Counter(range(300)), "every line exactly once"
    assert (counters.records_in, counters.records_out) == (300, 300)
    assert sorted(counters.progress) == [0, 1, 2]
    sizes = [p.total for p in counters.progress.values()]
    assert sum(sizes) == sum(p.stat().st_size for p in (tmp_path / "landing").iterdir()) and all(sizes)

    counters, ids = run_spec(write_spec(tmp_path, 3))
    assert counters.records_in == 0 and Counter(ids) == Counter(range(300)), "nothing read again"

    # Fewer tasks now, and a new file: the files move between tasks, and are not read again.
    landing(tmp_path, files=1, lines=25, start=12)
    counters, ids = run_spec(write_spec(tmp_path, 2))
    assert counters.records_in == 25 and Counter(ids) == Counter(range(325))
