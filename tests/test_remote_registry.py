"""`schema_registry: {url: ...}`: a pipeline keeps its schemas in an external
Confluent-compatible registry (here our own REST server over a separate registry file, a
real HTTP server on a free 127.0.0.1 port), through the `pipeline` command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from runner.schema.registry import SchemaRegistry
from runner.schema.rest import make_server
from tests.conftest import run_cli
from tests.schema.test_remote import SECRET, Served, dead_url
from tests.test_end_to_end import SCHEMA, check_sink_output, write_input, write_spec


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[Served]:
    registry = SchemaRegistry(tmp_path / "elsewhere" / "schemas.db")
    served = Served(make_server(registry, "127.0.0.1", 0))
    try:
        yield served
    finally:
        served.stop()
        registry.close()


def with_registry(spec: Path, registry: str) -> Path:
    spec.write_text(spec.read_text().replace("topics:\n", f"schema_registry: {registry}\ntopics:\n", 1))
    return spec


def test_a_pipeline_registers_and_reads_its_schemas_in_the_external_registry(tmp_path: Path, registry_server: Served) -> None:
    spec = with_registry(write_spec(tmp_path), f"{{url: {json.dumps(registry_server.url)}}}")
    valid, invalid = write_input(tmp_path, 3000, bad_every=100)
    assert run_cli("validate", spec).returncode == 0

    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 0, ran.stderr
    check_sink_output(tmp_path / "out", valid)
    # The schemas are in the external registry, as any Confluent client sees them ...
    client = SchemaRegistryClient({"url": registry_server.url})
    assert sorted(client.get_subjects()) == ["events-dlq-value", "events-value"]
    latest = client.get_latest_version("events-value")
    assert json.loads(latest.schema.schema_str)["fields"] == SCHEMA["fields"]
    # ... and not in the state directory.
    assert not (tmp_path / ".pipeline" / "e2e" / "schemas.db").exists()
    listed = run_cli("schemas", "list", "--spec", spec)
    assert listed.returncode == 0, listed.stderr
    assert "events-value" in listed.stdout
    # The dead-letter topic decodes through it too.
    dlq = run_cli("consume", "events-dlq", "--from-beginning", "--spec", spec)
    assert dlq.returncode == 0, dlq.stderr
    assert len(dlq.stdout.splitlines()) == len(invalid)

    # An incompatible change of the topic's schema is refused by the registry, in one line.
    changed = {**SCHEMA, "fields": SCHEMA["fields"] + [{"name": "country", "type": "string"}]}
    (tmp_path / "event.avsc").write_text(json.dumps(changed))
    refused = run_cli("run", spec, "--once")
    assert refused.returncode == 1
    assert "events-value" in refused.stderr and "country" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_unreachable_registry_is_a_one_line_error_without_the_password(tmp_path: Path) -> None:
    url = dead_url()
    spec = with_registry(
        write_spec(tmp_path), f'{{url: "{url}", username: ci, password: "${{REGISTRY_PASSWORD}}", timeout: 1}}'
    )
    write_input(tmp_path, 10)
    env = {"REGISTRY_PASSWORD": SECRET}
    checked = run_cli("validate", spec, env=env)
    assert checked.returncode == 0, checked.stderr
    assert SECRET not in checked.stdout + checked.stderr
    ran = run_cli("run", spec, "--once", env=env, timeout=60)
    assert ran.returncode == 1
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert any(url in line and "unreachable" in line for line in lines), ran.stderr
    assert SECRET not in ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr


def test_bad_registry_options_are_reported_with_their_line(tmp_path: Path) -> None:
    spec = with_registry(write_spec(tmp_path), '{url: "http://127.0.0.1:1", timeout: "soon"}')
    checked = run_cli("validate", spec)
    assert checked.returncode == 2
    assert f"{spec}:2: schema_registry.timeout" in checked.stderr
