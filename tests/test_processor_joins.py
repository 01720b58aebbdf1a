"""Processors that merge, filter and join, through the CLI: the orders example equals what
DuckDB computes from its raw data files; a table keeps the latest value per key, a
tombstone deletes one; table records without a key, and records a `where:` cannot be
evaluated on, go to the dead-letter topic, named; `validate` names join mistakes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from runner.broker.base import ProduceBatch
from runner.broker.embedded import EmbeddedBroker
from tests.conftest import pipeline_exe, run_cli

REPO = Path(__file__).resolve().parents[1]


def test_orders_merged_enriched_and_aggregated_equal_duckdb_over_the_raw_files(tmp_path: Path) -> None:
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    spec = REPO / "pipelines" / "orders.yaml"
    ran = run_cli("run", spec, "--once", env=env)
    assert ran.returncode == 0, ran.stderr
    data = REPO / "pipelines" / "data" / "shop"
    db = duckdb.connect()
    db.execute("set TimeZone = 'UTC'")
    # The expected orders: both files, each joined with the last line of its customer.
    db.execute(f"""create view raw as
        select order_id, customer, amount, ordered_at::timestamptz as ordered_at
          from read_json('{data}/web-orders.jsonl')
        union all
        select order_id, customer, amount, ordered_at::timestamptz from read_csv('{data}/store-orders.csv')""")
    db.execute(f"""create view latest as
        select id, arg_max(name, line) as name, arg_max(country, line) as country, arg_max(tier, line) as tier
          from (select *, row_number() over () as line from read_json('{data}/customers.jsonl')) group by id""")
    expected = db.execute("""select order_id, customer, amount, ordered_at, name, country, tier
        from raw left join latest on raw.customer = latest.id order by order_id""").fetchall()
    out = f"{tmp_path}/out"
    got = db.execute(f"""select order_id, customer, amount, ordered_at, name, country, tier
        from read_parquet('{out}/orders/**/*.parquet') order by order_id""").fetchall()
    assert got == expected and len(got) == 120
    assert any(row[4] is None for row in got)  # a customer with no record: nulls (a left join)
    revenue = db.execute(f"""select country, window_start, orders, revenue, customers, largest
        from read_parquet('{out}/revenue/**/*.parquet') order by all""").fetchall()
    grouped = db.execute("""select country, time_bucket(interval 1 hour, ordered_at), count(*), sum(amount),
               count(distinct customer), max(amount)
        from raw left join latest on raw.customer = latest.id
        where amount >= 10 and country is not null group by all order by all""").fetchall()
    assert [r[:3] + (round(r[3], 6),) + r[4:] for r in revenue] == \
        [r[:3] + (round(r[3], 6),) + r[4:] for r in grouped] and len(revenue) >= 6


def _spec(tmp_path: Path, processor: str, *, table_key: str = "id") -> Path:
    (tmp_path / "clicks.avsc").write_text(json.dumps({"type": "record", "name": "Click", "fields": [
        {"name": "user", "type": ["null", "string"], "default": None},
        {"name": "page", "type": "string"},
        {"name": "ms", "type": ["null", "long"], "default": None},
    ]}))
    (tmp_path / "user.avsc").write_text(json.dumps({"type": "record", "name": "User", "fields": [
        {"name": "id", "type": ["null", "string"], "default": None},
        {"name": "plan", "type": "string"},
        {"name": "page", "type": ["null", "string"], "default": None},
    ]}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: joins
        topics:
          clicks: {{partitions: 2, schema: clicks.avsc, key: user}}
          users: {{partitions: 1, schema: user.avsc, key: {table_key}}}
          out: {{partitions: 1}}
        sources:
          - {{name: click-log, connector: jsonl, topic: clicks, config: {{paths: [clicks.jsonl]}}}}
          - {{name: user-log, connector: jsonl, topic: users, config: {{paths: [users.jsonl]}}}}
        processors:
        """) + textwrap.indent(textwrap.dedent(processor), "  ") + textwrap.dedent("""\
        sinks:
          - {name: sink, connector: jsonl, topics: [out], config: {path: got}}
        errors: {tolerance: all, dead_letter_topic: dlq}
        """))
    return spec


def _lines(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _out(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "got" / "out-0.jsonl").read_text().splitlines()]


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_a_table_keeps_the_latest_value_per_key_and_a_tombstone_deletes_it(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """\
        - name: enrich
          from: clicks
          to: out
          join: {table: users, on: user, fields: [plan], how: left}
        """)
    _lines(tmp_path / "users.jsonl", [{"id": "ann", "plan": "free"}, {"id": "bob", "plan": "pro"},
                                      {"id": "ann", "plan": "team"}])
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/a"}, {"user": "bob", "page": "/b"},
                                       {"user": "cy", "page": "/c"}, {"user": None, "page": "/d"}])
    assert run_cli("run", spec, "--once").returncode == 0
    got = {(o["user"], o["page"]): o["plan"] for o in _out(tmp_path)}
    assert got == {("ann", "/a"): "team", ("bob", "/b"): "pro", ("cy", "/c"): None, (None, "/d"): None}

    async def delete_bob() -> None:  # a tombstone: bob's key with no value
        broker = EmbeddedBroker(tmp_path / ".pipeline" / "joins")
        await broker.start()
        await broker.produce([ProduceBatch("users", 0, [b"bob"], [None], [0])])
        await broker.close()
    asyncio.run(delete_bob())
    _lines(tmp_path / "clicks.jsonl", [{"user": "bob", "page": "/e"}, {"user": "ann", "page": "/f"}])
    assert run_cli("run", spec, "--once").returncode == 0
    got = {(o["user"], o["page"]): o["plan"] for o in _out(tmp_path)}
    assert got[("bob", "/e")] is None and got[("ann", "/f")] == "team"
    assert got[("bob", "/b")] == "pro" and len(got) == 6  # what was written stays; nothing twice


def test_an_inner_join_drops_unmatched_records_and_a_keyless_table_record_is_a_data_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """\
        - name: enrich
          from: clicks
          to: out
          where: "ms > 100"
          join: {table: users, on: user, how: inner}
        """)
    _lines(tmp_path / "users.jsonl", [{"id": "ann", "plan": "free", "page": "/home"}, {"id": None, "plan": "pro"}])
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/a", "ms": 500}, {"user": "cy", "page": "/c", "ms": 500},
                                       {"user": "ann", "page": "/b", "ms": 5}, {"user": "ann", "page": "/n", "ms": None}])
    checked = run_cli("validate", spec)
    assert checked.returncode == 2 and "field 'page' is in clicks already" in checked.stderr
    spec.write_text(spec.read_text().replace("how: inner}", "fields: [plan], how: inner}"))
    ran = run_cli("run", spec, "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    assert [(o["user"], o["page"], o["plan"]) for o in _out(tmp_path)] == [("ann", "/a", "free")]
    enrich = [c for c in json.loads(ran.stdout)["connectors"] if c["name"] == "enrich"][0]
    # read: 4 clicks and the keyless table record (dead-lettered); good table records are state, not read
    assert (enrich["read"], enrich["delivered"], enrich["filtered"], enrich["dead_lettered"]) == (5, 1, 2, 2)
    letters = [json.loads(line) for line in run_cli("consume", "dlq", "--from-beginning", "--spec", spec).stdout.splitlines()]
    by = {d["field"]: d for d in letters if d["connector"] == "enrich"}
    assert "is null" in by["ms"]["error"] and "where 'ms > 100'" in by["ms"]["error"]
    keyless = [d for d in letters if "without a key" in d["error"]]
    assert len(keyless) == 1 and keyless[0]["topic"] == "users"


def test_merged_topics_pass_on_the_fields_they_share_and_validate_names_join_mistakes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """\
        - name: merge
          from: [clicks, users]
          to: out
          where: "page != '/skip'"
        """)
    _lines(tmp_path / "users.jsonl", [{"id": "ann", "plan": "free", "page": "/u"}, {"id": "bo", "plan": "x", "page": "/skip"}])
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/a"}])
    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 0, ran.stderr
    assert sorted(o["page"] for o in _out(tmp_path)) == ["/a", "/u"]
    assert all(set(o) == {"page"} for o in _out(tmp_path))  # the one field both have
    # Shape mistakes are found first; the ones that need the schemas once the shapes are sound.
    for mistakes in [
        [("join: {table: nope, on: user}", "topic 'nope' is not declared under topics"),
         ("join: {table: users, on: user, how: outer}", "expected 'left' or 'inner'"),
         ("join: {table: users, on: user}\n  window: {tumbling: 1m}", "'window' does not go with join"),
         ("where: \"page ==\"", "syntax error")],
        [("join: {table: users, on: usr}", "no field 'usr' in clicks (the join key)"),
         ("join: {table: users, on: user, fields: [plann]}", "no field 'plann' in table 'users'"),
         ("where: \"pages == 1\"", "no field 'pages' in 'clicks'")],
    ]:
        spec = _spec(tmp_path, "".join(f"- name: p{i}\n  from: clicks\n  to: out\n  {processor}\n"
                                       for i, (processor, _) in enumerate(mistakes)))
        checked = run_cli("validate", spec)
        assert checked.returncode == 2
        for i, (processor, message) in enumerate(mistakes):  # each at its line, under its processor
            assert re.search(rf"spec\.yaml:\d+: processors\[{i}\]\S*: .*{re.escape(message)}", checked.stderr), \
                (processor, checked.stderr)


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_an_output_topic_may_declare_its_schema_when_the_records_fit_it(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "- name: p\n  from: clicks\n  to: out\n")
    (tmp_path / "out.avsc").write_text(json.dumps({"type": "record", "name": "Out", "fields": [
        {"name": "user", "type": ["null", "string"], "default": None}, {"name": "page", "type": "string"},
        {"name": "ms", "type": ["null", "long"], "default": None},
        {"name": "source", "type": "string", "default": "clicks"}]}))
    spec.write_text(spec.read_text().replace("out: {partitions: 1}", "out: {partitions: 1, schema: out.avsc}"))
    _lines(tmp_path / "users.jsonl", [])
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/a", "ms": 3}])
    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 0, ran.stderr
    assert _out(tmp_path) == [{"user": "ann", "page": "/a", "ms": 3, "source": "clicks"}]
    (tmp_path / "out.avsc").write_text(json.dumps({"type": "record", "name": "Out", "fields": [
        {"name": "user", "type": "string"}, {"name": "page", "type": "string"}, {"name": "ms", "type": "long"}]}))
    checked = run_cli("validate", spec)
    assert checked.returncode == 2 and "field 'user' may be null" in checked.stderr


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_a_table_with_retention_drops_keys_not_updated_within_it(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """\
        - name: enrich
          from: clicks
          to: out
          join: {table: users, on: user, fields: [plan], retention: 7d}
        """)
    _lines(tmp_path / "users.jsonl", [{"id": "ann", "plan": "free"}, {"id": "bob", "plan": "pro"}])
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/a"}])
    assert run_cli("run", spec, "--once").returncode == 0
    assert [(o["user"], o["plan"]) for o in _out(tmp_path)] == [("ann", "free")]

    async def later_record() -> None:  # cy's record, eight days after ann's and bob's
        broker = EmbeddedBroker(tmp_path / ".pipeline" / "joins")
        await broker.start()
        consumer = await broker.consumer(None, ["users"])
        (batch,) = await consumer.fetch(10, 1.0)
        await consumer.close()
        eight_days = 8 * 24 * 3600 * 1000
        await broker.produce([ProduceBatch("users", 0, [b"cy"], [batch.values[1]], [batch.timestamps[1] + eight_days])])
        await broker.close()
    asyncio.run(later_record())
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/b"}, {"user": "cy", "page": "/c"}])
    assert run_cli("run", spec, "--once").returncode == 0
    got = {(o["user"], o["page"]): o["plan"] for o in _out(tmp_path)}
    assert got == {("ann", "/a"): "free", ("ann", "/b"): None, ("cy", "/c"): "pro"}  # ann's record had expired
    spec.write_text(spec.read_text().replace("retention: 7d", "retention: 7 days"))
    checked = run_cli("validate", spec)
    assert checked.returncode == 2 and "expected a duration" in checked.stderr


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_interrupting_a_once_run_does_not_hang_a_join_waiting_for_its_table(tmp_path: Path) -> None:
    """A join in a --once run waits for what feeds it before it joins; Ctrl-C stops that
    wait too (it waited forever for an upstream processor that had been stopped)."""
    spec = _spec(tmp_path, """\
        - name: copy
          from: clicks
          to: mid
        - name: enrich
          from: mid
          to: out
          join: {table: users, on: user, fields: [plan]}
        """)
    spec.write_text(spec.read_text().replace("  out: {partitions: 1}", "  out: {partitions: 1}\n  mid: {partitions: 1}"))
    _lines(tmp_path / "users.jsonl", [{"id": "u1", "plan": "free"}])
    with (tmp_path / "clicks.jsonl").open("w") as f:
        f.writelines('{"user": "u%d", "page": "/p", "ms": %d}\n' % (i % 100, i) for i in range(1_000_000))
    run = subprocess.Popen([pipeline_exe(), "run", str(spec), "--once", "--no-progress"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / ".pipeline" / "joins").exists():  # started
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)  # mid-run: the source is still reading clicks, so `copy` and `enrich` wait
    run.send_signal(signal.SIGINT)
    try:
        code = run.wait(20)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert code in (0, 130), run.stderr.read()


def test_join_and_merge_edge_cases_the_review_found(tmp_path: Path) -> None:
    """A table field that is a list; a named type defined by a field that is not carried
    over; table records without a key counted as read and dead-lettered."""
    (tmp_path / "clicks.avsc").write_text(json.dumps({"type": "record", "name": "Click", "fields": [
        {"name": "user", "type": "string"}, {"name": "page", "type": "string"}]}))
    (tmp_path / "user.avsc").write_text(json.dumps({"type": "record", "name": "User", "fields": [
        {"name": "id", "type": ["null", "string"], "default": None},
        {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["free", "pro"]}},
        {"name": "old_tier", "type": "Tier"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ]}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: edge
        topics:
          clicks: {partitions: 1, schema: clicks.avsc, key: user}
          users: {partitions: 1, schema: user.avsc, key: id}
          out: {partitions: 1}
        sources:
          - {name: click-log, connector: jsonl, topic: clicks, config: {paths: [clicks.jsonl]}}
          - {name: user-log, connector: jsonl, topic: users, config: {paths: [users.jsonl]}}
        processors:
          - name: enrich
            from: clicks
            to: out
            join: {table: users, on: user, fields: [old_tier, tags]}
        sinks:
          - {name: sink, connector: jsonl, topics: [out], config: {path: got}}
        errors: {tolerance: all, dead_letter_topic: dlq}
        """))
    _lines(tmp_path / "users.jsonl", [{"id": "ann", "tier": "pro", "old_tier": "free", "tags": ["a", "b"]},
                                      {"id": None, "tier": "pro", "old_tier": "pro", "tags": []}])
    _lines(tmp_path / "clicks.jsonl", [{"user": "ann", "page": "/a"}, {"user": "bob", "page": "/b"}])
    ran = run_cli("run", spec, "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    got = {o["user"]: (o["old_tier"], o["tags"]) for o in _out(tmp_path)}
    assert got == {"ann": ("free", ["a", "b"]), "bob": (None, None)}
    (enrich,) = [c for c in json.loads(ran.stdout)["connectors"] if c["name"] == "enrich"]
    assert (enrich["read"], enrich["delivered"], enrich["dead_lettered"]) == (3, 2, 1)  # read = delivered + dead
