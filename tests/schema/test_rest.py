"""`pipeline registry serve`: the embedded registry over Confluent's REST API, read by
confluent-kafka's own SchemaRegistryClient and AvroDeserializer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from runner.broker.embedded import EmbeddedBroker
from runner.schema.registry import SchemaRegistry
from runner.schema.serde import AvroDecoder
from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import free_port

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "pipelines" / "activity-tracking.yaml"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The bundled job run once, and its registry served on a free 127.0.0.1 port."""
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    assert run_cli("run", SPEC, "--once", env=env).returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [pipeline_exe(), "registry", "serve", "--spec", str(SPEC), "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )
    try:
        line = proc.stderr.readline()
        assert re.search(rf"on http://127\.0\.0\.1:{port}$", line.strip()), line
        yield f"http://127.0.0.1:{port}", tmp_path / "state"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def raw_values(state: Path, topic: str) -> list[bytes]:
    async def read() -> list[bytes]:
        broker = EmbeddedBroker(state, read_only=True)
        await broker.start()
        try:
            consumer = await broker.consumer(None, [topic])
            values: list[bytes] = []
            while batches := await consumer.fetch(10_000, 0.05):
                values += [v for b in batches for v in b.values]
            await consumer.close()
            return values
        finally:
            await broker.close()

    return asyncio.run(read())


def test_confluent_clients_read_our_topic_through_the_served_registry(served: tuple[str, Path]) -> None:
    url, state = served
    client = SchemaRegistryClient({"url": url})
    assert "activity-value" in client.get_subjects()
    latest = client.get_latest_version("activity-value")
    assert latest.version == 1 and latest.schema.schema_type == "AVRO"
    assert json.loads(client.get_schema(latest.schema_id).schema_str)["name"] == json.loads(latest.schema.schema_str)["name"]

    values = raw_values(state, "activity")
    assert len(values) == 5994
    deserialize = AvroDeserializer(client)
    context = SerializationContext("activity", MessageField.VALUE)
    theirs = [deserialize(v, context) for v in values]
    registry = SchemaRegistry(state / "schemas.db")
    try:
        ours, failures = AvroDecoder(registry.schema_by_id).decode(values)
    finally:
        registry.close()
    assert not failures and theirs == ours


def test_register_check_and_configure_through_the_rest_api(served: tuple[str, Path]) -> None:
    url, _ = served
    client = SchemaRegistryClient({"url": url})
    v1 = {"type": "record", "name": "Click", "fields": [{"name": "id", "type": "long"}]}
    v2 = {**v1, "fields": v1["fields"] + [{"name": "page", "type": ["null", "string"], "default": None}]}
    bad = {**v1, "fields": [{"name": "id", "type": "string"}]}
    first = client.register_schema("clicks-value", Schema(json.dumps(v1), "AVRO"))
    assert client.register_schema("clicks-value", Schema(json.dumps(v1), "AVRO")) == first  # same schema, same id
    assert client.test_compatibility("clicks-value", Schema(json.dumps(v2), "AVRO"))
    assert not client.test_compatibility("clicks-value", Schema(json.dumps(bad), "AVRO"))
    second = client.register_schema("clicks-value", Schema(json.dumps(v2), "AVRO"))
    assert second != first and client.get_versions("clicks-value") == [1, 2]
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema("clicks-value", Schema(json.dumps(bad), "AVRO"))
    assert refused.value.http_status_code == 409
    found = client.lookup_schema("clicks-value", Schema(json.dumps(v2), "AVRO"))
    assert (found.version, found.schema_id) == (2, second)
    with pytest.raises(SchemaRegistryError) as missing:
        client.get_latest_version("no-such-value")
    assert (missing.value.http_status_code, missing.value.error_code) == (404, 40401)
    assert client.get_compatibility() == "BACKWARD"
    client.set_compatibility("clicks-value", "FULL")
    assert client.get_compatibility("clicks-value") == "FULL"
