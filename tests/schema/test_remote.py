"""`RemoteSchemaRegistry` against a real server: our own REST server (runner.schema.rest)
over an embedded registry, plus tiny stand-ins for failures (401, 503, silence, TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from runner.errors import FatalError, RetryableError
from runner.schema.registry import (
    IncompatibleSchemaError,
    InvalidSchemaError,
    SchemaNotFoundError,
    SchemaRegistry,
    normalized,
)
from runner.schema.remote import RemoteSchemaRegistry
from runner.schema.rest import make_server
from runner.schema.serde import AvroDecoder, unframe
from tests.kafka_broker import free_port

V1 = {"type": "record", "name": "Click", "fields": [{"name": "id", "type": "long"}]}
V2 = {**V1, "fields": V1["fields"] + [{"name": "page", "type": ["null", "string"], "default": None}]}
# A new field without a default: the new schema cannot read version 1's data.
BAD = {**V1, "fields": V1["fields"] + [{"name": "user", "type": "string"}]}
SECRET = "s3cr3t-Pa55word"


class Served:
    """A server running in a thread; stop() is idempotent so tests can stop it early."""

    def __init__(self, server: HTTPServer, scheme: str = "http") -> None:
        self.server = server
        host, port = server.server_address[:2]
        self.url = f"{scheme}://{host}:{port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=5)


@pytest.fixture
def rest(tmp_path: Path) -> Iterator[Served]:
    """Our REST server over a fresh embedded registry, on a free 127.0.0.1 port."""
    registry = SchemaRegistry(tmp_path / "schemas.db")
    served = Served(make_server(registry, "127.0.0.1", 0))
    try:
        yield served
    finally:
        served.stop()
        registry.close()


@pytest.fixture
def answering() -> Iterator[Callable[[int, dict[str, Any]], Served]]:
    """Start servers that answer every request with one status and JSON body."""
    started: list[Served] = []

    def start(status: int, body: dict[str, Any]) -> Served:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        served = Served(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def dead_url() -> str:
    """A URL where nothing listens (a free port, closed again)."""
    return f"http://127.0.0.1:{free_port()}"


# -- against our REST server ------------------------------------------------------------------


def test_register_is_idempotent_and_schema_by_id_is_cached(rest: Served) -> None:
    remote = RemoteSchemaRegistry(rest.url)
    first = remote.register("clicks-value", V1)
    assert isinstance(first, int)
    assert remote.register("clicks-value", json.dumps(V1, indent=2)) == first  # same schema, other form
    assert json.loads(remote.schema_by_id(first)) == json.loads(normalized(V1))
    rest.stop()
    # Ids are immutable: the second lookup is answered from the cache, without the server.
    assert json.loads(remote.schema_by_id(first)) == json.loads(normalized(V1))
    with pytest.raises(RetryableError):
        remote.subjects()  # ...which really is gone


def test_compatible_evolution_becomes_version_2(rest: Served) -> None:
    with RemoteSchemaRegistry(rest.url) as remote:
        first = remote.register("clicks-value", V1)
        assert remote.check("clicks-value", V2) == []
        second = remote.register("clicks-value", V2)
        assert second != first
        assert remote.versions("clicks-value") == [1, 2]
        latest = remote.get("clicks-value")
        assert (latest.subject, latest.version, latest.id) == ("clicks-value", 2, second)
        assert json.loads(latest.schema) == json.loads(normalized(V2))
        assert remote.get("clicks-value", 1).id == first


def test_incompatible_change_is_refused_with_the_reason(rest: Served) -> None:
    remote = RemoteSchemaRegistry(rest.url)
    remote.register("clicks-value", V1)
    reasons = remote.check("clicks-value", BAD)
    assert reasons and any("'user'" in r and "no default" in r for r in reasons)
    with pytest.raises(IncompatibleSchemaError) as refused:
        remote.register("clicks-value", BAD)
    err = refused.value
    assert (err.subject, err.version, err.mode) == ("clicks-value", 1, "BACKWARD")
    assert err.reasons == reasons
    assert "'user'" in str(err) and "no default" in str(err) and rest.url in str(err)
    assert err.hint
    assert remote.versions("clicks-value") == [1]


def test_check_of_a_new_subject_is_empty_and_invalid_schemas_are_refused(rest: Served) -> None:
    remote = RemoteSchemaRegistry(rest.url)
    assert remote.check("new-value", V1) == []
    with pytest.raises(InvalidSchemaError):
        remote.register("clicks-value", {"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]})
    with pytest.raises(InvalidSchemaError):
        remote.check("clicks-value", "{not json")


def test_subjects_versions_and_compatibility_round_trip(rest: Served) -> None:
    remote = RemoteSchemaRegistry(rest.url)
    assert remote.subjects() == [] and remote.versions("clicks-value") == []
    remote.register("views-value", V1)
    remote.register("clicks-value", V1)
    assert remote.subjects() == ["clicks-value", "views-value"]
    assert remote.compatibility() == "BACKWARD" and remote.compatibility("clicks-value") == "BACKWARD"
    remote.set_compatibility("full", "clicks-value")
    assert remote.compatibility("clicks-value") == "FULL"
    assert remote.compatibility("views-value") == "BACKWARD"
    remote.set_compatibility("NONE")
    assert remote.compatibility() == "NONE" and remote.compatibility("views-value") == "NONE"
    assert remote.compatibility("clicks-value") == "FULL"
    with pytest.raises(FatalError, match="unknown compatibility mode"):
        remote.set_compatibility("SIDEWAYS")
    # Under NONE anything goes.
    assert remote.register("views-value", BAD) != remote.get("views-value", 1).id


def test_unknown_ids_subjects_and_versions(rest: Served) -> None:
    remote = RemoteSchemaRegistry(rest.url)
    with pytest.raises(SchemaNotFoundError, match="no schema with id 999"):
        remote.schema_by_id(999)
    with pytest.raises(SchemaNotFoundError, match="no subject 'nope-value'"):
        remote.get("nope-value")
    remote.register("clicks-value", V1)
    with pytest.raises(SchemaNotFoundError, match=r"no version 7 \(versions: 1\)"):
        remote.get("clicks-value", 7)


def test_confluent_serializer_output_decodes_with_our_lookup(rest: Served) -> None:
    client = SchemaRegistryClient({"url": rest.url})
    serialize = AvroSerializer(client, json.dumps(V2))
    value = serialize({"id": 7, "page": "/home"}, SerializationContext("clicks", MessageField.VALUE))
    remote = RemoteSchemaRegistry(rest.url)
    schema_id, _ = unframe(value)
    assert schema_id == remote.get("clicks-value").id
    records, failures = AvroDecoder(remote.schema_by_id).decode([value])
    assert not failures and records == [{"id": 7, "page": "/home"}]


def test_next_url_is_tried_when_one_is_down(rest: Served) -> None:
    remote = RemoteSchemaRegistry(f"{dead_url()}, {rest.url}")
    assert remote.register("clicks-value", V1) == remote.get("clicks-value").id


# -- failures ---------------------------------------------------------------------------------


def test_nothing_listening_is_retryable_and_names_the_url() -> None:
    url = dead_url()
    with pytest.raises(RetryableError) as down:
        RemoteSchemaRegistry(url).subjects()
    message = str(down.value)
    assert url in message and "refused" in message.lower() and "\n" not in message


def test_no_answer_times_out_as_retryable() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RetryableError) as slow:
            RemoteSchemaRegistry(url, timeout=0.2).schema_by_id(1)
    assert url in str(slow.value) and "timed out" in str(slow.value)


def test_password_never_appears_in_errors_or_repr(answering: Callable[..., Served]) -> None:
    url = dead_url()
    remote = RemoteSchemaRegistry(url, username="pipeline", password=SECRET)
    assert SECRET not in repr(remote)
    with pytest.raises(RetryableError) as down:
        remote.register("clicks-value", V1)
    assert url in str(down.value) and SECRET not in str(down.value)

    # Credentials in the URL itself are used but not shown either.
    port = url.rsplit(":", 1)[1]
    in_url = RemoteSchemaRegistry(f"http://pipeline:{SECRET}@127.0.0.1:{port}")
    assert in_url.username == "pipeline" and SECRET not in repr(in_url)
    with pytest.raises(RetryableError) as down:
        in_url.subjects()
    assert url in str(down.value) and SECRET not in str(down.value)

    # A server that refuses the credentials (and, rudely, echoes the password back).
    refusing = answering(401, {"error_code": 40101, "message": f"bad password {SECRET}"})
    with pytest.raises(FatalError) as refused:
        RemoteSchemaRegistry(refusing.url, username="pipeline", password=SECRET).subjects()
    err = refused.value
    assert not isinstance(err, RetryableError)
    assert refusing.url in str(err) and "refused authentication" in str(err)
    assert SECRET not in str(err) and SECRET not in (err.hint or "")


def test_server_errors_are_retryable(answering: Callable[..., Served]) -> None:
    failing = answering(503, {"error_code": 50301, "message": "leader not known"})
    with pytest.raises(RetryableError) as busy:
        RemoteSchemaRegistry(failing.url).register("clicks-value", V1)
    assert failing.url in str(busy.value) and "503" in str(busy.value) and "leader not known" in str(busy.value)


def test_invalid_url_is_fatal() -> None:
    for url in ("", "registry:8081", f"ftp://u:{SECRET}@host", "http://host:port"):
        with pytest.raises(FatalError) as bad:
            RemoteSchemaRegistry(url)
        assert SECRET not in str(bad.value)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def tls_rest(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    """Our REST server behind TLS with a self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    registry = SchemaRegistry(tmp_path / "schemas.db")
    server = make_server(registry, "127.0.0.1", 0)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    served = Served(server, scheme="https")
    try:
        yield served, cert_file
    finally:
        served.stop()
        registry.close()


def test_tls_with_the_ca_file_and_without(tls_rest: tuple[Served, Path]) -> None:
    served, cert_file = tls_rest
    remote = RemoteSchemaRegistry(served.url, ssl_cafile=str(cert_file))
    schema_id = remote.register("clicks-value", V1)
    assert remote.get("clicks-value").id == schema_id
    with pytest.raises(FatalError) as untrusted:
        RemoteSchemaRegistry(served.url).subjects()
    assert not isinstance(untrusted.value, RetryableError)
    assert served.url in str(untrusted.value) and "certificate" in str(untrusted.value)
    assert "ssl_cafile" in (untrusted.value.hint or "")
