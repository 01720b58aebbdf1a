"""A Kafka cluster that cannot be reached, or refuses the security settings, stops
`pipeline run` with one line naming the brokers and the cause; a password given through
${ENV} shows nowhere, not even with --debug."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.kafka_broker import Tansu, free_port

PASSWORD = "hunter2-Xyzzy-s3cret"


def write_spec(tmp: Path, bootstrap: str, security: str | None) -> Path:
    kafka = {"bootstrap_servers": bootstrap, "request_timeout_ms": 3000}
    options = json.dumps(kafka)[:-1] + (f", security: {security}}}" if security else "}")
    (tmp / "in.jsonl").write_text('{"a": 1}\n')
    spec = tmp / "spec.yaml"
    spec.write_text(f"""\
name: refused
broker: {{kafka: {options}}}
topics:
  t: {{partitions: 1, schema: {{type: record, name: R, fields: [{{name: a, type: long}}]}}}}
sources:
  - {{name: s, connector: jsonl, topic: t, config: {{paths: ["in.jsonl"]}}}}
""")
    return spec


def check_refused(spec: Path, bootstrap: str, cause: str) -> None:
    for debug in ([], ["--debug"]):
        ran = run_cli(*debug, "run", spec, "--once", env={"KAFKA_PASSWORD": PASSWORD}, timeout=60)
        assert ran.returncode == 1, ran.stderr
        assert PASSWORD not in ran.stdout + ran.stderr
        if not debug:
            errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
            assert errors == [f"error: cannot reach Kafka at {bootstrap}: {cause}"], ran.stderr
            assert "Traceback" not in ran.stderr and "aiokafka" not in ran.stderr, ran.stderr


def test_nothing_listening(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    check_refused(write_spec(tmp_path, bootstrap, None), bootstrap, "connection refused")


@pytest.mark.parametrize(
    ("security", "cause"),
    [
        ('{protocol: SASL_PLAINTEXT, sasl_mechanism: SCRAM-SHA-512, username: ci, password: "${KAFKA_PASSWORD}"}',
         "the broker does not accept SASL mechanism SCRAM-SHA-512"),
        ('{protocol: SASL_SSL, sasl_mechanism: PLAIN, username: ci, password: "${KAFKA_PASSWORD}"}',
         "no TLS handshake (is the listener plain text?)"),
    ],
    ids=["sasl-on-a-plain-listener", "tls-on-a-plain-listener"],
)
def test_security_settings_the_broker_refuses(tmp_path: Path, kafka: Tansu, security: str, cause: str) -> None:
    spec = write_spec(tmp_path, kafka.bootstrap, security)
    checked = run_cli("validate", spec, env={"KAFKA_PASSWORD": PASSWORD})
    assert checked.returncode == 0, checked.stderr
    assert PASSWORD not in checked.stdout + checked.stderr
    check_refused(spec, kafka.bootstrap, cause)
