"""The embedded schema registry: Confluent semantics, stored in one SQLite file.

Subjects (by convention `<topic>-value`) hold numbered versions (1, 2, 3, ...); every
version points at a schema with a global id. As in Confluent's registry:

- ids are global: the same schema registered under two subjects gets the same id;
- registering a schema a subject already has returns that version's id, no new version;
- before a new version is added it is checked against the subject's compatibility mode
  (subject setting, else the global setting, else BACKWARD). Non-transitive modes check
  against the latest version only, `*_TRANSITIVE` against every version.

Compatibility is decided by Apache Avro's own checker (`avro.compatibility`), never by
hand-written rules.

"Identical" means equal after normalisation, not equal text: whitespace, key order,
`namespace` vs dotted names and `{"type": "int"}` vs `"int"` do not matter. Unlike
Avro's Parsing Canonical Form we keep `default`, `logicalType`, `doc`, `aliases` and
custom properties, because dropping them would make `{"type": "long", "logicalType":
"timestamp-millis"}` "identical" to a plain long and would silently ignore an added
default (which changes compatibility). Confluent also treats those as different.

The file is in WAL mode so other processes (a second `pipeline` command, a sink worker)
can read while one registers; registration takes the write lock for the whole
read-check-insert so two writers cannot hand out the same version or id.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import avro.errors
import avro.schema
import fastavro
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityResult,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
)

from runner.errors import FatalError, RetryableError
from runner.sqlite import connect_read_only, use_wal

DEFAULT_COMPATIBILITY = "BACKWARD"

COMPATIBILITY_MODES = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)

_PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_ENDS_AT_FIELD = re.compile(r"/fields/\d+$")
_GLOBAL = ""  # the `config` row holding the global mode (subjects are never empty)


class InvalidSchemaError(FatalError):
    """The text is not a valid Avro schema."""


class IncompatibleSchemaError(FatalError):
    """A new schema breaks the subject's compatibility mode."""

    def __init__(
        self,
        message: str,
        *,
        subject: str,
        version: int,
        mode: str,
        reasons: list[str],
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.subject = subject
        self.version = version  # the (first) version it conflicts with
        self.mode = mode
        self.reasons = reasons


class SchemaNotFoundError(FatalError):
    """An unknown schema id, subject or version."""


@dataclass(frozen=True)
class RegisteredSchema:
    subject: str
    version: int
    id: int
    schema: str  # normalised JSON text


@dataclass(frozen=True)
class _Parsed:
    normalized: str  # the identity key and the stored text
    json: Any  # fastavro-parsed JSON (full names), used to explain checker locations
    avro: avro.schema.Schema  # for the compatibility checker


class SchemaRegistry:
    """Embedded Confluent-style registry in a SQLite file (see the module docstring)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only` for inspection: opens an existing file without writing anything
        (also where the user may not write); registering then fails."""
        self.path = Path(path)
        self._lock = threading.RLock()
        self._schemas: dict[int, str] = {}  # id -> text; ids never change, so never stale
        self._parsed: dict[int, _Parsed] = {}
        if read_only:
            self._db = connect_read_only(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: we issue BEGIN IMMEDIATE ourselves where it matters.
        self._db = sqlite3.connect(
            str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            use_wal(self._db)
            # A lost schema makes every record written with it unreadable, and
            # registrations are rare: pay for a full fsync.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS schemas (
                    id INTEGER PRIMARY KEY,
                    normalized TEXT NOT NULL UNIQUE
                );
                CREATE TABLE IF NOT EXISTS versions (
                    subject TEXT NOT NULL,
                    version INTEGER NOT NULL,
                    schema_id INTEGER NOT NULL REFERENCES schemas(id),
                    PRIMARY KEY (subject, version)
                );
                CREATE TABLE IF NOT EXISTS config (
                    subject TEXT PRIMARY KEY,
                    compatibility TEXT NOT NULL
                );
                """
            )

    # -- registration -------------------------------------------------------------------

    def register(self, subject: str, schema: str | dict[str, Any] | list[Any]) -> int:
        """Register `schema` under `subject`; return its global id.

        Raises InvalidSchemaError for a schema that does not parse and
        IncompatibleSchemaError when the subject's compatibility mode refuses it.
        """
        _check_subject(subject)
        parsed = _parse(schema)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # another process held the lock 30 s
                raise RetryableError(f"schema registry {self.path} is busy: {exc}") from exc
            try:
                schema_id = self._id_for(parsed.normalized)
                if schema_id is not None:
                    row = self._db.execute(
                        "SELECT 1 FROM versions WHERE subject = ? AND schema_id = ?",
                        (subject, schema_id),
                    ).fetchone()
                    if row is not None:  # already a version of this subject
                        self._db.execute("COMMIT")
                        return schema_id
                mode = self._mode(subject)
                conflicts = self._conflicts(subject, parsed, mode)
                if conflicts:
                    raise _incompatible(subject, mode, conflicts)
                if schema_id is None:
                    cur = self._db.execute(
                        "INSERT INTO schemas (normalized) VALUES (?)", (parsed.normalized,)
                    )
                    schema_id = int(cur.lastrowid)  # type: ignore[arg-type]
                (latest,) = self._db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM versions WHERE subject = ?",
                    (subject,),
                ).fetchone()
                self._db.execute(
                    "INSERT INTO versions (subject, version, schema_id) VALUES (?, ?, ?)",
                    (subject, latest + 1, schema_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._schemas[schema_id] = parsed.normalized
        self._parsed[schema_id] = parsed
        return schema_id

    def check(self, subject: str, schema: str | dict[str, Any] | list[Any]) -> list[str]:
        """Why `schema` could not be registered under `subject` (empty: it could).

        An identical schema already in the subject is compatible by definition.
        """
        _check_subject(subject)
        parsed = _parse(schema)
        with self._lock:
            schema_id = self._id_for(parsed.normalized)
            if schema_id is not None and self._db.execute(
                "SELECT 1 FROM versions WHERE subject = ? AND schema_id = ?",
                (subject, schema_id),
            ).fetchone():
                return []
            conflicts = self._conflicts(subject, parsed, self._mode(subject))
        return [reason for _, reasons in conflicts for reason in reasons]

    # -- lookups --------------------------------------------------------------------------

    def schema_by_id(self, schema_id: int) -> str:
        """The schema text for a global id (cached: ids are immutable)."""
        text = self._schemas.get(schema_id)
        if text is not None:
            return text
        with self._lock:
            row = self._db.execute(
                "SELECT normalized FROM schemas WHERE id = ?", (schema_id,)
            ).fetchone()
        if row is None:
            raise SchemaNotFoundError(
                f"no schema with id {schema_id} in the registry at {self.path}",
                hint="the data was written with a schema registered elsewhere; point the "
                "pipeline at the registry (state directory) that wrote it",
            )
        self._schemas[schema_id] = row[0]
        return row[0]

    def subjects(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT subject FROM versions ORDER BY subject"
            ).fetchall()
        return [r[0] for r in rows]

    def versions(self, subject: str) -> list[int]:
        """The subject's version numbers, ascending (empty for an unknown subject)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version FROM versions WHERE subject = ? ORDER BY version", (subject,)
            ).fetchall()
        return [r[0] for r in rows]

    def get(self, subject: str, version: int | Literal["latest"] = "latest") -> RegisteredSchema:
        with self._lock:
            if version == "latest":
                row = self._db.execute(
                    "SELECT version, schema_id FROM versions WHERE subject = ? "
                    "ORDER BY version DESC LIMIT 1",
                    (subject,),
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT version, schema_id FROM versions WHERE subject = ? AND version = ?",
                    (subject, int(version)),
                ).fetchone()
        if row is None:
            known = self.versions(subject)
            if not known:
                raise SchemaNotFoundError(f"no subject {subject!r} in the registry at {self.path}")
            raise SchemaNotFoundError(
                f"subject {subject!r} has no version {version} (versions: "
                f"{', '.join(map(str, known))})"
            )
        return RegisteredSchema(subject, row[0], row[1], self.schema_by_id(row[1]))

    # -- compatibility settings -----------------------------------------------------------

    def compatibility(self, subject: str | None = None) -> str:
        """The mode in force: the subject's own, else the global one, else BACKWARD."""
        with self._lock:
            return self._mode(subject)

    def set_compatibility(self, mode: str, subject: str | None = None) -> None:
        """Set the global mode, or one subject's mode. Existing versions are not rechecked."""
        normalized = str(mode).strip().upper()
        if normalized not in COMPATIBILITY_MODES:
            raise FatalError(
                f"unknown compatibility mode {mode!r}",
                hint=f"use one of {', '.join(COMPATIBILITY_MODES)}",
            )
        if subject is not None:
            _check_subject(subject)
        with self._lock:
            self._db.execute(
                "INSERT INTO config (subject, compatibility) VALUES (?, ?) "
                "ON CONFLICT(subject) DO UPDATE SET compatibility = excluded.compatibility",
                (_GLOBAL if subject is None else subject, normalized),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SchemaRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (call with self._lock held) ----------------------------------------------

    def _id_for(self, normalized: str) -> int | None:
        row = self._db.execute(
            "SELECT id FROM schemas WHERE normalized = ?", (normalized,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _mode(self, subject: str | None) -> str:
        keys = [_GLOBAL] if subject is None else [subject, _GLOBAL]
        for key in keys:
            row = self._db.execute(
                "SELECT compatibility FROM config WHERE subject = ?", (key,)
            ).fetchone()
            if row is not None:
                return str(row[0])
        return DEFAULT_COMPATIBILITY

    def _parsed_by_id(self, schema_id: int) -> _Parsed:
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            parsed = _parse(self.schema_by_id(schema_id))
            self._parsed[schema_id] = parsed
        return parsed

    def _conflicts(
        self, subject: str, new: _Parsed, mode: str
    ) -> list[tuple[int, list[str]]]:
        """[(version, reasons)] for each existing version `new` is incompatible with."""
        if mode == "NONE":
            return []
        rows = self._db.execute(
            "SELECT version, schema_id FROM versions WHERE subject = ? ORDER BY version",
            (subject,),
        ).fetchall()
        if not rows:
            return []
        if not mode.endswith("_TRANSITIVE"):
            rows = rows[-1:]
        backward = mode.startswith(("BACKWARD", "FULL"))
        forward = mode.startswith(("FORWARD", "FULL"))
        conflicts = []
        for version, schema_id in rows:
            old = self._parsed_by_id(schema_id)
            reasons: list[str] = []
            if backward:  # the new schema must read what the old one wrote
                reasons += [
                    f"new schema reading version {version} data: {r}"
                    for r in _reasons(reader=new, writer=old)
                ]
            if forward:  # the old schema must read what the new one writes
                reasons += [
                    f"version {version} reading new schema data: {r}"
                    for r in _reasons(reader=old, writer=new)
                ]
            if reasons:
                conflicts.append((version, reasons))
        return conflicts


# -- helpers ------------------------------------------------------------------------------


def normalized(schema: str | dict[str, Any] | list[Any]) -> str:
    """The registry's normal form of a schema (its identity: equal forms, one id).
    Raises InvalidSchemaError."""
    return _parse(schema).normalized


def _check_subject(subject: str) -> None:
    if not isinstance(subject, str) or not subject.strip():
        raise FatalError(f"invalid subject {subject!r}: a subject is a non-empty string")


def _parse(schema: str | dict[str, Any] | list[Any]) -> _Parsed:
    """Validate with both libraries and build the normalised form."""
    if isinstance(schema, str):
        try:
            schema_json = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidSchemaError(f"invalid Avro schema: not JSON: {exc}") from None
    else:
        schema_json = schema
    try:
        parsed = fastavro.parse_schema(schema_json, _write_hint=False)
    except Exception as exc:  # fastavro raises several types (SchemaParseException, ...)
        raise InvalidSchemaError(f"invalid Avro schema: {exc}") from None
    normalized = json.dumps(_normalize(parsed), sort_keys=True, separators=(",", ":"))
    try:
        with warnings.catch_warnings():
            # avro warns (rather than fails) on ignored logical types; fastavro already
            # judged the schema.
            warnings.simplefilter("ignore")
            avro_schema = avro.schema.parse(normalized)
    except (avro.errors.AvroException, ValueError, TypeError) as exc:
        raise InvalidSchemaError(f"invalid Avro schema: {exc}") from None
    return _Parsed(normalized, parsed, avro_schema)


def _normalize(node: Any) -> Any:
    if isinstance(node, dict):
        if node.keys() == {"type"} and node["type"] in _PRIMITIVES:
            return node["type"]  # {"type": "int"} is "int"
        return {k: _normalize(v) for k, v in node.items() if not k.startswith("__")}
    if isinstance(node, list):
        return [_normalize(v) for v in node]
    return node


def _reasons(reader: _Parsed, writer: _Parsed) -> list[str]:
    """The Avro checker's verdict for (reader, writer), as readable sentences."""
    # A fresh checker each time: it memoises by object identity.
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader.avro, writer.avro)
    if result.compatibility is not SchemaCompatibilityType.incompatible:
        return []
    return _describe(result, reader.json)


def _describe(result: SchemaCompatibilityResult, reader_json: Any) -> list[str]:
    """Pair the checker's messages with its locations where we can.

    The Python checker returns messages and locations as two unordered sets (the Java
    one keeps pairs). With one of each they pair; a missing-default message is the field
    name, which pairs with the location whose field has that name. Anything left is
    reported with all the remaining locations. The merge also leaks "/" (the root) from
    compatible sub-results; drop it when a real location exists.
    """
    messages = set(result.messages)
    locations = {loc for loc in result.locations if loc != "/"} or set(result.locations)
    kinds = set(result.incompatibilities)
    reasons: list[str] = []
    if SchemaIncompatibilityType.reader_field_missing_default_value in kinds:
        names = set(messages)  # fields of one name at two depths share one message
        for loc in sorted(locations, key=_location_sort_key):
            path, last_field = _field_path(reader_json, loc)
            # The checker's location for a missing field ends at /fields/<n>.
            if last_field in names and _ENDS_AT_FIELD.search(loc):
                reasons.append(
                    f"reader field {path!r} has no default value and is missing in "
                    f"writer at {loc}"
                )
                messages.discard(last_field)
                locations.discard(loc)
    if not messages:
        return reasons
    if len(messages) == 1 and len(locations) == 1:
        (msg,), (loc,) = messages, locations
        reasons.append(f"{msg} at {_where(reader_json, loc)}")
        return reasons
    where = ", ".join(
        _where(reader_json, loc) for loc in sorted(locations, key=_location_sort_key)
    )
    for msg in sorted(messages):
        reasons.append(f"{msg} (at {where})" if where else msg)
    return reasons


def _location_sort_key(loc: str) -> list[tuple[int, int, str]]:
    # Numeric tokens in numeric order ("/fields/10" after "/fields/9").
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in loc.split("/")]


def _where(reader_json: Any, loc: str) -> str:
    path, _ = _field_path(reader_json, loc)
    return f"{loc} (field {path!r})" if path else loc


def _field_path(reader_json: Any, loc: str) -> tuple[str, str | None]:
    """Follow a checker location ("/fields/3/type/fields/0") in the reader schema.

    Returns the dotted field path ("request.path") and the last field's name. Stops at
    anything it cannot follow (union branch indexes are the writer's, not the reader's).
    """
    named: dict[str, Any] = {}
    _collect_named(reader_json, named)
    node = reader_json
    names: list[str] = []
    tokens = [t for t in loc.split("/") if t]
    i = 0
    while i < len(tokens):
        if isinstance(node, str) and node in named:
            node = named[node]
        tok = tokens[i]
        if tok == "fields" and isinstance(node, dict) and i + 1 < len(tokens):
            try:
                fld = node["fields"][int(tokens[i + 1])]
            except (KeyError, IndexError, ValueError):
                break
            names.append(fld["name"])
            node = fld
            i += 2
            continue
        if tok in ("type", "items", "values") and isinstance(node, dict) and tok in node:
            node = node[tok]
            i += 1
            continue
        break
    return ".".join(names), (names[-1] if names else None)


def _collect_named(node: Any, named: dict[str, Any]) -> None:
    if isinstance(node, dict):
        if node.get("type") in ("record", "error", "enum", "fixed") and "name" in node:
            named.setdefault(node["name"], node)
        for value in node.values():
            _collect_named(value, named)
    elif isinstance(node, list):
        for value in node:
            _collect_named(value, named)


def _incompatible(
    subject: str, mode: str, conflicts: list[tuple[int, list[str]]]
) -> IncompatibleSchemaError:
    versions = [v for v, _ in conflicts]
    reasons = [r for _, rs in conflicts for r in rs]
    which = (
        f"version {versions[0]}"
        if len(versions) == 1
        else f"versions {', '.join(map(str, versions))}"
    )
    added = any(r.startswith("new schema reading") and "has no default" in r for r in reasons)
    removed = any(r.startswith("version") and "has no default" in r for r in reasons)
    if added:
        hint = (
            "give the new field a default (for an optional field: "
            '"type": ["null", ...], "default": null)'
        )
    elif removed:
        hint = "keep the field: older versions have no default for it, so their readers need it"
    else:
        hint = (
            "make the change compatible (add fields with defaults, only remove fields "
            "that have defaults, widen types int→long→float→double)"
        )
    hint += (
        f", or change the compatibility mode of {subject!r} (now {mode}) if the break "
        "is intended and every reader can cope"
    )
    return IncompatibleSchemaError(
        f"schema for subject {subject!r} is incompatible with {which} under "
        f"{mode} compatibility: {'; '.join(reasons)}",
        subject=subject,
        version=versions[0],
        mode=mode,
        reasons=reasons,
        hint=hint,
    )
