"""The Kafka broker (aiokafka) against a real Kafka-protocol broker (Tansu, the `kafka`
fixture): topics, batch produce and group fetch, end offsets, committed offsets and groups,
source offsets per pipeline and connector, reading outside a group, and start-up failures.

Every group join costs about 3 s on Tansu (see `tests.kafka_broker`), so each test joins
at most twice."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from runner.broker.base import FetchedBatch, ProduceBatch, SourceOffsetCommit, TopicPartition
from runner.broker.kafka import KafkaBroker, KafkaConsumer
from runner.errors import FatalError, RetryableError
from tests.kafka_broker import CONSUMER, Tansu, free_port

T = TypeVar("T")
TS = 1_700_000_000_000


def run(fn: Callable[[], Awaitable[T]], timeout: float = 45) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(bounded())


def batch(topic: str, partition: int, values: list[bytes], keys: list[bytes | None] | None = None,
          headers: list[dict[str, bytes]] | None = None, ts0: int = TS) -> ProduceBatch:
    return ProduceBatch(
        topic, partition, keys if keys is not None else [None] * len(values), values,
        [ts0 + i for i in range(len(values))], headers,
    )


async def open_broker(kafka: Tansu, topics: dict[str, int] | None = None, pipeline: str = "pipe",
                      **options: Any) -> KafkaBroker:
    b = KafkaBroker({"bootstrap_servers": kafka.bootstrap, "consumer": CONSUMER, **options}, pipeline)
    await b.start()
    for name, n in (topics or {}).items():
        await b.ensure_topic(name, n)
    return b


async def drain(consumer: KafkaConsumer, expected: int, max_records: int = 5000, within: float = 20) -> list[FetchedBatch]:
    """Fetch until `expected` records arrived (then one more short fetch to show there is
    nothing beyond), or fail after `within` seconds."""
    out: list[FetchedBatch] = []
    deadline = time.monotonic() + within
    while sum(len(fb.offsets) for fb in out) < expected:
        assert time.monotonic() < deadline, f"got {sum(len(fb.offsets) for fb in out)} of {expected} records"
        out.extend(await consumer.fetch(max_records, 0.5))
    out.extend(await consumer.fetch(max_records, 0.3))
    return out


def by_partition(batches: list[FetchedBatch]) -> dict[int, list[tuple[int, bytes | None, bytes, int, dict[str, bytes]]]]:
    """partition -> [(offset, key, value, timestamp, headers)], in fetch order."""
    out: dict[int, list[tuple[int, bytes | None, bytes, int, dict[str, bytes]]]] = {}
    for fb in batches:
        headers = fb.headers or [{} for _ in fb.offsets]
        out.setdefault(fb.partition, []).extend(zip(fb.offsets, fb.keys, fb.values, fb.timestamps, headers))
    return out


def closed_port() -> int:
    """A 127.0.0.1 port where nothing listens."""
    port = free_port()
    with socket.socket() as s:  # make sure: connecting must be refused
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


# -- topics ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ensure_topic_creates_is_idempotent_and_refuses_another_count(kafka: Tansu) -> None:
    async def main() -> None:
        b = await open_broker(kafka)
        try:
            await b.ensure_topic("t", 3)
            await b.ensure_topic("t", 3)  # again: fine
            assert [(i.name, i.partitions, i.end_offsets) for i in await b.topics()] == [("t", 3, [0, 0, 0])]
            with pytest.raises(FatalError, match=r"'t' exists .* with 3 partition\(s\), the spec says 5") as err:
                await b.ensure_topic("t", 5)
            assert err.value.hint
        finally:
            await b.close()
        # Another broker (nothing cached) sees the topic as created.
        b = await open_broker(kafka)
        try:
            with pytest.raises(FatalError, match=r"with 3 partition\(s\), the spec says 1"):
                await b.ensure_topic("t", 1)
            await b.ensure_topic("t", 3)
            await b.ensure_topic("u", 1)
            assert [(i.name, i.partitions) for i in await b.topics()] == [("t", 3), ("u", 1)]
        finally:
            await b.close()

    run(main)


# -- produce, fetch, end offsets --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_produce_batches_then_group_fetches_all_with_keys_headers_timestamps(kafka: Tansu) -> None:
    n_big = 20_000

    async def main() -> None:
        b = await open_broker(kafka, {"t": 3})
        try:
            headers0 = [{"trace": b"\x00\xff\x80 bin", "empty": b""}, {}, {"h": b"v"}]
            p0 = batch("t", 0, [b"v0", b"v1", b""], keys=[b"k", None, b"k2"], headers=headers0)
            big = batch("t", 1, [b"r%d" % i for i in range(n_big)],
                        keys=[None if i % 3 == 0 else b"key%d" % i for i in range(n_big)], ts0=TS + 10_000)
            # Two batches for one partition in one call keep call order; a 2nd call appends.
            p2a = batch("t", 2, [b"a0", b"a1"], keys=[None, b"x"], ts0=1_600_000_000_000)
            p2b = batch("t", 2, [b"b0"], headers=[{"only": b"one"}], ts0=1_650_000_000_000)
            await b.produce([p0, big, p2a, p2b])
            p2c = batch("t", 2, [b"c0", b"c1", b"c2"], ts0=TS + 5)
            await b.produce([p2c])

            c = await b.consumer("g", ["t"])
            try:
                assert await c.assignment() == [TopicPartition("t", p) for p in range(3)]
                got = by_partition(await drain(c, 3 + n_big + 6))
                assert await c.position(TopicPartition("t", 1)) == n_big
            finally:
                await c.close()

            def expected(*batches: ProduceBatch) -> list[tuple[int, bytes | None, bytes, int, dict[str, bytes]]]:
                rows = []
                for pb in batches:
                    hs = pb.headers or [{} for _ in pb.values]
                    rows += list(zip(pb.keys, pb.values, pb.timestamps, hs))
                return [(i, *row) for i, row in enumerate(rows)]

            assert sorted(got) == [0, 1, 2]
            assert got[0] == expected(p0)
            assert [o for o, *_ in got[1]] == list(range(n_big))
            assert got[1] == expected(big)
            assert got[2] == expected(p2a, p2b, p2c)
            assert await b.end_offsets("t") == [3, n_big, 6]
        finally:
            await b.close()

    run(main)


@pytest.mark.timeout(60)
def test_end_offsets_count_records_of_multi_record_batches(kafka: Tansu) -> None:
    """Tansu's ListOffsets reports the last batch's base offset + 1; end_offsets must give
    the true next offset (the record count here), and 0 for an empty partition."""

    async def main() -> None:
        b = await open_broker(kafka, {"t": 4})
        try:
            assert await b.end_offsets("t") == [0, 0, 0, 0]
            await b.produce([batch("t", 0, [b"x"] * 5), batch("t", 2, [b"y"])])
            assert await b.end_offsets("t") == [5, 0, 1, 0]
            await b.produce([batch("t", 0, [b"x"] * 3), batch("t", 2, [b"z"] * 4),
                             batch("t", 3, [b"w%d" % i for i in range(20_000)])])
            assert await b.end_offsets("t") == [8, 0, 5, 20_000]
            [info] = await b.topics()
            assert (info.name, info.partitions, info.end_offsets) == ("t", 4, [8, 0, 5, 20_000])
        finally:
            await b.close()

    run(main)


# -- consumer groups ----------------------------------------------------------------------------


@pytest.mark.slow  # waits out a consumer-group rebalance
@pytest.mark.timeout(60)
def test_commit_shows_in_committed_and_groups_and_a_new_member_resumes_there(kafka: Tansu) -> None:
    async def main() -> None:
        b = await open_broker(kafka, {"t": 2, "other": 1})
        try:
            await b.produce([batch("t", 0, [b"a%d" % i for i in range(5)]), batch("t", 1, [b"b0", b"b1", b"b2"])])
            assert await b.groups("t") == []
            assert await b.committed("g", "t") == {}

            c = await b.consumer("g", ["t"])
            try:
                got = by_partition(await drain(c, 8))
                assert [v for _, _, v, *_ in got[0]] == [b"a%d" % i for i in range(5)]
                await c.commit({TopicPartition("t", 0): 3, TopicPartition("t", 1): 1})
            finally:
                await c.close()

            assert await b.committed("g", "t") == {0: 3, 1: 1}
            assert await b.committed("nobody", "t") == {}
            assert await b.groups("t") == ["g"]
            assert await b.groups("other") == []

            await b.produce([batch("t", 0, [b"a5"])])
            # This join takes ~11 s on Tansu: its first generation is 0, for which aiokafka
            # sends no LeaveGroup on close, so the group waits for the old member's session.
            c = await b.consumer("g", ["t"])
            try:
                assert await c.position(TopicPartition("t", 0)) == 3
                assert await c.position(TopicPartition("t", 1)) == 1
                got = by_partition(await drain(c, 3 + 2))
                assert [(o, v) for o, _, v, *_ in got[0]] == [(3, b"a3"), (4, b"a4"), (5, b"a5")]
                assert [(o, v) for o, _, v, *_ in got[1]] == [(1, b"b1"), (2, b"b2")]
                await c.commit({TopicPartition("t", 0): 6})
            finally:
                await c.close()
            assert await b.committed("g", "t") == {0: 6, 1: 1}
        finally:
            await b.close()

    run(main)


@pytest.mark.timeout(60)
def test_reader_outside_a_group_gets_every_partition_at_once_and_seeks(kafka: Tansu) -> None:
    async def main() -> None:
        b = await open_broker(kafka, {"a": 2, "b": 1})
        try:
            await b.produce([batch("a", 1, [b"x", b"y", b"z"]), batch("b", 0, [b"only"])])
            started = time.monotonic()
            c = await b.consumer(None, ["b", "a"])
            try:
                assert time.monotonic() - started < 2.5  # no group join (that takes ~3 s)
                assert await c.assignment() == [TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)]
                got = by_partition(await drain(c, 4))
                assert [(o, v) for o, _, v, *_ in got[1]] == [(0, b"x"), (1, b"y"), (2, b"z")]
                await c.seek(TopicPartition("a", 1), 2)
                assert await c.position(TopicPartition("a", 1)) == 2
                [fb] = await drain(c, 1)
                assert (fb.topic, fb.partition, fb.offsets, fb.values) == ("a", 1, [2], [b"z"])
                await c.seek(TopicPartition("a", 1), 0)
                [fb] = await drain(c, 3)
                assert (fb.partition, fb.offsets) == (1, [0, 1, 2])
                with pytest.raises(FatalError, match="commit"):  # not in a group: nothing to commit to
                    await c.commit({TopicPartition("a", 1): 3})
            finally:
                await c.close()
            assert time.monotonic() - started < 10
            assert await b.groups("a") == []
        finally:
            await b.close()

    run(main)


# -- source offsets ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_source_offsets_latest_per_partition_per_pipeline_and_connector(kafka: Tansu) -> None:
    async def main() -> None:
        b = await open_broker(kafka, {"t": 1})
        other = await open_broker(kafka, pipeline="other-pipe")
        try:
            assert await b.source_offsets("src") == {}  # no offsets topic yet
            await b.produce([batch("t", 0, [b"r0", b"r1"])], SourceOffsetCommit("src", {"a": 1, "b": {"pos": 5}}))
            await b.produce([batch("t", 0, [b"r2"])], SourceOffsetCommit("src", {"a": 2}))
            await b.produce([], SourceOffsetCommit("src2", {"a": [1, "two"]}))  # offsets alone
            await other.produce([], SourceOffsetCommit("src", {"a": 99, "c": 7}))

            assert await b.source_offsets("src") == {"a": 2, "b": {"pos": 5}}
            assert await b.source_offsets("src2") == {"a": [1, "two"]}
            assert await b.source_offsets("unknown") == {}
            assert await other.source_offsets("src") == {"a": 99, "c": 7}
            assert await other.source_offsets("src2") == {}
            assert await b.end_offsets("t") == [3]
            # The offsets topic is internal: not among the topics.
            assert [i.name for i in await b.topics()] == ["t"]
        finally:
            await other.close()
            await b.close()
        # A later run of the same pipeline reads them back.
        b = await open_broker(kafka)
        try:
            assert await b.source_offsets("src") == {"a": 2, "b": {"pos": 5}}
        finally:
            await b.close()

    run(main)


# -- start-up failures ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_start_without_a_cluster_is_a_short_fatal_error_naming_the_servers() -> None:
    bootstrap = f"127.0.0.1:{closed_port()}"

    async def main() -> None:
        b = KafkaBroker({"bootstrap_servers": bootstrap, "request_timeout_ms": 1000}, "pipe")
        started = time.monotonic()
        with pytest.raises(FatalError) as err:
            await b.start()
        assert time.monotonic() - started < 15
        message = str(err.value)
        assert bootstrap in message
        assert "\n" not in message and "Traceback" not in message, message
        assert err.value.hint and "bootstrap_servers" in err.value.hint
        await b.close()  # closing after a failed start is harmless

        # A server that accepts connections but never answers: bounded by request_timeout_ms.
        silent: list[asyncio.StreamWriter] = []

        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            silent.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        mute = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            b = KafkaBroker({"bootstrap_servers": mute, "request_timeout_ms": 1000}, "pipe")
            started = time.monotonic()
            with pytest.raises(FatalError, match=f"cannot reach Kafka at {mute}"):
                await b.start()
            assert time.monotonic() - started < 10
            await b.close()
        finally:
            for w in silent:
                w.close()
            server.close()
            await server.wait_closed()

    run(main, timeout=30)


@pytest.mark.timeout(60)
def test_failing_start_never_shows_the_password() -> None:
    password = "s3cr3t-Pa55w0rd-xyzzy"
    bootstrap = f"127.0.0.1:{closed_port()}"

    async def main() -> None:
        b = KafkaBroker({
            "bootstrap_servers": bootstrap,
            "request_timeout_ms": 1000,
            "security": {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                         "username": "alice", "password": password},
        }, "pipe")
        with pytest.raises(FatalError) as err:
            await b.start()
        chain: list[BaseException] = []
        exc: BaseException | None = err.value
        while exc is not None and exc not in chain:
            chain.append(exc)
            exc = exc.__cause__ or exc.__context__
        for e in chain:
            assert password not in str(e) and password not in repr(e), (type(e), str(e))
        assert password not in (err.value.hint or "")
        assert bootstrap in str(err.value)

    run(main, timeout=30)


# -- known bugs of runner/broker/kafka.py: these fail until it is fixed ----------------------------


@pytest.mark.timeout(60)
def test_start_failure_message_has_no_repr_noise() -> None:
    """A failed start says which servers did not answer, without aiokafka's repeated type
    name or Python reprs of the resolved addresses."""
    bootstrap = f"127.0.0.1:{closed_port()}"

    async def main() -> None:
        b = KafkaBroker({"bootstrap_servers": bootstrap, "request_timeout_ms": 1000}, "pipe")
        with pytest.raises(FatalError) as err:
            await b.start()
        message = str(err.value)
        assert "KafkaConnectionError: KafkaConnectionError" not in message, message
        assert "AddressFamily" not in message and "<" not in message, message

    run(main, timeout=30)


@pytest.mark.timeout(60)
def test_topics_lists_spec_valid_names_starting_with_underscore(kafka: Tansu) -> None:
    """Topic names may start with '_' (the embedded broker lists them too): topics() hides
    only Kafka's own `__...` topics and the offsets topic."""

    async def main() -> None:
        b = await open_broker(kafka, {"_t": 1, "t": 1})
        try:
            await b.produce([batch("_t", 0, [b"x"])], SourceOffsetCommit("src", {"a": 1}))
            assert [(i.name, i.end_offsets) for i in await b.topics()] == [("_t", [1]), ("t", [0])]
        finally:
            await b.close()

    run(main)


@pytest.mark.timeout(60)
def test_a_short_request_timeout_does_not_break_group_joins(kafka: Tansu) -> None:
    """A JoinGroup may take up to the session timeout to be answered (Tansu: half of it),
    so consumers get a request timeout above the session timeout whatever
    request_timeout_ms says, and the join completes within the consumer's deadline."""

    async def main() -> None:
        b = await open_broker(kafka, {"t": 1}, consumer={"session_timeout_ms": 2000, "heartbeat_interval_ms": 500},
                              request_timeout_ms=500)
        try:
            c = await asyncio.wait_for(b.consumer("g", ["t"]), 12)
            try:
                assert await c.assignment() == [TopicPartition("t", 0)]
            finally:
                await c.close()
        finally:
            await b.close()

    run(main)


@pytest.mark.timeout(60)
def test_consumer_when_the_cluster_is_gone_raises_our_error(kafka: Tansu) -> None:
    """With the cluster gone, broker.consumer() raises RetryableError (the worker retries
    it with backoff), not aiokafka's own exception."""

    async def main() -> None:
        b = await open_broker(kafka, {"t": 1})
        try:
            kafka.stop()
            for group in (None, "g"):
                with pytest.raises(RetryableError):
                    await asyncio.wait_for(b.consumer(group, ["t"]), 15)
        finally:
            await b.close()

    run(main)


@pytest.mark.timeout(60)
def test_closing_a_fresh_reader_outside_a_group_is_clean(kafka: Tansu) -> None:
    """consumer(None, ...) then close() at once: aiokafka's coordinator would raise
    CancelledError out of stop() (aio-libs/aiokafka#647); close() must not."""

    async def main() -> None:
        b = await open_broker(kafka, {"t": 1})
        try:
            c = await b.consumer(None, ["t"])
            try:
                await c.close()
            except asyncio.CancelledError:
                pytest.fail("KafkaConsumer.close() raised CancelledError")
        finally:
            await b.close()

    run(main)


@pytest.mark.timeout(60)
def test_seek_on_an_unassigned_partition_is_our_error(kafka: Tansu) -> None:
    """As with the embedded consumer, seek and position on a partition the consumer does
    not have raise FatalError('... not assigned')."""

    async def main() -> None:
        b = await open_broker(kafka, {"t": 1})
        try:
            c = await b.consumer(None, ["t"])
            try:
                with pytest.raises(FatalError, match="not assigned"):
                    await c.seek(TopicPartition("other", 0), 0)
                with pytest.raises(FatalError, match="not assigned"):
                    await c.position(TopicPartition("other", 0))
            finally:
                await c.close()
        finally:
            await b.close()

    run(main)
