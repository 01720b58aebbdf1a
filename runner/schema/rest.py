"""The embedded schema registry over Confluent's Schema Registry REST API, so off-the-shelf
clients (confluent-kafka's `SchemaRegistryClient` and `AvroDeserializer`, Kafka UI tools)
read the topics a pipeline writes: `pipeline registry serve [--port 8081]`.

The subset served (Avro only), with Confluent's paths, bodies and error codes:

    GET  /subjects                                      ["activity-value", ...]
    GET  /subjects/{subject}/versions                   [1, 2]
    GET  /subjects/{subject}/versions/{version|latest}  {subject, version, id, schema}
    GET  /subjects/{subject}/versions/{version}/schema  the schema itself
    POST /subjects/{subject}/versions   {"schema": ...} {"id": N}   (409 if incompatible)
    POST /subjects/{subject}            {"schema": ...} {subject, version, id, schema}
    GET  /schemas/ids/{id}                              {"schema": "..."}
    GET  /schemas/ids/{id}/versions                     [{subject, version}, ...]
    POST /compatibility/subjects/{subject}/versions/{version|latest}  {"is_compatible": bool}
    GET  /config, /config/{subject}                     {"compatibilityLevel": "BACKWARD"}
    PUT  /config, /config/{subject}  {"compatibility": M}  {"compatibility": M}

Errors are `{"error_code": 40401, "message": ...}` with Confluent's codes: 40401 subject,
40402 version, 40403 schema not found; 409 incompatible; 42201 invalid schema; 42202
invalid version; 42203 invalid compatibility level.
"""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from runner.errors import FatalError
from runner.schema.registry import (
    IncompatibleSchemaError,
    InvalidSchemaError,
    SchemaNotFoundError,
    SchemaRegistry,
    normalized,
)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RestError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _version(text: str) -> int | str:
    if text == "latest" or text == "-1":
        return "latest"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise RestError(422, 42202, f"The specified version '{text}' is not a valid version id")


def _schema_text(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise RestError(422, 42201, 'expected a JSON body like {"schema": "<Avro schema as a string>"}')
    if body.get("schemaType", "AVRO") != "AVRO":
        raise RestError(422, 42201, f"only AVRO schemas are served here, not {body['schemaType']}")
    return body["schema"]


class RegistryApi:
    """Request → response over a SchemaRegistry; independent of the HTTP server."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self.routes: list[tuple[str, re.Pattern[str], Any]] = [
            ("GET", re.compile(r"/subjects"), self.subjects),
            ("GET", re.compile(r"/subjects/(?P<subject>[^/]+)/versions"), self.versions),
            ("GET", re.compile(r"/subjects/(?P<subject>[^/]+)/versions/(?P<version>[^/]+)"), self.version),
            ("GET", re.compile(r"/subjects/(?P<subject>[^/]+)/versions/(?P<version>[^/]+)/schema"), self.raw_schema),
            ("POST", re.compile(r"/subjects/(?P<subject>[^/]+)/versions"), self.register),
            ("POST", re.compile(r"/subjects/(?P<subject>[^/]+)"), self.lookup),
            ("GET", re.compile(r"/schemas/ids/(?P<id>\d+)"), self.by_id),
            ("GET", re.compile(r"/schemas/ids/(?P<id>\d+)/versions"), self.id_versions),
            ("POST", re.compile(r"/compatibility/subjects/(?P<subject>[^/]+)/versions/(?P<version>[^/]+)"), self.compatible),
            ("GET", re.compile(r"/config(?:/(?P<subject>[^/]+))?"), self.get_config),
            ("PUT", re.compile(r"/config(?:/(?P<subject>[^/]+))?"), self.put_config),
        ]

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        for verb, pattern, handler in self.routes:
            m = pattern.fullmatch(path)
            if m and verb == method:
                args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                try:
                    return 200, handler(body=body, **args)
                except RestError as exc:
                    return exc.status, {"error_code": exc.code, "message": exc.message}
                except SchemaNotFoundError as exc:
                    return 404, {"error_code": 40403, "message": str(exc)}
        return 404, {"error_code": 404, "message": f"HTTP 404 Not Found: {method} {path}"}

    def _known(self, subject: str) -> None:
        if not self.registry.versions(subject):
            raise RestError(404, 40401, f"Subject '{subject}' not found.")

    def subjects(self, body: Any) -> list[str]:
        return self.registry.subjects()

    def versions(self, subject: str, body: Any) -> list[int]:
        self._known(subject)
        return self.registry.versions(subject)

    def version(self, subject: str, version: str, body: Any) -> dict[str, Any]:
        self._known(subject)
        try:
            found = self.registry.get(subject, _version(version))  # type: ignore[arg-type]
        except SchemaNotFoundError:
            raise RestError(404, 40402, f"Version {version} not found.") from None
        return {"subject": found.subject, "version": found.version, "id": found.id, "schema": found.schema}

    def raw_schema(self, subject: str, version: str, body: Any) -> Any:
        return json.loads(self.version(subject, version, body)["schema"])

    def register(self, subject: str, body: Any) -> dict[str, Any]:
        text = _schema_text(body)
        try:
            return {"id": self.registry.register(subject, text)}
        except InvalidSchemaError as exc:
            raise RestError(422, 42201, f"Invalid schema: {exc}") from None
        except IncompatibleSchemaError as exc:
            raise RestError(409, 409, f"Schema being registered is incompatible with an earlier schema: {exc}") from None
        except FatalError as exc:  # e.g. an invalid subject name
            raise RestError(422, 42201, str(exc)) from None

    def lookup(self, subject: str, body: Any) -> dict[str, Any]:
        self._known(subject)
        try:
            wanted = normalized(_schema_text(body))
        except InvalidSchemaError as exc:
            raise RestError(422, 42201, f"Invalid schema: {exc}") from None
        for version in self.registry.versions(subject):
            found = self.registry.get(subject, version)
            if found.schema == wanted:
                return {"subject": subject, "version": found.version, "id": found.id, "schema": found.schema}
        raise RestError(404, 40403, "Schema not found")

    def by_id(self, id: str, body: Any) -> dict[str, Any]:
        try:
            return {"schema": self.registry.schema_by_id(int(id))}
        except SchemaNotFoundError:
            raise RestError(404, 40403, "Schema not found") from None

    def id_versions(self, id: str, body: Any) -> list[dict[str, Any]]:
        self.by_id(id, body)
        return [
            {"subject": s, "version": v}
            for s in self.registry.subjects()
            for v in self.registry.versions(s)
            if self.registry.get(s, v).id == int(id)
        ]

    def compatible(self, subject: str, version: str, body: Any) -> dict[str, Any]:
        text = _schema_text(body)
        if self.registry.versions(subject):
            self.version(subject, version, body)  # 40402 for a version that does not exist
        try:
            reasons = self.registry.check(subject, text)
        except InvalidSchemaError as exc:
            raise RestError(422, 42201, f"Invalid schema: {exc}") from None
        return {"is_compatible": not reasons, "messages": reasons}

    def get_config(self, body: Any, subject: str | None = None) -> dict[str, Any]:
        return {"compatibilityLevel": self.registry.compatibility(subject)}

    def put_config(self, body: Any, subject: str | None = None) -> dict[str, Any]:
        mode = body.get("compatibility") if isinstance(body, dict) else None
        try:
            self.registry.set_compatibility(str(mode), subject)
        except FatalError:
            raise RestError(422, 42203, f"Invalid compatibility level: {mode}") from None
        return {"compatibility": self.registry.compatibility(subject)}


def make_server(registry: SchemaRegistry, host: str, port: int) -> ThreadingHTTPServer:
    api = RegistryApi(registry)

    class Handler(BaseHTTPRequestHandler):
        server_version = "pipeline-registry"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                status, answer = 400, {"error_code": 400, "message": "the request body is not JSON"}
            else:
                status, answer = api.handle(method, self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._serve("PUT")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: no line per request

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server

