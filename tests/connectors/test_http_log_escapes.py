"""Access-log escapes read losslessly, by both sources that read access logs (`http_log`
and `files` with `format: http_log`), on real files and end to end into Parquet.

The rule (connectors/http_log/formats.py): in every string field, `request` included,
runs of `\\xhh` escapes that form valid UTF-8 become those characters; escapes that do not
(Latin-1, CP1251, truncated sequences, garbage) stay exactly as written, in the case
written; `\\"` -> `"`, `\\\\` -> `\\`. Raw bytes of the file that are not valid in the
source's encoding are read as `\\xhh` text, under the same rule. Never U+FFFD.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path
from typing import Any

import duckdb
import pytest

from connectors.files import FilesSource
from connectors.http_log import HttpLogSource, avro_schema_for
from connectors.http_log.formats import compile_format, unescape
from tests.conftest import run_cli
from tests.connectors.tasks import context, drain

pytestmark = pytest.mark.timeout(60)

# -- the rule, on strings ------------------------------------------------------------------

CASES = [
    # (as logged, as read)
    (r"caf\xc3\xa9", "café"),  # UTF-8, Apache's lowercase hex
    (r"caf\xC3\xA9", "café"),  # UTF-8, Nginx's uppercase hex
    (r"smile \xf0\x9f\x98\x80!", "smile 😀!"),  # 4 bytes
    (r"\xe2\x82\xac", "€"),
    (r"M\xe4rz", r"M\xe4rz"),  # Latin-1: kept as written
    (r"M\xE4rz", r"M\xE4rz"),  # ...in the case written
    (r"\xcf\xf0\xe8\xe2\xe5\xf2", r"\xcf\xf0\xe8\xe2\xe5\xf2"),  # CP1251 "Привет"
    (r"price \xe2\x82", r"price \xe2\x82"),  # truncated at the end of the field
    (r"\xe2\x82 mid", r"\xe2\x82 mid"),  # truncated, then text
    (r"\xc3\xa4\xe4", r"ä\xe4"),  # valid, then invalid
    (r"\xe4\xc3\xa4", r"\xe4ä"),  # invalid, then valid: still decoded
    (r"\xC3\xA4\xe4\xF0\x9F\x98\x80\xff", r"ä\xe4😀\xff"),  # mixed case, mixed validity
    (r"\xed\xa0\x80", r"\xed\xa0\x80"),  # an encoded surrogate is not UTF-8
    (r"\xc0\xaf", r"\xc0\xaf"),  # overlong
    (r"\x22quoted\x22 back\x5Cslash", '"quoted" back\\slash'),  # Nginx's escapes of " and \
    (r"say \"hi\" c:\\dir", 'say "hi" c:\\dir'),  # Apache's
    (r"tab\there\nnew", "tab\there\nnew"),
    (r"\q stays", r"\q stays"),  # an escape no server writes: as written
    (r"a\\xe4", r"a\xe4"),  # a logged backslash before "xe4" reads like the byte (the one ambiguity)
]


@pytest.mark.parametrize(("logged", "read"), CASES)
def test_unescape_decodes_valid_utf8_and_keeps_other_bytes_as_written(logged: str, read: str) -> None:
    assert unescape(logged) == read


def test_unescape_never_loses_a_byte_of_random_escaped_bytes() -> None:
    """Any bytes, escaped as a server would (either case): what is read holds every byte,
    valid UTF-8 decoded, the rest as the escapes written. Never U+FFFD or a surrogate."""
    rng = random.Random(20240501)
    alphabet = [0x41, 0xC3, 0xA4, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xE4, 0xFF, 0xED, 0xA0, 0x00, 0x16]
    for _ in range(3000):
        data = bytes(rng.choice(alphabet) if rng.random() < 0.8 else rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        case = rng.choice(["lower", "upper", "mixed"])  # Apache, Nginx, nobody
        logged = "".join(
            (r"\x%02x" if case == "lower" or case == "mixed" and rng.random() < 0.5 else r"\x%02X") % b for b in data
        )
        read = unescape(logged)
        assert "\ufffd" not in read or "\ufffd".encode() in data
        assert not re.search("[\ud800-\udfff]", read)
        # Each kept escape is one byte as logged; everything else is UTF-8 of the bytes.
        back = b"".join(
            bytes.fromhex(m.group(1)) if m.group(1) else m.group(0).encode() for m in re.finditer(r"\\x([0-9A-Fa-f]{2})|.", read, re.S)
        )
        assert back == data, (logged, read)
        kept = re.findall(r"\\x[0-9A-Fa-f]{2}", read)
        assert all(k in logged for k in kept)  # case as written
        if data.decode("utf-8", "ignore").encode() == data:
            assert read == data.decode()


# -- through the sources, on real files ------------------------------------------------------

UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"


def entry(n: int, request: str = "GET /n HTTP/1.1", referrer: str = "-", agent: str = UA) -> str:
    return f'192.0.2.{n} - - [10/Oct/2023:13:55:{n:02d} +0000] "{request}" 200 {n} "{referrer}" "{agent}"\n'


# (line as logged, expected request, referrer, user agent); path follows from request
LINES: list[tuple[str, str, str | None, str]] = [
    (entry(1, r"GET /caf\xc3\xa9?q=\xf0\x9f\x98\x80 HTTP/1.1", r"https://example.com/\xc3\xa4", r"UA \xe2\x82\xac"),
     "GET /café?q=😀 HTTP/1.1", "https://example.com/ä", "UA €"),
    (entry(2, r"GET /M\xe4rz HTTP/1.1", r"https://example.de/M\xe4rz", r"Latin \xe4\xf6\xfc"),
     r"GET /M\xe4rz HTTP/1.1", r"https://example.de/M\xe4rz", r"Latin \xe4\xf6\xfc"),
    (entry(3, r"GET /?q=\xcf\xf0\xe8\xe2\xe5\xf2 HTTP/1.1", r"https://yandex.ru/search/?text=\xcf\xf0\xe8\xe2\xe5\xf2", UA),
     r"GET /?q=\xcf\xf0\xe8\xe2\xe5\xf2 HTTP/1.1", r"https://yandex.ru/search/?text=\xcf\xf0\xe8\xe2\xe5\xf2", UA),
    (entry(4, r"GET /price\xe2\x82 HTTP/1.1", r"https://example.com/\xe2\x82", r"cut \xf0\x9f\x98"),
     r"GET /price\xe2\x82 HTTP/1.1", r"https://example.com/\xe2\x82", r"cut \xf0\x9f\x98"),
    # Nginx: uppercase hex, and " and \ as \x22 and \x5C
    (entry(5, r"GET /caf\xC3\xA9/\xE4 HTTP/1.1", r"https://example.com/\xD0\x9F\xCF", r"curl \x22x\x22 \x5C\xC3\xA4\xE4"),
     r"GET /café/\xE4 HTTP/1.1", r"https://example.com/П\xCF", 'curl "x" \\ä\\xE4'),
    # Apache: \" and \\ in request, referrer and user agent
    (entry(6, r"GET /say?\"hi\"&p=c:\\dir HTTP/1.1", r"https://example.com/\"q\"\\", r"Agent \"quoted\" back\\slash"),
     'GET /say?"hi"&p=c:\\dir HTTP/1.1', 'https://example.com/"q"\\', 'Agent "quoted" back\\slash'),
    (entry(7, r"\x16\x03\x01\x00\xfc\x03", "-", "-"), "\x16\x03\x01\x00\\xfc\x03", None, None),
]
RAW_LINE = entry(8, "GET /raw HTTP/1.1", "https://example.ru/RAW", "raw LATIN and UTF8").encode()
RAW_LINE = RAW_LINE.replace(b"RAW", "Привет".encode("cp1251")).replace(b"LATIN", b"M\xe4rz").replace(b"UTF8", "ü".encode())
RAW_EXPECTED = ("GET /raw HTTP/1.1", r"https://example.ru/\xcf\xf0\xe8\xe2\xe5\xf2", r"raw M\xe4rz and ü")


def write_logs(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "access.log").write_bytes("".join(line for line, *_ in LINES).encode("ascii") + RAW_LINE + b"garbage \xe4\n")
    with gzip.open(directory / "access.log.1.gz", "wb") as f:  # the same bytes compressed
        f.write(RAW_LINE)


def expected_rows() -> list[tuple[Any, ...]]:
    return [tuple(x) for _, *x in LINES] + [RAW_EXPECTED]


def view(rows: list[dict]) -> list[tuple[Any, ...]]:
    return sorted(((r["request"], r["referrer"], r["user_agent"]) for r in rows), key=repr)


def split_request(request: str) -> tuple[str, ...] | None:
    parts = request.split(" ")
    return tuple(parts) if len(parts) == 3 and parts[0].isalpha() else None


def check_rows(rows: list[dict], errors: list, log: Path) -> None:
    want = expected_rows() + [RAW_EXPECTED]  # the raw line is in the .gz too
    assert view(rows) == sorted(want, key=repr)
    for r in rows:
        got = (r["method"], r["path"], r["protocol"])
        assert got == (split_request(r["request"]) or (None, None, None))
        for value in r.values():
            assert not isinstance(value, str) or "\ufffd" not in value
    (error,) = errors
    assert error.record == r"garbage \xe4" and error.position == f"{log}:9"


def test_the_http_log_source_reads_escapes_and_raw_bytes_losslessly(tmp_path: Path) -> None:
    write_logs(tmp_path / "logs")
    source = HttpLogSource(HttpLogSource.Config.parse({"paths": ["logs/access.log*"]}), context(tmp_path))
    (task,) = source.tasks()
    batches = drain(task)
    check_rows([r for b in batches for r in b.rows], [e for b in batches for e in b.errors], tmp_path / "logs" / "access.log")


def test_the_files_source_reads_access_logs_by_the_same_rule(tmp_path: Path) -> None:
    write_logs(tmp_path / "logs")
    ctx = context(tmp_path, schemas={"t": avro_schema_for("combined")})
    config = FilesSource.Config.parse({"paths": ["logs/access.log*"], "format": "http_log"})
    (task,) = FilesSource(config, ctx).tasks()
    batches = drain(task)
    check_rows([r for b in batches for r in b.rows], [e for b in batches for e in b.errors], tmp_path / "logs" / "access.log")


def test_escapes_are_undone_in_every_string_field_of_a_custom_format() -> None:
    fmt = r'%h %u %t \"%r\" %>s %b \"%{X-Forwarded-For}i\" \"%{Cookie}i\"'
    text = r'192.0.2.1 J\xc3\xbcrgen [10/Oct/2023:13:55:36 +0000] "GET /\xe4 HTTP/1.1" 200 1 "\x31.2.3.4" "a=\"\xe2\x82\""'
    rows, errors, _ = compile_format(fmt).parse_lines([text])
    assert errors == []
    assert {k: v for k, v in rows[0].items() if isinstance(v, str)} == {
        "remote_host": "192.0.2.1", "user": "Jürgen", "request": r"GET /\xe4 HTTP/1.1", "method": "GET",
        "path": r"/\xe4", "protocol": "HTTP/1.1", "x_forwarded_for": "1.2.3.4", "cookie": r'a="\xe2\x82"',
    }


# -- end to end: pipeline run --once into Parquet --------------------------------------------


def test_parquet_holds_literal_cp1251_escapes_and_decoded_utf8_from_both_sources(tmp_path: Path) -> None:
    """The issue's check: a log whose referrer has CP1251 `\\xhh` escapes and one with UTF-8
    escapes: the Parquet holds the literal escapes and the decoded characters respectively.
    One log is read by `http_log`, the other by `files` (format http_log), into one topic."""
    cp1251 = r"https://yandex.ru/search/?text=\xcf\xf0\xe8\xe2\xe5\xf2"
    utf8 = r"https://yandex.ru/search/?text=\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82"
    for directory, referrer in (("tail", cp1251), ("landing", utf8)):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "access.log").write_text(entry(1, referrer=referrer) + entry(2), encoding="ascii")
    (tmp_path / "activity.avsc").write_text(json.dumps(avro_schema_for("combined")))
    (tmp_path / "spec.yaml").write_text(
        """\
name: escapes-e2e
topics:
  activity: {partitions: 2, schema: activity.avsc, key: remote_host}
sources:
  - {name: tail, connector: http_log, topic: activity, config: {paths: ["tail/*.log"]}}
  - {name: landing, connector: files, topic: activity, config: {paths: ["landing/*.log"], format: http_log}}
sinks:
  - {name: lake, connector: parquet, topics: [activity], config: {path: out}}
"""
    )
    result = run_cli("run", "spec.yaml", "--once", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = duckdb.connect().execute(
        f"select referrer, count(*) from read_parquet('{tmp_path}/out/activity/**/*.parquet', hive_partitioning=false) "
        "group by referrer order by referrer nulls first"
    ).fetchall()
    assert rows == [
        (None, 2),
        (r"https://yandex.ru/search/?text=\xcf\xf0\xe8\xe2\xe5\xf2", 1),  # literally, backslashes and all
        ("https://yandex.ru/search/?text=Привет", 1),
    ]
