"""The activity-tracking job on a real Kafka-protocol broker, read back by Confluent's own
client: the topic holds Confluent-framed Avro whose schema ids resolve through
`pipeline registry serve`, and it decodes to the same records as the Parquet output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import duckdb
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import CONSUMER, Tansu, free_port

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "pipelines" / "activity-tracking.yaml"


def test_confluent_clients_read_the_kafka_topic_as_the_parquet_output(tmp_path: Path, kafka: Tansu) -> None:
    env = {
        **os.environ,
        "PIPELINE_STATE": str(tmp_path / "state"),
        "OUT_DIR": str(tmp_path / "out"),
        "PIPELINE_BROKER": json.dumps({"kafka": {"bootstrap_servers": kafka.bootstrap, "consumer": CONSUMER}}),
    }
    ran = run_cli("run", SPEC, "--once", env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr

    port = free_port()
    registry = subprocess.Popen(
        [pipeline_exe(), "registry", "serve", "--spec", str(SPEC), "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "confluent-check",
                         "enable.auto.commit": False})
    try:
        assert "on http://127.0.0.1:" in registry.stderr.readline()
        deserialize = AvroDeserializer(SchemaRegistryClient({"url": f"http://127.0.0.1:{port}"}))
        context = SerializationContext("activity", MessageField.VALUE)
        consumer.assign([TopicPartition("activity", p, 0) for p in range(4)])
        records, deadline = [], time.monotonic() + 30
        while len(records) < 5994 and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                assert message.error() is None, message.error()
                value = message.value()
                assert value[0] == 0  # Confluent framing: magic byte, then the schema id
                record = deserialize(value, context)
                assert message.key() == record["remote_host"].encode()  # keyed by visitor
                records.append(record)
    finally:
        consumer.close()
        registry.send_signal(signal.SIGTERM)
        registry.wait(timeout=10)

    parquet = duckdb.connect().execute(f"select * from read_parquet('{tmp_path}/out/activity/**/*.parquet', hive_partitioning=false)")
    columns = [d[0] for d in parquet.description]
    rows = [dict(zip(columns, row)) for row in parquet.fetchall()]
    assert len(records) == len(rows) == 5994
    assert sorted(map(repr, map(sorted_items, records))) == sorted(map(repr, map(sorted_items, rows)))
    assert re.match(r"^[0-9a-f:.]+$", records[0]["remote_host"])


def sorted_items(record: dict) -> list[tuple]:
    """The record's fields in name order, its timestamp as epoch ms (readers differ only in
    which UTC tzinfo object they attach)."""
    return sorted({**record, "timestamp": round(record["timestamp"].timestamp() * 1000)}.items())
