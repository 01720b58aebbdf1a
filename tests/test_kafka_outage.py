"""The Kafka broker goes away in the middle of a run and comes back: the run retries with
backoff, stays up, and the sink's output holds every record exactly once, in order per key.

Every connection to the broker (Tansu) goes through a TCP proxy (tests/tcp_proxy.py): the
broker advertises the proxy's address, so the clients' bootstrap connection and the broker
connection they find in the metadata both pass through it. `proxy.cut()` closes them all
and refuses new ones, as a broker that went down would; `proxy.restore()` brings it back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import pipeline_exe, read_jsonl_dir
from tests.kafka_broker import CONSUMER, Tansu
from tests.tcp_proxy import TcpProxy

PARTITIONS = 3
USERS = 31
SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "user", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "amount", "type": "double"},
    ],
}


@pytest.fixture
def proxied_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpProxy]:
    """Tansu listening on a free port and advertising the proxy in front of it."""
    proxy = TcpProxy("127.0.0.1", 0)  # its target: Tansu's port, once Tansu has one
    try:
        broker = Tansu(tmp_path_factory.mktemp("tansu") / "tansu.log", advertise=lambda port: f"tcp://{proxy.address}")
        try:
            broker.wait_ready()
            proxy.target = ("127.0.0.1", broker.port)
            yield proxy
        finally:
            broker.stop()
    finally:
        proxy.close()


class Input:
    """Appends events to input/events.jsonl: ids 1, 2, ...; `seq` counts up per user."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "input").mkdir()
        self.path = tmp / "input" / "events.jsonl"
        self.path.touch()
        self.count = 0
        self.seqs: dict[str, int] = defaultdict(int)

    def append(self, n: int) -> None:
        lines = []
        for _ in range(n):
            self.count += 1
            user = f"user-{self.count % USERS}"
            self.seqs[user] += 1
            lines.append(json.dumps({"id": self.count, "user": user, "seq": self.seqs[user], "amount": self.count / 10}))
        with open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")


def write_spec(tmp: Path, bootstrap: str) -> Path:
    (tmp / "event.avsc").write_text(json.dumps(SCHEMA))
    # request_timeout_ms: a produce the broker does not acknowledge within 2 s fails with a
    # retriable error (aiokafka's default, 30 s, would hide a 3-9 s outage inside the
    # client), so the worker's own retry path runs: backoff, recount, send the rest again.
    broker = json.dumps(
        {"kafka": {"bootstrap_servers": bootstrap, "consumer": CONSUMER, "request_timeout_ms": 2000}}
    )
    spec = tmp / "spec.yaml"
    spec.write_text(f"""\
name: outage
broker: {broker}
topics:
  events: {{partitions: {PARTITIONS}, schema: event.avsc, key: user}}
sources:
  - name: events-in
    connector: jsonl
    topic: events
    config: {{paths: ["input/*.jsonl"], batch_size: 500, follow: true}}
sinks:
  - name: events-out
    connector: jsonl
    topics: [events]
    config: {{path: out}}
""")
    return spec


def ids_written(out: Path) -> set[int]:
    """Ids in the sink's files so far (a line still being written is left out)."""
    ids = set()
    for path in out.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                pass
    return ids


def check_output(out: Path, count: int) -> None:
    files = read_jsonl_dir(out)
    assert sorted(files) == [f"events-{p}.jsonl" for p in range(PARTITIONS)]
    ids = [r["id"] for rs in files.values() for r in rs]
    dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
    assert not dupes, f"{len(ids) - len(set(ids))} record(s) arrived twice, e.g. ids {dupes[:10]}"
    missing = sorted(set(range(1, count + 1)) - set(ids))
    assert not missing, f"{len(missing)} record(s) missing, e.g. ids {missing[:10]}"
    assert len(ids) == count
    partition_of: dict[str, str] = {}
    for name, records in files.items():
        last: dict[str, int] = {}
        for r in records:
            assert partition_of.setdefault(r["user"], name) == name, f"{r['user']} in two partitions"
            assert r["seq"] == last.get(r["user"], 0) + 1, f"{r['user']} out of order in {name}: {r}"
            last[r["user"]] = r["seq"]


def run_through_an_outage(tmp: Path, proxy: TcpProxy, cut_seconds: float) -> str:
    """Run the pipeline; cut the broker away for `cut_seconds` while input keeps coming;
    check the output; return the run's log (stderr, --debug)."""
    spec = write_spec(tmp, proxy.address)
    data = Input(tmp)
    out = tmp / "out"
    err_path = tmp / "run.log"

    def log() -> str:
        return err_path.read_text()

    def wait(until: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not until():
            assert proc.poll() is None, f"the run exited ({proc.returncode}) while {what}:\n{log()[-4000:]}"
            assert time.monotonic() < deadline, f"not within {seconds} s: {what}\n{log()[-4000:]}"
            time.sleep(0.1)

    def alive(when: str) -> None:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) {when}:\n{log()[-4000:]}"

    data.append(2000)
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [pipeline_exe(), "--debug", "run", str(spec)],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ}, cwd=tmp,
        )
    try:
        wait(lambda: len(ids_written(out)) == data.count, 30, "the first records reach the sink")

        proxy.cut()
        cut_at = time.monotonic()
        while time.monotonic() - cut_at < cut_seconds:  # input keeps coming while the broker is away
            data.append(300)
            alive("while the broker was away")
            time.sleep(0.5)
        during = data.count
        proxy.restore()
        alive("when the broker came back")

        data.append(2000)
        wait(lambda: len(ids_written(out)) >= data.count, 30 + cut_seconds, f"all {data.count} records reach the sink")
        # A little longer: anything written twice would show up now.
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not stop within 30 s of SIGTERM:\n{log()[-4000:]}")
        assert code == 0, f"exit {code} after SIGTERM:\n{log()[-4000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    text = log()
    assert during > 2000
    check_output(out, data.count)
    retries = [line for line in text.splitlines() if "retrying in" in line]
    assert retries, f"no retry logged:\n{text[-4000:]}"
    # Every failure was handled: none left in a task or future nobody awaited (asyncio
    # logs those with a traceback, also without --debug).
    abandoned = text.find("exception was never retrieved")
    assert abandoned < 0, "an error was left unhandled:\n" + text[abandoned - 200 : abandoned + 3000]
    return text


@pytest.mark.slow
def test_a_broker_away_for_less_than_the_session_timeout_loses_and_duplicates_nothing(
    tmp_path: Path, proxied_kafka: TcpProxy
) -> None:
    run_through_an_outage(tmp_path, proxied_kafka, cut_seconds=3)


@pytest.mark.slow
def test_a_broker_away_for_longer_than_the_session_timeout_loses_and_duplicates_nothing(
    tmp_path: Path, proxied_kafka: TcpProxy
) -> None:
    # 9 s > session_timeout_ms (6 s): the group drops the members and rebalances when back.
    run_through_an_outage(tmp_path, proxied_kafka, cut_seconds=9)
