"""The `sqlite` sink: the conformance checks of `runner.testing`, upserts by key, resuming
from the offsets kept in the database, and the Avro → SQLite type mapping."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import sqlite3
from pathlib import Path

import pytest

from pipeline_sqlite import SqliteSink
from runner.batch import Batch
from runner.connector import ConnectorContext, FatalError, TopicPartition
from runner.testing import check_sink

ORDER = {
    "type": "record",
    "name": "OrderUpdate",
    "fields": [
        {"name": "order_id", "type": "long"},
        {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["created", "paid", "shipped"]}},
        {"name": "amount", "type": "double"},
        {"name": "updated_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
T0 = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.timezone.utc)


def user_tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute(
            "select name from sqlite_master where type = 'table' and name not like '\\_pipeline%' escape '\\'")]


def select(path: Path, sql: str, *args) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def run(coro):
    return asyncio.run(coro)


def sink(tmp_path: Path, schemas: dict | None = None, **config) -> SqliteSink:
    schemas = schemas or {"orders": ORDER}
    config = {"path": "out/orders.db", "key": ["order_id"], **config}
    context = ConnectorContext(
        name="orders-db", pipeline="test", spec_dir=tmp_path, state_dir=tmp_path / "state",
        topics=tuple(schemas), schemas=schemas, partitions={t: 2 for t in schemas},
    )
    return SqliteSink(SqliteSink.Config.parse(config), context)


def update(order_id: int, status: str, minutes: int = 0, **extra) -> dict:
    return {"order_id": order_id, "status": status, "amount": 10.0 * order_id,
            "updated_at": T0 + dt.timedelta(minutes=minutes), "note": None, **extra}


def batch(rows: list[dict], partition: int = 0, first: int = 0, topic: str = "orders") -> Batch:
    return Batch(rows, topic=topic, partition=partition, record_offsets=list(range(first, first + len(rows))))


TP0, TP1 = TopicPartition("orders", 0), TopicPartition("orders", 1)


# --- conformance --------------------------------------------------------------------------


def test_conformance(tmp_path: Path) -> None:
    db = tmp_path / "conformance.db"

    def read() -> list[dict]:
        if not db.exists():
            return []
        return [row for table in user_tables(db) for row in select(db, f'select * from "{table}"')]

    check_sink(SqliteSink, {"path": str(db), "key": ["id"]}, read=read, tmp_path=tmp_path)


def test_conformance_with_timestamps_and_a_relative_path(tmp_path: Path) -> None:
    schema = {"type": "record", "name": "Event", "fields": [
        {"name": "id", "type": "long"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ok", "type": "boolean"},
        {"name": "tag", "type": ["null", "string"], "default": None},
    ]}
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def make(n: int) -> dict:
        return {"id": n, "at": base + dt.timedelta(seconds=n), "ok": n % 2 == 0, "tag": None if n % 3 else f"t{n}"}

    def read() -> list[dict]:
        found = list(tmp_path.rglob("events.db"))
        if not found:
            return []
        rows = [row for table in user_tables(found[0]) for row in select(found[0], f'select * from "{table}"')]
        # Back to the record's Python values, as the conformance check compares them.
        return [{**r, "at": dt.datetime.fromisoformat(r["at"]), "ok": bool(r["ok"])} for r in rows]

    check_sink(SqliteSink, {"path": "events.db", "key": ["id"]}, read=read, schema=schema, make_record=make,
               tmp_path=tmp_path)


# --- upserts and offsets ------------------------------------------------------------------------


def test_upserts_keep_the_latest_version_of_each_key(tmp_path: Path) -> None:
    async def go() -> None:
        task = sink(tmp_path).task()
        assert await task.open([TP0, TP1]) == {TP0: 0, TP1: 0}
        await task.put(batch([update(1, "created"), update(3, "created", 1), update(1, "paid", 2)], 0))
        await task.put(batch([update(2, "created"), update(2, "paid", 1)], 1))
        await task.flush()
        await task.put(batch([update(1, "shipped", 5), update(3, "paid", 6)], 0, first=3))
        await task.put(batch([update(4, "created", 7)], 1, first=2))
        await task.flush()
        await task.close()

    run(go())
    rows = select(tmp_path / "out" / "orders.db", "select order_id, status, updated_at from orders order by order_id")
    assert rows == [
        {"order_id": 1, "status": "shipped", "updated_at": "2026-11-20T08:05:00.000Z"},
        {"order_id": 2, "status": "paid", "updated_at": "2026-11-20T08:01:00.000Z"},
        {"order_id": 3, "status": "paid", "updated_at": "2026-11-20T08:06:00.000Z"},
        {"order_id": 4, "status": "created", "updated_at": "2026-11-20T08:07:00.000Z"},
    ]
    offsets = select(tmp_path / "out" / "orders.db", "select * from _pipeline_offsets order by partition")
    assert [(o["table_name"], o["topic"], o["partition"], o["next_offset"]) for o in offsets] == [
        ("orders", "orders", 0, 5), ("orders", "orders", 1, 3)]


def test_a_restart_resumes_where_the_database_is_and_an_abort_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "out" / "orders.db"

    async def go() -> None:
        task = sink(tmp_path).task()
        await task.open([TP0, TP1])
        await task.put(batch([update(1, "created"), update(2, "created")], 0))
        await task.flush()
        await task.put(batch([update(1, "paid", 1)], 0, first=2))  # never flushed
        await task.close()  # an abort: close without flush

        again = sink(tmp_path).task()
        assert await again.open([TP0, TP1]) == {TP0: 2, TP1: 0}
        assert select(db, "select status from orders where order_id = 1") == [{"status": "created"}]
        await again.put(batch([update(1, "paid", 1)], 0, first=2))  # delivered again
        await again.flush()
        await again.close()

        third = sink(tmp_path).task()
        assert await third.open([TP1, TP0]) == {TP0: 3, TP1: 0}
        await third.close()

    run(go())
    assert select(db, "select order_id, status from orders order by 1") == [
        {"order_id": 1, "status": "paid"}, {"order_id": 2, "status": "created"}]


def test_a_flush_that_fails_leaves_the_database_as_it_was_and_can_be_retried(tmp_path: Path) -> None:
    db = tmp_path / "out" / "orders.db"

    async def go() -> None:
        task = sink(tmp_path).task()
        await task.open([TP0])
        await task.put(batch([update(1, "created")], 0))
        await task.flush()
        await task.put(batch([update(1, "paid", 1), update(2, "created", 1)], 0, first=1))
        blocker = sqlite3.connect(db, timeout=0)
        blocker.execute("begin immediate")  # another writer holds the lock
        task.conn.execute("pragma busy_timeout = 50")
        with pytest.raises(Exception) as failure:
            await task.flush()
        assert "locked" in str(failure.value)
        assert type(failure.value).__name__ == "RetryableError"
        blocker.rollback()
        blocker.close()
        await task.flush()  # the engine retries: everything put is still there
        await task.close()

    run(go())
    assert select(db, "select order_id, status from orders order by 1") == [
        {"order_id": 1, "status": "paid"}, {"order_id": 2, "status": "created"}]
    assert select(db, "select next_offset from _pipeline_offsets") == [{"next_offset": 3}]


def test_partitions_given_up_in_a_rebalance_are_dropped(tmp_path: Path) -> None:
    async def go() -> None:
        task = sink(tmp_path).task()
        await task.open([TP0, TP1])
        await task.put(batch([update(1, "created")], 0))
        await task.put(batch([update(2, "created")], 1))
        assert await task.open([TP0]) == {TP0: 0}  # partition 1 went to another process
        await task.put(batch([update(3, "created")], 1, first=1))  # late: ignored
        await task.flush()
        await task.close()

    run(go())
    db = tmp_path / "out" / "orders.db"
    assert select(db, "select order_id from orders") == [{"order_id": 1}]
    assert select(db, "select partition, next_offset from _pipeline_offsets") == [{"partition": 0, "next_offset": 1}]


def test_a_null_key_is_a_record_error(tmp_path: Path) -> None:
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "id", "type": ["null", "string"]}, {"name": "v", "type": "int"}]}

    async def go() -> list:
        task = sink(tmp_path, {"things": schema}, key=["id"]).task()
        await task.open([TopicPartition("things", 0)])
        errors = await task.put(batch([{"id": "a", "v": 1}, {"id": None, "v": 2}], topic="things"))
        await task.flush()
        await task.close()
        return errors

    [error] = run(go())
    assert error.field == "id" and error.position == "things[0]@1" and error.stage == "sink"
    assert select(tmp_path / "out" / "orders.db", "select * from things") == [{"id": "a", "v": 1}]


def test_two_sinks_on_one_database_keep_their_own_offsets(tmp_path: Path) -> None:
    async def go() -> None:
        first = sink(tmp_path, table="orders_a").task()
        await first.open([TP0])
        await first.put(batch([update(1, "created"), update(2, "created")], 0))
        await first.flush()
        await first.close()
        second = sink(tmp_path, table="orders_b").task()
        assert await second.open([TP0]) == {TP0: 0}
        await second.close()

    run(go())


# --- tables -----------------------------------------------------------------------------------------


def test_avro_types_map_to_sqlite_types(tmp_path: Path) -> None:
    schema = {"type": "record", "name": "All", "namespace": "t", "fields": [
        {"name": "id", "type": "string"},
        {"name": "flag", "type": "boolean"},
        {"name": "small", "type": "int"},
        {"name": "big", "type": ["null", "long"]},
        {"name": "ratio", "type": "float"},
        {"name": "raw", "type": "bytes"},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "clock", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
        {"name": "again", "type": ["null", "Kind"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "attrs", "type": {"type": "map", "values": "long"}},
        {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "int"}]}},
        {"name": "either", "type": ["null", "long", "string"]},
    ]}
    at = dt.datetime(2026, 11, 20, 9, 30, 1, 123456, tzinfo=dt.timezone.utc)
    row = {
        "id": "r1", "flag": True, "small": 7, "big": None, "ratio": 0.5, "raw": b"\x00\x01",
        "price": decimal.Decimal("12.30"), "at": at.replace(microsecond=123000), "at_us": at,
        "local": dt.datetime(2026, 11, 20, 10, 30, 1, 5000), "day": dt.date(2026, 11, 20),
        "clock": dt.time(9, 30, 1, 250000), "uid": "6a2f41a3-c54c-fce8-32d2-0324e1c32e22", "kind": "B",
        "again": None, "tags": ["a", "b"], "attrs": {"n": 1}, "inner": {"x": 3}, "either": "text",
    }

    async def go() -> None:
        task = sink(tmp_path, {"all": schema}, key=["id"]).task()
        await task.open([TopicPartition("all", 0)])
        await task.put(batch([row], topic="all"))
        await task.flush()
        await task.close()

    run(go())
    db = tmp_path / "out" / "orders.db"
    columns = {r["name"]: (r["type"], r["notnull"]) for r in select(db, "pragma table_info('all')")}
    assert columns == {
        "id": ("TEXT", 1), "flag": ("INTEGER", 1), "small": ("INTEGER", 1), "big": ("INTEGER", 0),
        "ratio": ("REAL", 1), "raw": ("BLOB", 1), "price": ("TEXT", 1), "at": ("TEXT", 1), "at_us": ("TEXT", 1),
        "local": ("TEXT", 1), "day": ("TEXT", 1), "clock": ("TEXT", 1), "uid": ("TEXT", 1), "kind": ("TEXT", 1),
        "again": ("TEXT", 0), "tags": ("TEXT", 1), "attrs": ("TEXT", 1), "inner": ("TEXT", 1), "either": ("", 0),
    }
    [stored] = select(db, 'select * from "all"')
    assert stored == {
        "id": "r1", "flag": 1, "small": 7, "big": None, "ratio": 0.5, "raw": b"\x00\x01", "price": "12.30",
        "at": "2026-11-20T09:30:01.123Z", "at_us": "2026-11-20T09:30:01.123456Z", "local": "2026-11-20T10:30:01.005",
        "day": "2026-11-20", "clock": "09:30:01.250", "uid": "6a2f41a3-c54c-fce8-32d2-0324e1c32e22", "kind": "B",
        "again": None, "tags": '["a","b"]', "attrs": '{"n":1}', "inner": '{"x":3}', "either": "text",
    }
    # SQLite's date functions read the ISO text.
    assert select(db, "select unixepoch(at) as s from \"all\"") == [{"s": int(at.timestamp())}]


def test_a_field_added_to_the_schema_becomes_a_column(tmp_path: Path) -> None:
    async def write(schema: dict, row: dict, offset: int) -> None:
        task = sink(tmp_path, {"orders": schema}).task()
        await task.open([TP0])
        await task.put(batch([row], first=offset))
        await task.flush()
        await task.close()

    run(write(ORDER, update(1, "created"), 0))
    wider = {**ORDER, "fields": [*ORDER["fields"], {"name": "carrier", "type": ["null", "string"], "default": None}]}
    run(write(wider, update(1, "shipped", 3, carrier="DHL"), 1))
    assert select(tmp_path / "out" / "orders.db", "select status, carrier from orders") == [
        {"status": "shipped", "carrier": "DHL"}]


def test_create_false_needs_the_table(tmp_path: Path) -> None:
    with pytest.raises(FatalError, match="does not exist"):
        run(sink(tmp_path, create=False).task().open([TP0]))


def test_create_false_writes_into_an_existing_table(tmp_path: Path) -> None:
    db = tmp_path / "out" / "orders.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("create table orders (order_id integer primary key, status text, amount real, "
                     "updated_at text, note text, extra text default 'x')")

    async def go() -> None:
        task = sink(tmp_path, create=False).task()
        assert await task.open([TP0]) == {TP0: 0}
        await task.put(batch([update(5, "created"), update(5, "paid", 1)]))
        await task.flush()
        await task.close()

    run(go())
    assert select(db, "select order_id, status, extra from orders") == [{"order_id": 5, "status": "paid", "extra": "x"}]


def test_an_existing_table_without_a_unique_key_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "out" / "orders.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("create table orders (order_id integer, status text, amount real, updated_at text, note text)")
    with pytest.raises(FatalError, match="no primary key or unique index"):
        run(sink(tmp_path).task().open([TP0]))


def test_table_is_only_valid_with_one_topic(tmp_path: Path) -> None:
    with pytest.raises(FatalError, match="only valid with one topic"):
        sink(tmp_path, {"orders": ORDER, "returns": ORDER}, table="t")


def test_several_topics_go_to_a_table_each(tmp_path: Path) -> None:
    async def go() -> None:
        task = sink(tmp_path, {"orders": ORDER, "returns": ORDER}).task()
        await task.open([TP0, TopicPartition("returns", 0)])
        await task.put(batch([update(1, "created")]))
        await task.put(batch([update(1, "paid"), update(2, "paid")], topic="returns"))
        await task.flush()
        await task.close()

    run(go())
    db = tmp_path / "out" / "orders.db"
    assert sorted(user_tables(db)) == ["orders", "returns"]
    assert len(select(db, "select * from returns")) == 2


def test_the_key_must_be_fields_of_the_schema(tmp_path: Path) -> None:
    with pytest.raises(FatalError, match="'id' not in topic 'orders'"):
        sink(tmp_path, key=["id"])


def test_config_is_checked() -> None:
    from runner.connector import ConfigError

    with pytest.raises(ConfigError) as problems:
        SqliteSink.Config.parse({"path": "x.db", "key": []})
    assert problems.value.problems == [("key", "needs at least one field")]
    with pytest.raises(ConfigError, match="key"):
        SqliteSink.Config.parse({"path": "x.db"})


def test_target_is_the_database_path(tmp_path: Path) -> None:
    assert sink(tmp_path).target().endswith("out/orders.db")
