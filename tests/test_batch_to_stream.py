"""pipelines/batch-to-stream.yaml with `every: 2s`, left running about 10 s while CSV and
Parquet exports are dropped into its landing directory between ticks: every record of
every file reaches Parquet exactly once, no file is read twice, a bad CSV cell goes to the
dead-letter topic with file, line and column, and `pipeline runs` lists the runs."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import pipeline_exe, run_cli

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "pipelines" / "batch-to-stream.yaml"
T0 = dt.datetime(2026, 11, 24, 8, 0, tzinfo=dt.timezone.utc)


def order(i: int) -> dict:
    return {
        "order_id": i,
        "customer": f"c{i % 7}",
        "amount": round(i * 1.25, 2),
        "quantity": i % 5 + 1,
        "coupon": None if i % 3 else f"SAVE{i % 10}",
        "ordered_at": T0 + dt.timedelta(minutes=i),
    }


def drop_csv(landing: Path, name: str, ids: range, bad: int | None = None) -> None:
    lines = ["order_id,customer,amount,quantity,coupon,ordered_at"]
    for i in ids:
        o = order(i)
        amount = "twelve" if i == bad else str(o["amount"])
        lines.append(f"{i},{o['customer']},{amount},{o['quantity']},{o['coupon'] or ''},{o['ordered_at'].isoformat()}")
    tmp = landing / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(landing / name)  # lands atomically


def drop_parquet(landing: Path, name: str, ids: range) -> None:
    table = pa.Table.from_pylist([order(i) for i in ids], schema=pa.schema([
        ("order_id", pa.int64()), ("customer", pa.string()), ("amount", pa.float64()),
        ("quantity", pa.int32()), ("coupon", pa.string()), ("ordered_at", pa.timestamp("ms", tz="UTC")),
    ]))
    tmp = landing / f".{name}.tmp"
    pq.write_table(table, tmp)
    tmp.rename(landing / name)


@pytest.mark.slow  # ticks for about 10 s by design
def test_exports_dropped_between_ticks_land_once(tmp_path: Path) -> None:
    landing, done, out = tmp_path / "landing", tmp_path / "done", tmp_path / "out"
    landing.mkdir()
    env = {**os.environ, "EVERY": "2s", "LANDING": str(landing), "DONE": str(done), "OUT_DIR": str(out),
           "PIPELINE_STATE": str(tmp_path / "state")}
    drops = [  # (seconds after start, kind, file name, ids)
        (0.0, "csv", "orders-001.csv", range(0, 400)),
        (0.0, "parquet", "orders-002.parquet", range(400, 1000)),
        (2.5, "csv", "orders-003.csv", range(1000, 1300)),
        (4.5, "parquet", "orders-004.parquet", range(1300, 2300)),
        (4.5, "csv", "orders-005.csv", range(2300, 2350)),
        (6.5, "csv", "orders-006.csv", range(2350, 2800)),
        (8.5, "parquet", "orders-007.parquet", range(2800, 2900)),
    ]
    bad = 1111  # in orders-003.csv, line 1111 - 1000 + 2
    proc = subprocess.Popen([pipeline_exe(), "run", str(SPEC)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        for at, kind, name, ids in drops:
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            if kind == "csv":
                drop_csv(landing, name, ids, bad if bad in ids else None)
            else:
                drop_parquet(landing, name, ids)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (list(landing.glob("orders-*")) or time.monotonic() - start < 10.5):
            time.sleep(0.2)  # until every file was taken (and moved), and ~10 s have passed
        time.sleep(2.0)  # the sink lands what the last run streamed
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr

    # Every record of every file once, with its types, in Parquet.
    rows = duckdb.connect().execute(
        f"select order_id, customer, amount, quantity, coupon, ordered_at from read_parquet('{out}/orders/**/*.parquet')"
    ).fetchall()
    expected = [i for _, _, _, ids in drops for i in ids if i != bad]
    assert sorted(r[0] for r in rows) == expected
    got = {r[0]: r for r in rows}
    for i in (0, 401, 1299, 2349, 2899):
        o = order(i)
        assert got[i][1:5] == (o["customer"], o["amount"], o["quantity"], o["coupon"])
        assert got[i][5].replace(tzinfo=dt.timezone.utc) == o["ordered_at"]
    # No file was read twice: each is in done/, none left behind.
    assert sorted(p.name for p in done.iterdir()) == sorted(name for _, _, name, _ in drops)
    # The bad cell is in the dead-letter topic with file, line and column.
    dlq = run_cli("consume", "orders-dlq", "--from-beginning", "--spec", SPEC, env=env)
    assert dlq.returncode == 0, dlq.stderr
    [dead] = [json.loads(line) for line in dlq.stdout.splitlines()]
    assert dead["position"].endswith(f"orders-003.csv:{bad - 1000 + 2}")
    assert dead["field"] == "amount" and "twelve" in dead["error"]
    # `pipeline runs` lists the runs with their record counts, which add up.
    listed = run_cli("runs", "--spec", SPEC, "--json", "--last", "1000", env=env)
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    for source, kind in (("exports-csv", "csv"), ("exports-parquet", "parquet")):
        mine = [r for r in runs if r["source"] == source]
        assert len(mine) >= 4, mine  # a run every 2 s for about 10 s
        assert all(r["outcome"] == "ok" for r in mine), mine
        assert sum(r["records"] for r in mine) == sum(len(ids) for _, k, _, ids in drops if k == kind) - (kind == "csv")
        assert sum(r["files"] for r in mine) == sum(1 for _, k, _, _ in drops if k == kind)
    table = run_cli("runs", "--spec", SPEC, "--source", "exports-csv", env=env)
    assert table.returncode == 0 and "records" in table.stdout.splitlines()[0]
