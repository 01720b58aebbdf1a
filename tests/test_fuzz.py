"""Random input never raises anything but our own errors: the http_log parser on random
bytes, the spec loader on random text and bytes, Avro decoding of random values."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.http_log.formats import compile_format
from runner.errors import SpecError
from runner.schema.codec import BatchDecoder
from runner.spec import load_spec

SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Pieces of real lines, so random ones get past the first fields often enough.
LOG_PIECES = [b"127.0.0.1", b" ", b"-", b"[10/Oct/2000:13:55:36 -0700]", b'"GET /a HTTP/1.0"', b"200", b"2326",
              b'"', b"\\", b"\\x", b"\\\"", b"\x00", b"\xff", b"\xc3", b"\t", b"\r", b"99999999999999999999", b"[",
              b"]", b"\xe2\x80\xa8", b"\x85", b"\x0b"]


@pytest.mark.parametrize("fmt", ["common", "combined", "vhost_combined", '%h "%{X-Forwarded-For}i" %D %q %U'])
@SETTINGS
@given(chunk=st.lists(st.one_of(st.sampled_from(LOG_PIECES), st.binary(max_size=20)), max_size=60))
def test_http_log_parses_random_bytes_into_records_and_named_errors(fmt: str, chunk: list[bytes]) -> None:
    log_format = compile_format(fmt)
    lines = b"".join(chunk).decode("utf-8", "surrogateescape").split("\n")  # as the source reads them
    for parse in (log_format.parse_lines, log_format.parse_columns):
        rows, errors, kept = parse(lines)
        count = rows.num_rows if hasattr(rows, "num_rows") else len(rows)
        assert count + len(errors) <= len(lines)
        assert all(isinstance(message, str) and message for _, message in errors)


def load(content: bytes, env: dict[str, str]) -> None:
    """Load `content` as a spec; only a SpecError may come out (or a spec)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-spec-") as directory:
        path = Path(directory) / "spec.yaml"
        path.write_bytes(content)
        try:
            load_spec(path, env=env)
        except SpecError as exc:
            assert str(exc)


YAML_PIECES = ["name: x\n", "topics:\n", "  t: {}\n", "sources:\n", "  - ", "{", "}", "[", "]", ": ", "&a ", "*a",
               "<<: *a\n", "!!python/object ", "${", "${X:-", "}", "\n", "  ", "- ", "'", '"', "\\", "#", "? ",
               "|\n", ">-\n", "---\n", "...\n", "%YAML 1.1\n", "\t", "\x00", "\ufeff", "1e999", "0x", "~"]


@SETTINGS
@given(text=st.lists(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=10)), max_size=40))
def test_the_spec_loader_refuses_random_text_with_spec_errors(text: list[str]) -> None:
    load("".join(text).encode("utf-8", "surrogatepass"), {"X": "1"})  # (random pieces may make a valid spec)


@SETTINGS
@given(content=st.binary(max_size=300))
def test_the_spec_loader_refuses_random_bytes_with_spec_errors(content: bytes) -> None:
    load(content, {})


SCHEMA = {"type": "record", "name": "R", "fields": [
    {"name": "s", "type": "string"},
    {"name": "n", "type": ["null", "long"]},
    {"name": "m", "type": {"type": "map", "values": "double"}},
    {"name": "a", "type": {"type": "array", "items": "bytes"}},
    {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
]}


def frame(schema_id: int, body: bytes) -> bytes:
    return struct.pack(">bI", 0, schema_id) + body


@SETTINGS
@given(values=st.lists(st.one_of(
    st.binary(max_size=40),  # anything
    st.builds(frame, st.sampled_from([1, 2, 99]), st.binary(max_size=40)),  # framed, random body
), min_size=1, max_size=20))
def test_avro_decoding_of_random_values_gives_a_failure_per_bad_value(values: list[bytes]) -> None:
    """Schema id 1 is the reader's schema, 2 another one, 99 unknown."""
    other = {"type": "record", "name": "R", "fields": [{"name": "s", "type": "string"}]}
    known = {1: json.dumps(SCHEMA), 2: json.dumps(other)}

    def lookup(schema_id: int) -> str:
        if schema_id not in known:
            raise KeyError(f"schema id {schema_id} is unknown")
        return known[schema_id]

    columns, rows, failures = BatchDecoder(lookup, SCHEMA).decode(values)
    if columns is not None:
        assert columns.num_rows == len(values) and not failures
        return
    assert rows is not None and len(rows) == len(values)
    bad = {f.index for f in failures}
    assert bad == {i for i, row in enumerate(rows) if row is None}
    assert all(isinstance(f.error, str) and f.error for f in failures)
