"""A source task reading ahead (runner/worker/source.py): what it read is written once if
its process then runs the task from the same offsets, and thrown away if another process
moved them meanwhile. On the embedded broker (the runner is the same on both brokers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runner.batch import Batch
from runner.broker.embedded import EmbeddedBroker
from runner.connector import SourceTask
from runner.worker.common import Counters, DeadLetters, Topic
from runner.worker.source import SourceRunner

SCHEMA = {"type": "record", "name": "N", "fields": [{"name": "n", "type": "long"}]}
RECORDS, BATCH = 100, 10


class Numbers(SourceTask):
    """0 .. RECORDS - 1 in batches of BATCH, its offset the next number to read."""

    read_ahead = True

    def __init__(self, opened: list[int]) -> None:
        self.opened = opened  # where each task of this kind was opened, in order
        self.next = 0

    async def open(self, offsets: dict[str, Any]) -> None:
        self.next = offsets.get("numbers", 0)
        self.opened.append(self.next)

    async def poll(self) -> Batch | None:
        if self.next >= RECORDS:
            return None
        rows = [{"n": n} for n in range(self.next, min(self.next + BATCH, RECORDS))]
        self.next += len(rows)
        return Batch(rows, source_offsets={"numbers": self.next})


def runner(broker: EmbeddedBroker, opened: list[int]) -> SourceRunner:
    topic = Topic("numbers", 1, SCHEMA, 1)
    dead_letters = DeadLetters(SimpleNamespace(errors=SimpleNamespace(tolerance="none")), None)
    return SourceRunner("numbers", Numbers(opened), topic, broker.source_writer("numbers", 0, ["numbers"]),
                        dead_letters, Counters("numbers", "source"), asyncio.Event(),
                        fresh_task=lambda: Numbers(opened))


def on_a_broker(tmp_path: Path, body: Callable[[EmbeddedBroker], Awaitable[None]]) -> None:
    async def main() -> None:
        broker = EmbeddedBroker(tmp_path / "state")
        await broker.start()
        try:
            await broker.ensure_topic("numbers", 1)
            await body(broker)
        finally:
            await broker.close()

    asyncio.run(main())


async def read_ahead_to_the_end(ahead: SourceRunner) -> None:
    ahead.read_ahead()
    assert ahead._ahead is not None
    await ahead._ahead  # it ends with the input (RECORDS are far below READ_AHEAD_BYTES)
    assert ahead._ahead_batches[-1] is None


def test_what_was_read_ahead_is_written_once_when_the_offsets_did_not_move(tmp_path: Path) -> None:
    async def body(broker: EmbeddedBroker) -> None:
        opened: list[int] = []
        ahead = runner(broker, opened)
        await read_ahead_to_the_end(ahead)
        await ahead.run()
        assert opened == [0]  # the task read ahead went on: no new task was opened
        assert ahead.counters.records_in == ahead.counters.records_out == RECORDS
        assert await broker.end_offsets("numbers") == [RECORDS]
        assert await broker.source_offsets("numbers") == {"numbers": RECORDS}

    on_a_broker(tmp_path, body)


def test_what_was_read_ahead_is_thrown_away_when_another_process_moved_the_offsets(tmp_path: Path) -> None:
    async def body(broker: EmbeddedBroker) -> None:
        opened: list[int] = []
        ahead = runner(broker, opened)
        await read_ahead_to_the_end(ahead)
        # Meanwhile the task ran elsewhere, to its end.
        await runner(broker, opened).run()
        assert await broker.end_offsets("numbers") == [RECORDS]
        # Now given the task, this process starts a new one where the offsets stand.
        await ahead.run()
        assert opened == [0, 0, RECORDS]
        assert ahead.counters.records_in == ahead.counters.records_out == 0
        assert await broker.end_offsets("numbers") == [RECORDS]  # nothing written twice

    on_a_broker(tmp_path, body)


def test_a_task_read_ahead_for_nothing_is_closed(tmp_path: Path) -> None:
    async def body(broker: EmbeddedBroker) -> None:
        ahead = runner(broker, [])
        closed = asyncio.Event()

        async def close() -> None:
            closed.set()

        ahead.task.close = close  # type: ignore[method-assign]
        await read_ahead_to_the_end(ahead)
        await ahead.discard()
        assert closed.is_set()
        assert await broker.end_offsets("numbers") == [0]

    on_a_broker(tmp_path, body)
