"""The embedded schema registry: Confluent semantics in a SQLite file."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from runner.errors import FatalError
from runner.schema import (
    DEFAULT_COMPATIBILITY,
    IncompatibleSchemaError,
    InvalidSchemaError,
    SchemaNotFoundError,
    SchemaRegistry,
)

SUBJECT = "activity-value"


def record(*fields: dict[str, Any], name: str = "Activity") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "test", "fields": list(fields)}


A = {"name": "a", "type": "int"}
B_DEFAULT = {"name": "b", "type": "string", "default": ""}
B_REQUIRED = {"name": "b", "type": "string"}
C_REQUIRED = {"name": "c", "type": "long"}


@pytest.fixture
def registry(tmp_path: Path):
    reg = SchemaRegistry(tmp_path / "state" / "schemas.db")
    yield reg
    reg.close()


# -- ids, versions, identity ------------------------------------------------------------


def test_creates_parent_dir_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "schemas.db"
    with SchemaRegistry(path):
        pass
    assert path.exists()
    (mode,) = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_versions_and_global_ids(registry: SchemaRegistry) -> None:
    id1 = registry.register(SUBJECT, record(A))
    id2 = registry.register(SUBJECT, record(A, B_DEFAULT))
    other = registry.register("other-value", record(C_REQUIRED, name="Other"))
    assert (id1, id2, other) == (1, 2, 3)
    assert registry.versions(SUBJECT) == [1, 2]
    assert registry.versions("other-value") == [1]
    assert registry.versions("nope") == []
    assert registry.subjects() == [SUBJECT, "other-value"]
    latest = registry.get(SUBJECT)
    assert (latest.subject, latest.version, latest.id) == (SUBJECT, 2, id2)
    assert registry.get(SUBJECT, 1).id == id1
    assert registry.get(SUBJECT, "latest") == latest
    assert json.loads(registry.schema_by_id(id1))["fields"] == [A]


def test_identical_schema_is_idempotent(registry: SchemaRegistry) -> None:
    schema = record(A, B_DEFAULT)
    first = registry.register(SUBJECT, schema)
    # Same schema, different text: whitespace, key order, {"type": "int"}, dotted name.
    same = {
        "fields": [{"type": {"type": "int"}, "name": "a"}, {"default": "", "name": "b", "type": "string"}],
        "name": "test.Activity",
        "type": "record",
    }
    assert registry.register(SUBJECT, json.dumps(same, indent=4)) == first
    assert registry.register(SUBJECT, json.dumps(schema)) == first
    assert registry.versions(SUBJECT) == [1]


def test_re_registering_an_older_version_returns_its_id(registry: SchemaRegistry) -> None:
    v1 = registry.register(SUBJECT, record(A))
    registry.register(SUBJECT, record(A, B_DEFAULT))
    assert registry.register(SUBJECT, record(A)) == v1
    assert registry.versions(SUBJECT) == [1, 2]


def test_same_schema_under_two_subjects_shares_the_id(registry: SchemaRegistry) -> None:
    id1 = registry.register("a-value", record(A))
    registry.register("x-value", record(C_REQUIRED, name="X"))
    id2 = registry.register("b-value", record(A))
    assert id1 == id2
    assert registry.get("b-value").version == 1


def test_defaults_and_logical_types_are_part_of_identity(registry: SchemaRegistry) -> None:
    # Parsing Canonical Form would call these identical; they are not.
    plain = registry.register("t1", record({"name": "ts", "type": "long"}))
    logical = registry.register(
        "t2", record({"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}})
    )
    with_default = registry.register("t3", record({"name": "ts", "type": "long", "default": 0}))
    assert len({plain, logical, with_default}) == 3
    assert "timestamp-millis" in registry.schema_by_id(logical)


def test_unknown_id_subject_version(registry: SchemaRegistry) -> None:
    registry.register(SUBJECT, record(A))
    with pytest.raises(SchemaNotFoundError, match="no schema with id 99"):
        registry.schema_by_id(99)
    with pytest.raises(SchemaNotFoundError, match="no subject 'missing'"):
        registry.get("missing")
    with pytest.raises(SchemaNotFoundError, match="has no version 5"):
        registry.get(SUBJECT, 5)
    assert issubclass(SchemaNotFoundError, FatalError)


@pytest.mark.parametrize(
    "schema, reason",
    [
        ("{not json", "not JSON"),
        (record({"name": "a", "type": "nope"}), "nope"),
        ({"type": "record", "fields": []}, "name"),
        (record({"name": "a", "type": "int", "default": "x"}), "Default value"),
    ],
)
def test_invalid_schema(registry: SchemaRegistry, schema: Any, reason: str) -> None:
    with pytest.raises(InvalidSchemaError, match=reason) as info:
        registry.register(SUBJECT, schema)
    assert isinstance(info.value, FatalError)
    assert registry.subjects() == []


def test_non_record_schemas_are_allowed(registry: SchemaRegistry) -> None:
    assert registry.register("key", '"string"') == registry.register("key", {"type": "string"})


# -- compatibility --------------------------------------------------------------------------


def test_default_mode(registry: SchemaRegistry) -> None:
    assert DEFAULT_COMPATIBILITY == "BACKWARD"
    assert registry.compatibility() == "BACKWARD"
    assert registry.compatibility(SUBJECT) == "BACKWARD"


def test_backward_refuses_a_new_field_without_default(registry: SchemaRegistry) -> None:
    registry.register(SUBJECT, record(A))
    with pytest.raises(IncompatibleSchemaError) as info:
        registry.register(SUBJECT, record(A, B_REQUIRED))
    err = info.value
    message = str(err)
    assert SUBJECT in message
    assert "version 1" in message
    assert "BACKWARD" in message
    assert "reader field 'b' has no default value and is missing in writer at /fields/1" in message
    assert "default" in (err.hint or "")
    assert "compatibility mode" in (err.hint or "")
    assert (err.subject, err.version, err.mode) == (SUBJECT, 1, "BACKWARD")
    assert isinstance(err, FatalError)
    assert registry.versions(SUBJECT) == [1]  # nothing registered


def test_backward_allows_a_new_field_with_default(registry: SchemaRegistry) -> None:
    registry.register(SUBJECT, record(A))
    assert registry.check(SUBJECT, record(A, B_DEFAULT)) == []
    registry.register(SUBJECT, record(A, B_DEFAULT))
    assert registry.versions(SUBJECT) == [1, 2]


def test_reasons_name_nested_fields_and_type_changes(registry: SchemaRegistry) -> None:
    inner_v1 = {"type": "record", "name": "Req", "fields": [{"name": "path", "type": "string"}]}
    inner_v2 = {
        "type": "record",
        "name": "Req",
        "fields": [{"name": "path", "type": "string"}, {"name": "q", "type": "int"}],
    }
    registry.register(SUBJECT, record(A, {"name": "request", "type": inner_v1}))
    reasons = registry.check(
        SUBJECT, record({"name": "a", "type": "string"}, {"name": "request", "type": inner_v2})
    )
    text = "\n".join(reasons)
    assert "reader field 'request.q' has no default value and is missing in writer at /fields/1/type/fields/1" in text
    assert "reader type: string not compatible with writer type: int at /fields/0/type (field 'a')" in text


def test_same_field_name_missing_at_two_depths(registry: SchemaRegistry) -> None:
    inner = {"type": "record", "name": "In", "fields": [{"name": "x", "type": "int"}]}
    inner_new = {**inner, "fields": [*inner["fields"], {"name": "id", "type": "int"}]}
    registry.register(SUBJECT, record(A, {"name": "in", "type": inner}))
    reasons = registry.check(SUBJECT, record(A, {"name": "in", "type": inner_new}, {"name": "id", "type": "int"}))
    assert len(reasons) == 2
    assert any("reader field 'in.id'" in r for r in reasons)
    assert any("reader field 'id'" in r for r in reasons)


def test_backward_allows_widening_refuses_narrowing(registry: SchemaRegistry) -> None:
    registry.register(SUBJECT, record(A))
    assert registry.check(SUBJECT, record({"name": "a", "type": "long"})) == []
    registry.register("narrow", record({"name": "a", "type": "long"}))
    (reason,) = registry.check("narrow", record(A))  # an int reader cannot read longs
    assert "reader type: int not compatible with writer type: long" in reason


def test_forward(registry: SchemaRegistry) -> None:
    registry.set_compatibility("FORWARD", SUBJECT)
    registry.register(SUBJECT, record(A, C_REQUIRED))
    # Adding a field without default is fine: old readers ignore it.
    assert registry.check(SUBJECT, record(A, C_REQUIRED, B_REQUIRED)) == []
    # Removing a field old readers need (no default) is not.
    with pytest.raises(IncompatibleSchemaError, match="FORWARD") as info:
        registry.register(SUBJECT, record(A))
    assert "reader field 'c' has no default value" in str(info.value)
    assert "version 1 reading new schema data" in str(info.value)
    assert "keep the field" in (info.value.hint or "")


def test_full(registry: SchemaRegistry) -> None:
    registry.set_compatibility("FULL", SUBJECT)
    registry.register(SUBJECT, record(A))
    assert registry.check(SUBJECT, record(A, B_REQUIRED))  # not backward
    registry.register(SUBJECT, record(A, B_DEFAULT))  # both ways
    assert registry.check(SUBJECT, record(A, B_DEFAULT, C_REQUIRED))
    # Removing b needs b's default on the old (reader) side: present, so fine both ways.
    assert registry.check(SUBJECT, record(A)) == []


def test_none_allows_anything(registry: SchemaRegistry) -> None:
    registry.set_compatibility("NONE", SUBJECT)
    registry.register(SUBJECT, record(A))
    registry.register(SUBJECT, record({"name": "a", "type": "string"}, B_REQUIRED))
    assert registry.versions(SUBJECT) == [1, 2]


def test_transitive_checks_every_version(registry: SchemaRegistry) -> None:
    v1 = record(A)
    v2 = record(A, B_DEFAULT)
    v3 = record(A, B_REQUIRED)  # can read v2 data (b present), not v1 data (b absent)
    for subject, mode in (("plain", "BACKWARD"), ("trans", "BACKWARD_TRANSITIVE")):
        registry.set_compatibility(mode, subject)
        registry.register(subject, v1)
        registry.register(subject, v2)
    registry.register("plain", v3)
    assert registry.versions("plain") == [1, 2, 3]
    with pytest.raises(IncompatibleSchemaError) as info:
        registry.register("trans", v3)
    assert info.value.version == 1
    assert "BACKWARD_TRANSITIVE" in str(info.value)
    assert "version 1" in str(info.value) and "version 2" not in str(info.value)


def test_forward_and_full_transitive(registry: SchemaRegistry) -> None:
    v1 = record(A, C_REQUIRED)
    v2 = record(A, {"name": "c", "type": "long", "default": 0})
    v3 = record(A)  # v2 readers have c's default; v1 readers do not
    for mode in ("FORWARD", "FULL"):
        for suffix, transitive in (("", False), ("_TRANSITIVE", True)):
            subject = f"{mode}{suffix}".lower()
            registry.set_compatibility(mode + suffix, subject)
            registry.register(subject, v1)
            registry.register(subject, v2)
            assert bool(registry.check(subject, v3)) is transitive, subject


def test_subject_mode_overrides_global(registry: SchemaRegistry) -> None:
    registry.set_compatibility("none")
    assert registry.compatibility() == "NONE"
    assert registry.compatibility(SUBJECT) == "NONE"
    registry.set_compatibility("FULL", SUBJECT)
    assert registry.compatibility(SUBJECT) == "FULL"
    assert registry.compatibility("other") == "NONE"
    with pytest.raises(FatalError, match="unknown compatibility mode"):
        registry.set_compatibility("SIDEWAYS")


def test_check_does_not_register(registry: SchemaRegistry) -> None:
    assert registry.check(SUBJECT, record(A)) == []  # a new subject takes anything
    assert registry.subjects() == []
    registry.register(SUBJECT, record(A))
    assert registry.check(SUBJECT, record(A)) == []
    reasons = registry.check(SUBJECT, record(A, B_REQUIRED))
    assert len(reasons) == 1 and "reader field 'b'" in reasons[0]
    assert registry.versions(SUBJECT) == [1]


# -- persistence and concurrency ---------------------------------------------------------------


def test_persisted_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "schemas.db"
    with SchemaRegistry(path) as reg:
        id1 = reg.register(SUBJECT, record(A))
        id2 = reg.register(SUBJECT, record(A, B_DEFAULT))
        reg.set_compatibility("FULL_TRANSITIVE", SUBJECT)
        reg.set_compatibility("FORWARD")
    with SchemaRegistry(path) as reg:
        assert reg.versions(SUBJECT) == [1, 2]
        assert reg.get(SUBJECT).id == id2
        assert json.loads(reg.schema_by_id(id1))["fields"] == [A]
        assert reg.compatibility(SUBJECT) == "FULL_TRANSITIVE"
        assert reg.compatibility() == "FORWARD"
        assert reg.register(SUBJECT, record(A)) == id1  # still idempotent
        with pytest.raises(IncompatibleSchemaError, match="FULL_TRANSITIVE"):
            reg.register(SUBJECT, record(A, B_DEFAULT, C_REQUIRED))
        assert reg.register("new", record(C_REQUIRED)) == id2 + 1


def test_reads_while_another_connection_writes(tmp_path: Path) -> None:
    path = tmp_path / "schemas.db"
    with SchemaRegistry(path) as writer, SchemaRegistry(path) as reader:
        schema_id = writer.register(SUBJECT, record(A))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock, as a registering process would
        blocker.execute("INSERT INTO config (subject, compatibility) VALUES ('x', 'NONE')")
        try:
            assert reader.get(SUBJECT).id == schema_id
            assert reader.schema_by_id(schema_id)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


def test_second_process_reads(tmp_path: Path) -> None:
    path = tmp_path / "schemas.db"
    with SchemaRegistry(path) as reg:
        schema_id = reg.register(SUBJECT, record(A))
        code = (
            "import sys, json; from pathlib import Path; "
            "from runner.schema import SchemaRegistry; "
            f"r = SchemaRegistry(Path({str(path)!r})); "
            f"print(json.dumps([r.get({SUBJECT!r}).id, r.versions({SUBJECT!r})]))"
        )
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=root,
            env={"PYTHONPATH": str(root)},
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == [schema_id, [1]]


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    path = tmp_path / "schemas.db"
    regs = [SchemaRegistry(path) for _ in range(4)]
    regs[0].set_compatibility("NONE")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                regs[n].register(SUBJECT, record({"name": f"f{n}_{i}", "type": "int"}))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert regs[0].versions(SUBJECT) == list(range(1, 21))
    ids = {regs[0].get(SUBJECT, v).id for v in range(1, 21)}
    assert ids == set(range(1, 21))
    for reg in regs:
        reg.close()
