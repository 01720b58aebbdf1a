"""The `kafka` source and sink against a real Kafka-protocol broker (Tansu) as the
*external* cluster, with the pipeline itself on the embedded broker: the source reads JSON
values into a schema-checked topic (bad values to the dead-letter topic with their
position, a restart reads only what is new); the sink copies an Avro topic out, resumes
from what the target holds, and reports a wrong target in one line."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as TP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from connectors.kafka import KafkaSink
from connectors.kafka.tasks import _owner
from runner.batch import Batch
from runner.connector import ConnectorContext, FatalError, TopicPartition
from tests.conftest import run_cli
from tests.kafka_broker import Tansu, free_port

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}
MARK = "pipeline.source.offset"


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def send(bootstrap: str, topic: str, values: list[tuple[int, bytes]]) -> None:
    """(partition, value) pairs, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, partition=p) for p, v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, partitions: int) -> dict[int, list]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TP(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        out: dict[int, list] = {p: [] for p in range(partitions)}
        done: set[TP] = set()
        deadline = time.monotonic() + 20
        while len(done) < len(tps):
            assert time.monotonic() < deadline, f"reading {topic} did not reach its end"
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                out[tp.partition] += records
            for tp in tps:
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    done.add(tp)
        return out
    finally:
        await consumer.stop()


def consume(spec: Path, topic: str) -> list[dict]:
    result = run_cli("consume", topic, "--from-beginning", "--spec", spec)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def source_spec(tmp: Path, bootstrap: str, tasks: int = 1) -> Path:
    """A spec whose source `external` reads the cluster's topic `ext` to its end into `events`."""
    (tmp / "event.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp / "in.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: kafka-in
        topics:
          events: {{partitions: 3, schema: event.avsc, key: name}}
        sources:
          - name: external
            connector: kafka
            topic: events
            tasks: {tasks}
            config:
              cluster: {{bootstrap_servers: "{bootstrap}"}}
              topics: [ext]
              batch_size: 64
              stop_at_end: true
        errors: {{tolerance: all, dead_letter_topic: events-dlq}}
        """))
    return spec


def test_source_reads_json_values_dead_letters_bad_ones_and_resumes(tmp_path: Path, kafka: Tansu) -> None:
    asyncio.run(create_topic(kafka.bootstrap, "ext", 2))
    good = [(i % 2, json.dumps({"id": i, "name": f"n{i}"}).encode()) for i in range(300)]
    bad = [(1, b"[1, 2, 3]"), (0, b"{not json")]
    asyncio.run(send(kafka.bootstrap, "ext", good[:100] + bad + good[100:]))
    spec = source_spec(tmp_path, kafka.bootstrap)
    first = run_cli("run", spec, "--once", timeout=60)
    assert first.returncode == 0, first.stderr
    assert sorted(r["id"] for r in consume(spec, "events")) == list(range(300))
    letters = consume(spec, "events-dlq")
    assert len(letters) == 2
    by_position = {d["position"]: d for d in letters}
    # partition 1 got 50 good values before [1, 2, 3]; partition 0 got 50 before the broken one
    assert set(by_position) == {"ext[1]@50", "ext[0]@50"}
    assert "expected a JSON object, got list" in by_position["ext[1]@50"]["error"]
    assert "invalid JSON" in by_position["ext[0]@50"]["error"]
    assert by_position["ext[0]@50"]["connector"] == "external"

    # New records only, after a restart: what the first run read is not read again.
    asyncio.run(send(kafka.bootstrap, "ext", [(i % 2, json.dumps({"id": i, "name": f"n{i}"}).encode()) for i in range(300, 350)]))
    second = run_cli("run", spec, "--once", timeout=60)
    assert second.returncode == 0, second.stderr
    assert sorted(r["id"] for r in consume(spec, "events")) == list(range(350))
    assert len(consume(spec, "events-dlq")) == 2
    summary = second.stderr[second.stderr.index("pipeline 'kafka-in' finished"):]
    assert summary.split("external")[1].split()[1] == "50"  # records in: only the new ones


def test_source_tasks_take_a_topics_partitions_in_turn() -> None:
    for topic in ("ext", "orders", "clicks"):
        owners = [_owner(TP(topic, p), 3) for p in range(7)]
        assert owners == [(owners[0] + p) % 3 for p in range(7)]
    assert {_owner(TP("ext", p), 1) for p in range(7)} == {0}


def test_source_split_into_tasks_reads_every_partition_once(tmp_path: Path, kafka: Tansu) -> None:
    asyncio.run(create_topic(kafka.bootstrap, "ext", 4))
    asyncio.run(send(kafka.bootstrap, "ext", [(i % 4, json.dumps({"id": i, "name": f"n{i}"}).encode())
                                             for i in range(200)]))
    spec = source_spec(tmp_path, kafka.bootstrap, tasks=3)
    first = run_cli("run", spec, "--once", timeout=60)
    assert first.returncode == 0, first.stderr
    assert Counter(r["id"] for r in consume(spec, "events")) == Counter(range(200))


def test_sink_copies_an_avro_topic_out_and_resumes_from_the_target(tmp_path: Path, kafka: Tansu) -> None:
    (tmp_path / "event.avsc").write_text(json.dumps(SCHEMA))
    lines = "".join(json.dumps({"id": i, "name": f"k{i % 9}"}) + "\n" for i in range(500))
    (tmp_path / "events.jsonl").write_text(lines)
    spec = tmp_path / "out.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: kafka-out
        topics:
          events: {{partitions: 2, schema: event.avsc, key: name}}
        sources:
          - {{name: lines, connector: jsonl, topic: events, config: {{paths: ["events*.jsonl"]}}}}
        sinks:
          - name: out
            connector: kafka
            topics: [events]
            config:
              topic_prefix: "m."
              cluster: {{bootstrap_servers: "{kafka.bootstrap}", producer: {{linger_ms: 2}}}}
        """))
    first = run_cli("run", spec, "--once", timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"m.events on {kafka.bootstrap}" in first.stderr  # the summary's `where`
    (tmp_path / "events2.jsonl").write_text("".join(json.dumps({"id": i, "name": f"k{i % 9}"}) + "\n" for i in range(500, 600)))
    # The second run resumes after what the target holds: only the new records go out.
    second = run_cli("run", spec, "--once", timeout=60)
    assert second.returncode == 0, second.stderr
    copy = asyncio.run(read_all(kafka.bootstrap, "m.events", 2))
    assert sum(map(len, copy.values())) == 600
    for p, records in copy.items():
        assert [dict(r.headers)[MARK] for r in records] == [str(i).encode() for i in range(len(records))]
        for r in records:
            assert r.value[0] == 0  # Confluent-framed Avro, copied as it is in the topic
            assert r.key.decode() in {f"k{k}" for k in range(9)}
    keys = {p: {r.key for r in rs} for p, rs in copy.items()}
    assert not keys[0] & keys[1]  # each key in one partition, as in the pipeline's topic


def test_sink_refuses_a_target_topic_with_fewer_partitions(tmp_path: Path, kafka: Tansu) -> None:
    asyncio.run(create_topic(kafka.bootstrap, "n.raw", 1))
    spec = tmp_path / "few.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: few
        topics:
          raw: {{partitions: 4}}
        sinks:
          - {{name: out, connector: kafka, topics: [raw], config: {{topic_prefix: n., cluster: {{bootstrap_servers: "{kafka.bootstrap}"}}}}}}
        """))
    result = run_cli("run", spec, "--once", timeout=60)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: out: target topic 'n.raw' on {kafka.bootstrap} has 1 partition(s), fewer than the 4 of source topic 'raw'"]
    assert "Traceback" not in result.stderr


def test_unreachable_target_is_one_line_naming_the_cluster_never_the_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    spec = tmp_path / "away.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: away
        topics:
          raw: {{partitions: 2}}
        sinks:
          - name: to-backup
            connector: kafka
            topics: [raw]
            config:
              cluster:
                bootstrap_servers: "127.0.0.1:{port}"
                security: {{protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN, username: u, password: "${{KAFKA_PASSWORD}}"}}
        """))
    started = time.monotonic()
    result = run_cli("run", spec, "--once", env={"KAFKA_PASSWORD": "s3cret-pw"}, timeout=60)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: to-backup: cannot reach the target Kafka cluster at 127.0.0.1:{port}: no broker answered"]
    assert "hint: check config.cluster.bootstrap_servers" in result.stderr
    assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr + result.stdout
    assert time.monotonic() - started < 30


def test_validate_names_file_and_line_of_cluster_mistakes(tmp_path: Path) -> None:
    (tmp_path / "event.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp_path / "bad.yaml"
    spec.write_text(textwrap.dedent("""\
        name: bad
        topics:
          events: {partitions: 1, schema: event.avsc}
          raw: {partitions: 1}
        sources:
          - name: external
            connector: kafka
            topic: events
            config:
              cluster: {client_id: x}
              topics: []
              start: oldest
        sinks:
          - name: mirror
            connector: kafka
            topics: [raw]
            config:
              topic_prefix: "a/b"
              cluster:
                bootstrap_servers: "h:9092"
                producer: {acks: 1}
        """))
    result = run_cli("validate", spec)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith(str(spec))]
    assert f"{spec}:10: sources[0].config.cluster.bootstrap_servers: required setting missing" in result.stderr
    assert any(line.startswith(f"{spec}:11: sources[0].config.topics") for line in lines)
    assert any(line.startswith(f"{spec}:12: sources[0].config.start") and "'earliest'" in line for line in lines)
    assert any(line.startswith(f"{spec}:18: sinks[0].config.topic_prefix") for line in lines)
    assert any(line.startswith(f"{spec}:21: sinks[0].config.cluster.producer.acks") and "acks=all" in line for line in lines)
    assert len(lines) == 5, result.stderr


def test_sink_task_retries_add_no_duplicates_and_a_gap_stops_it(tmp_path: Path, kafka: Tansu) -> None:
    """The sink's task driven through the contract, on a real target: a put the engine
    retries, and a send whose outcome is unknown (read back before sending again), write
    each record once; a record missing before later ones stops the task, naming it."""
    context = ConnectorContext(
        name="out", pipeline="p", spec_dir=tmp_path, state_dir=tmp_path / "state",
        topics=("t",), schemas={}, partitions={"t": 1},
    )
    sink = KafkaSink(KafkaSink.Config.parse({"cluster": {"bootstrap_servers": kafka.bootstrap}, "topic_prefix": "c."}), context)
    tp = TopicPartition("t", 0)

    def batch(first: int, count: int) -> Batch:
        offsets = list(range(first, first + count))
        return Batch(
            topic="t", partition=0, record_offsets=offsets, keys=[b"k"] * count,
            values=[str(o).encode() for o in offsets], timestamps=[1000 + o for o in offsets],
            headers=[{"h": b"x"}] * count,
        )

    async def main() -> None:
        task = sink.task()
        try:
            assert await task.open([tp]) == {}  # empty target: the group's offsets decide
            part = task.parts[tp]
            await task.put(batch(0, 100))
            await task.put(batch(0, 100))  # retried by the engine: nothing sent twice
            await task.put(batch(50, 80))  # overlapping: only 100..129 are new
            await task.flush()
            # Sent, but the outcome unknown (as after a failed acknowledgement): read back.
            await task.put(batch(130, 70))
            part.state = "unsure"
            await task.flush()
            # Held, not sent (a send failed before it): read back, then sent.
            part.state = "unsure"
            await task.put(batch(200, 50))
            await task.flush()
        finally:
            await task.close()
        copy = (await read_all(kafka.bootstrap, "c.t", 1))[0]
        assert [r.value for r in copy] == [str(o).encode() for o in range(250)]
        assert all(r.headers == (("h", b"x"), (MARK, str(r.offset).encode())) for r in copy)

        # A later record landed while 250.. did not: the task refuses to leave a gap.
        await send_with_headers(kafka.bootstrap, "c.t", [(MARK, b"260")])
        task = sink.task()
        try:
            assert await task.open([tp]) == {tp: 261}  # resumes after the target's last record
            task.parts[tp].next_offset = None
            task.parts[tp].end = 250
            task.parts[tp].state = "unsure"
            await task.put(batch(250, 20))
            with pytest.raises(FatalError, match=r"c\.t\[0\] on .* lacks the record of source offset 250"):
                await task.flush()
        finally:
            await task.close()

    asyncio.run(main())


async def send_with_headers(bootstrap: str, topic: str, headers: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await (await producer.send(topic, value=b"foreign", partition=0, headers=headers))
    finally:
        await producer.stop()
