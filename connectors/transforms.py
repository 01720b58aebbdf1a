"""Built-in record transforms: `rename`, `drop`, `mask`, `cast`, `insert`, `timestamp`,
`filter` and `route`.

A spec chains them under `transforms:` of a source (between `poll` and the Avro encode) or
of a sink (between the decode and `put`); each works on a whole batch at a time::

    sources:
      - name: access-logs
        connector: http_log
        topic: pageviews
        config: {paths: ["logs/access.log*"]}
        transforms:
          - rename: {fields: {remote_host: client_ip}}
          - mask: {fields: [client_ip], hash: true, salt: "${MASK_SALT}"}
          - filter: {drop: "path.startswith('/static/')"}
          - route: {field: method, topics: {POST: writes}}

Records a transform cannot handle (a cast of "abc" to int, an expression that fails on a
record) are left out and go to the spec's error policy with stage `transform` and the
field named: `errors: {tolerance: all}` sends them to the dead-letter topic, the default
stops the run naming the record. A mistake in a transform's config (an unknown key, a
filter with a syntax error, on a sink a field the topic's schema does not have) is reported by
`pipeline validate` with its file and line.

Shape. On a source the chain's output is what the topic's schema checks, so declare the
topic as the records leave the chain (`client_ip`, not `remote_host`). On a sink the
transforms say how they change the topic's schema, and the sink (Parquet: its columns)
sees the schema that leaves the chain.

rename
    Renames fields; type, default and doc are kept::

        - rename: {fields: {remote_host: client_ip, user_agent: ua}}

drop
    Removes fields (`fields`), or keeps only the listed ones (`keep`); exactly one of the
    two::

        - drop: {fields: [ident, user]}
        - drop: {keep: [timestamp, path, status]}

mask
    Masks fields (Kafka Connect's MaskField): strings become `with` (default "****"),
    numbers 0, booleans false, bytes empty, timestamps the epoch; null stays null::

        - mask: {fields: [email, card_number], with: "[redacted]"}

    `hash: true` pseudonymises instead: a string becomes the hex SHA-256 of `salt` + the
    value, so counts, distinct counts and joins on the field still work while the value
    cannot be read (keep the salt secret, e.g. `salt: "${MASK_SALT}"`; without a salt a
    value from a small space such as an IPv4 address can be found by brute force).
    Non-string values are masked as above; cast a number to string first to hash it.
    (`replacement` is another name for `with`, as in Kafka Connect.)

        - mask: {fields: [client_ip], hash: true, salt: "${MASK_SALT}"}

cast
    Converts fields to `string`, `int`, `long`, `float`, `double` or `boolean`::

        - cast: {fields: {status: string, bytes: double, is_bot: boolean}}

    null stays null. Numbers to int/long are truncated toward zero (2.7 → 2) and must fit
    (int: 32 bits, long: 64); strings are parsed ("42", "4.2e1", " 7 "), and booleans
    from true/false/yes/no/1/0 (any case). To string: numbers as Python prints them,
    booleans as `true`/`false`, timestamps in ISO 8601. A value that does not convert
    ("abc" to int) is a record error naming the field. Schema: the field's type becomes the
    target, nullability kept (["null", "int"] → ["null", "string"]).

insert
    Adds fields with static values (Avro type from the YAML value: string, long, double,
    boolean) and, optionally, fields holding each record's Kafka metadata::

        - insert:
            fields: {region: eu-west-1, pipeline_version: 2}
            topic: kafka_topic          # the name of the field to add
            partition: kafka_partition
            offset: kafka_offset
            timestamp: kafka_timestamp

    The metadata are the record's topic, partition, offset and timestamp as read by a
    sink; on a source the record has not been written yet and those fields are null
    (they are nullable in the schema, so the same chain works on both sides). A field
    that is already in the record schema is a config error at validate (on a sink).

timestamp
    Converts one field between a timestamp (what Avro `timestamp-millis` decodes to, and
    what `http_log` produces), epoch milliseconds and a string::

        - timestamp: {field: timestamp, to: string, format: "%Y-%m-%dT%H:%M:%SZ"}
        - timestamp: {field: created, to: timestamp, format: "%d/%m/%Y %H:%M"}
        - timestamp: {field: ts, to: millis}

    Input: a datetime (naive ones are taken as UTC), epoch milliseconds (an int), or a
    string, parsed with `format` (strptime) when given, else as ISO 8601. Output: `to:
    timestamp` an aware UTC datetime (schema `{"type": "long", "logicalType":
    "timestamp-millis"}`), `millis` an int (`long`), `string` formatted with `format`
    (strftime, in UTC) or ISO 8601 with milliseconds and `Z`. null stays null; a value
    that does not parse is a record error.

filter
    Keeps (`keep`) or drops (`drop`) the records for which a Python-like expression over
    their fields is true; exactly one of the two::

        - filter: {drop: "status >= 500 or path.startswith('/health')"}
        - filter: {keep: "method in ('POST', 'PUT') and bytes is not None and bytes > 0"}

    Evaluated with simpleeval (no imports, no dunder attributes): comparisons, `and/or/
    not`, `in`, arithmetic, string methods, `len`, `int`, `float`, `str`, `abs`, `min`,
    `max`, `round`, lists/tuples/sets/dicts. Each field of the record is a name. A record
    for which the expression fails (a name that is not a field of the record, `None >=
    500`, `None.startswith(...)`) is a record error naming the field, so it follows the
    error policy rather than being silently kept or dropped; guard with `x is not None
    and ...` where nulls are expected.

route (sources only)
    Sends records to other topics of the spec by the value of a field::

        - route: {field: method, topics: {POST: writes, PUT: writes}, default: reads}

    Values are compared as text (`str(value)`): 404 matches the key `404` (quoted or
    not), a boolean true the unquoted YAML key `true`, and a null value (or a record
    without the field) the key `null`.
    Records whose value has no key go to `default`, or without `default` stay on the
    source's topic. Every topic routed to must be declared under `topics:` with a
    schema the routed records fit (`validate` checks it is declared).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import decimal
import hashlib
import math
import re
from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa

from runner.expressions import Condition, parse
from runner.transform import Batch, Config, ConfigError, Transform, setting

__all__ = ["Cast", "Drop", "Filter", "Insert", "Mask", "Rename", "Route", "TimestampConverter", "TRANSFORMS"]

_AVRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)


class _Fail(Exception):
    """One record cannot be transformed: the message and the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _map_rows(transform: Transform, batch: Batch, fn: Callable[[dict], dict]) -> Batch:
    """`fn` applied to every row of `batch`. The common case, no failure, is one list
    comprehension; a batch with failures is done again record by record, leaving out
    (and reporting) the records `fn` raised `_Fail` for."""
    rows = batch.rows
    try:
        return batch.derive([fn(row) for row in rows])
    except _Fail:
        pass
    out: list[dict] = []
    kept: list[int] = []
    errors = []
    for i, row in enumerate(rows):
        try:
            out.append(fn(row))
        except _Fail as exc:
            errors.append(transform.record_error(batch, i, exc.message, exc.field))
        else:
            kept.append(i)
    return batch.derive(out, kept=kept, errors=errors)


# -- schema helpers ----------------------------------------------------------------------


def _record_fields(name: str, schema: dict) -> list[dict]:
    if not isinstance(schema, dict) or schema.get("type") not in ("record", "error") or not isinstance(
        schema.get("fields"), list
    ):
        raise ValueError(f"{name}: the topic's schema is not an Avro record")
    return schema["fields"]


def _need(name: str, schema: dict, fields: list[str] | tuple[str, ...] | dict) -> None:
    """ValueError naming the first of `fields` the record schema lacks."""
    present = [f["name"] for f in _record_fields(name, schema)]
    for f in fields:
        if f not in present:
            raise ValueError(
                f"{name}: field {f!r} is not in the record schema (fields: {', '.join(present)})"
            )


def _nullable(avro_type: Any) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


def _retyped(avro_type: Any, target: Any) -> Any:
    """`target` in place of `avro_type`, keeping nullability: ["null", X] → ["null",
    target], [X, "null"] → [target, "null"], X → target."""
    if isinstance(avro_type, list) and "null" in avro_type:
        if avro_type[0] == "null":
            return ["null", target]
        return [target, "null"]
    return target


def _retype_field(field: dict, target: Any, convert_default: Callable[[Any], Any]) -> None:
    field["type"] = _retyped(field["type"], target)
    if "default" in field and field["default"] is not None:
        try:
            field["default"] = convert_default(field["default"])
        except Exception:  # a default that has no value of the new type: no default
            del field["default"]
    elif "default" in field and field["default"] is None and not _nullable(field["type"]):
        del field["default"]


def _names_problems(key: str, names: Any) -> list[tuple[str, str]]:
    bad = [n for n in names if isinstance(n, str) and not _AVRO_NAME.fullmatch(n)]
    return [(key, f"{n!r} is not a valid Avro field name ([A-Za-z_][A-Za-z0-9_]*)") for n in bad]


def _exactly_one(given: dict, a: str, b: str) -> list[tuple[str, str]]:
    has_a, has_b = given.get(a) is not None, given.get(b) is not None
    if has_a and has_b:
        return [(b, f"give `{a}` or `{b}`, not both")]
    if not has_a and not has_b:
        return [("", f"give `{a}` or `{b}`")]
    return []


# -- rename ------------------------------------------------------------------------------


class Rename(Transform):
    name = "rename"
    description = "Rename fields (type, default and doc are kept)."

    class Config(Config):
        fields: dict[str, str] = setting(help="Old name → new name, e.g. {remote_host: client_ip}.")

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            fields = given.get("fields")
            if not isinstance(fields, dict):
                return []
            if not fields:
                return [("fields", "name at least one field to rename")]
            problems = _names_problems("fields", fields.values())
            targets = [t for t in fields.values() if isinstance(t, str)]
            dups = sorted({t for t in targets if targets.count(t) > 1})
            if dups:
                problems.append(("fields", f"two fields renamed to {dups[0]!r}"))
            return problems

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.mapping = dict(config.fields)

    def apply(self, batch: Batch) -> Batch:
        get = self.mapping.get
        return batch.derive([{get(k, k): v for k, v in row.items()} for row in batch.rows])

    def schema(self, schema: dict) -> dict:
        _need(self.name, schema, self.mapping)
        out = copy.deepcopy(schema)
        fields = _record_fields(self.name, out)
        untouched = {f["name"] for f in fields} - set(self.mapping)
        for old, new in self.mapping.items():
            if new in untouched:
                raise ValueError(f"rename: cannot rename {old!r} to {new!r}: the record already has a field {new!r}")
        for f in fields:
            f["name"] = self.mapping.get(f["name"], f["name"])
        return out


# -- drop --------------------------------------------------------------------------------


class Drop(Transform):
    name = "drop"
    description = "Remove fields, or keep only some (`keep`)."

    class Config(Config):
        fields: list[str] | None = setting(None, help="Fields to remove.")
        keep: list[str] | None = setting(None, help="Fields to keep (all others are removed); instead of `fields`.")

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = _exactly_one(given, "fields", "keep")
            for key in ("fields", "keep"):
                if isinstance(given.get(key), list) and not given[key]:
                    problems.append((key, "name at least one field"))
            return problems

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.names = frozenset(config.fields if config.fields is not None else config.keep)
        self.keep = config.keep is not None

    def apply(self, batch: Batch) -> Batch:
        names = self.names
        if self.keep:
            rows = [{k: v for k, v in row.items() if k in names} for row in batch.rows]
        else:
            rows = [{k: v for k, v in row.items() if k not in names} for row in batch.rows]
        return batch.derive(rows)

    def schema(self, schema: dict) -> dict:
        _need(self.name, schema, list(self.config.keep or self.config.fields))
        out = copy.deepcopy(schema)
        fields = _record_fields(self.name, out)
        fields[:] = [f for f in fields if (f["name"] in self.names) == self.keep]
        if not fields:
            raise ValueError("drop: no field of the record is left")
        return out


# -- mask --------------------------------------------------------------------------------


class Mask(Transform):
    name = "mask"
    description = "Mask fields (strings → `with` or a salted SHA-256, numbers → 0, booleans → false)."

    class Config(Config):
        fields: list[str] = setting(help="Fields to mask.")
        replacement: str = setting("****", help="What strings become (written `with:` in a spec).")
        hash: bool = setting(False, help="Replace strings with the hex SHA-256 of salt + value (pseudonymise).")
        salt: str = setting("", help="Prefix hashed with each value (keep it secret).", secret=True)

        @classmethod
        def parse(cls, mapping: dict[str, Any] | None) -> Config:
            # `with` is a Python keyword and cannot name a setting: it is the spec's name of
            # `replacement` (Kafka Connect's), and reported under the name the spec used.
            mapping = dict(mapping or {})
            if "with" not in mapping:
                return super().parse(mapping)
            if "replacement" in mapping:
                raise ConfigError([("with", "give `with` or `replacement`, not both")])
            mapping["replacement"] = mapping.pop("with")
            try:
                return super().parse(mapping)
            except ConfigError as exc:
                raise ConfigError([
                    ("with" if key == "replacement" else key, message.replace("`replacement`", "`with`"))
                    for key, message in exc.problems
                ]) from None

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = []
            if isinstance(given.get("fields"), list) and not given["fields"]:
                problems.append(("fields", "name at least one field to mask"))
            if given.get("hash") is True and given.get("replacement") is not None:
                problems.append(("replacement", "give `with` (a fixed replacement) or `hash: true`, not both"))
            if given.get("salt") and given.get("hash") is not True:
                problems.append(("salt", "a salt is used only with `hash: true`"))
            return problems

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.fields = tuple(dict.fromkeys(config.fields))
        if config.hash:
            salt = config.salt.encode("utf-8")

            def string(value: str) -> str:
                return hashlib.sha256(salt + value.encode("utf-8", "surrogatepass")).hexdigest()
        else:
            replacement = config.replacement

            def string(value: str) -> str:
                return replacement

        self._string = string

    def _mask(self, field: str, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return 0
        if isinstance(value, float):
            return 0.0
        if isinstance(value, decimal.Decimal):
            return decimal.Decimal(0)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return b""
        if isinstance(value, dt.datetime):
            return _EPOCH if value.tzinfo is not None else _EPOCH.replace(tzinfo=None)
        if isinstance(value, dt.date):
            return dt.date(1970, 1, 1)
        if isinstance(value, list):
            return []
        if isinstance(value, dict):
            return {}
        raise _Fail(f"cannot mask a value of type {type(value).__name__}", field)

    def apply(self, batch: Batch) -> Batch:
        fields, mask = self.fields, self._mask

        def one(row: dict) -> dict:
            new = dict(row)
            for f in fields:
                if f in new:
                    new[f] = mask(f, new[f])
            return new

        return _map_rows(self, batch, one)

    def schema(self, schema: dict) -> dict:
        _need(self.name, schema, self.fields)
        return copy.deepcopy(schema)


# -- cast --------------------------------------------------------------------------------

_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_FLOAT_MAX = 3.4028234663852886e38
_TRUE = {"true", "yes", "1", "on", "t", "y"}
_FALSE = {"false", "no", "0", "off", "f", "n"}
_AVRO_TYPE = {"string": "string", "int": "int", "long": "long", "float": "float", "double": "double",
              "boolean": "boolean"}


def _to_int(value: Any, target: str) -> int:
    if isinstance(value, bool):
        result = int(value)
    elif isinstance(value, int):
        result = value
    elif isinstance(value, (float, decimal.Decimal)):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no {target} value")
        result = int(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = int(text)
        except ValueError:
            number = float(text)  # "4.2e1", "3.0"; ValueError for "abc"
            if not math.isfinite(number):
                raise ValueError(f"{value!r} has no {target} value") from None
            result = int(number)
    elif isinstance(value, dt.datetime) and target == "long":
        return _millis(value)
    else:
        raise TypeError(f"cannot cast a {type(value).__name__} to {target}")
    low, high = _INT_RANGE[target]
    if not low <= result <= high:
        raise ValueError(f"{result} is out of the range of {target}")
    return result


def _to_float(value: Any, target: str) -> float:
    if isinstance(value, (bool, int, float, decimal.Decimal)):
        result = float(value)
    elif isinstance(value, str):
        result = float(value.strip())
    else:
        raise TypeError(f"cannot cast a {type(value).__name__} to {target}")
    if target == "float" and math.isfinite(result) and abs(result) > _FLOAT_MAX:
        raise ValueError(f"{value!r} is out of the range of float")
    return result


def _to_string(value: Any, target: str = "string") -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, decimal.Decimal)):
        return str(value)
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    raise TypeError(f"cannot cast a {type(value).__name__} to string")


def _to_boolean(value: Any, target: str = "boolean") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, decimal.Decimal)):
        return value != 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")
    raise TypeError(f"cannot cast a {type(value).__name__} to boolean")


_CASTS: dict[str, Callable[[Any, str], Any]] = {
    "string": _to_string, "int": _to_int, "long": _to_int, "float": _to_float, "double": _to_float,
    "boolean": _to_boolean,
}

CastType = Literal["string", "int", "long", "float", "double", "boolean"]


class Cast(Transform):
    name = "cast"
    description = "Convert fields to string, int, long, float, double or boolean."

    class Config(Config):
        fields: dict[str, CastType] = setting(help="Field → target type, e.g. {status: string, bytes: double}.")

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            if isinstance(given.get("fields"), dict) and not given["fields"]:
                return [("fields", "name at least one field to cast")]
            return []

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.casts = [(f, target, _CASTS[target]) for f, target in config.fields.items()]

    def apply(self, batch: Batch) -> Batch:
        casts = self.casts

        def one(row: dict) -> dict:
            new = dict(row)
            for f, target, convert in casts:
                value = new.get(f)
                if value is None:
                    continue
                try:
                    new[f] = convert(value, target)
                except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
                    raise _Fail(f"field {f!r}: cannot cast {_short(value)} to {target} ({exc})", f) from None
            return new

        return _map_rows(self, batch, one)

    def schema(self, schema: dict) -> dict:
        _need(self.name, schema, self.config.fields)
        out = copy.deepcopy(schema)
        for field in _record_fields(self.name, out):
            target = self.config.fields.get(field["name"])
            if target is not None:
                convert = _CASTS[target]
                _retype_field(field, _AVRO_TYPE[target], lambda v, c=convert, t=target: c(v, t))
        return out


# -- insert ------------------------------------------------------------------------------

_METADATA = {
    "topic": "string",
    "partition": "int",
    "offset": "long",
    "timestamp": {"type": "long", "logicalType": "timestamp-millis"},
}


def _static_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return None


class Insert(Transform):
    name = "insert"
    description = "Add fields: static values, and the record's topic, partition, offset, timestamp (sinks)."

    class Config(Config):
        fields: dict[str, Any] = setting(
            {}, help="Field → static value (a string, integer, number or boolean), e.g. {region: eu-west-1}."
        )
        topic: str | None = setting(None, help="Add the record's topic as this field (null on a source).")
        partition: str | None = setting(None, help="Add the record's partition as this field (null on a source).")
        offset: str | None = setting(None, help="Add the record's offset as this field (null on a source).")
        timestamp: str | None = setting(
            None, help="Add the record's Kafka timestamp as this field (timestamp-millis; null on a source)."
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems: list[tuple[str, str]] = []
            static = given.get("fields") if isinstance(given.get("fields"), dict) else {}
            for key, value in static.items():
                if _static_type(value) is None:
                    what = "null" if value is None else type(value).__name__
                    problems.append((f"fields.{key}", f"expected a string, integer, number or boolean, got {what} "
                                                      "(its Avro type is taken from the value)"))
            problems += _names_problems("fields", [str(k) for k in static])
            names = [str(k) for k in static]
            for meta in _METADATA:
                target = given.get(meta)
                if isinstance(target, str):
                    problems += _names_problems(meta, [target])
                    names.append(target)
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                problems.append(("", f"field {dups[0]!r} is inserted twice"))
            if not names:
                problems.append(("", "give `fields` or one of topic, partition, offset, timestamp"))
            return problems

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.static = dict(config.fields)
        self.meta = {m: getattr(config, m) for m in _METADATA if getattr(config, m) is not None}

    def apply(self, batch: Batch) -> Batch:
        static = self.static
        rows = batch.rows
        if not self.meta:
            return batch.derive([{**row, **static} for row in rows])
        n = len(rows)
        columns: list[tuple[str, list[Any]]] = []
        for meta, field in self.meta.items():
            if meta == "topic":
                values: list[Any] = [batch.topic] * n
            elif meta == "partition":
                values = [batch.partition] * n
            elif meta == "offset":
                values = list(batch.record_offsets) if batch.record_offsets is not None else [None] * n
            else:
                stamps = batch.timestamps
                values = (
                    [None if t is None else _EPOCH + dt.timedelta(milliseconds=t) for t in stamps]
                    if stamps is not None else [None] * n
                )
            columns.append((field, values))
        if len(columns) == 1:
            (field, values), = columns
            return batch.derive([{**row, **static, field: v} for row, v in zip(rows, values)])
        names = [f for f, _ in columns]
        per_row = zip(*(v for _, v in columns))
        return batch.derive([{**row, **static, **dict(zip(names, vs))} for row, vs in zip(rows, per_row)])

    def schema(self, schema: dict) -> dict:
        out = copy.deepcopy(schema)
        fields = _record_fields(self.name, out)
        present = {f["name"] for f in fields}
        for name in [*self.static, *self.meta.values()]:
            if name in present:
                raise ValueError(f"insert: field {name!r} is already in the record schema")
        for name, value in self.static.items():
            fields.append({"name": name, "type": _static_type(value), "default": value})
        for meta, name in self.meta.items():
            fields.append({"name": name, "type": ["null", copy.deepcopy(_METADATA[meta])], "default": None,
                           "doc": f"the record's Kafka {meta} (null before it was written)"})
        return out


# -- timestamp ---------------------------------------------------------------------------


def _millis(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _iso(value: dt.datetime) -> str:
    value = value.astimezone(_UTC) if value.tzinfo is not None else value.replace(tzinfo=_UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TimestampConverter(Transform):
    name = "timestamp"
    description = "Convert a field between timestamp, epoch milliseconds and string."

    class Config(Config):
        field: str = setting(help="The field to convert.")
        to: Literal["string", "millis", "timestamp"] = setting(
            help="string, millis (epoch milliseconds, long) or timestamp (timestamp-millis)."
        )
        format: str | None = setting(
            None, help="strptime/strftime format of the strings read and written (default: ISO 8601)."
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            fmt = given.get("format")
            if isinstance(fmt, str):
                if "%" not in fmt:
                    return [("format", f"{fmt!r} has no %-directive (strftime format, e.g. \"%Y-%m-%d %H:%M:%S\")")]
                try:
                    dt.datetime(2000, 1, 2, 3, 4, 5, tzinfo=_UTC).strftime(fmt)
                except ValueError as exc:
                    return [("format", f"not a valid strftime format: {exc}")]
            return []

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        fmt = config.format

        def parse(value: Any) -> dt.datetime:
            if isinstance(value, dt.datetime):
                return value.astimezone(_UTC) if value.tzinfo is not None else value.replace(tzinfo=_UTC)
            if isinstance(value, bool):
                raise TypeError("a boolean is no timestamp")
            if isinstance(value, (int, float)):
                return _EPOCH + dt.timedelta(milliseconds=value)
            if isinstance(value, str):
                parsed = dt.datetime.strptime(value, fmt) if fmt else dt.datetime.fromisoformat(value.strip())
                return parsed.astimezone(_UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=_UTC)
            if isinstance(value, dt.date):
                return dt.datetime(value.year, value.month, value.day, tzinfo=_UTC)
            raise TypeError(f"a {type(value).__name__} is no timestamp")

        if config.to == "timestamp":
            def convert(value: Any) -> Any:
                return parse(value)
        elif config.to == "millis":
            def convert(value: Any) -> Any:
                return value if type(value) is int else _millis(parse(value))
        else:
            def convert(value: Any) -> Any:
                stamp = parse(value)
                return stamp.strftime(fmt) if fmt else _iso(stamp)

        self.convert = convert

    def apply(self, batch: Batch) -> Batch:
        field, convert, to = self.config.field, self.convert, self.config.to
        fmt = f" with format {self.config.format!r}" if self.config.format else ""

        def one(row: dict) -> dict:
            value = row.get(field)
            if value is None:
                return row if field in row else {**row, field: None}
            try:
                return {**row, field: convert(value)}
            except (ValueError, TypeError, OverflowError) as exc:
                raise _Fail(f"field {field!r}: cannot convert {_short(value)} to {to}{fmt} ({exc})", field) from None

        return _map_rows(self, batch, one)

    def schema(self, schema: dict) -> dict:
        _need(self.name, schema, [self.config.field])
        out = copy.deepcopy(schema)
        target: Any = {"string": "string", "millis": "long"}.get(self.config.to) or {
            "type": "long", "logicalType": "timestamp-millis"}
        for field in _record_fields(self.name, out):
            if field["name"] == self.config.field:
                convert = self.convert
                _retype_field(field, target, lambda v: _millis(r) if isinstance(r := convert(v), dt.datetime) else r)
        return out


# -- filter ------------------------------------------------------------------------------

class Filter(Transform):
    name = "filter"
    description = "Keep or drop records by a condition over their fields (e.g. \"status >= 500\")."

    class Config(Config):
        keep: str | None = setting(None, help="Keep only the records for which this expression is true.")
        drop: str | None = setting(None, help="Drop the records for which this expression is true.")

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = _exactly_one(given, "keep", "drop")
            for key in ("keep", "drop"):
                if isinstance(given.get(key), str):
                    try:
                        parse(given[key])
                    except ValueError as exc:
                        problems.append((key, str(exc)))
            return problems

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.keep = config.keep is not None
        expression = config.keep if self.keep else config.drop
        self.condition = Condition(expression, label=f"{'keep' if self.keep else 'drop'} {expression!r}")
        self.names = self.condition.names

    def apply(self, batch: Batch) -> Batch:
        # A columnar batch stays columns (Arrow kernels where the condition compiles).
        if batch.columnar:
            columns = pa.Table.from_batches([batch.columns])
            mask, failed = self.condition.mask(columns)
            holds = mask.to_pylist()
        else:
            holds, failed = self.condition.rows(batch.rows)
        kept = [i for i, h in enumerate(holds) if h is self.keep and i not in failed]
        errors = [self.record_error(batch, i, message, field) for i, (message, field) in sorted(failed.items())]
        if len(kept) == len(batch):
            return batch
        if batch.columnar:
            picked = columns.take(pa.array(kept, pa.int64())).combine_chunks()
            return batch.derive(columns=picked.to_batches()[0] if picked.num_rows else
                                pa.RecordBatch.from_pylist([], schema=columns.schema), kept=kept, errors=errors)
        rows = batch.rows
        return batch.derive([rows[i] for i in kept], kept=kept, errors=errors)

    def schema(self, schema: dict) -> dict:
        _need(self.name, schema, self.names)  # every name the expression reads is a field
        return copy.deepcopy(schema)


# -- route -------------------------------------------------------------------------------


class Route(Transform):
    name = "route"
    description = "Send records to other topics by the value of a field (sources only)."
    sides = ("source",)

    class Config(Config):
        field: str = setting(help="The field whose value picks the topic.")
        topics: dict[str, str] = setting(
            help="Value → topic, e.g. {POST: writes}; values compare as text, null as the key `null`."
        )
        default: str | None = setting(
            None, help="Topic of the records whose value is not listed (default: the source's topic)."
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            topics = given.get("topics")
            if isinstance(topics, dict):
                if not topics:
                    return [("topics", "give at least one value → topic")]
                return [(f"topics.{k}", "the topic name is empty") for k, v in topics.items() if v == ""]
            return []

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        # YAML's `null:` key arrives as the text "None" (config keys are text).
        self.table = {("null" if k == "None" else k): t for k, t in config.topics.items()}

    def topics(self) -> list[str]:
        targets = [*self.table.values(), *([self.config.default] if self.config.default else [])]
        return list(dict.fromkeys(targets))

    def apply(self, batch: Batch) -> Batch:
        field, table, default = self.config.field, self.table, self.config.default
        rows = batch.rows
        keys = ["null" if (v := row.get(field)) is None else v if type(v) is str else str(v) for row in rows]
        if default is not None or batch.destinations is None:
            destinations = [table.get(k, default) for k in keys]
        else:  # not listed: where an earlier route sent it
            destinations = [table.get(k, d) for k, d in zip(keys, batch.destinations)]
        return batch.derive(rows, destinations=destinations)


TRANSFORMS: list[type[Transform]] = [Rename, Drop, Mask, Cast, Insert, TimestampConverter, Filter, Route]


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        text = "b64:" + base64.b64encode(bytes(value)).decode("ascii")
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"
