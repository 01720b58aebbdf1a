"""The http_log source, driven directly through its task API (no engine), on real files."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import fastavro
import pytest

from connectors.http_log import HttpLogSource, avro_schema_for
from connectors.http_log.formats import compile_format, parse_clf_time, unescape
from runner.batch import Batch
from runner.connector import ConfigError, FatalError
from tests.conftest import run_cli
from tests.connectors.tasks import context as _context, drain, write

pytestmark = pytest.mark.timeout(30)

UTC = dt.timezone.utc
UA_CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
UA_BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


# -- helpers ---------------------------------------------------------------------------------


def context(tmp: Path):
    return _context(tmp, name="logs")


def source_task(tmp: Path, **config: Any):
    source = HttpLogSource(HttpLogSource.Config.parse(config), context(tmp))
    (task,) = source.tasks()
    return task


def line(n: int, *, host: str = "192.0.2.1", path: str | None = None) -> str:
    """A combined line whose path names its number, so every line can be counted."""
    return (
        f'{host} - - [10/Oct/2023:13:{n // 60 % 60:02d}:{n % 60:02d} +0000] "GET {path or f"/n/{n}"} HTTP/1.1" '
        f'200 {n} "-" "{UA_CHROME}"\n'
    )


def lines(start: int, stop: int) -> str:
    return "".join(line(n) for n in range(start, stop))


def numbers(rows: list[dict]) -> list[int]:
    return [int(r["path"].rsplit("/", 1)[1]) for r in rows]


def rows_of(batches: list[Batch]) -> list[dict]:
    return [r for b in batches for r in b.rows]


def offsets_of(batches: list[Batch], start: dict | None = None) -> dict:
    offsets = dict(start or {})
    for b in batches:
        offsets.update(b.source_offsets)
    return offsets


async def poll_until(task, want: int, deadline: float = 5.0, *, sink: list | None = None) -> list[dict]:
    """Poll a following source until `want` rows arrived (or the deadline)."""
    rows: list[dict] = []
    end = time.monotonic() + deadline
    while len(rows) < want and time.monotonic() < end:
        batch = await task.poll()
        assert batch is not None, "a following source never ends"
        rows += batch.rows
        if sink is not None:
            sink.append(batch)
    return rows


def parse(fmt: str, *texts: str) -> list[dict]:
    rows, errors, _ = compile_format(fmt).parse_lines(list(texts))
    assert errors == []
    return rows


def ts(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


# -- formats ---------------------------------------------------------------------------------


def test_combined_parses_real_looking_lines_into_typed_fields() -> None:
    text = [
        f'203.0.113.7 - - [10/Oct/2023:13:55:36 +0000] "GET /index.html?q=a%20b&x=1 HTTP/1.1" 200 5120 "https://www.google.com/" "{UA_CHROME}"',
        f'2001:db8:85a3::8a2e:370:7334 - frank [10/Oct/2023:13:55:37 +0000] "POST /api/v1/login HTTP/2.0" 500 - "-" "{UA_BOT}"',
        '198.51.100.4 - - [10/Oct/2023:13:55:38 +0000] "GET /wp-login.php HTTP/1.0" 404 162 "-" "Mozilla/5.0 \\"quoted\\" agent"',
        '198.51.100.5 ident-x - [10/Oct/2023:13:55:39 +0000] "HEAD / HTTP/1.1" 304 0 "" "-"',
    ]
    assert parse("combined", *text) == [
        {
            "remote_host": "203.0.113.7", "ident": None, "user": None, "timestamp": ts(2023, 10, 10, 13, 55, 36),
            "method": "GET", "path": "/index.html?q=a%20b&x=1", "protocol": "HTTP/1.1",
            "request": "GET /index.html?q=a%20b&x=1 HTTP/1.1",
            "status": 200, "bytes": 5120, "referrer": "https://www.google.com/", "user_agent": UA_CHROME,
        },
        {
            "remote_host": "2001:db8:85a3::8a2e:370:7334", "ident": None, "user": "frank",
            "timestamp": ts(2023, 10, 10, 13, 55, 37), "method": "POST", "path": "/api/v1/login",
            "protocol": "HTTP/2.0", "request": "POST /api/v1/login HTTP/2.0",
            "status": 500, "bytes": None, "referrer": None, "user_agent": UA_BOT,
        },
        {
            "remote_host": "198.51.100.4", "ident": None, "user": None, "timestamp": ts(2023, 10, 10, 13, 55, 38),
            "method": "GET", "path": "/wp-login.php", "protocol": "HTTP/1.0", "request": "GET /wp-login.php HTTP/1.0",
            "status": 404, "bytes": 162, "referrer": None, "user_agent": 'Mozilla/5.0 "quoted" agent',
        },
        {
            "remote_host": "198.51.100.5", "ident": "ident-x", "user": None, "timestamp": ts(2023, 10, 10, 13, 55, 39),
            "method": "HEAD", "path": "/", "protocol": "HTTP/1.1", "request": "HEAD / HTTP/1.1",
            "status": 304, "bytes": 0, "referrer": "", "user_agent": None,
        },
    ]


def test_common_is_combined_without_referrer_and_user_agent() -> None:
    (row,) = parse("common", '127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326')
    assert row == {
        "remote_host": "127.0.0.1", "ident": None, "user": "frank", "timestamp": ts(2000, 10, 10, 20, 55, 36),
        "method": "GET", "path": "/apache_pb.gif", "protocol": "HTTP/1.0", "request": "GET /apache_pb.gif HTTP/1.0",
        "status": 200, "bytes": 2326,
    }
    # A combined line has more than the common format: it does not match it.
    _, errors, _ = compile_format("common").parse_lines([line(1).rstrip("\n")])
    assert [e[1] for e in errors] == ["line does not match format common"]


def test_custom_logformat_with_duration_forwarded_for_and_vhost() -> None:
    fmt = r'%v %h %l %u %t \"%r\" %>s %b %D %T %I %O \"%{X-Forwarded-For}i\" \"%{Referer}i\" \"%{User-agent}i\"'
    text = (
        'shop.example.com 10.0.0.5 - - [01/Mar/2024:08:00:00 +0100] "GET /cart HTTP/1.1" 200 1234 53211 0 512 1789 '
        '"203.0.113.9, 10.0.0.1" "-" "curl/8.4.0"'
    )
    assert parse(fmt, text) == [
        {
            "server_name": "shop.example.com", "remote_host": "10.0.0.5", "ident": None, "user": None,
            "timestamp": ts(2024, 3, 1, 7, 0, 0), "method": "GET", "path": "/cart", "protocol": "HTTP/1.1",
            "request": "GET /cart HTTP/1.1", "status": 200, "bytes": 1234, "duration_us": 53211, "duration_s": 0,
            "bytes_in": 512, "bytes_out": 1789, "x_forwarded_for": "203.0.113.9, 10.0.0.1", "referrer": None,
            "user_agent": "curl/8.4.0",
        }
    ]
    schema = avro_schema_for(fmt)
    types = {f["name"]: f["type"] for f in schema["fields"]}
    assert types["duration_us"] == ["null", "long"] and types["bytes_out"] == ["null", "long"]
    assert types["status"] == ["null", "int"] and types["x_forwarded_for"] == ["null", "string"]
    assert [f["name"] for f in schema["fields"]] == list(parse(fmt, text)[0])


def test_custom_logformat_with_split_request_directives_and_response_header() -> None:
    fmt = '%V:%p %a %t "%m %U%q %H" %s %B %{X-Request-Id}o %{Host}i %%'
    rows = parse(
        fmt,
        'www.example.com:443 10.0.0.1 [10/Oct/2000:13:55:36 +0000] "GET /a/b?x=1&y=2 HTTP/2.0" 200 0 abc-1 example.com %',
        'www.example.com:443 10.0.0.1 [10/Oct/2000:13:55:36 +0000] "GET /a/b HTTP/2.0" 200 17 - - %',
    )
    assert rows[0] == {
        "server_name": "www.example.com", "server_port": 443, "remote_addr": "10.0.0.1",
        "timestamp": ts(2000, 10, 10, 13, 55, 36), "method": "GET", "url_path": "/a/b", "query_string": "?x=1&y=2",
        "protocol": "HTTP/2.0", "status": 200, "bytes": 0, "x_request_id": "abc-1", "host": "example.com",
    }
    assert (rows[1]["query_string"], rows[1]["bytes"], rows[1]["x_request_id"], rows[1]["host"]) == (None, 17, None, None)


def test_request_lines_that_are_not_method_target_protocol_keep_the_raw_request() -> None:
    def row(request: str) -> dict:
        (r,) = parse("combined", f'192.0.2.9 - - [10/Oct/2023:13:55:36 +0000] "{request}" 400 0 "-" "-"')
        return {k: r[k] for k in ("method", "path", "protocol", "request", "status")}

    assert row("-") == {"method": None, "path": None, "protocol": None, "request": "-", "status": 400}
    # A TLS handshake sent to a plain-HTTP port: the bytes that are valid UTF-8 (ASCII control
    # characters) are decoded, the one that is not (\xfc) stays as logged.
    tls = "\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03"
    assert row(tls) == {
        "method": None, "path": None, "protocol": None, "request": "\x16\x03\x01\x02\x00\x01\x00\x01\\xfc\x03\x03",
        "status": 400,
    }
    assert row("GET /")["request"] == "GET /" and row("GET /")["method"] is None
    assert row("") == {"method": None, "path": None, "protocol": None, "request": "", "status": 400}
    assert row("GET /a b HTTP/1.1")["path"] is None  # four words: not a request line
    assert row('GET /say?\\"hi\\" HTTP/1.1')["path"] == '/say?"hi"'
    assert row('GET /say?\\"hi\\" HTTP/1.1')["request"] == 'GET /say?"hi" HTTP/1.1'  # unescaped too


def test_escapes_are_undone_apache_and_nginx_style() -> None:
    assert unescape(r"a \"b\" c\\d") == 'a "b" c\\d'
    assert unescape(r"nginx \x22quoted\x22 caf\xC3\xA9") == 'nginx "quoted" café'
    assert unescape(r"tab\there \xff") == "tab\there \\xff"  # not UTF-8: kept as logged (tests in test_http_log_escapes.py)
    (r,) = parse("combined", '192.0.2.9 - - [10/Oct/2023:13:55:36 +0000] "GET / HTTP/1.1" 200 1 "-" "UA \\x22x\\x22"')
    assert r["user_agent"] == 'UA "x"'


def test_timestamps_with_offsets_become_utc() -> None:
    assert parse_clf_time("10/Oct/2000:13:55:36 -0700") == ts(2000, 10, 10, 20, 55, 36)
    assert parse_clf_time("01/Jan/2024:01:30:00 +0200") == ts(2023, 12, 31, 23, 30, 0)
    assert parse_clf_time("29/Feb/2024:23:59:59 +0000") == ts(2024, 2, 29, 23, 59, 59)
    assert parse_clf_time("15/Aug/2023:12:00:00 +0530") == ts(2023, 8, 15, 6, 30, 0)
    assert parse_clf_time("15/Aug/2023:12:00:00 +0530").tzinfo is UTC
    rows, errors, kept = compile_format("common").parse_lines(
        ['h - - [31/Dec/2023:23:00:00 -0700] "GET / HTTP/1.1" 200 1', 'h - - [32/Dec/2023:23:00:00 -0700] "GET / HTTP/1.1" 200 1']
    )
    assert [r["timestamp"] for r in rows] == [ts(2024, 1, 1, 6, 0, 0)]
    assert errors[0][0] == 1 and "bad timestamp" in errors[0][1] and kept == [0]


def test_bad_format_strings_and_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        HttpLogSource.Config.parse({"paths": [], "format": "%h %Z", "encoding": "klingon", "batch_size": 0})
    keys = {k for k, _ in exc.value.problems}
    assert keys == {"paths", "format", "encoding", "batch_size"}
    assert "%Z" in dict(exc.value.problems)["format"]
    with pytest.raises(ConfigError, match="custom time format"):
        HttpLogSource.Config.parse({"paths": ["x"], "format": "%h %{%Y-%m-%d}t"})
    with pytest.raises(ConfigError, match="incomplete directive"):
        HttpLogSource.Config.parse({"paths": ["x"], "format": "%h % %t"})
    config = HttpLogSource.Config.parse({"paths": ["x"]})
    assert (config.format, config.follow, config.batch_size, config.poll_interval, config.encoding) == (
        "combined", False, 10_000, 0.1, "utf-8"
    )


def test_avro_schema_encodes_parsed_rows_with_fastavro() -> None:
    texts = [
        line(1).rstrip("\n"),
        '2001:db8::1 - - [10/Oct/2023:13:55:36 -0700] "-" 400 - "-" "-"',
        '192.0.2.9 - bob [10/Oct/2023:13:55:36 +0200] "GET /x HTTP/1.1" 500 1 "http://r/" "Mozilla \\"x\\""',
    ]
    for fmt in ("combined", "common"):
        schema = avro_schema_for(fmt)
        assert schema["type"] == "record" and schema["name"] == "Activity"
        fields = {f["name"]: f for f in schema["fields"]}
        assert fields["timestamp"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
        assert fields["request"]["type"] == "string"
        assert fields["status"]["type"] == ["null", "int"] and fields["status"]["default"] is None
        assert fields["bytes"]["type"] == ["null", "long"]
        parsed = fastavro.parse_schema(schema)
        rows, errors, _ = compile_format(fmt).parse_lines([t if fmt == "combined" else t.rsplit(' "', 2)[0] for t in texts])
        assert not errors and len(rows) == 3
        for row in rows:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, parsed, row)
            buf.seek(0)
            assert fastavro.schemaless_reader(buf, parsed) == row
    names = [f["name"] for f in avro_schema_for("combined", name="Hit")["fields"]]
    assert names == [
        "remote_host", "ident", "user", "timestamp", "request", "method", "path", "protocol",
        "status", "bytes", "referrer", "user_agent",
    ]
    assert avro_schema_for("combined", name="Hit")["name"] == "Hit"


# -- reading files ---------------------------------------------------------------------------


def test_reads_files_in_batches_with_identity_offsets_and_positions(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "access.log"
    write(log, lines(1, 6) + "not an access log line\n" + lines(6, 11))
    batches = drain(source_task(tmp_path, paths=["logs/access.log"], batch_size=4))
    assert numbers(rows_of(batches)) == list(range(1, 11))
    assert all(len(b) <= 4 for b in batches)
    st = log.stat()
    ident = f"{st.st_dev}:{st.st_ino}"
    final = offsets_of(batches)
    assert final == {ident: {"path": str(log), "pos": st.st_size, "line": 11, "head": [1024, final[ident]["head"][1]]}}
    # The bad line: an error with the raw line and path:line; the rest of its batch is there.
    errors = [e for b in batches for e in b.errors]
    assert len(errors) == 1
    assert (errors[0].stage, errors[0].error, errors[0].record, errors[0].position) == (
        "source", "line does not match format combined", "not an access log line", f"{log}:6"
    )
    assert list(batches[1].positions) == [f"{log}:5", f"{log}:7", f"{log}:8"]
    assert numbers(batches[1].rows) == [5, 6, 7]
    assert batches[1].position(0) == f"{log}:5"
    assert list(batches[0].positions) == [f"{log}:{n}" for n in range(1, 5)]


def test_blank_lines_and_crlf_line_ends(tmp_path: Path) -> None:
    write(tmp_path / "a.log", line(1).replace("\n", "\r\n") + "\n\r\n" + line(2))
    batches = drain(source_task(tmp_path, paths=["a.log"]))
    assert numbers(rows_of(batches)) == [1, 2]
    assert not batches[0].errors and list(batches[0].positions) == [f"{tmp_path / 'a.log'}:1", f"{tmp_path / 'a.log'}:4"]


def test_lines_longer_than_a_read_block(tmp_path: Path) -> None:
    long_ua = "Mozilla/5.0 " + "x" * 300_000
    write(tmp_path / "a.log", line(1) + line(2).replace(UA_CHROME, long_ua) + line(3))
    rows = rows_of(drain(source_task(tmp_path, paths=["a.log"], batch_size=2)))
    assert numbers(rows) == [1, 2, 3] and rows[1]["user_agent"] == long_ua


def test_undecodable_bytes_are_kept_as_escapes(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(line(1).replace("Chrome", "Chr\xffme").encode("latin-1"))
    (row,) = rows_of(drain(source_task(tmp_path, paths=["a.log"])))
    assert "Chr\\xffme" in row["user_agent"]


def test_resume_from_offsets_after_every_batch_without_repeat_or_skip(tmp_path: Path) -> None:
    write(tmp_path / "access.log.1", lines(1, 8))
    os.utime(tmp_path / "access.log.1", (1_000_000, 1_000_000))
    write(tmp_path / "access.log", lines(8, 20) + "garbage\n" + lines(20, 23))
    everything = numbers(rows_of(drain(source_task(tmp_path, paths=["access.log*"], batch_size=3))))
    assert everything == list(range(1, 23))

    for stop_after in range(1, 9):

        async def first_part() -> tuple[list[int], dict]:
            task = source_task(tmp_path, paths=["access.log*"], batch_size=3)
            await task.open({})
            seen, offsets = [], {}
            for _ in range(stop_after):
                batch = await task.poll()
                if batch is None:
                    break
                seen += numbers(batch.rows)
                offsets.update(batch.source_offsets)
            await task.close()
            return seen, offsets

        seen, offsets = asyncio.run(first_part())
        rest = numbers(rows_of(drain(source_task(tmp_path, paths=["access.log*"], batch_size=3), offsets)))
        assert seen + rest == everything, stop_after


def test_resume_finds_a_file_renamed_while_stopped_by_its_identity(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 6))
    offsets = offsets_of(drain(source_task(tmp_path, paths=["access.log*"])))
    write(log, lines(6, 9), mode="a")  # written after the stop, before the rotation
    log.rename(tmp_path / "access.log.1")
    write(log, lines(9, 12))
    os.utime(tmp_path / "access.log.1", (time.time() - 60, time.time() - 60))
    batches = drain(source_task(tmp_path, paths=["access.log*"]), offsets)
    assert numbers(rows_of(batches)) == list(range(6, 12))
    # The old identity now carries its new name.
    final = offsets_of(batches, offsets)
    assert sorted(o["path"] for o in final.values()) == [str(log), str(tmp_path / "access.log.1")]
    assert drain(source_task(tmp_path, paths=["access.log*"]), final) == []


def test_a_file_rewritten_in_place_is_read_again_from_the_start(tmp_path: Path) -> None:
    # Same identity, different first bytes (truncated and refilled past our position while we
    # were stopped, or an inode reused by a new file): the head fingerprint tells.
    log = tmp_path / "access.log"
    write(log, lines(1, 4))
    offsets = offsets_of(drain(source_task(tmp_path, paths=["access.log"])))
    with open(log, "r+", encoding="utf-8") as f:
        f.write(lines(100, 110))
    assert numbers(rows_of(drain(source_task(tmp_path, paths=["access.log"]), offsets))) == list(range(100, 110))
    # A plain truncation (size below our position) starts over too.
    offsets = offsets_of(drain(source_task(tmp_path, paths=["access.log"])))
    write(log, lines(200, 201))
    assert numbers(rows_of(drain(source_task(tmp_path, paths=["access.log"]), offsets))) == [200]


def test_gz_files_are_read_once_and_rotated_sets_oldest_first(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "access.log.2.gz", "wt", encoding="utf-8") as f:
        f.write(lines(1, 2001) + "junk\n" + line(2001).rstrip("\n"))  # unterminated last line: read
    write(tmp_path / "access.log.1", lines(2002, 2010))
    write(tmp_path / "access.log", lines(2010, 2015))
    now = time.time()
    os.utime(tmp_path / "access.log.2.gz", (now - 200, now - 200))
    os.utime(tmp_path / "access.log.1", (now - 100, now - 100))
    batches = drain(source_task(tmp_path, paths=["access.log*"], batch_size=500))
    assert numbers(rows_of(batches)) == list(range(1, 2015))
    (error,) = [e for b in batches for e in b.errors]
    assert error.position == f"{tmp_path / 'access.log.2.gz'}:2001" and error.record == "junk"
    offsets = offsets_of(batches)
    (gz,) = [o for o in offsets.values() if o.get("gz")]
    raw = gzip.decompress((tmp_path / "access.log.2.gz").read_bytes())
    assert gz == {"path": str(tmp_path / "access.log.2.gz"), "pos": len(raw), "line": 2002, "gz": True, "done": True}
    # Resuming in the middle of the .gz continues there; after it, nothing is read again.
    mid = offsets_of(batches[:2])
    (reached,) = [o["line"] for o in mid.values()]
    assert 500 < reached < 1000
    rest = rows_of(drain(source_task(tmp_path, paths=["access.log*"], batch_size=500), mid))
    assert numbers(rest) == list(range(reached + 1, 2015))
    assert drain(source_task(tmp_path, paths=["access.log*"]), offsets) == []


def test_rotated_files_of_one_mtime_are_read_in_rotation_order(tmp_path: Path) -> None:
    """A copy or a checkout gives a rotated set one mtime (to within the second, in any
    order): oldest first all the same, by the rotation number."""
    with gzip.open(tmp_path / "access.log.2.gz", "wt", encoding="utf-8") as f:
        f.write(lines(1, 5))
    write(tmp_path / "access.log.1", lines(5, 9))
    write(tmp_path / "access.log", lines(9, 12))
    second = int(time.time()) - 100
    os.utime(tmp_path / "access.log", (second + 0.1, second + 0.1))  # the live file a touch older
    os.utime(tmp_path / "access.log.1", (second + 0.5, second + 0.5))
    os.utime(tmp_path / "access.log.2.gz", (second + 0.9, second + 0.9))
    batches = drain(source_task(tmp_path, paths=["access.log*"]))
    assert numbers(rows_of(batches)) == list(range(1, 12))


def test_a_corrupt_gz_is_a_data_error_and_the_rest_is_read(tmp_path: Path) -> None:
    (tmp_path / "access.log.1.gz").write_bytes(b"this is not gzip\n")
    os.utime(tmp_path / "access.log.1.gz", (1_000_000, 1_000_000))
    write(tmp_path / "access.log", lines(1, 3))
    batches = drain(source_task(tmp_path, paths=["access.log*"]))
    assert numbers(rows_of(batches)) == [1, 2]
    (error,) = [e for b in batches for e in b.errors]
    assert error.position == str(tmp_path / "access.log.1.gz") and "access.log.1.gz" in error.error


def test_without_follow_ends_with_none_and_reads_an_unterminated_last_line(tmp_path: Path) -> None:
    write(tmp_path / "access.log", lines(1, 3) + line(3).rstrip("\n"))

    async def main() -> None:
        task = source_task(tmp_path, paths=["access.log"])
        await task.open({})
        try:
            batch = await task.poll()
            assert batch is not None and numbers(batch.rows) == [1, 2, 3]
            assert await task.poll() is None
            assert await task.poll() is None
        finally:
            await task.close()

    asyncio.run(main())


def test_without_follow_and_no_matching_file_is_fatal_at_open(tmp_path: Path) -> None:
    write(tmp_path / "logs" / "error.log", "x\n")
    with pytest.raises(FatalError, match=r"logs/access\.log\*"):
        asyncio.run(source_task(tmp_path, paths=["logs/access.log*"]).open({}))


# -- following -------------------------------------------------------------------------------


def test_following_sees_new_lines_within_a_second(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 3))

    async def main() -> None:
        task = source_task(tmp_path, paths=["access.log"], follow=True)  # default poll_interval
        await task.open({})
        try:
            assert numbers(await poll_until(task, 2)) == [1, 2]
            write(log, lines(3, 5), mode="a")
            start = time.monotonic()
            assert numbers(await poll_until(task, 2)) == [3, 4]
            assert time.monotonic() - start < 1.2
        finally:
            await task.close()

    asyncio.run(main())


def test_following_waits_for_a_partial_line_without_spinning(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    half = line(2)[:40]
    write(log, line(1) + half)

    async def main() -> dict:
        task = source_task(tmp_path, paths=["access.log"], follow=True, poll_interval=0.2)
        await task.open({})
        batches: list[Batch] = []
        try:
            assert numbers(await poll_until(task, 1, sink=batches)) == [1]
            polls, end = 0, time.monotonic() + 1.0
            while time.monotonic() < end:
                batch = await task.poll()
                assert batch is not None and batch.rows == [] and not batch.errors
                batches.append(batch)
                polls += 1
            assert polls <= 7, f"{polls} polls in one second with only a partial line to read"
            offsets = offsets_of(batches)
            write(log, line(2)[40:] + line(3), mode="a")
            assert numbers(await poll_until(task, 2)) == [2, 3]
            batch = await task.poll()
            assert batch is not None and batch.rows == []
            return offsets
        finally:
            await task.close()

    offsets = asyncio.run(main())
    (offset,) = offsets.values()
    assert offset["pos"] == len(line(1)) and offset["line"] == 1
    # A restart after the partial point reads the completed line exactly once.
    assert numbers(rows_of(drain(source_task(tmp_path, paths=["access.log"]), offsets))) == [2, 3]


def test_following_survives_rename_rotation_every_line_once(tmp_path: Path) -> None:
    log, old = tmp_path / "access.log", tmp_path / "access.log.1"
    write(log, lines(1, 6))

    async def main() -> list[int]:
        task = source_task(tmp_path, paths=["access.log*"], follow=True, poll_interval=0.05, batch_size=4)
        await task.open({})
        seen: list[dict] = []
        try:
            seen += await poll_until(task, 5)
            write(log, lines(6, 9), mode="a")  # not read yet when the rotation happens
            log.rename(old)
            write(old, lines(9, 11), mode="a")  # the server still writes to its open descriptor
            write(log, lines(11, 16))  # ...then reopens the log under the old name
            seen += await poll_until(task, 10)
            write(log, lines(16, 18), mode="a")
            seen += await poll_until(task, 2)
            for _ in range(3):
                seen += (await task.poll()).rows
        finally:
            await task.close()
        return numbers(seen)

    got = asyncio.run(main())
    assert sorted(got) == list(range(1, 18)), got


def test_following_drains_a_file_renamed_out_of_the_globs(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 3))

    async def main() -> list[int]:
        task = source_task(tmp_path, paths=["access.log"], follow=True, poll_interval=0.05)
        await task.open({})
        try:
            seen = await poll_until(task, 2)
            write(log, lines(3, 6), mode="a")
            log.rename(tmp_path / "access.log-20231010")  # no longer matched: read by descriptor
            write(log, lines(6, 8))
            seen += await poll_until(task, 5)
            seen += (await task.poll()).rows
            return numbers(seen)
        finally:
            await task.close()

    assert sorted(asyncio.run(main())) == list(range(1, 8))


def test_following_survives_copytruncate_rotation_every_line_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 11))

    async def main() -> tuple[list[int], dict]:
        task = source_task(tmp_path, paths=["access.log"], follow=True, poll_interval=0.05)
        await task.open({})
        batches: list[Batch] = []
        try:
            seen = await poll_until(task, 10, sink=batches)
            write(log, lines(11, 13), mode="a")
            seen += await poll_until(task, 2, sink=batches)
            shutil.copyfile(log, tmp_path / "access.log.1")  # copytruncate: copy, then cut
            with open(log, "r+") as f:
                f.truncate(0)
            write(log, lines(13, 16), mode="a")  # shorter than before
            seen += await poll_until(task, 3, sink=batches)
            # Truncated and refilled past our position between two looks: the first bytes
            # differ, so it is read from the start too.
            with open(log, "r+") as f:
                f.truncate(0)
            write(log, lines(100, 120), mode="a")
            seen += await poll_until(task, 20, sink=batches)
            seen += (await task.poll()).rows
            return numbers(seen), offsets_of(batches)
        finally:
            await task.close()

    got, offsets = asyncio.run(main())
    assert got == list(range(1, 16)) + list(range(100, 120))
    (offset,) = offsets.values()
    assert offset["pos"] == log.stat().st_size and offset["line"] == 20


def test_following_picks_up_new_files_and_starts_with_none(tmp_path: Path) -> None:
    async def main() -> None:
        task = source_task(tmp_path, paths=["logs/*.log", "logs/*.gz"], follow=True, poll_interval=0.05)
        await task.open({})  # nothing there yet: fine when following
        try:
            batch = await task.poll()
            assert batch is not None and len(batch) == 0
            write(tmp_path / "logs" / "a.log", lines(1, 3))
            assert numbers(await poll_until(task, 2)) == [1, 2]
            write(tmp_path / "logs" / "b.log", lines(3, 5))
            write(tmp_path / "logs" / "other.txt", lines(90, 91))
            with gzip.open(tmp_path / "logs" / "c.log.1.gz", "wt") as f:
                f.write(lines(5, 7))
            assert sorted(numbers(await poll_until(task, 4))) == [3, 4, 5, 6]
            write(tmp_path / "logs" / "a.log", lines(7, 8), mode="a")
            assert numbers(await poll_until(task, 1)) == [7]
            for _ in range(3):
                batch = await task.poll()
                assert batch is not None and batch.rows == []
        finally:
            await task.close()

    asyncio.run(main())


def test_following_resumes_after_a_rotation_during_the_stop(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 4))

    async def run(offsets: dict, want: int) -> tuple[list[int], dict]:
        task = source_task(tmp_path, paths=["access.log*"], follow=True, poll_interval=0.05)
        await task.open(offsets)
        batches: list[Batch] = []
        try:
            rows = await poll_until(task, want, sink=batches)
            for _ in range(2):
                batches.append(await task.poll())
                rows += batches[-1].rows
        finally:
            await task.close()
        return numbers(rows), offsets_of(batches, offsets)

    got, offsets = asyncio.run(run({}, 3))
    write(log, lines(4, 6), mode="a")
    log.rename(tmp_path / "access.log.1")
    write(log, lines(6, 8))
    got2, _ = asyncio.run(run(offsets, 4))
    assert got + sorted(got2) == list(range(1, 8))


def test_following_waits_for_a_gz_still_being_compressed(tmp_path: Path) -> None:
    # logrotate compresses into the final name: the .gz is first empty, then incomplete.
    packed = gzip.compress(lines(1, 400).encode(), mtime=0)
    gz = tmp_path / "access.log.1.gz"

    async def main() -> list[int]:
        task = source_task(tmp_path, paths=["access.log*"], follow=True, poll_interval=0.05, batch_size=50)
        write(tmp_path / "access.log", "")
        await task.open({})
        try:
            gz.write_bytes(b"")
            seen = await poll_until(task, 1, deadline=0.3)
            gz.write_bytes(packed[: len(packed) // 2])
            seen += await poll_until(task, 399, deadline=0.3)  # what the first half holds, if any
            assert len(seen) < 399
            with open(gz, "ab") as f:
                f.write(packed[len(packed) // 2 :])
            seen += await poll_until(task, 399 - len(seen))
            for _ in range(2):
                batch = await task.poll()
                assert not batch.errors
                seen += batch.rows
            return numbers(seen)
        finally:
            await task.close()

    assert asyncio.run(main()) == list(range(1, 400))


def test_end_to_end_through_the_engine_with_the_generated_schema(tmp_path: Path) -> None:
    """`pipeline run` with http_log → a keyed topic whose schema is avro_schema_for(...) →
    jsonl sink; non-matching lines land in the dead-letter topic with path:line."""
    (tmp_path / "activity.avsc").write_text(json.dumps(avro_schema_for("combined")))
    write(tmp_path / "logs" / "access.log", lines(1, 50) + "garbage line\n" + lines(50, 60)
          + '2001:db8::7 - - [10/Oct/2023:13:55:36 +0200] "\\x16\\x03" 400 - "-" "-"\n')
    with gzip.open(tmp_path / "logs" / "access.log.1.gz", "wt") as f:
        f.write(lines(60, 70))
    (tmp_path / "spec.yaml").write_text(
        """\
name: http-log-e2e
topics:
  activity: {partitions: 2, schema: activity.avsc, key: remote_host}
sources:
  - {name: logs, connector: http_log, topic: activity, config: {paths: ["logs/access.log*"], batch_size: 16}}
sinks:
  - {name: out, connector: jsonl, topics: [activity], config: {path: out}}
errors: {tolerance: all, dead_letter_topic: activity-dlq}
"""
    )
    result = run_cli("run", "spec.yaml", "--once", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    out = [json.loads(x) for p in sorted((tmp_path / "out").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(numbers([r for r in out if r["path"]])) == list(range(1, 70))
    (tls,) = [r for r in out if not r["path"]]
    assert tls["request"] == "\x16\x03" and tls["timestamp"] == "2023-10-10T11:55:36+00:00" and tls["bytes"] is None
    dlq = run_cli("consume", "activity-dlq", "--from-beginning", "--spec", "spec.yaml", cwd=tmp_path, timeout=60)
    assert dlq.returncode == 0, dlq.stderr
    (dead,) = [json.loads(x) for x in dlq.stdout.splitlines()]
    assert dead["record"] == "garbage line" and dead["position"] == f"{tmp_path / 'logs' / 'access.log'}:50"
    assert dead["stage"] == "source" and dead["connector"] == "logs"


def compress(src: Path, dst: Path) -> None:
    """What logrotate's `compress` does: a new .gz file, then the original removed."""
    with open(src, "rb") as f, gzip.open(dst, "wb") as out:
        shutil.copyfileobj(f, out)
    src.unlink()


def test_following_debian_style_rotation_with_delaycompress_every_line_once(tmp_path: Path) -> None:
    # access.log.1 -> access.log.2.gz (a new identity holding lines already read), then
    # access.log -> access.log.1, then a new access.log. One glob matches them all.
    log = tmp_path / "access.log"
    write(log, lines(1, 6))

    async def main() -> list[int]:
        task = source_task(tmp_path, paths=["access.log*"], follow=True, poll_interval=0.05)
        await task.open({})
        seen: list[dict] = []
        try:
            seen += await poll_until(task, 5)
            log.rename(tmp_path / "access.log.1")
            write(log, lines(6, 9))
            seen += await poll_until(task, 3)
            write(tmp_path / "access.log.1", lines(100, 101), mode="a")  # late write, unread...
            compress(tmp_path / "access.log.1", tmp_path / "access.log.2.gz")  # ...when compressed
            log.rename(tmp_path / "access.log.1")
            write(log, lines(9, 11))
            seen += await poll_until(task, 3)
            for _ in range(4):
                seen += (await task.poll()).rows
        finally:
            await task.close()
        return numbers(seen)

    assert sorted(asyncio.run(main())) == list(range(1, 11)) + [100]


def test_resume_after_rotation_and_compression_while_stopped(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 6))
    offsets = offsets_of(drain(source_task(tmp_path, paths=["access.log*"])))
    write(log, lines(6, 8), mode="a")  # never read before the file was rotated and compressed
    log.rename(tmp_path / "access.log.1")
    compress(tmp_path / "access.log.1", tmp_path / "access.log.1.gz")
    write(log, lines(8, 10))
    os.utime(tmp_path / "access.log.1.gz", (time.time() - 60, time.time() - 60))
    batches = drain(source_task(tmp_path, paths=["access.log*"]), offsets)
    assert numbers(rows_of(batches)) == list(range(6, 10))
    gz = [o for o in offsets_of(batches).values() if o.get("gz")]
    assert [(o["line"], o["done"]) for o in gz] == [(7, True)]


def test_following_copytruncate_then_compress_every_line_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write(log, lines(1, 6))

    async def main() -> list[int]:
        task = source_task(tmp_path, paths=["access.log", "access.log.*.gz"], follow=True, poll_interval=0.05)
        await task.open({})
        seen: list[dict] = []
        try:
            seen += await poll_until(task, 5)
            write(log, lines(6, 7), mode="a")  # unread when the copy is taken
            shutil.copyfile(log, tmp_path / "access.log.1")
            with open(log, "r+") as f:
                f.truncate(0)
            compress(tmp_path / "access.log.1", tmp_path / "access.log.1.gz")
            write(log, lines(7, 9), mode="a")
            seen += await poll_until(task, 3)
            for _ in range(4):
                seen += (await task.poll()).rows
        finally:
            await task.close()
        return numbers(seen)

    assert sorted(asyncio.run(main())) == list(range(1, 9))
