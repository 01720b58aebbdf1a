"""The embedded broker: durability, exactly-once source offsets, consumer groups, wake-up,
the state-directory lock, read-only access from another process, and kill -9."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runner.broker import embedded
from runner.broker.base import FetchedBatch, ProduceBatch, SourceOffsetCommit, TopicPartition
from runner.broker.embedded import EmbeddedBroker, EmbeddedConsumer
from runner.errors import FatalError

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


def batch(topic: str, partition: int, values: list[bytes], keys: list[bytes | None] | None = None,
          headers: list[dict[str, bytes]] | None = None) -> ProduceBatch:
    return ProduceBatch(
        topic, partition, keys if keys is not None else [None] * len(values), values,
        [1_700_000_000_000 + i for i in range(len(values))], headers,
    )


async def open_broker(path: Path, topics: dict[str, int] | None = None, **kw: Any) -> EmbeddedBroker:
    b = EmbeddedBroker(path, **kw)
    await b.start()
    for name, n in (topics or {}).items():
        await b.ensure_topic(name, n)
    return b


async def drain(consumer: EmbeddedConsumer, max_records: int = 1000) -> list[FetchedBatch]:
    out: list[FetchedBatch] = []
    while fetched := await consumer.fetch(max_records, 0):
        out.extend(fetched)
    return out


def by_partition(batches: list[FetchedBatch]) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = {}
    for b in batches:
        out.setdefault(b.partition, []).extend(zip(b.offsets, b.values))
    return out


def python(code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw,
    )


# -- produce and fetch --------------------------------------------------------------


def test_round_trip_keys_timestamps_headers(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 2})
        headers = [{"trace": b"\x00\xff\x80 bin", "empty": b""}, {}]
        await b.produce([batch("t", 1, [b"v0", b"v1"], keys=[b"k", None], headers=headers)])
        c = await b.consumer("g", ["t"])
        [fb] = await c.fetch(10, 1)
        assert (fb.topic, fb.partition, fb.offsets) == ("t", 1, [0, 1])
        assert fb.keys == [b"k", None] and fb.values == [b"v0", b"v1"]
        assert fb.timestamps == [1_700_000_000_000, 1_700_000_000_001]
        assert fb.headers == headers
        assert await c.position(TopicPartition("t", 1)) == 2
        await b.produce([batch("t", 0, [b"x"])])
        [fb] = await c.fetch(10, 1)
        assert fb.headers is None and fb.next_offset == 1
        assert await b.end_offsets("t") == [1, 2]
        infos = await b.topics()
        assert [(i.name, i.partitions, i.end_offsets) for i in infos] == [("t", 2, [1, 2])]
        await b.close()

    run(main)


def test_order_kept_per_partition_across_many_produces(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 3})
        expected: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
        for i in range(60):
            batches = []
            for p in range(3):
                values = [f"{p}-{i}-{j}".encode() for j in range((i * 7 + p) % 13)]
                expected[p].extend(values)
                batches.append(batch("t", p, values))
            await b.produce(batches)
        # Two batches for one partition in one call stay in call order.
        await b.produce([batch("t", 0, [b"a"]), batch("t", 0, [b"b"])])
        expected[0] += [b"a", b"b"]
        await b.close()

        b = await open_broker(tmp_path)  # from disk
        got = by_partition(await drain(await b.consumer("g", ["t"]), 17))
        for p in range(3):
            assert [o for o, _ in got[p]] == list(range(len(expected[p])))
            assert [v for _, v in got[p]] == expected[p]
        assert await b.end_offsets("t") == [len(expected[p]) for p in range(3)]
        await b.close()

    run(main)


def test_fetch_spreads_max_records_fairly_over_partitions(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 3})
        await b.produce([batch("t", 0, [b"x"] * 1000), batch("t", 2, [b"y"] * 10)])
        c = await b.consumer("g", ["t"])
        fetched = await c.fetch(100, 1)
        counts = {fb.partition: len(fb.values) for fb in fetched}
        assert counts == {0: 90, 2: 10}  # the busy partition does not starve the other
        # One busy partition alone gets the whole budget.
        counts = {fb.partition: len(fb.values) for fb in await c.fetch(100, 1)}
        assert counts == {0: 100}
        await b.close()

    run(main)


def test_produce_errors_store_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 2})
        offsets = SourceOffsetCommit("src", {"file-a": {"line": 10}})
        with pytest.raises(FatalError, match="topic 'nope' does not exist"):
            await b.produce([batch("t", 0, [b"v"]), batch("nope", 0, [b"w"])], offsets)
        with pytest.raises(FatalError, match="partition 2 out of range"):
            await b.produce([batch("t", 0, [b"v"]), batch("t", 2, [b"w"])], offsets)
        with pytest.raises(ValueError):
            await b.produce([ProduceBatch("t", 0, [None], [b"v", b"w"], [1, 2])], offsets)
        await b.close()

        b = await open_broker(tmp_path)
        assert await b.end_offsets("t") == [0, 0]
        assert await b.source_offsets("src") == {}
        await b.produce([batch("t", 0, [b"first"])])  # offsets still start at 0
        assert by_partition(await drain(await b.consumer("g", ["t"]))) == {0: [(0, b"first")]}
        await b.close()

    run(main)


def test_failing_transaction_rolls_back_records_and_offsets(tmp_path: Path) -> None:
    """A failure inside the transaction (here: the source offset upsert) rolls back the
    records already inserted, and the in-memory next offsets stay put."""

    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 1})
        assert b._writer is not None
        b._writer.conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON source_offsets BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        with pytest.raises(FatalError, match="boom"):
            await b.produce([batch("t", 0, [b"a", b"b"])], SourceOffsetCommit("src", {"p": 1}))
        b._writer.conn.execute("DROP TRIGGER boom")
        assert await b.end_offsets("t") == [0]
        await b.produce([batch("t", 0, [b"c"])], SourceOffsetCommit("src", {"p": 2}))
        await b.close()

        b = await open_broker(tmp_path)
        assert by_partition(await drain(await b.consumer("g", ["t"]))) == {0: [(0, b"c")]}
        assert await b.source_offsets("src") == {"p": 2}
        await b.close()

    run(main)


def test_source_offsets_commit_with_records_and_survive_reopen(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 1})
        await b.produce([batch("t", 0, [b"a", b"b"])], SourceOffsetCommit("src", {"f": {"pos": 2}, "g": 5}))
        await b.produce([batch("t", 0, [b"c"])], SourceOffsetCommit("src", {"f": {"pos": 3}}))
        await b.produce([], SourceOffsetCommit("other", {"x": [1, "two"]}))  # offsets alone
        await b.close()

        b = await open_broker(tmp_path)
        assert await b.source_offsets("src") == {"f": {"pos": 3}, "g": 5}
        assert await b.source_offsets("other") == {"x": [1, "two"]}
        assert await b.source_offsets("unknown") == {}
        assert await b.end_offsets("t") == [3]
        await b.close()

    run(main)


# -- topics -------------------------------------------------------------------------


def test_ensure_topic_is_idempotent_and_refuses_another_partition_count(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 4})
        await b.ensure_topic("t", 4)
        with pytest.raises(FatalError, match="has 4 partitions.*but 6 were asked for"):
            await b.ensure_topic("t", 6)
        await b.close()
        b = await open_broker(tmp_path)
        with pytest.raises(FatalError, match="has 4 partitions.*but 2 were asked for"):
            await b.ensure_topic("t", 2)
        await b.ensure_topic("odd name \"with' quotes", 1)
        await b.produce([batch("odd name \"with' quotes", 0, [b"ok"])])
        assert [t.name for t in await b.topics()] == ["odd name \"with' quotes", "t"]
        with pytest.raises(FatalError, match="topic 'missing' does not exist"):
            await b.consumer("g", ["missing"])
        await b.close()

    run(main)


# -- consumer groups ------------------------------------------------------------------


def test_group_offsets_resume_after_reopen_and_groups_are_independent(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 2})
        await b.produce([batch("t", 0, [b"a0", b"a1", b"a2"]), batch("t", 1, [b"b0", b"b1"])])
        c1 = await b.consumer("g1", ["t"])
        fetched = await c1.fetch(100, 1)
        await c1.commit({TopicPartition("t", fb.partition): fb.next_offset for fb in fetched})
        c2 = await b.consumer("g2", ["t"])
        [fb] = [fb for fb in await c2.fetch(2, 1) if fb.partition == 0]
        await c2.commit({TopicPartition("t", 0): fb.next_offset})
        assert await b.groups("t") == ["g1", "g2"]
        assert await b.committed("g1", "t") == {0: 3, 1: 2}
        assert await b.committed("g2", "t") == {0: 1}
        await b.close()

        b = await open_broker(tmp_path)
        await b.produce([batch("t", 0, [b"a3"])])
        c1 = await b.consumer("g1", ["t"])
        assert await c1.position(TopicPartition("t", 0)) == 3
        assert by_partition(await drain(c1)) == {0: [(3, b"a3")]}
        c2 = await b.consumer("g2", ["t"])
        got = by_partition(await drain(c2))
        assert got[0] == [(1, b"a1"), (2, b"a2"), (3, b"a3")]
        assert got[1] == [(0, b"b0"), (1, b"b1")]
        assert await b.committed("g3", "t") == {}
        await b.close()

    run(main)


def test_seek_and_assignment(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"a": 2, "b": 1})
        await b.produce([batch("a", 1, [b"x", b"y", b"z"])])
        c = await b.consumer("g", ["b", "a"])
        assert await c.assignment() == [TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)]
        await c.seek(TopicPartition("a", 1), 2)
        [fb] = await c.fetch(10, 1)
        assert fb.offsets == [2] and fb.values == [b"z"]
        await c.seek(TopicPartition("a", 1), 0)
        assert (await c.fetch(10, 1))[0].offsets == [0, 1, 2]
        with pytest.raises(FatalError, match="not assigned"):
            await c.seek(TopicPartition("c", 0), 0)
        await c.close()
        await b.close()

    run(main)


def test_fetch_waits_for_timeout_then_returns_empty(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 1})
        c = await b.consumer("g", ["t"])
        start = time.monotonic()
        assert await c.fetch(10, 0.3) == []
        assert 0.25 < time.monotonic() - start < 2
        await b.close()

    run(main)


def test_fetch_wakes_as_soon_as_a_produce_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With polling effectively off, only the in-process wake-up can end the wait early.
    monkeypatch.setattr(embedded, "POLL_INTERVAL", 30.0)

    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 2, "other": 1})
        c = await b.consumer("g", ["t"])
        waiting = asyncio.create_task(c.fetch(100, 20))
        await asyncio.sleep(0.2)
        await b.produce([batch("other", 0, [b"not mine"])])  # another topic: keeps waiting
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await b.produce([batch("t", 1, [b"hello"])])
        produced = time.monotonic()
        fetched = await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - produced < 1.0
        assert [(fb.partition, fb.values) for fb in fetched] == [(1, [b"hello"])]
        await b.close()

    run(main)


# -- the state-directory lock -----------------------------------------------------------


def test_second_writer_is_refused_naming_the_pid(tmp_path: Path) -> None:
    async def main() -> None:
        b = await open_broker(tmp_path, {"t": 1})
        with pytest.raises(FatalError, match=rf"in use by another `pipeline run` \(pid {os.getpid()}\)"):
            await EmbeddedBroker(tmp_path).start()
        # From another process too, while this one keeps running.
        child = python(
            """
            import asyncio, sys, pathlib
            from runner.broker.embedded import EmbeddedBroker
            from runner.errors import FatalError
            try:
                asyncio.run(EmbeddedBroker(pathlib.Path(sys.argv[1])).start())
                print("started")
            except FatalError as e:
                print(e, "|", e.hint)
            """,
            str(tmp_path),
        )
        out, err = await asyncio.to_thread(child.communicate, timeout=30)
        assert f"is in use by another `pipeline run` (pid {os.getpid()})" in out, (out, err)
        await b.close()
        # Released on close: the next run may start.
        b = await open_broker(tmp_path)
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())
        await b.close()

    run(main)


# -- read-only brokers ------------------------------------------------------------------


def test_read_only_broker_refuses_writes_and_missing_state(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(FatalError, match="has no topics yet"):
            await EmbeddedBroker(tmp_path / "nothing", read_only=True).start()
        assert not (tmp_path / "nothing").exists()

        w = await open_broker(tmp_path, {"t": 1})
        await w.produce([batch("t", 0, [b"a"])])
        r = await open_broker(tmp_path, read_only=True)  # no lock taken: the writer holds it
        await r.ensure_topic("t", 1)  # already there: fine
        with pytest.raises(FatalError, match="read-only"):
            await r.ensure_topic("new", 1)
        with pytest.raises(FatalError, match="read-only"):
            await r.produce([batch("t", 0, [b"b"])])
        c = await r.consumer("g", ["t"])
        assert by_partition(await drain(c)) == {0: [(0, b"a")]}
        with pytest.raises(FatalError, match="read-only"):
            await c.commit({TopicPartition("t", 0): 1})
        # Topics created and records written by the writer after the reader opened.
        await w.ensure_topic("later", 2)
        await w.produce([batch("later", 1, [b"x", b"y"])])
        assert await r.end_offsets("later") == [0, 2]
        assert {t.name: t.end_offsets for t in await r.topics()} == {"later": [0, 2], "t": [1]}
        await r.close()
        await w.close()

    run(main)


READER = """
import asyncio, sys, pathlib
from runner.broker.embedded import EmbeddedBroker
from runner.broker.base import TopicPartition
from runner.errors import FatalError

async def main():
    b = EmbeddedBroker(pathlib.Path(sys.argv[1]), read_only=True)
    await b.start()
    c = await b.consumer("reader", ["t"])
    print("ready", flush=True)
    got = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(got) < 200 and loop.time() < deadline:
        for fb in await c.fetch(1000, 0.5):
            got.extend(fb.values)
    try:
        await c.commit({TopicPartition("t", 0): 1})
        print("commit allowed")
    except FatalError:
        print("commit refused")
    print(len(got), got == [b"v%d" % i for i in range(200)], flush=True)
    await b.close()

asyncio.run(main())
"""


def test_read_only_broker_in_another_process_reads_while_writer_runs(tmp_path: Path) -> None:
    async def main() -> None:
        w = await open_broker(tmp_path, {"t": 1})
        await w.produce([batch("t", 0, [b"v%d" % i for i in range(100)])])
        child = python(READER, str(tmp_path))
        assert child.stdout is not None
        ready = await asyncio.to_thread(child.stdout.readline)
        assert ready.strip() == "ready", child.stderr.read() if child.stderr else ""
        # Written after the reader started: it sees them by polling the database.
        for i in range(100, 200, 25):
            await w.produce([batch("t", 0, [b"v%d" % j for j in range(i, i + 25)])])
            await asyncio.sleep(0.05)
        out, err = await asyncio.to_thread(child.communicate, timeout=30)
        assert child.returncode == 0, err
        assert out.split("\n")[:2] == ["commit refused", "200 True"], (out, err)
        assert await w.groups("t") == []
        await w.close()

    run(main)


# -- crash safety -------------------------------------------------------------------------

PRODUCER = """
import asyncio, sys, pathlib
from runner.broker.embedded import EmbeddedBroker
from runner.broker.base import ProduceBatch, SourceOffsetCommit

N = 500  # records per partition per produce

async def main():
    b = EmbeddedBroker(pathlib.Path(sys.argv[1]))
    await b.start()
    await b.ensure_topic("t", 2)
    # Resume after the last committed iteration, as a source resumes from its offsets.
    it = (await b.source_offsets("src")).get("iteration", -1) + 1
    while True:
        batches = [
            ProduceBatch("t", p, [None] * N, [b"p%d-%d" % (p, it * N + i) for i in range(N)], [it] * N)
            for p in (0, 1)
        ]
        await b.produce(batches, SourceOffsetCommit("src", {"iteration": it}))
        print(it, (it + 1) * N - 1, flush=True)  # acknowledged: last offset in each partition
        it += 1

asyncio.run(main())
"""


def test_kill_9_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """Kill the producer at a few random moments (mid-transaction, mid-fsync, between
    produces), restarting it each time; every acknowledged record must be there, once."""
    n = 500
    rng = random.Random()
    acked: list[int] = []
    for _ in range(3):
        child = python(PRODUCER, str(tmp_path))
        assert child.stdout is not None
        deadline = time.monotonic() + 20
        for _ in range(5):
            line = child.stdout.readline()
            if not line or time.monotonic() > deadline:
                break
            acked.append(int(line.split()[1]))
        time.sleep(rng.uniform(0, 0.03))
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=10)
        acked += [int(line.split()[1]) for line in rest.splitlines()]
        assert child.returncode == -signal.SIGKILL, err
    assert len(acked) >= 15
    assert acked == sorted(acked)

    async def main() -> None:
        b = await open_broker(tmp_path)  # a dead process's lock is gone with it
        ends = await b.end_offsets("t")
        assert min(ends) >= acked[-1] + 1
        assert ends[0] == ends[1] and ends[0] % n == 0  # whole transactions only
        # Records and source offsets committed together: the stored offset names exactly
        # the last transaction whose records are present.
        assert await b.source_offsets("src") == {"iteration": ends[0] // n - 1}
        got = by_partition(await drain(await b.consumer("check", ["t"]), 5000))
        for p in (0, 1):
            assert [o for o, _ in got[p]] == list(range(ends[p]))  # contiguous, no duplicates
            assert [v for _, v in got[p]] == [b"p%d-%d" % (p, i) for i in range(ends[p])]
        await b.close()

    run(main)


def test_a_fetch_cancelled_as_a_produce_wakes_it_is_cancelled(tmp_path: Path) -> None:
    """The cancellation must not be lost when it comes together with the wake-up: a task
    group cancelling a waiting fetch (another task failed) would otherwise see the fetching
    task run on, and the run never end (seen with a sink that hit a full disk)."""

    async def main() -> None:
        broker = await open_broker(tmp_path, {"t": 1})
        consumer = await broker.consumer("g", ["t"])
        try:
            for _ in range(20):
                fetch = asyncio.create_task(consumer.fetch(10, 5.0))
                while not consumer._wakeup._waiters:  # the fetch waits for a produce
                    await asyncio.sleep(0)
                consumer._wakeup.set()  # what a produce does ...
                fetch.cancel()  # ... in the same turn of the loop as the cancellation
                with pytest.raises(asyncio.CancelledError):
                    await fetch
        finally:
            await consumer.close()
            await broker.close()

    run(main)
