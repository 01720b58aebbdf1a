"""Values shaped by the topic's Avro schema: CSV cells (text) converted per field type, and
the few JSON / Parquet values Avro cannot take as they are (a timestamp written as an ISO
string, a decimal as a number) fitted.

`plan_for(schema)` walks the schema once and gives one `FieldPlan` per top-level field;
the readers then run a plain loop over the plans for each record. Conversion failures
raise `Bad` with the part of the message after the column name, e.g.
`'abc' is not a double`.

Text rules (CSV cells; also JSON / Parquet strings in fields that are not strings):

| Avro type | accepted text |
|---|---|
| null, or a union with null | an empty cell is null (whitespace only, for non-string types) |
| boolean | true/false, 1/0, yes/no (any case) |
| int, long | an optional sign and digits; range-checked (32-bit, 64-bit) |
| float, double | a decimal or exponent number, nan, inf; float range-checked |
| string | the cell as it is |
| bytes, fixed | the cell encoded as UTF-8 (fixed: exactly `size` bytes) |
| enum | one of the symbols |
| timestamp-millis / -micros | ISO 8601 (`2024-05-01T12:00:00Z`, `2024-05-01 12:00:00.123+02:00`, a date); without an offset it is UTC; or an integer: milli/microseconds since the epoch. Gives a UTC-aware datetime |
| local-timestamp-millis / -micros | ISO 8601; the wall-clock time as written (offset dropped) |
| date | ISO 8601 date (`2024-05-01`) |
| time-millis / -micros | ISO 8601 time (`12:30:00.250`) |
| decimal | a decimal number with at most `scale` decimal places and `precision` digits |
| uuid (string) | a UUID in any form `uuid.UUID` accepts, written in canonical form |
| array, map, record | JSON |
| union of several types | each non-null branch in turn, the first that accepts the text |

An empty cell in a field that is not nullable is an empty string for string, bytes and
(if allowed) enum types, the field's default if it has one, else an error.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Bad", "FieldPlan", "OMIT", "plan_for"]

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = dt.datetime(1970, 1, 1)
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_MAX = 3.4028234663852886e38
_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}

#: A value for a field that is left out of the record, so that the encoder applies the
#: field's Avro default.
OMIT: Any = object()
_NO_EMPTY = object()


class Bad(ValueError):
    """A value that cannot become the field's type; the message reads after the column
    name: `'abc' is not a double`."""


@dataclass
class FieldPlan:
    name: str
    names: tuple[str, ...]  # the name and its aliases (CSV header cells matched against)
    nullable: bool
    has_default: bool
    #: text -> value (CSV). Handles empty text per the rules above.
    from_text: Callable[[str], Any]
    #: JSON / Parquet value -> value, or None when values of this field are taken as they are.
    fit: Callable[[Any], Any] | None
    type_label: str = ""


def plan_for(schema: dict[str, Any] | None) -> list[FieldPlan] | None:
    """One plan per top-level field of a record schema; None without a schema (values are
    then taken as they are: CSV cells stay strings)."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    names: dict[str, Any] = {}
    _collect_names(schema, schema.get("namespace"), names)
    plans = []
    for f in schema.get("fields", []):
        plans.append(_field_plan(f, names))
    return plans


# -- schema walking ---------------------------------------------------------------------------


def _collect_names(t: Any, namespace: str | None, names: dict[str, Any]) -> None:
    if isinstance(t, list):
        for b in t:
            _collect_names(b, namespace, names)
        return
    if not isinstance(t, dict):
        return
    kind = t.get("type")
    if kind in ("record", "error", "enum", "fixed") and "name" in t:
        name = t["name"]
        ns = t.get("namespace", namespace)
        full = name if "." in name or not ns else f"{ns}.{name}"
        names[name] = names[full] = t
        namespace = full.rpartition(".")[0] or None
    if kind in ("record", "error"):
        for f in t.get("fields", []):
            _collect_names(f.get("type"), namespace, names)
    elif kind == "array":
        _collect_names(t.get("items"), namespace, names)
    elif kind == "map":
        _collect_names(t.get("values"), namespace, names)
    elif isinstance(kind, (dict, list)):
        _collect_names(kind, namespace, names)


def _resolve(t: Any, names: dict[str, Any]) -> dict[str, Any]:
    """A type as a dict with at least "type" (named references looked up)."""
    if isinstance(t, str):
        if t in _PRIMITIVES:
            return {"type": t}
        if t in names:
            return names[t]
        raise ValueError(f"unknown Avro type {t!r}")
    if isinstance(t, dict):
        kind = t.get("type")
        if isinstance(kind, dict):  # {"type": {"type": "long", ...}}
            return _resolve(kind, names)
        if isinstance(kind, str) and kind in names and kind not in _COMPLEX:
            return names[kind]
        return t
    raise ValueError(f"unsupported Avro type {t!r}")


_COMPLEX = {"record", "error", "enum", "fixed", "array", "map"}


def _field_plan(f: dict[str, Any], names: dict[str, Any]) -> FieldPlan:
    t = f["type"]
    branches = t if isinstance(t, list) else [t]
    resolved = [_resolve(b, names) for b in branches]
    nullable = any(r.get("type") == "null" for r in resolved)
    typed = [r for r in resolved if r.get("type") != "null"]
    converters = [_text_converter(r) for r in typed]
    labels = [label for label, _, _ in converters]
    label = " or ".join(labels) if labels else "null"
    has_default = "default" in f
    stringish = [r for r in typed if r.get("type") in ("string", "bytes") and "logicalType" not in r]
    empty_value: Any
    if nullable:
        empty_value = None
    elif stringish:
        empty_value = "" if stringish[0]["type"] == "string" else b""
    elif has_default:
        empty_value = OMIT
    else:
        empty_value = _NO_EMPTY

    text_fns = [fn for _, fn, _ in converters]
    takes_any_text = any(r.get("type") in ("string",) for r in typed)

    if len(text_fns) == 1:
        one = text_fns[0]

        def convert_one(s: str) -> Any:
            return one(s)

        convert = convert_one
    elif text_fns:

        def convert_any(s: str) -> Any:
            for fn in text_fns:
                try:
                    return fn(s)
                except (Bad, ValueError, ArithmeticError):
                    continue
            raise Bad(f"{_show(s)} is not {label}")

        convert = convert_any
    else:

        def convert_null(s: str) -> Any:
            raise Bad(f"{_show(s)} is not null (the field only holds null)")

        convert = convert_null

    strip_empty = not takes_any_text

    def from_text(s: str) -> Any:
        if s == "" or (strip_empty and not s.strip()):
            if empty_value is _NO_EMPTY:
                raise Bad(f"empty, but the field is {label} (not nullable, no default)")
            return empty_value
        return convert(s)

    fit = _fitter(typed, convert)
    return FieldPlan(
        name=f["name"],
        names=(f["name"], *f.get("aliases", ())),
        nullable=nullable,
        has_default=has_default,
        from_text=from_text,
        fit=fit,
        type_label=label,
    )


def _show(s: str, limit: int = 60) -> str:
    return repr(s) if len(s) <= limit else repr(s[:limit]) + "…"


# -- text converters per Avro type ------------------------------------------------------------


def _text_converter(t: dict[str, Any]) -> tuple[str, Callable[[str], Any], str]:
    """(label, text -> value, kind)"""
    kind = t.get("type")
    logical = t.get("logicalType")
    if logical in ("timestamp-millis", "timestamp-micros") and kind == "long":
        unit = 1000 if logical == "timestamp-millis" else 1
        return "a timestamp (ISO 8601)", lambda s: _timestamp(s, unit), "timestamp"
    if logical in ("local-timestamp-millis", "local-timestamp-micros") and kind == "long":
        return "a local timestamp (ISO 8601)", _local_timestamp, "local-timestamp"
    if logical == "date" and kind == "int":
        return "a date (ISO 8601, YYYY-MM-DD)", _date, "date"
    if logical in ("time-millis", "time-micros") and kind in ("int", "long"):
        return "a time (ISO 8601, HH:MM:SS)", _time, "time"
    if logical == "decimal" and kind in ("bytes", "fixed"):
        precision = int(t.get("precision", 38))
        scale = int(t.get("scale", 0))
        return (
            f"a decimal({precision},{scale})",
            lambda s: _decimal(s, precision, scale),
            "decimal",
        )
    if logical == "uuid" and kind == "string":
        return "a UUID", _uuid, "uuid"
    if kind == "boolean":
        return "a boolean (true/false, 1/0, yes/no)", _boolean, kind
    if kind in ("int", "long"):
        low, high = _RANGES[kind]
        return f"an {kind}" if kind == "int" else "a long", lambda s: _integer(s, kind, low, high), kind
    if kind == "float":
        return "a float", lambda s: _float(s, True), kind
    if kind == "double":
        return "a double", lambda s: _float(s, False), kind
    if kind == "string":
        return "a string", str, kind
    if kind == "bytes":
        return "bytes", _bytes, kind
    if kind == "fixed":
        size = int(t["size"])
        return f"{size} bytes", lambda s: _fixed(s, size), kind
    if kind == "enum":
        symbols = list(t.get("symbols", []))
        known = frozenset(symbols)

        def enum(s: str) -> str:
            if s in known:
                return s
            raise Bad(f"{_show(s)} is not one of {', '.join(symbols)}")

        return f"one of {', '.join(symbols)}", enum, kind
    if kind in ("array", "map", "record", "error"):
        what = {"array": "a JSON array", "map": "a JSON object", "record": "a JSON object", "error": "a JSON object"}[kind]
        return what, lambda s: _json(s, what), kind
    raise ValueError(f"unsupported Avro type {t!r}")


def _boolean(s: str) -> bool:
    low = s.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise Bad(f"{_show(s)} is not a boolean (true/false, 1/0, yes/no)")


def _integer(s: str, kind: str, low: int, high: int) -> int:
    text = s.strip()
    if not _INT_TEXT.fullmatch(text):
        raise Bad(f"{_show(s)} is not {'an int' if kind == 'int' else 'a long'}")
    n = int(text)
    if not low <= n <= high:
        raise Bad(f"{_show(s)} is out of range for {'an int' if kind == 'int' else 'a long'} ({low}..{high})")
    return n


def _float(s: str, single: bool) -> float:
    text = s.strip()
    try:
        if "_" in text:
            raise ValueError
        x = float(text)
    except ValueError:
        raise Bad(f"{_show(s)} is not {'a float' if single else 'a double'}") from None
    if single and math.isfinite(x) and abs(x) > _FLOAT_MAX:
        raise Bad(f"{_show(s)} is out of range for a float")
    return x


def _bytes(s: str) -> bytes:
    return s.encode("utf-8")


def _fixed(s: str, size: int) -> bytes:
    b = s.encode("utf-8")
    if len(b) != size:
        raise Bad(f"{_show(s)} is {len(b)} bytes, the fixed type holds {size}")
    return b


def _json(s: str, what: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        raise Bad(f"{_show(s)} is not {what}") from None


def _timestamp(s: str, unit_us: int) -> dt.datetime:
    text = s.strip()
    if _INT_TEXT.fullmatch(text):  # an epoch number in the field's unit
        try:
            return _EPOCH + dt.timedelta(microseconds=int(text) * unit_us)
        except OverflowError:
            raise Bad(f"{_show(s)} is out of range for a timestamp") from None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise Bad(f"{_show(s)} is not a timestamp (ISO 8601)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _local_timestamp(s: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(s.strip()).replace(tzinfo=None)
    except ValueError:
        raise Bad(f"{_show(s)} is not a local timestamp (ISO 8601)") from None


def _date(s: str) -> dt.date:
    try:
        return dt.date.fromisoformat(s.strip())
    except ValueError:
        raise Bad(f"{_show(s)} is not a date (ISO 8601, YYYY-MM-DD)") from None


def _time(s: str) -> dt.time:
    try:
        t = dt.time.fromisoformat(s.strip())
    except ValueError:
        raise Bad(f"{_show(s)} is not a time (ISO 8601, HH:MM:SS)") from None
    return t.replace(tzinfo=None)


def _decimal(s: str, precision: int, scale: int) -> decimal.Decimal:
    try:
        d = decimal.Decimal(s.strip())
    except (decimal.InvalidOperation, ValueError):
        raise Bad(f"{_show(s)} is not a decimal") from None
    if not d.is_finite():
        raise Bad(f"{_show(s)} is not a decimal")
    try:
        # At most `precision` digits once written with `scale` decimal places.
        q = d.quantize(decimal.Decimal(1).scaleb(-scale), context=decimal.Context(prec=max(precision, 1)))
    except decimal.InvalidOperation:
        raise Bad(f"{_show(s)} has more than {precision} digits (decimal({precision},{scale}))") from None
    if q != d:
        raise Bad(f"{_show(s)} has more than {scale} decimal places (decimal({precision},{scale}))")
    return q


def _uuid(s: str) -> str:
    try:
        return str(uuid.UUID(s.strip()))
    except ValueError:
        raise Bad(f"{_show(s)} is not a UUID") from None


# -- fitting JSON / Parquet values ------------------------------------------------------------


def _fitter(typed: list[dict[str, Any]], convert: Callable[[str], Any]) -> Callable[[Any], Any] | None:
    """A value -> value function for fields whose JSON / Parquet values may need work, or
    None when they are taken as they are (the encoder then checks them)."""
    kinds = set()
    for r in typed:
        logical = r.get("logicalType")
        kind = r.get("type")
        if logical in ("timestamp-millis", "timestamp-micros", "local-timestamp-millis", "local-timestamp-micros"):
            kinds.add("timestamp" if logical.startswith("timestamp") else "local")
        elif logical in ("date", "time-millis", "time-micros", "decimal"):
            kinds.add(logical.split("-")[0])
        elif kind in ("bytes", "fixed"):
            kinds.add("bytes")
        elif kind in ("string", "enum"):
            kinds.add("string")
    if not kinds - {"string"}:
        return None
    keeps_strings = "string" in kinds
    aware = "timestamp" in kinds
    decimals = "decimal" in kinds
    decimal_spec = next(
        ((int(r.get("precision", 38)), int(r.get("scale", 0))) for r in typed if r.get("logicalType") == "decimal"),
        None,
    )

    def fit(v: Any) -> Any:
        if v is None:
            return v
        if type(v) is str:
            return v if keeps_strings else convert(v)
        if aware and type(v) is dt.datetime and v.tzinfo is None:
            return v.replace(tzinfo=UTC)
        if decimals and type(v) in (int, float, decimal.Decimal):
            assert decimal_spec is not None
            return _decimal(repr(v) if type(v) is float else str(v), *decimal_spec)
        return v

    return fit
