"""The mirror pipeline (pipelines/mirror.yaml) between two real Kafka-protocol brokers
(Tansu): a keyed 3-partition topic is copied from A to B while records keep arriving, the
mirror is killed with kill -9 in the middle, then run again to the end. B must then hold
exactly A's records, partition by partition: same keys, values, timestamps and headers
(plus the one header the sink adds), in the same order, none skipped, none repeated."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as TP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import CONSUMER, Tansu

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "pipelines" / "mirror.yaml"
TOPIC, TARGET, PARTITIONS = "orders", "primary.orders", 3
GROUP = "pipeline-mirror-to-backup"
MARK = "pipeline.source.offset"
BASE_TS = 1_700_000_000_000


def record(i: int) -> dict:
    """Record i: keyed (40 keys over 3 partitions), a distinct timestamp, headers on most
    (several, one repeated in value), none on every 7th, a tombstone now and then."""
    headers = None if i % 7 == 0 else [("trace", f"t-{i}".encode()), ("origin", b"primary"), ("n", str(i % 5).encode())]
    return {
        "key": f"customer-{i % 40}".encode(),
        "value": None if i % 97 == 0 else json.dumps({"order": i, "amount": i * 3 % 1000}).encode(),
        "timestamp_ms": BASE_TS + i * 7,
        "headers": headers,
    }


async def produce(bootstrap: str, first: int, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(TOPIC, **record(i)) for i in range(first, first + count)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str) -> dict[int, list]:
    """Every record of `topic`, per partition, as an independent consumer sees it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TP(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        out: dict[int, list] = {p: [] for p in range(PARTITIONS)}
        done: set[TP] = set()
        deadline = time.monotonic() + 30
        while len(done) < len(tps):
            assert time.monotonic() < deadline, f"reading {topic} did not reach its end"
            got = await consumer.getmany(timeout_ms=200)
            for tp, records in got.items():
                out[tp.partition] += records
            for tp in tps:
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    done.add(tp)
        return out
    finally:
        await consumer.stop()


async def committed(bootstrap: str) -> dict[int, int]:
    """The mirror's consumer-group offsets on A (0 where nothing is committed)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False)
    await reader.start()
    try:
        return {p: (await reader.committed(TP(TOPIC, p))) or 0 for p in range(PARTITIONS)}
    finally:
        await reader.stop()


async def listed_ends(bootstrap: str, topic: str) -> dict[int, int]:
    """ListOffsets of `topic` (on Tansu a lower bound of the true end: the last batch's
    base offset + 1); zeros while the topic does not exist."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return {p: 0 for p in range(PARTITIONS)}
        ends = await consumer.end_offsets([TP(topic, p) for p in range(PARTITIONS)])
        return {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()


def ahead_of_commits(ends: dict[int, int], done: dict[int, int]) -> bool:
    """The mirror has committed some 1000 records, and B holds records beyond the commits
    (`ends` are lower bounds of B's ends, so B is truly ahead)."""
    return sum(done.values()) >= 1000 and any(ends[p] > done[p] for p in ends)


def freeze(pid: int) -> None:
    """SIGSTOP the process and wait until each of its threads is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10

    def stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        return all(state in "tT" for state in states)

    while not stopped():
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)


@pytest.mark.slow
def test_mirror_copies_a_keyed_topic_exactly_once_through_a_kill_9(tmp_path: Path, kafka: Tansu) -> None:
    target = Tansu(tmp_path / "tansu-b.log")
    try:
        target.wait_ready()
        asyncio.run(scenario(tmp_path, kafka, target))
    finally:
        target.stop()


async def scenario(tmp_path: Path, a: Tansu, b: Tansu) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=a.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()
    produced = 2000
    await produce(a.bootstrap, 0, produced)

    env = {
        **os.environ,
        "PIPELINE_BROKER": json.dumps({"kafka": {"bootstrap_servers": a.bootstrap, "consumer": CONSUMER}}),
        "MIRROR_TARGET": b.bootstrap,
        "PIPELINE_STATE": str(tmp_path / "state"),
    }
    assert run_cli("validate", SPEC, env=env).returncode == 0

    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen([pipeline_exe(), "run", str(SPEC)], stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        # Records keep arriving while the mirror copies them. Once it has committed some,
        # kill it at a moment when B holds records the consumer group has not committed
        # yet: the restart must not copy those again (it resumes from B, not from the
        # group's offsets). The mirror copies faster than records arrive, so "now" is
        # decided on a frozen process: stopped (SIGSTOP), its state is the state at the
        # kill; if B is ahead of the commits, records arrive that it has not read, and it
        # is killed where it stands; if not, it goes on.
        deadline = time.monotonic() + 40
        while True:
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the mirror never got ahead of its commits:\n" + log_path.read_text()[-3000:]
            await produce(a.bootstrap, produced, 20)
            produced += 20
            if ahead_of_commits(await listed_ends(b.bootstrap, TARGET), await committed(a.bootstrap)):
                freeze(first.pid)
                if ahead_of_commits(await listed_ends(b.bootstrap, TARGET), await committed(a.bootstrap)):
                    await produce(a.bootstrap, produced, 20)  # left to copy: the kill lands mid-copy
                    produced += 20
                    os.kill(first.pid, signal.SIGKILL)
                    break
                os.kill(first.pid, signal.SIGCONT)
            await asyncio.sleep(0.05)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    at_kill_b = {p: len(rs) for p, rs in (await read_all(b.bootstrap, TARGET)).items()}
    at_kill_committed = await committed(a.bootstrap)
    assert 0 < sum(at_kill_b.values()) < produced, f"the kill should land mid-copy: B held {at_kill_b} of {produced}, committed {at_kill_committed}"
    ahead = {p for p in at_kill_b if at_kill_b[p] > at_kill_committed[p]}
    assert ahead, f"B ({at_kill_b}) was not ahead of the group's commits ({at_kill_committed}) at the kill"

    await produce(a.bootstrap, produced, 1000)  # more arrive while the mirror is down
    produced += 1000
    started = time.monotonic()
    second = await asyncio.to_thread(run_cli, "--debug", "run", SPEC, "--once", env=env, timeout=90)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "to-backup: resuming from the target" in second.stderr
    summary = second.stderr[second.stderr.index("pipeline 'mirror' finished"):]
    copied = int(summary.split("to-backup")[1].split()[1].replace(",", ""))  # the "in" column
    assert copied == produced - sum(at_kill_b.values()), summary  # exactly what B lacked
    print(f"killed at {sum(at_kill_b.values())} of {produced - 1000} copied (committed: {sum(at_kill_committed.values())}); "
          f"the restart took {time.monotonic() - started:.1f}s and copied {copied}")

    source, copy = await read_all(a.bootstrap, TOPIC), await read_all(b.bootstrap, TARGET)
    assert sum(len(rs) for rs in source.values()) == produced
    for p in range(PARTITIONS):
        want = [(r.key, r.value, r.timestamp, tuple(r.headers)) for r in source[p]]
        got = [(r.key, r.value, r.timestamp, tuple(h for h in r.headers if h[0] != MARK)) for r in copy[p]]
        assert len(got) == len(want), f"partition {p}: {len(got)} records on B, {len(want)} on A"
        assert got == want, f"partition {p} differs"
        # The added header names each record's source offset; B's offsets are A's.
        assert [dict(r.headers)[MARK] for r in copy[p]] == [str(r.offset).encode() for r in source[p]]
        assert [r.offset for r in copy[p]] == [r.offset for r in source[p]]
    # Keys stayed in their partitions: no key appears in two partitions of B.
    owners = {r.key: p for p in range(PARTITIONS) for r in copy[p]}
    assert all(owners[r.key] == p for p in range(PARTITIONS) for r in copy[p])
