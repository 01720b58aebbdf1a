"""`LogFormat.parse_columns` (a column at a time, what http_log runs) gives exactly what
`LogFormat.parse_lines` (a dict per line) gives: the same records, the same errors, the
same line of each record — on random lines built from real and hostile pieces."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.http_log.formats import NAMED_FORMATS, compile_format
from tests.conftest import run_cli
from tests.connectors.tasks import drain, write
from tests.connectors.test_http_log import lines, source_task

HOSTS = st.sampled_from(["203.0.113.7", "-", "host.example", "::1", "", "a b"])
TIMES = st.sampled_from([
    "10/Oct/2000:13:55:36 -0700", "10/OCT/2000:13:55:36 +0130", "29/Feb/2024:00:00:00 +0000",
    "31/Feb/2024:00:00:00 +0000", "10/Oct/2000:25:00:00 +0000", "01/Jan/1970:00:00:00 +0000",
    "10/Oct/2000:13:55:36 +0099", "10/Xyz/2000:13:55:36 +0000", "31/Dec/9999:23:59:59 -0100",
    "01/Jan/0001:00:00:00 +0100", "01/Jan/0000:00:00:00 +0000",
])
REQUESTS = st.sampled_from([
    "GET / HTTP/1.1", "GET /a?b=c HTTP/2.0", "-", "", r"\x16\x03\x01\x02\x00\x01", "GET  HTTP/1.1",
    r"POST /caf\xc3\xa9 HTTP/1.1", r"GET /\"q\" HTTP/1.0", "BREW /pot HTCPCP/1.0", "get lower HTTP/1.1",
])
NUMBERS = st.sampled_from(["200", "404", "-", "007", "99999999999", "2147483648", "١٢٣", "0"])
TEXTS = st.sampled_from([
    "-", "", "https://example.org/", r"https://example.ru/\xcf\xf0\xe8", r"caf\xc3\xa9", r"say \"hi\"",
    "Mozilla/5.0 (X11; Linux x86_64)", "ünïcödé", r"back\\slash", r"\x22nginx\x22",
])


@st.composite
def log_lines(draw) -> str:
    host, time, request, status, size = draw(HOSTS), draw(TIMES), draw(REQUESTS), draw(NUMBERS), draw(NUMBERS)
    line = f'{host} - {draw(HOSTS)} [{time}] "{request}" {status} {size} "{draw(TEXTS)}" "{draw(TEXTS)}"'
    return draw(st.sampled_from([line, line, line, line + " \t", "", "   ", "garbage", line[: len(line) // 2]]))


@settings(max_examples=int(os.environ.get("COLUMNS_EXAMPLES", 300)), deadline=None)
@given(st.sampled_from(sorted(NAMED_FORMATS)), st.lists(log_lines(), max_size=12))
def test_columns_give_exactly_what_rows_give(fmt: str, texts: list[str]) -> None:
    log_format = compile_format(fmt)
    rows, errors, kept = log_format.parse_lines(texts)
    records, column_errors, column_kept = log_format.parse_columns(texts)
    if isinstance(records, pa.RecordBatch):
        assert records.schema == log_format.arrow_schema()
        records = records.to_pylist()
    assert (records, column_errors, column_kept) == (rows, errors, kept)


# Formats with every kind of fragment: nullable fields, %r quoted and not, %U%q, headers, %t.
RE2_FORMATS = [
    *sorted(NAMED_FORMATS),
    r"%h %l %u %t %r %>s %b",
    r"%h %U%q %>s %{X-Forwarded-For}i %D",
    r"%v:%p %a \"%m %U%q %H\" %s %O %{Referer}i",
]
# Printable ASCII and tabs (what RE2 splits), hostile: lone and leading dashes, empty
# fields, quotes, escapes, controls both engines take alike; then what only re may split.
ASCII_PIECES = ["-", "", "-x", "--", "200", "007", "2147483648", "abc", "a b", "a\tb", '"q"', r'\"', "\\",
                "GET / HTTP/1.1", "GET  HTTP/1.1", "get x HTTP/1.1", "?a=b", "?", "/p?x", "x\x01y", "\x0c", "\r"]
OTHER_PIECES = ["\x0b", "\x1c", "\x1f", "ü", "١٢٣", "\x85", "\xa0"]
TIME_PIECES = ["[10/Oct/2000:13:55:36 -0700]", "[31/Feb/2024:00:00:00 +0000]", "[10/Oct/2000:13:55:36]", "-"]


@st.composite
def format_lines(draw, fmt: str, pieces: list[str]) -> str:
    """A line of `fmt`: its literal text, and a random piece for each directive."""
    from connectors.http_log.formats import _tokens

    out = []
    for kind, value in _tokens(NAMED_FORMATS.get(fmt, fmt)):
        if kind == "lit":
            out.append(value)
        else:
            out.append(draw(st.sampled_from(TIME_PIECES if value[1] == "t" else pieces)))
    line = "".join(out)
    return draw(st.sampled_from([line, line, line, line + " \t", "", "  ", "garbage"]))


@st.composite
def chunks(draw, pieces: list[str]) -> tuple[str, list[str]]:
    fmt = draw(st.sampled_from(RE2_FORMATS))
    return fmt, draw(st.lists(format_lines(fmt, pieces), max_size=8))


@settings(max_examples=int(os.environ.get("COLUMNS_EXAMPLES", 300)) * 2 // 3, deadline=None)
@given(chunks(ASCII_PIECES))
def test_a_chunk_split_by_re2_gives_exactly_what_rows_give(chunk: tuple[str, list[str]]) -> None:
    fmt, texts = chunk
    log_format = compile_format(fmt)
    if texts:
        assert log_format._split_re2(texts) is not None  # the property is about RE2's split
    rows, errors, kept = log_format.parse_lines(texts)
    records, column_errors, column_kept = log_format.parse_columns(texts)
    if isinstance(records, pa.RecordBatch):
        records = records.to_pylist()
    assert (records, column_errors, column_kept) == (rows, errors, kept)


@settings(max_examples=int(os.environ.get("COLUMNS_EXAMPLES", 300)) // 3, deadline=None)
@given(chunks(ASCII_PIECES + OTHER_PIECES))
def test_a_chunk_re2_could_split_otherwise_is_split_by_re(chunk: tuple[str, list[str]]) -> None:
    fmt, texts = chunk
    log_format = compile_format(fmt)
    if any(not line.isascii() or any(c in line for c in "\x0b\x1c\x1d\x1e\x1f") for line in texts):
        assert log_format._split_re2(texts) is None
    rows, errors, kept = log_format.parse_lines(texts)
    records, column_errors, column_kept = log_format.parse_columns(texts)
    if isinstance(records, pa.RecordBatch):
        records = records.to_pylist()
    assert (records, column_errors, column_kept) == (rows, errors, kept)


def test_a_plain_chunk_comes_back_as_columns() -> None:
    log_format = compile_format("combined")
    line = '203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] "GET /caf\\xc3\\xa9 HTTP/1.1" 200 - "-" "curl/8"'
    records, errors, kept = log_format.parse_columns([line, "", line])
    assert isinstance(records, pa.RecordBatch) and errors == [] and kept == [0, 2]
    first = records.to_pylist()[0]
    assert first["path"] == "/café" and first["bytes"] is None and first["referrer"] is None
    assert first["timestamp"] == dt.datetime(2000, 10, 10, 20, 55, 36, tzinfo=dt.timezone.utc)


def test_a_timestamp_at_the_edge_of_the_dates_is_a_bad_line_not_a_crash() -> None:
    ok = '203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200 5'
    edge = '203.0.113.7 - - [31/Dec/9999:23:59:59 -0100] "GET / HTTP/1.1" 200 5'
    for parse in (compile_format("common").parse_lines, compile_format("common").parse_columns):
        records, errors, kept = parse([ok, edge, ok])
        assert errors == [(1, "bad timestamp '31/Dec/9999:23:59:59 -0100' in a line of format common")]
        assert kept == [0, 2] and len(records) == 2


def test_a_status_too_large_for_its_column_comes_back_as_rows() -> None:
    line = '203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 2147483648 5'
    records, errors, _ = compile_format("common").parse_columns([line])
    assert isinstance(records, list)
    assert records[0]["status"] == 2147483648 and errors == []  # the schema check names it later


# -- parsing in worker processes (a long log) ------------------------------------------------


def read_all(tmp_path, *, processes: bool, offsets=None, **config):
    """What an http_log task gives, parsing in a worker process or in place."""
    task = source_task(tmp_path, parse_processes=1 if processes else 0, **config)
    batches = drain(task, offsets)
    if processes and not offsets:  # the worker parsed, and the engine too while it waited for it
        assert task.parsed_by_workers and task.parsed_here, (task.parsed_by_workers, task.parsed_here)
    return [
        (b.rows, [(e.error, e.record, e.position) for e in b.errors], list(b.positions), b.source_offsets)
        for b in batches
    ]


def test_parsing_in_worker_processes_gives_what_parsing_in_place_gives(tmp_path) -> None:
    text = lines(1, 40) + "not an access log line\n\n" + lines(40, 90).replace("Chrome", r"Chr\xc3\xa9me")
    write(tmp_path / "access.log.1", lines(100, 130))
    os.utime(tmp_path / "access.log.1", (1_000_000, 1_000_000))
    write(tmp_path / "access.log", text)
    config = {"paths": ["access.log*"], "batch_size": 7}
    in_place = read_all(tmp_path, processes=False, **config)
    in_processes = read_all(tmp_path, processes=True, **config)
    assert in_processes == in_place
    assert sum(len(rows) for rows, *_ in in_place) == 119 and any(errors for _, errors, *_ in in_place)
    # Resuming from the offsets of any batch reads the rest, as in place.
    offsets: dict = {}
    for rows, _, _, batch_offsets in in_place[:5]:
        offsets.update(batch_offsets)
    assert read_all(tmp_path, processes=True, offsets=offsets, **config) == \
        read_all(tmp_path, processes=False, offsets=offsets, **config)


def test_a_worker_process_ends_with_the_engine_however_it_ends(tmp_path) -> None:
    """Killed with SIGKILL, the engine leaves no parse process behind: its pipe closes."""
    import signal
    import subprocess
    import sys
    import time

    write(tmp_path / "access.log", lines(1, 20))
    script = (
        "import asyncio, os, sys\n"
        "from tests.connectors.test_http_log import source_task\n"
        "from pathlib import Path\n"
        "task = source_task(Path(sys.argv[1]), paths=['access.log'], batch_size=2, parse_processes=1)\n"
        "async def main():\n"
        "    await task.open({})\n"
        "    await task.poll()\n"
        "    print(task.pool._workers[0].process.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    engine = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    worker = int(engine.stdout.readline())
    engine.send_signal(signal.SIGKILL)
    engine.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{worker}/stat") as f:  # reaped by init once it ends: a zombie has ended
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError(f"parse worker {worker} still runs 10 s after its engine was killed")


def test_a_run_parsing_in_a_worker_process_through_the_cli(tmp_path) -> None:
    """Through the CLI, with `parse_processes: 1`: every line delivered, the malformed one
    dead-lettered with its file:line, and nothing but the run's own output on stderr."""
    import json

    write(tmp_path / "logs" / "access.log", lines(1, 500) + "garbage\n" + lines(500, 1000))
    schema = str(Path(__file__).resolve().parents[2] / "pipelines" / "schemas" / "activity.avsc")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: parse-processes
topics:
  activity: {{partitions: 2, schema: {json.dumps(schema)}, key: remote_host}}
sources:
  - name: logs
    connector: http_log
    topic: activity
    config: {{paths: [logs/access.log], parse_processes: 1, batch_size: 100}}
sinks:
  - {{name: out, connector: jsonl, topics: [activity], config: {{path: out}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
""")
    ran = run_cli("run", str(spec), "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    assert "Warning" not in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
    records = [json.loads(text) for part in (tmp_path / "out").glob("*.jsonl") for text in part.read_text().splitlines()]
    assert sorted(int(r["path"].rsplit("/", 1)[1]) for r in records) == list(range(1, 1000))
    dead = run_cli("consume", "activity-dlq", "--from-beginning", "--spec", str(spec), "--json")
    assert f"{tmp_path / 'logs' / 'access.log'}:500" in dead.stdout
