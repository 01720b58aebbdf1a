"""A client for an external Confluent-compatible Schema Registry, over its REST API.

`RemoteSchemaRegistry` is a drop-in for the embedded `SchemaRegistry` (same methods, return
types and errors). It is used when the spec has `schema_registry: {url: ...}`, so the
pipeline shares schemas (and schema ids, which are in every record it writes) with other
Kafka clients instead of keeping them in its state directory.

Schemas are validated and normalised locally before they are sent (the same
`normalized()` as the embedded registry), so an invalid schema fails without a request
and the same schema given as text or as a dict is the same schema to the server.
Compatibility is decided by the server.

Errors: an unreachable registry (refused, timed out, HTTP 5xx) is a `RetryableError`;
refused credentials are a `FatalError`; Confluent's error codes map to the embedded
registry's errors. Messages name the registry URL, never the password.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from runner.config import Config, setting
from runner.errors import FatalError, RetryableError
from runner.schema.registry import (
    COMPATIBILITY_MODES,
    IncompatibleSchemaError,
    InvalidSchemaError,
    RegisteredSchema,
    SchemaNotFoundError,
    normalized,
)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_ACCEPT = f"{CONTENT_TYPE}, application/vnd.schemaregistry+json, application/json"


class _ApiError(FatalError):
    """A 4xx answer other than 401/403. The methods map the codes they expect to the
    registry's errors; any other one reaches the user as this FatalError."""

    def __init__(
        self, message: str, *, status: int, code: int, server_message: str, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code  # Confluent's error_code (40401...), or the HTTP status
        self.server_message = server_message


class RegistryOptions(Config):
    """`schema_registry:` in a spec."""

    url: str = setting(help="The registry's URL; several, comma-separated, are tried in turn.")
    username: str | None = setting(None, help="Basic-auth user name.")
    password: str | None = setting(None, help="Basic-auth password; write it as ${ENV_VAR}.", secret=True)
    timeout: float = setting(10.0, help="Seconds a request may take.", min=0.1)
    ssl_cafile: str | None = setting(None, help="CA bundle to verify an https registry.")

    def open(self) -> RemoteSchemaRegistry:
        return RemoteSchemaRegistry(
            self.url, username=self.username, password=self.password, timeout=self.timeout, ssl_cafile=self.ssl_cafile
        )


class RemoteSchemaRegistry:
    """Confluent-compatible Schema Registry client with `SchemaRegistry`'s interface."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        ssl_cafile: str | None = None,
    ) -> None:
        self.urls: list[str] = []
        for raw in str(url).split(","):
            if not raw.strip():
                continue
            base, user, pw = _split_credentials(raw.strip())
            # Credentials in the URL (http://user:pass@host) work too, but are kept out of
            # self.urls: those are what messages show.
            if username is None and user is not None:
                username, password = user, pw
            self.urls.append(base)
        if not self.urls:
            raise FatalError(
                f"invalid schema registry url {_redact(str(url), password)!r}",
                hint="give one URL like http://registry:8081, or several separated by commas",
            )
        self.username = username
        self._password = password
        self.timeout = float(timeout)
        self._auth = None
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._auth = f"Basic {token}"
        self._ssl: ssl.SSLContext | None = None
        if ssl_cafile is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=ssl_cafile)
            except (OSError, ssl.SSLError) as exc:
                raise FatalError(
                    f"cannot load the schema registry CA file {ssl_cafile}: {exc}"
                ) from None
        self._current = 0  # index into self.urls of the last one that answered
        self._schemas: dict[int, str] = {}  # id -> text; ids never change, so never stale

    def __repr__(self) -> str:
        user = f", username={self.username!r}" if self.username is not None else ""
        return f"RemoteSchemaRegistry({','.join(self.urls)!r}{user})"

    # -- registration -------------------------------------------------------------------

    def register(self, subject: str, schema: str | dict[str, Any] | list[Any]) -> int:
        """Register `schema` under `subject`; return its global id.

        Raises InvalidSchemaError for a schema that does not parse and
        IncompatibleSchemaError when the subject's compatibility mode refuses it.
        """
        _check_subject(subject)
        text = normalized(schema)  # raises InvalidSchemaError before any request
        try:
            answer = self._request("POST", f"/subjects/{_q(subject)}/versions", {"schema": text})
        except _ApiError as exc:
            if exc.status == 409:
                raise self._incompatible(subject, text, exc) from None
            if exc.code in (42201, 422):
                raise InvalidSchemaError(
                    f"the schema registry at {self._url()} refused the schema for subject "
                    f"{subject!r} as invalid: {exc.server_message}"
                ) from None
            raise
        return int(answer["id"])

    def check(self, subject: str, schema: str | dict[str, Any] | list[Any]) -> list[str]:
        """Why `schema` could not be registered under `subject` (empty: it could)."""
        _check_subject(subject)
        text = normalized(schema)
        try:
            answer = self._request(
                "POST",
                f"/compatibility/subjects/{_q(subject)}/versions/latest?verbose=true",
                {"schema": text},
            )
        except _ApiError as exc:
            # Confluent answers 40401/40402 for a subject with no versions yet: anything is
            # compatible with nothing.
            if exc.code in (40401, 40402):
                return []
            if exc.code in (42201, 422):
                raise InvalidSchemaError(
                    f"the schema registry at {self._url()} refused the schema as invalid: "
                    f"{exc.server_message}"
                ) from None
            raise
        if answer.get("is_compatible", False):
            return []
        # `messages` is only there with ?verbose=true on registries that support it.
        reasons = [str(m) for m in answer.get("messages") or []]
        return reasons or [
            f"incompatible with the latest version under {self.compatibility(subject)} "
            "compatibility (the registry gave no details)"
        ]

    # -- lookups --------------------------------------------------------------------------

    def schema_by_id(self, schema_id: int) -> str:
        """The schema text for a global id (cached: ids are immutable)."""
        text = self._schemas.get(schema_id)
        if text is not None:
            return text
        try:
            answer = self._request("GET", f"/schemas/ids/{int(schema_id)}")
        except _ApiError as exc:
            if exc.code in (40403, 404):
                raise SchemaNotFoundError(
                    f"no schema with id {schema_id} in the schema registry at {self._url()}",
                    hint="the data was written with a schema registered in another "
                    "registry; point the pipeline at the registry that wrote it",
                ) from None
            raise
        kind = answer.get("schemaType", "AVRO")
        if kind != "AVRO":
            # A SchemaNotFoundError, so a decoder treats the record as a bad one (dead
            # letter) rather than stopping the run.
            raise SchemaNotFoundError(
                f"schema id {schema_id} in the schema registry at {self._url()} is a "
                f"{kind} schema; only Avro is supported"
            )
        text = str(answer["schema"])
        self._schemas[schema_id] = text
        return text

    def subjects(self) -> list[str]:
        return sorted(self._request("GET", "/subjects"))

    def versions(self, subject: str) -> list[int]:
        """The subject's version numbers, ascending (empty for an unknown subject)."""
        try:
            return sorted(int(v) for v in self._request("GET", f"/subjects/{_q(subject)}/versions"))
        except _ApiError as exc:
            if exc.code == 40401:
                return []
            raise

    def get(self, subject: str, version: int | Literal["latest"] = "latest") -> RegisteredSchema:
        which = "latest" if version == "latest" else str(int(version))
        try:
            answer = self._request("GET", f"/subjects/{_q(subject)}/versions/{which}")
        except _ApiError as exc:
            if exc.code == 40401:
                raise SchemaNotFoundError(
                    f"no subject {subject!r} in the schema registry at {self._url()}"
                ) from None
            if exc.code in (40402, 42202):
                known = self.versions(subject)
                raise SchemaNotFoundError(
                    f"subject {subject!r} has no version {version} (versions: "
                    f"{', '.join(map(str, known)) or 'none'})"
                ) from None
            raise
        found = RegisteredSchema(
            subject=str(answer["subject"]),
            version=int(answer["version"]),
            id=int(answer["id"]),
            schema=str(answer["schema"]),
        )
        if answer.get("schemaType", "AVRO") == "AVRO":
            self._schemas.setdefault(found.id, found.schema)
        return found

    # -- compatibility settings -----------------------------------------------------------

    def compatibility(self, subject: str | None = None) -> str:
        """The mode in force: the subject's own, else the global one."""
        if subject is not None:
            try:
                # defaultToGlobal: else Confluent answers 40408 for a subject without its
                # own setting (older registries ignore it, hence the fallback below).
                answer = self._request("GET", f"/config/{_q(subject)}?defaultToGlobal=true")
            except _ApiError as exc:
                if exc.code not in (40401, 40408):
                    raise
            else:
                return _mode_of(answer)
        return _mode_of(self._request("GET", "/config"))

    def set_compatibility(self, mode: str, subject: str | None = None) -> None:
        """Set the global mode, or one subject's mode. Existing versions are not rechecked."""
        wanted = str(mode).strip().upper()
        if wanted not in COMPATIBILITY_MODES:
            raise FatalError(
                f"unknown compatibility mode {mode!r}",
                hint=f"use one of {', '.join(COMPATIBILITY_MODES)}",
            )
        if subject is not None:
            _check_subject(subject)
        path = "/config" if subject is None else f"/config/{_q(subject)}"
        self._request("PUT", path, {"compatibility": wanted})

    def close(self) -> None:
        """Nothing to release (one connection per request); here for the interface."""

    def __enter__(self) -> RemoteSchemaRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP -----------------------------------------------------------------------------

    def _url(self) -> str:
        return self.urls[self._current]

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request, trying each URL in turn (starting with the last one that
        answered) until one answers; return its JSON. Raises RetryableError when none
        answers or one answers 5xx, FatalError for 401/403, _ApiError for other 4xx."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": _ACCEPT}
        if data is not None:
            headers["Content-Type"] = CONTENT_TYPE
        if self._auth is not None:
            headers["Authorization"] = self._auth
        failures: list[tuple[str, str]] = []  # (url, cause)
        n = len(self.urls)
        for k in range(n):
            i = (self._current + k) % n
            base = self.urls[i]
            request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:  # it answered, with an error status
                self._current = i
                raise self._http_error(base, method, path, exc) from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, ssl.SSLCertVerificationError):
                    # Not transient: retrying will not make the certificate trusted.
                    raise FatalError(
                        f"schema registry at {base}: TLS certificate not trusted: "
                        f"{_one_line(exc.reason.verify_message or str(exc.reason))}",
                        hint="set the registry's `ssl_cafile` to the CA that signed its certificate",
                    ) from None
                failures.append((base, _one_line(_cause(exc.reason))))
                continue
            except (OSError, http.client.HTTPException) as exc:
                # A read timeout, a reset or a garbled answer after connecting.
                failures.append((base, _one_line(_cause(exc))))
                continue
            self._current = i
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                raise FatalError(
                    f"schema registry at {base} answered {method} {path.split('?')[0]} "
                    "with something that is not JSON: "
                    + _redact(_one_line(raw[:200].decode(errors="replace")), self._password),
                    hint="check that the URL points at a Schema Registry",
                ) from None
        if n == 1:
            message = f"schema registry at {failures[0][0]} unreachable: {failures[0][1]}"
        else:
            message = "schema registry unreachable: " + "; ".join(f"{u}: {c}" for u, c in failures)
        raise RetryableError(_redact(message, self._password))

    def _http_error(
        self, base: str, method: str, path: str, exc: urllib.error.HTTPError
    ) -> Exception:
        status = exc.code
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        try:
            answer = json.loads(raw)
            code = int(answer.get("error_code", status))
            message = str(answer.get("message", ""))
        except (ValueError, TypeError, AttributeError):  # not Confluent's JSON error body
            code, message = status, raw[:200].decode(errors="replace")
        message = _redact(_one_line(message or exc.reason or ""), self._password)
        where = f"schema registry at {base}"
        if status in (401, 403):
            return FatalError(
                f"{where} refused authentication (HTTP {status}): {message}",
                hint="check the registry's username and password"
                if self._auth is not None
                else "the registry needs credentials: set its username and password",
            )
        if status >= 500:
            return RetryableError(f"{where} failed (HTTP {status}): {message}")
        return _ApiError(
            f"{where} refused {method} {path.split('?')[0]} (HTTP {status}, error code "
            f"{code}): {message}",
            status=status,
            code=code,
            server_message=message,
            # 404 with no Confluent error code: the path itself is unknown there.
            hint="check that the URL points at a Schema Registry" if code == 404 else None,
        )

    def _incompatible(self, subject: str, text: str, exc: _ApiError) -> IncompatibleSchemaError:
        """The 409 as the embedded registry's error: the reasons and mode are fetched
        separately, as a 409's message is free text that differs between servers."""
        try:
            reasons = self.check(subject, text) or [exc.server_message]
            mode = self.compatibility(subject)
            version = self.get(subject, "latest").version
        except (FatalError, RetryableError):  # best effort: the 409 is the real answer
            reasons, mode, version = [exc.server_message], "unknown", 0
        return IncompatibleSchemaError(
            f"schema for subject {subject!r} is incompatible with version {version} under "
            f"{mode} compatibility (schema registry at {self._url()}): {'; '.join(reasons)}",
            subject=subject,
            version=version,
            mode=mode,
            reasons=reasons,
            hint="make the change compatible (add fields with defaults, only remove fields "
            "that have defaults, widen types int→long→float→double), or change the "
            f"compatibility mode of {subject!r} if the break is intended and every "
            "reader can cope",
        )


# -- helpers ------------------------------------------------------------------------------


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(url without user:password@, user, password); also checks the URL is http(s)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise FatalError(
            f"invalid schema registry url {_redact(url, parts.password)!r}",
            hint="use http://host:port or https://host:port",
        )
    netloc = parts.netloc.rpartition("@")[2]
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return base, parts.username, parts.password


def _check_subject(subject: str) -> None:
    if not isinstance(subject, str) or not subject.strip():
        raise FatalError(f"invalid subject {subject!r}: a subject is a non-empty string")


def _q(subject: str) -> str:
    return quote(subject, safe="")


def _mode_of(answer: Any) -> str:
    # GET answers {"compatibilityLevel": M}; some servers say {"compatibility": M}.
    return str(answer.get("compatibilityLevel") or answer.get("compatibility"))


def _cause(reason: Any) -> str:
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror  # "Connection refused", not "[Errno 111] Connection refused"
    return str(reason) or type(reason).__name__


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _redact(text: str, password: str | None) -> str:
    # Belt and braces: we never format the password into a message, but a server or
    # proxy could echo it back.
    return text.replace(password, "***") if password else text
