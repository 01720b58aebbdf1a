"""A test harness for plugin authors: conformance checks for connectors and transforms,
and two test connectors to build pipelines around yours.

Each check drives your class exactly as the engine does (the lifecycles documented in
`runner.connector` and `runner.transform`), runs every named check, and raises one
`ConformanceError` (an `AssertionError`, so pytest shows it as a test failure) listing each
check that failed: what was expected, what happened, and which rule of the contract it
breaks. Call them from ordinary (synchronous) pytest tests::

    from runner.testing import check_source, check_sink, check_transform

    def test_my_source(tmp_path):
        (tmp_path / "in.csv").write_text("a,b\\n1,2\\n3,4\\n")
        records = check_source(MySource, {"path": "in.csv"}, tmp_path=tmp_path)
        assert records == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]

    def test_my_sink(tmp_path):
        check_sink(MySink, {"path": str(tmp_path / "out")},
                   read=lambda: read_my_output(tmp_path / "out"), tmp_path=tmp_path)

    def test_my_transform():
        rows = check_transform(MyTransform, {"fields": ["name"]},
                               records=[{"name": "ada"}], schema=MY_AVRO_SCHEMA)
        assert rows == [{"name": "ADA"}]

`check_source(cls, config, *, tmp_path=None, schema=None, max_records=100_000, idle_polls=5)`
    Builds the source with `config` (relative paths resolve against `tmp_path`, or the
    current directory), and for each of its `tasks()`:

    1. config — `Config.parse` refuses an unknown key naming it, reports every missing
       required setting, every setting has help text, `repr` of the config hides secrets.
    2. read all — open({}), poll until None (a bounded source), `idle_polls` empty batches
       in a row (an unbounded one) or `max_records`. Every batch with records carries
       JSON-serialisable `source_offsets`; records are dicts; with `schema`, every record
       encodes with the engine's Avro encoder (failures name the record and the field).
       Different tasks own different source partitions.
    3. resume after restart — a new task opened with the offsets committed through the
       middle batch (merged per source partition and stored as JSON, as the engine does)
       delivers exactly the records after that batch, nothing lost, nothing repeated.
    4. simulated crash — a task polls a few batches past the committed offsets and is
       closed without committing them; a new task from the committed offsets delivers
       exactly those records again, and the rest.
    5. close is always safe — right after open, and on a task that was never opened.

    Returns the records read in check 2 (all tasks, in task order). `committed()` is
    never handed offsets older than ones it was already given, so a source that
    acknowledges upstream there (moves or deletes what it read) can be checked too. A
    source that returns more than `idle_polls` empty batches in a row before its data
    (a slow start, a long pause) is taken for an idle unbounded one: raise `idle_polls`.

`check_sink(cls, config, *, read, schema=None, make_record=None, records=300, tmp_path=None)`
    `read()` returns every record now durable in your sink's output, as dicts (fields
    beyond those of the records put are ignored). Records `make_record(0..)` (default:
    {id, name, amount}) are Avro-encoded and decoded with `schema` as the engine would,
    spread over partitions 0 and 1 of topic "conformance", and put in batches in offset
    order (with `arrow_schema` for `wants = "columns"` sinks). The checks:

    1. config — as for sources.
    2. flush before close — open, put, flush, close: the output holds everything flush
       reported durable (None: all put; a dict: up to those offsets, plus what close
       returns), once each, and nothing that was never put.
    3. resume after restart — a new task: offsets returned by open must not exceed what
       was put; records are redelivered from there (or from the committed offsets), more
       are put, flushed, closed: the output holds them all.
    4. no loss across a simulated crash — put, flush, put, close without flush (the
       engine's abort); a new task gets the redelivery: nothing flushed is lost, every
       record ever sent ends up in the output (duplicates are allowed: at-least-once).
    5. record errors from put — `put` returns None or RecordErrors naming records of the
       batch (`position` or `record`); those records are not expected in the output.
    6. close is always safe — open then close with nothing put keeps the output; close on
       a task that was never opened does not raise.

`check_transform(cls, config, *, records, schema, side="sink")`
    Applies the transform to one batch of `records` (positions "record[i]", record
    offsets 0..n-1). On a sink, `schema` is the topic's: records are decoded through it
    and the output must fit `schema(schema)`; on a source, `schema` is the topic's, which
    the output must fit. Checks config (as above), that `apply` returns a Batch whose
    per-record bookkeeping matches its rows, that `schema()` neither modifies its
    argument nor returns invalid Avro, that every output row encodes, and that errors
    are RecordErrors of stage "transform". Returns the output rows.

Test connectors and whole pipelines
-----------------------------------
This module is a plugin (it is not an entry point: `pipeline plugins` does not list it).
`run_spec(path, plugins=(my_plugin,))` loads it with your plugin modules, checks the spec
and runs it (`once=True`: until the sources end and the sinks caught up), returning the
`RunResult` (`result.counters`: records in and out, errors, dead letters per connector).
In such a spec:

- `connector: scripted` (`ScriptedSource`) plays `config.script`, a list of steps:
  `{records: [{...}, ...]}` one batch; `{pause: 0.5}` empty batches for that long;
  `{error: "message"}` a data error (stage "source", position "script[i]"; an optional
  `record:` is the bad input); `{fail: "message", times: 2}` poll raises RetryableError
  that many times; `{end: true}` the end. After the last step it ends, or with
  `follow: true` returns empty batches until stopped. Its offset is the next step.
- `connector: list` (`ListSink`) appends what it flushes to
  `ListSink.received[<its name in the spec>]` (clear it in your test); what was not
  flushed when it is closed is discarded, as an at-least-once sink should.

The connectors under check get a `ConnectorContext` named "conformance" (pipeline and
topic too), with `spec_dir` = `tmp_path` (else the current directory) and `state_dir` =
`tmp_path / "state"` (else a temporary directory). Every call into a connector is bounded
by `TIMEOUT` seconds (30), so a hanging connector fails the check with a message instead
of hanging the test run; RetryableError from poll, put and flush is retried, as the
engine does.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import json
import math
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fastavro

from runner import engine
from runner.batch import Batch, json_default
from runner.config import Config, ConfigError, setting
from runner.connector import ConnectorContext, Sink, SinkTask, Source, SourceTask, TopicPartition
from runner.errors import FatalError, RecordError, RetryableError
from runner.hookspecs import hookimpl
from runner.plugins import load_plugins
from runner.schema.arrow import avro_to_arrow
from runner.schema.serde import AvroDecoder, AvroEncoder
from runner.transform import Transform, TransformContext

__all__ = [
    "ConformanceError",
    "ListSink",
    "ScriptedSource",
    "check_sink",
    "check_source",
    "check_transform",
    "run_spec",
]

#: Seconds any one call into a connector (open, poll, put, flush, close…) may take.
TIMEOUT = 30.0
#: RetryableErrors in a row from one poll/put/flush before the check gives up.
RETRIES = 20

NAME = "conformance"  # the connector's name, pipeline and topic in the checks
_UNKNOWN_KEY = "conformance_unknown_setting"
_SECRET = "conformance-secret-0f6c2b"

DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "ConformanceRecord",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "name", "type": "string"},
        {"name": "amount", "type": "double"},
    ],
}


def default_record(i: int) -> dict[str, Any]:
    """The default `make_record` of `check_sink`: fits `DEFAULT_SCHEMA`."""
    return {"id": i, "name": f"record-{i}", "amount": i * 1.25}


# -- the report ---------------------------------------------------------------------------------


class ConformanceError(AssertionError):
    """One or more conformance checks failed. `failures` maps each failed check to its
    problems; `passed` and `skipped` (check -> why it did not run) complete the picture."""

    def __init__(
        self,
        subject: str,
        failures: dict[str, list[str]],
        passed: list[str] | None = None,
        skipped: dict[str, str] | None = None,
    ) -> None:
        self.subject = subject
        self.failures = failures
        self.passed = list(passed or [])
        self.skipped = dict(skipped or {})
        super().__init__(self._message())

    def _message(self) -> str:
        total = len(self.failures) + len(self.passed) + len(self.skipped)
        lines = [f"{self.subject}: {len(self.failures)} of {total} conformance checks failed"]
        rules: set[str] = set()
        for check, problems in self.failures.items():
            for problem in problems:
                text, _, rule = problem.partition("\nRule ")
                if rule and rule not in rules:  # each rule once, after its first problem
                    rules.add(rule)
                    text += "\nRule " + rule
                text = text.replace("\n", "\n    ")
                lines.append(f"- {check}: {text}")
        if self.passed:
            lines.append(f"passed: {', '.join(self.passed)}")
        for check, why in self.skipped.items():
            lines.append(f"not run: {check} ({why})")
        return "\n".join(lines).rstrip()


class _Report:
    def __init__(self, subject: str, checks: list[str]) -> None:
        self.subject = subject
        self.checks = checks
        self.problems: dict[str, list[str]] = {}
        self.skipped: dict[str, str] = {}
        self.ran: set[str] = set()

    def run(self, check: str) -> None:
        self.ran.add(check)

    def add(self, check: str, problem: str) -> None:
        self.ran.add(check)
        problems = self.problems.setdefault(check, [])
        if problem not in problems:
            problems.append(problem)

    def skip(self, check: str, why: str) -> None:
        if check not in self.ran and check not in self.skipped:
            self.skipped[check] = why

    def failed(self, check: str) -> bool:
        return check in self.problems

    def raise_if_failed(self) -> None:
        for check in self.checks:
            if check not in self.ran:
                self.skip(check, "not reached")
        if self.problems:
            failures = {c: self.problems[c] for c in self.checks if c in self.problems}
            failures.update({c: p for c, p in self.problems.items() if c not in failures})
            passed = [c for c in self.checks if c in self.ran and c not in self.problems]
            skipped = {c: w for c, w in self.skipped.items() if c not in self.problems}
            raise ConformanceError(self.subject, failures, passed, skipped)


class _Broke(Exception):
    """A call into the connector failed; the message says which call and how."""


# -- helpers ------------------------------------------------------------------------------------


def _describe_exc(exc: BaseException) -> str:
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    return f"{type(exc).__name__}: {exc}{where}"


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _lenient_default(value: Any) -> Any:
    try:
        return json_default(value)
    except TypeError:
        return repr(value)


def _canon(row: Any) -> str:
    """A record as canonical JSON: what the checks compare."""
    try:
        return json.dumps(row, sort_keys=True, default=_lenient_default, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(row)


def _stored(offsets: dict[str, Any]) -> dict[str, Any]:
    """Offsets as the engine stores them: keys as strings, values through JSON."""
    return {str(k): json.loads(json.dumps(v, sort_keys=True)) for k, v in offsets.items()}


def _offsets_text(offsets: dict[Any, Any]) -> str:
    try:
        return _short(json.dumps(offsets, sort_keys=True, default=str), 240)
    except (TypeError, ValueError):
        return _short(offsets, 240)


def _tps_text(offsets: dict[TopicPartition, int]) -> str:
    return "{" + ", ".join(f"{tp}: {off}" for tp, off in sorted(offsets.items(), key=lambda kv: str(kv[0]))) + "}"


def _run_sync(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to completion from synchronous code, even under a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(main())
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="runner.testing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


async def _call(what: str, fn: Callable[[], Any], *, retry: bool = False) -> Any:
    """Await `fn()` bounded by TIMEOUT; retry RetryableError where the engine does."""
    attempts = 0
    while True:
        try:
            result = fn()
        except RetryableError as exc:
            error: BaseException = exc
        except Exception as exc:
            raise _Broke(f"{what} raised {_describe_exc(exc)}") from exc
        else:
            if not inspect.isawaitable(result):
                raise _Broke(f"{what} is not a coroutine: declare it with `async def` (tasks are awaited on "
                             "the engine's event loop)")
            try:
                async with asyncio.timeout(TIMEOUT) as cm:
                    return await result
            except TimeoutError as exc:
                if cm.expired():
                    raise _Broke(f"{what} did not return within {TIMEOUT:g} s: a call must not block or wait "
                                 "forever (a poll with nothing to read waits up to about a second and returns "
                                 "an empty Batch; run blocking I/O with asyncio.to_thread)") from None
                raise _Broke(f"{what} raised {_describe_exc(exc)}") from exc
            except RetryableError as exc:
                error = exc
            except Exception as exc:
                raise _Broke(f"{what} raised {_describe_exc(exc)}") from exc
        if not retry:
            raise _Broke(f"{what} raised {_describe_exc(error)}: the engine does not retry {what.split('(')[0]}() "
                         "(only poll, put and flush), so the run would stop")
        attempts += 1
        if attempts >= RETRIES:
            raise _Broke(f"{what} raised RetryableError {attempts} times in a row ({error}): the world should "
                         "come back; the engine would retry forever with backoff")
        retry_after = getattr(error, "retry_after", None)
        await asyncio.sleep(min(retry_after or 0.01, 0.5))


@contextmanager
def _state_root(tmp_path: Any) -> Iterator[Path]:
    if tmp_path is not None:
        yield Path(tmp_path)
        return
    with tempfile.TemporaryDirectory(prefix="pipeline-conformance-") as tmp:
        yield Path(tmp)


def _context(spec_dir: Path, state_root: Path, schema: dict | None, partitions: int) -> ConnectorContext:
    return ConnectorContext(
        name=NAME,
        pipeline=NAME,
        spec_dir=spec_dir,
        state_dir=state_root / "state",
        topics=(NAME,),
        schemas={NAME: schema} if schema is not None else {},
        partitions={NAME: partitions},
    )


# -- config -------------------------------------------------------------------------------------

CONFIG = "config"


def _check_config(report: _Report, cls: type, config: dict[str, Any]) -> Any:
    """The config checks; returns the parsed config (None if `config` does not parse)."""
    report.run(CONFIG)
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, Config)):
        report.add(CONFIG, f"{cls.__qualname__}.Config is not a subclass of runner.connector.Config: declare "
                           "`class Config(Config)` with `setting(...)`s")
        return None
    try:
        settings = config_cls.settings()
    except Exception as exc:
        report.add(CONFIG, f"Config.settings() raised {_describe_exc(exc)}")
        return None
    for info in settings:
        if not (info.help or "").strip():
            report.add(CONFIG, f"setting {info.name!r} has no help text: declare it with "
                               f"`setting(..., help=\"...\")`; the help is what `pipeline connectors show` prints "
                               "and what the error for a missing required setting quotes")
    parsed = None
    try:
        parsed = config_cls.parse(config)
    except ConfigError as exc:
        report.add(CONFIG, f"the config given to the check does not parse: {exc}")
    except Exception as exc:
        report.add(CONFIG, f"Config.parse(config) raised {_describe_exc(exc)} instead of returning the config "
                           "or raising ConfigError")
    # An unknown key.
    try:
        config_cls.parse({**config, _UNKNOWN_KEY: 1})
    except ConfigError as exc:
        if not any(key == _UNKNOWN_KEY for key, _ in exc.problems):
            report.add(CONFIG, f"Config.parse refused the unknown setting {_UNKNOWN_KEY!r} but no problem names it "
                               f"(problems: {exc}); each problem is (key, message) so the spec error points at "
                               "the key")
    except Exception as exc:
        report.add(CONFIG, f"Config.parse with an unknown setting raised {_describe_exc(exc)} instead of "
                           "ConfigError")
    else:
        report.add(CONFIG, f"Config.parse accepted the unknown setting {_UNKNOWN_KEY!r}: unknown keys must be "
                           "refused with a ConfigError naming the key, so a misspelt setting in a spec is "
                           "reported instead of silently ignored")
    # Every required setting missing.
    required = [info.name for info in settings if info.required]
    if required:
        try:
            config_cls.parse({})
        except ConfigError as exc:
            named = {key for key, _ in exc.problems}
            missing = [name for name in required if name not in named]
            if missing:
                report.add(CONFIG, f"Config.parse({{}}) did not report the required setting(s) "
                                   f"{', '.join(map(repr, missing))} as missing (problems: {exc}): every problem "
                                   "is reported at once, each with its key")
        except Exception as exc:
            report.add(CONFIG, f"Config.parse({{}}) raised {_describe_exc(exc)} instead of a ConfigError listing "
                               f"the missing required settings ({', '.join(required)}); Config.check gets the raw "
                               "mapping and must cope with missing keys and values of the wrong type")
        else:
            report.add(CONFIG, f"Config.parse({{}}) succeeded although {', '.join(map(repr, required))} "
                               "are required")
    # Secrets are never shown.
    for info in settings:
        if not info.secret:
            continue
        shown = None
        try:
            trial = config_cls.parse({**config, info.name: _SECRET})
            marker = _SECRET
        except ConfigError as exc:
            if _SECRET in str(exc):
                report.add(CONFIG, f"a ConfigError message shows the value of secret setting {info.name!r}: "
                                   "never include a secret's value in a message")
            value = config.get(info.name)
            if parsed is None or not isinstance(value, str) or len(value) < 4:
                continue
            trial, marker = parsed, value
        except Exception:
            continue
        try:
            text = repr(trial) + "\n" + str(trial)
        except Exception as exc:
            report.add(CONFIG, f"repr() of the parsed config raised {_describe_exc(exc)}")
            continue
        if marker in text:
            shown = repr(trial).replace(marker, "<the secret>")
            report.add(CONFIG, f"repr() of the parsed config shows the value of secret setting {info.name!r} "
                               f"({_short(shown)}): secrets are masked as *** (the default Config.__repr__ "
                               "does it; keep it if you override __repr__)")
        try:
            config_cls.parse({**config, info.name: _SECRET, _UNKNOWN_KEY: 1})
        except ConfigError as exc:
            if _SECRET in str(exc):
                report.add(CONFIG, f"a ConfigError message shows the value of secret setting {info.name!r}: "
                                   "never include a secret's value in a message")
        except Exception:
            pass
    return parsed


# -- sources ------------------------------------------------------------------------------------

READ, RESUME, CRASH, CLOSE = "read all", "resume after restart", "simulated crash", "close is always safe"
MAX_POLLS = 1_000_000


@dataclass
class _Polled:
    rows: list[Any]
    canon: list[str]
    offsets: dict[str, Any]
    original: dict[str, Any]  # source_offsets as returned (handed to committed)
    errors: int


@dataclass
class _Read:
    batches: list[_Polled] = field(default_factory=list)
    ended: str = "end"  # "end" (poll returned None), "idle" (empty polls), "limit" (records)
    bad_offsets: bool = False  # some source_offsets were not JSON-serialisable

    @property
    def canon(self) -> list[str]:
        return [c for b in self.batches for c in b.canon]

    @property
    def rows(self) -> list[Any]:
        return [r for b in self.batches for r in b.rows]


async def _poll_all(
    task: SourceTask,
    *,
    stop_after: int,
    idle_polls: int,
    batches_limit: int | None = None,
    problems: _Findings | None = None,
    encoder: AvroEncoder | None = None,
    on_batch: Callable[[_Polled], Awaitable[None]] | None = None,
    out: _Read | None = None,
) -> _Read:
    """Poll until None, `idle_polls` empty batches in a row, `stop_after` records or
    `batches_limit` batches. `problems`: collect what check 2 verifies of each batch."""
    read = out if out is not None else _Read()
    idle = 0
    records = 0
    for _ in range(MAX_POLLS):
        if records >= stop_after:
            read.ended = "limit"
            return read
        if batches_limit is not None and len(read.batches) >= batches_limit:
            read.ended = "limit"
            return read
        batch = await _call("poll()", task.poll, retry=True)
        if batch is None:
            read.ended = "end"
            return read
        if not isinstance(batch, Batch):
            raise _Broke(f"poll() returned {type(batch).__name__} {_short(batch, 80)}: it returns a Batch, or None "
                         "at the end")
        offsets = batch.source_offsets
        if not (len(batch) or batch.errors or offsets):
            idle += 1
            if idle >= idle_polls:
                read.ended = "idle"
                return read
            continue
        idle = 0
        index = len(read.batches)
        try:
            rows = list(batch.rows)
        except Exception as exc:
            raise _Broke(f"batch {index}: reading its records (batch.rows) raised {_describe_exc(exc)}") from exc
        if problems is not None:
            _verify_batch(index, batch, rows, records, problems, encoder)
        try:
            stored = _stored(offsets) if isinstance(offsets, dict) else {}
        except (TypeError, ValueError):
            stored = {}
            read.bad_offsets = True
            if problems is None:
                raise _Broke(f"batch {index}: source_offsets are not JSON-serialisable") from None
        polled = _Polled(rows, [_canon(r) for r in rows], stored, offsets, len(batch.errors))
        read.batches.append(polled)
        records += len(rows)
        if on_batch is not None:
            await on_batch(polled)
    raise _Broke(f"poll() was called {MAX_POLLS} times without the source ending or going idle")


class _Findings:
    """Problems of check 2, one per kind: the first batch's message, and how many more
    batches had it."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[Any]] = {}
        self.schema_failures = 0

    def append(self, message: str, kind: str | None = None) -> None:
        entry = self.kinds.setdefault(kind or message, [message, 0])
        entry[1] += 1

    def messages(self) -> list[str]:
        out = []
        for message, count in self.kinds.values():
            out.append(message + (f" (and in {count - 1} more batch{'es' if count > 2 else ''})" if count > 1 else ""))
        return out


def _verify_batch(index: int, batch: Batch, rows: list[Any], before: int, problems: _Findings,
                  encoder: AvroEncoder | None) -> None:
    offsets = batch.source_offsets
    if not isinstance(offsets, dict):
        problems.append(f"batch {index}: source_offsets is {type(offsets).__name__}, not a dict of source "
                        "partition -> offset", "offsets type")
    else:
        if rows and not offsets:
            problems.append(f"batch {index} has {len(rows)} records but no source_offsets: after a restart the "
                            "source could not resume after them (give, with each batch, the offset reached in "
                            "each source partition)", "no offsets")
        try:
            json.dumps(offsets)
        except (TypeError, ValueError) as exc:
            problems.append(f"batch {index}: source_offsets {_short(offsets)} are not JSON-serialisable ({exc}): "
                            "the engine stores offsets as JSON (the embedded broker stops the run with 'offset is "
                            "not JSON-serialisable'); use strings, numbers, lists and dicts", "offsets json")
    for j, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"batch {index}, record {j}: a {type(row).__name__} ({_short(row, 80)}), not a dict: "
                            "records are dicts (Batch(rows)) or Arrow columns (Batch(columns=...))", "not dicts")
            break
    for j, error in enumerate(batch.errors):
        if not isinstance(error, RecordError):
            problems.append(f"batch {index}: errors[{j}] is a {type(error).__name__}, not a RecordError",
                            "errors type")
            break
    if encoder is not None and rows and all(isinstance(r, dict) for r in rows):
        _, failures = encoder.encode(rows)
        for f in failures:
            problems.schema_failures += 1
            if problems.schema_failures <= 5:
                where = batch.position(f.index)
                at = f" ({where})" if where else ""
                problems.append(f"record {before + f.index} (batch {index}){at} does not fit the schema: {f.error}")


def _difference(expected: list[str], got: list[str], earlier: list[str]) -> str:
    """What is wrong with `got` (records delivered) against `expected`."""
    exp_c, got_c = Counter(expected), Counter(got)
    missing = exp_c - got_c
    extra = got_c - exp_c
    repeated = extra & Counter(earlier)
    unknown = extra - repeated
    parts = []
    if repeated:
        first = next(c for c in got if c in repeated)
        parts.append(f"{sum(repeated.values())} repeat records delivered and committed before the restart "
                     f"(duplicates), e.g. {_short(first)}")
    if missing:
        first = next(c for c in expected if c in missing)
        parts.append(f"{sum(missing.values())} of the expected records are missing (lost), e.g. {_short(first)}")
    if unknown:
        first = next(c for c in got if c in unknown)
        parts.append(f"{sum(unknown.values())} records were never delivered by the first read, e.g. {_short(first)}")
    if not parts:
        i = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
        parts.append(f"the same records in another order: record {i} should be {_short(expected[i])}, "
                     f"got {_short(got[i])}")
    return "; ".join(parts)


def check_source(
    source_cls: type[Source],
    config: dict[str, Any],
    *,
    tmp_path: Any = None,
    schema: dict | None = None,
    max_records: int = 100_000,
    idle_polls: int = 5,
) -> list[dict]:
    """Run the source conformance checks (see the module docstring); return the records
    read, or raise ConformanceError listing every failed check."""
    if not (isinstance(source_cls, type) and issubclass(source_cls, Source)):
        raise TypeError(f"check_source needs a subclass of runner.connector.Source, got {source_cls!r}")
    if idle_polls < 1 or max_records < 1:
        raise ValueError("idle_polls and max_records must be at least 1")
    encoder = AvroEncoder(1, copy.deepcopy(schema)) if schema is not None else None
    report = _Report(f"check_source({source_cls.__qualname__})", [CONFIG, READ, RESUME, CRASH, CLOSE])
    parsed = _check_config(report, source_cls, dict(config))
    if parsed is None:
        for check in (READ, RESUME, CRASH, CLOSE):
            report.skip(check, "the config does not parse")
        report.raise_if_failed()
    with _state_root(tmp_path) as root:
        spec_dir = Path(tmp_path) if tmp_path is not None else Path.cwd()
        context = _context(spec_dir, root, schema, 1)

        def make() -> Source:
            return source_cls(source_cls.Config.parse(dict(config)), context)

        records = _run_sync(lambda: _source_checks(report, make, encoder, max_records, idle_polls))
    report.raise_if_failed()
    return records


async def _source_checks(report: _Report, make: Callable[[], Source], encoder: AvroEncoder | None,
                         max_records: int, idle_polls: int) -> list[dict]:
    try:
        count = len(_tasks(make()))
    except _Broke as exc:
        report.add(READ, str(exc))
        for check in (RESUME, CRASH, CLOSE):
            report.skip(check, "the source has no tasks")
        return []
    label = (lambda i: f"task {i}: ") if count > 1 else (lambda i: "")

    def new_task(i: int) -> SourceTask:
        tasks = _tasks(make())
        if len(tasks) != count:
            raise _Broke(f"tasks() returned {len(tasks)} tasks, and {count} before: the engine calls it again "
                         "for each task it starts and expects the same list")
        return tasks[i]

    stored: dict[str, Any] = {}  # what the engine would have stored, merged per source partition
    # 2. read all: every task from no offsets; committed() through its middle batch.
    firsts: dict[int, _Read] = {}
    middles: dict[int, int] = {}
    report.run(READ)
    owners: dict[str, int] = {}
    shared = False
    for i in range(count):
        problems = _Findings()
        read = _Read()
        try:
            task = new_task(i)
            async with _session(task, {}):
                await _poll_all(task, stop_after=max_records, idle_polls=idle_polls, problems=problems,
                                encoder=encoder, out=read)
                if read.batches:
                    middle = middles[i] = (len(read.batches) - 1) // 2
                    for polled in read.batches[: middle + 1]:
                        if polled.original:
                            await _call("committed(offsets)", lambda o=polled.original: task.committed(o))
                            stored.update(polled.offsets)
        except _Broke as exc:
            problems.append(str(exc))
            read.ended = "broke"
        if problems.schema_failures > 5:
            problems.append(f"{problems.schema_failures - 5} more records do not fit the schema")
        for problem in problems.messages():
            report.add(READ, label(i) + problem)
        if read.ended == "broke" or read.bad_offsets:
            continue
        if not read.canon:
            report.add(READ, label(i) + "the source delivered no records: give check_source a config (and "
                                        "input) that produces some, or the checks of resume verify nothing")
            continue
        firsts[i] = read
        for polled in read.batches:
            for part in polled.offsets:
                if owners.setdefault(part, i) != i:
                    shared = True
                    report.add(READ, f"tasks {owners[part]} and {i} both give offsets for source partition "
                                     f"{part!r}: each task must own distinct source partitions (the offsets of "
                                     "all tasks are stored under the connector, so one overwrites the other)")
    if shared:
        firsts.clear()
        report.skip(RESUME, "the tasks share source partitions")
        report.skip(CRASH, "the tasks share source partitions")
    if not firsts:
        report.skip(RESUME, "needs a task that got through `read all`")
        report.skip(CRASH, "needs a task that got through `read all`")

    def expectation(i: int) -> tuple[list[str], list[str], str]:
        read, middle = firsts[i], middles[i]
        earlier = [c for b in read.batches[: middle + 1] for c in b.canon]
        after = [c for b in read.batches[middle + 1:] for c in b.canon]
        return earlier, after, read.ended

    def reread_limits(expected: list[str], ended: str) -> int:
        return len(expected) if ended == "limit" else max_records

    def verdict(i: int, got: _Read, expected: list[str], earlier: list[str], ended: str) -> str | None:
        delivered = got.canon
        if ended == "limit":
            delivered = delivered[: len(expected)]
        if delivered != expected:
            return f"it delivered {len(delivered)}: {_difference(expected, delivered, earlier)}"
        if ended == "end" and got.ended != "end":
            how = "kept returning empty batches" if got.ended == "idle" else "went on delivering records"
            return (f"it delivered them, but then {how} where the first read ended (poll returned None): a "
                    "restarted bounded source must end as well")
        return None

    snapshot = copy.deepcopy(stored)
    # 3. resume after restart: a new task from the offsets through the middle batch.
    for i in sorted(firsts):
        report.run(RESUME)
        earlier, expected, ended = expectation(i)
        n, middle = len(firsts[i].batches), middles[i]
        read = _Read()
        try:
            task = new_task(i)
            async with _session(task, copy.deepcopy(snapshot)):
                await _poll_all(task, stop_after=reread_limits(expected, ended), idle_polls=idle_polls, out=read)
        except _Broke as exc:
            report.add(RESUME, label(i) + f"after a restart from the committed offsets: {exc}")
            continue
        wrong = verdict(i, read, expected, earlier, ended)
        if wrong:
            then = ", then the end" if ended == "end" else ""
            report.add(RESUME, label(i) + (
                f"a new task opened with the offsets committed through batch {middle + 1} of {n} "
                f"({_offsets_text(snapshot)}) must deliver exactly the {len(expected)} records after that "
                f"batch{then}; {wrong}.\nRule (SourceTask.open): position the task after the stored offsets, so "
                "a restarted source resumes exactly after the last committed batch: nothing lost, nothing "
                "repeated."))
    # 4. simulated crash: poll past the committed point, close without committing; restart.
    crashed: dict[int, int] = {}
    for i in sorted(firsts):
        report.run(CRASH)
        n, middle = len(firsts[i].batches), middles[i]
        few = max(1, min(3, math.ceil((n - middle - 1) / 2)))
        read = _Read()
        try:
            task = new_task(i)
            async with _session(task, copy.deepcopy(snapshot)):
                await _poll_all(task, stop_after=max_records, idle_polls=idle_polls, batches_limit=few, out=read)
        except _Broke as exc:
            report.add(CRASH, label(i) + f"a task polling past the committed offsets: {exc}")
            continue
        crashed[i] = len(read.batches)
    for i in sorted(crashed):
        earlier, expected, ended = expectation(i)
        read = _Read()
        try:
            task = new_task(i)

            async def commit(polled: _Polled, task: SourceTask = task) -> None:
                if polled.original:
                    await _call("committed(offsets)", lambda: task.committed(polled.original))
                    stored.update(polled.offsets)

            async with _session(task, copy.deepcopy(snapshot)):
                await _poll_all(task, stop_after=reread_limits(expected, ended), idle_polls=idle_polls, out=read,
                                on_batch=commit)
        except _Broke as exc:
            report.add(CRASH, label(i) + f"after the crash, a new task from the committed offsets: {exc}")
            continue
        wrong = verdict(i, read, expected, earlier, ended)
        if wrong:
            report.add(CRASH, label(i) + (
                f"a task polled {crashed[i]} batch{'' if crashed[i] == 1 else 'es'} past the committed offsets "
                f"({_offsets_text(snapshot)}) "
                f"and was closed without committing them (a crash); a new task opened with the committed "
                f"offsets must deliver exactly the {len(expected)} uncommitted records again and the rest; "
                f"{wrong}.\nRule (SourceTask.poll, committed): records returned but not committed are read "
                "again after a restart; keep no position that moves on poll alone (acknowledge upstream only "
                "in committed())."))
    # 5. close is always safe.
    report.run(CLOSE)
    for i in range(count):
        try:
            task = new_task(i)
            await _call("open(offsets)", lambda: task.open(copy.deepcopy(stored)))
        except _Broke as exc:
            report.add(CLOSE, label(i) + f"open() before the close: {exc}")
        else:
            try:
                await _call("close()", task.close)
            except _Broke as exc:
                report.add(CLOSE, label(i) + f"close() right after open() (no poll): {exc}; close is called once, "
                                             "always, also when a run stops before the first poll")
        try:
            task = new_task(i)
            await _call("close()", task.close)
        except _Broke as exc:
            report.add(CLOSE, label(i) + f"close() of a task that was never opened: {exc}; the engine closes a "
                                         "task whose start failed (the stored offsets could not be read), so "
                                         "close must cope with a task open() never ran on")
    return [row for i in sorted(firsts) for row in firsts[i].rows]


def _tasks(source: Source) -> list[SourceTask]:
    try:
        tasks = source.tasks()
    except Exception as exc:
        raise _Broke(f"tasks() raised {_describe_exc(exc)}") from exc
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise _Broke(f"tasks() returned {_short(tasks, 80)}: a source returns a list of at least one SourceTask")
    for task in tasks:
        if not isinstance(task, SourceTask):
            raise _Broke(f"tasks() returned a {type(task).__name__}, not a runner.connector.SourceTask")
    return list(tasks)


class _session:
    """open(offsets) … close(), as the engine does: close always runs, and a close that
    fails after the body failed does not hide the first failure."""

    def __init__(self, task: SourceTask, offsets: dict[str, Any]) -> None:
        self.task = task
        self.offsets = offsets

    async def __aenter__(self) -> None:
        try:
            await _call("open(offsets)", lambda: self.task.open(self.offsets))
        except _Broke:
            try:
                await _call("close()", self.task.close)
            except _Broke:
                pass
            raise

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            await _call("close()", self.task.close)
        except _Broke:
            if exc is None:
                raise
        return False


# -- sinks --------------------------------------------------------------------------------------

FLUSH, SINK_RESUME, SINK_CRASH, PUT_ERRORS = (
    "flush before close", "resume after restart", "no loss across a simulated crash", "record errors from put",
)

_FLUSH_NONE = "flush() returned None (which promises everything put so far is durable)"
_FLUSH_RULE = ("Rule (SinkTask.flush): flush makes everything put so far durable and returns None, or returns "
               "{TopicPartition: next_offset} for how far the output is durable; what it reports is committed, so "
               "the engine never delivers it again.")
_ABORT_RULE = ("Rule (SinkTask.close): on abort, close runs without flush: discard only what was not flushed (it is "
               "delivered again); what flush reported durable must stay in the output.")
_OPEN_RULE = ("Rule (SinkTask.open): open positions the task (None: from the committed offsets; a dict: from its "
              "own output's position); it must not remove output that flush reported durable.")


@dataclass
class _Stored:
    row: dict[str, Any]  # as decoded from Avro, what put gets
    canon: str  # projected on the compared fields
    key: bytes
    timestamp: int


class _SinkDriver:
    """The engine's side of a sink: a topic of two partitions, a consumer group's commits,
    and what the sink has promised is durable."""

    def __init__(self, make: Callable[[], Sink], wants: str, schema: dict, make_record: Callable[[int], dict],
                 read: Callable[[], list[dict]], report: _Report) -> None:
        self.make = make
        self.report = report
        self.read_output = read
        self.make_record = make_record
        self.tps = [TopicPartition(NAME, 0), TopicPartition(NAME, 1)]
        self.log: dict[TopicPartition, list[_Stored]] = {tp: [] for tp in self.tps}
        self.committed = {tp: 0 for tp in self.tps}
        self.durable: set[tuple[TopicPartition, int]] = set()
        self.rejected: set[tuple[TopicPartition, int]] = set()
        self.unnamed_rejects = 0
        self.reported: set[tuple[TopicPartition, int]] = set()  # missing, already reported
        self.fields = [f["name"] for f in schema["fields"]] if isinstance(schema, dict) and "fields" in schema else []
        self.encoder = AvroEncoder(1, copy.deepcopy(schema))
        text = json.dumps(schema)
        self.decoder = AvroDecoder(lambda _id: text, copy.deepcopy(schema))
        self.arrow = avro_to_arrow(copy.deepcopy(schema)) if wants == "columns" else None
        self.prepared: list[tuple[int, dict[str, Any]]] = []
        self.task: SinkTask | None = None
        self.events: list[str] = []

    # -- the topic -----------------------------------------------------------------------

    def prepare(self, n: int) -> None:
        """Make, encode and decode the records of the whole check up front, so a
        `make_record` that does not fit the schema fails before any task is opened."""
        ids = list(range(n))
        rows = []
        for i in ids:
            row = self.make_record(i)
            if not isinstance(row, dict):
                raise TypeError(f"make_record({i}) returned {type(row).__name__}, not a dict")
            rows.append(row)
        values, failures = self.encoder.encode(rows)
        if failures:
            f = failures[0]
            raise ValueError(f"make_record({ids[f.index]}) does not fit the schema: {f.error}")
        decoded, bad = self.decoder.decode(values)
        if bad:
            raise ValueError(f"make_record({ids[bad[0].index]}): {bad[0].error}")
        if not self.fields:
            self.fields = sorted({k for row in decoded for k in row})
        self.prepared = list(zip(ids, decoded))

    def produce(self, n: int) -> None:
        """Append the next `n` records to the topic, record i to partition i % 2."""
        made, self.prepared = self.prepared[:n], self.prepared[n:]
        for i, row in made:
            tp = self.tps[i % len(self.tps)]
            self.log[tp].append(_Stored(row, self.project(row), str(i).encode(), 1_700_000_000_000 + i))

    def project(self, row: Any) -> str:
        if not isinstance(row, dict):
            return _canon(row)
        return _canon({k: row.get(k) for k in self.fields})

    def end(self, tp: TopicPartition) -> int:
        return len(self.log[tp])

    # -- one task ------------------------------------------------------------------------

    async def open(self, check: str) -> None:
        sink = self.make()
        try:
            task = sink.task()
        except Exception as exc:
            raise _Broke(f"task() raised {_describe_exc(exc)}") from exc
        if not isinstance(task, SinkTask):
            raise _Broke(f"task() returned a {type(task).__name__}, not a runner.connector.SinkTask")
        self.task = task
        self.events = []
        resume = await _call("open(partitions)", lambda: task.open(list(self.tps)))
        self.position = dict(self.committed)
        if resume is not None:
            if not isinstance(resume, dict):
                raise _Broke(f"open() returned {_short(resume, 80)}: it returns None, or a dict "
                             "{TopicPartition: next_offset} for a sink that keeps its own position")
            for tp, offset in resume.items():
                if tp not in self.tps or not isinstance(offset, int) or isinstance(offset, bool):
                    self.report.add(check, f"open() returned {_short(resume, 120)}: keys must be the TopicPartitions "
                                           "it was given and values next offsets (int)")
                    continue
                if offset > self.end(tp):
                    self.report.add(check, (
                        f"open() returned {tp}: {offset}, but only {self.end(tp)} records were ever put to {tp} "
                        f"(next offset {self.end(tp)}): a sink cannot have written what it was never given (the "
                        f"engine stops with \"its output says {tp} was written up to offset {offset}, but the "
                        f"topic ends at {self.end(tp)}\")"))
                    offset = self.end(tp)
                if offset < 0:
                    self.report.add(check, f"open() returned a negative offset for {tp}: {offset}")
                    continue
                self.position[tp] = offset
                # The sink says its output holds everything before `offset`.
                self.durable.update((tp, o) for o in range(offset))
            if any(self.position[tp] != self.committed[tp] for tp in self.tps):
                self.events.append(f"open() returned {_tps_text(resume)}")
        self.start = dict(self.position)
        self.put_since: set[TopicPartition] = set()

    async def put_all(self, check: str, chunk: int) -> int:
        """Put what the topic holds past the task's position, in batches of `chunk`
        records, alternating partitions; the number of batches."""
        assert self.task is not None
        task = self.task
        pending = {tp: self.position[tp] for tp in self.tps}
        batches = 0
        while any(pending[tp] < self.end(tp) for tp in self.tps):
            for tp in self.tps:
                start = pending[tp]
                stop = min(start + chunk, self.end(tp))
                if start >= stop:
                    continue
                stored = self.log[tp][start:stop]
                batch = Batch(
                    [copy.deepcopy(s.row) for s in stored],
                    arrow_schema=self.arrow,
                    topic=tp.topic,
                    partition=tp.partition,
                    record_offsets=list(range(start, stop)),
                    keys=[s.key for s in stored],
                    timestamps=[s.timestamp for s in stored],
                )
                rejected = await _call(f"put(batch of {tp}@{start}..{stop - 1})", lambda b=batch: task.put(b),
                                       retry=True)
                self._rejected(batch, rejected)
                pending[tp] = self.position[tp] = stop
                self.put_since.add(tp)
                batches += 1
        return batches

    def _rejected(self, batch: Batch, rejected: Any) -> None:
        self.report.run(PUT_ERRORS)
        if rejected is None:
            return
        if not isinstance(rejected, (list, tuple)):
            self.report.add(PUT_ERRORS, f"put() returned a {type(rejected).__name__}: it returns None, or a list "
                                        "of RecordError for the records it cannot write")
            return
        tp = TopicPartition(batch.topic, batch.partition)
        offsets = batch.record_offsets or []
        by_position = {batch.position(i): off for i, off in enumerate(offsets)}
        by_record = {_canon(row): off for row, off in zip(batch.rows, offsets)}
        for error in rejected:
            if not isinstance(error, RecordError):
                self.report.add(PUT_ERRORS, f"put() returned a list holding a {type(error).__name__}: it holds "
                                            "RecordErrors only")
                continue
            offset = by_position.get(error.position)
            if offset is None and error.record is not None:
                offset = by_record.get(_canon(error.record))
            if offset is None:
                self.unnamed_rejects += 1
                self.report.add(PUT_ERRORS, (
                    f"put() returned a RecordError ({_short(error.describe(), 120)}) whose position and record "
                    "match no record of the batch: set position=batch.position(i) (or record=the row) so the "
                    "dead-lettered error names the record"))
                continue
            self.rejected.add((tp, offset))

    async def flush(self, check: str) -> None:
        assert self.task is not None
        result = await _call("flush()", self.task.flush, retry=True)
        self._durable(check, "flush", result)

    async def close(self, check: str, *, clean: bool) -> None:
        assert self.task is not None
        task, self.task = self.task, None
        result = await _call("close()", task.close)
        if clean:
            self._durable(check, "close", result)
            self.events.append("close()" if result is None else f"close() returned {_tps_text(result)}")
        else:
            self.events.append("close() without flush (the engine's abort)")

    def _durable(self, check: str, who: str, result: Any) -> None:
        if result is None:
            if who == "flush":
                for tp in self.tps:
                    self.durable.update((tp, o) for o in range(self.start[tp], self.position[tp]))
                for tp in self.put_since:  # the engine commits the positions of what was put since
                    self.committed[tp] = self.position[tp]
                self.start = dict(self.position)
                self.put_since = set()
                self.events.append(_FLUSH_NONE)
            return
        if not isinstance(result, dict):
            self.report.add(check, f"{who}() returned {_short(result, 80)}: it returns None, or a dict "
                                   "{TopicPartition: next_offset} of how far the output is durable")
            return
        for tp, offset in result.items():
            if tp not in self.tps or not isinstance(offset, int) or isinstance(offset, bool):
                self.report.add(check, f"{who}() returned {_short(result, 120)}: keys must be the TopicPartitions "
                                       "it was given and values next offsets (int)")
                continue
            if offset > self.position[tp]:
                self.report.add(check, (
                    f"{who}() returned {tp}: {offset}, but records were put to {tp} only up to offset "
                    f"{self.position[tp] - 1} (next offset {self.position[tp]}): a sink cannot have made durable "
                    "what it was never given, and the engine would commit past it; report the offset after the "
                    "last record that is durable"))
                offset = self.position[tp]
            self.durable.update((tp, o) for o in range(offset))
            self.committed[tp] = offset
        if who == "flush":
            self.put_since = set()
            self.events.append(f"flush() returned {_tps_text(result)}")

    # -- the output ----------------------------------------------------------------------

    def verify(self, check: str, after: str, *, once: bool = False, rule: str = _FLUSH_RULE) -> None:
        try:
            rows = self.read_output()
        except Exception as exc:
            self.report.add(check, f"read() raised {_describe_exc(exc)}")
            return
        try:
            rows = list(rows)
        except TypeError:
            self.report.add(check, f"read() returned {type(rows).__name__}, not a list of records")
            return
        got = Counter(self.project(r) for r in rows)
        expected = sorted(k for k in self.durable if k not in self.rejected)
        missing = [k for k in expected if got[self.log[k[0]][k[1]].canon] == 0 and k not in self.reported]
        if len(missing) > self.unnamed_rejects:
            self.reported.update(missing)
            example = self.log[missing[0][0]][missing[0][1]]
            self.report.add(check, (
                f"{len(missing)} of {len(expected)} records are missing from the output after {after}; e.g. "
                f"{_short(example.canon)} ({missing[0][0]}@{missing[0][1]}).\n{rule}"))
        every = {s.canon for stored in self.log.values() for s in stored}
        unknown = [c for c in got if c not in every]
        if unknown:
            self.report.add(check, (
                f"read() returned {sum(got[c] for c in unknown)} records that were never put (compared on the "
                f"fields {', '.join(self.fields)}), e.g. {_short(unknown[0])}: does the sink change the values it "
                "writes, or does read() return the output of an earlier run?"))
        if once:
            twice = [c for c, n in got.items() if n > 1 and c in every]
            if twice:
                self.report.add(check, (
                    f"{len(twice)} records appear more than once in the output after one task put each record "
                    f"once, flushed and closed (no crash, no redelivery), e.g. {_short(twice[0])}"))


def check_sink(
    sink_cls: type[Sink],
    config: dict[str, Any],
    *,
    read: Callable[[], list[dict]],
    schema: dict | None = None,
    make_record: Callable[[int], dict] | None = None,
    records: int = 300,
    tmp_path: Any = None,
) -> None:
    """Run the sink conformance checks (see the module docstring); raise ConformanceError
    listing every failed check."""
    if not (isinstance(sink_cls, type) and issubclass(sink_cls, Sink)):
        raise TypeError(f"check_sink needs a subclass of runner.connector.Sink, got {sink_cls!r}")
    wants = getattr(sink_cls, "wants", "rows")
    if wants == "raw":
        raise TypeError(f"{sink_cls.__qualname__} copies bytes (wants = \"raw\"); check_sink checks sinks of "
                        "decoded records: test a raw sink with run_spec")
    if schema is None:
        schema = DEFAULT_SCHEMA
        make_record = make_record or default_record
    elif make_record is None:
        raise ValueError("check_sink: with a schema, give make_record(i) returning a record that fits it")
    if records < 6:
        raise ValueError("check_sink: records must be at least 6")
    checks = [CONFIG, FLUSH, SINK_RESUME, SINK_CRASH, PUT_ERRORS, CLOSE]
    report = _Report(f"check_sink({sink_cls.__qualname__})", checks)
    parsed = _check_config(report, sink_cls, dict(config))
    if parsed is None:
        for check in checks[1:]:
            report.skip(check, "the config does not parse")
        report.raise_if_failed()
    with _state_root(tmp_path) as root:
        spec_dir = Path(tmp_path) if tmp_path is not None else Path.cwd()
        context = _context(spec_dir, root, copy.deepcopy(schema), 2)

        def make() -> Sink:
            return sink_cls(sink_cls.Config.parse(dict(config)), context)

        driver = _SinkDriver(make, wants, schema, make_record, read, report)
        driver.prepare(records + 3 * _more(records))
        _run_sync(lambda: _sink_checks(report, driver, records))
    report.raise_if_failed()


async def _sink_checks(report: _Report, d: _SinkDriver, records: int) -> None:
    chunk = max(1, records // 6)
    more = _more(records)

    async def abort() -> None:
        if d.task is not None:
            try:
                await d.close("", clean=False)
            except _Broke:
                pass

    # 2. flush before close.
    report.run(FLUSH)
    try:
        await d.open(FLUSH)
        d.produce(records)
        await d.put_all(FLUSH, chunk)
        await d.flush(FLUSH)
        await d.close(FLUSH, clean=True)
    except _Broke as exc:
        report.add(FLUSH, str(exc))
        await abort()
        for check in (SINK_RESUME, SINK_CRASH):
            report.skip(check, "needs a sink that got through `flush before close`")
    else:
        d.verify(FLUSH, _after(d.events), once=True)
        # 3. resume after restart.
        report.run(SINK_RESUME)
        try:
            await d.open(SINK_RESUME)
            resumed = dict(d.position)
            d.produce(more)
            await d.put_all(SINK_RESUME, chunk)
            await d.flush(SINK_RESUME)
            await d.close(SINK_RESUME, clean=True)
        except _Broke as exc:
            report.add(SINK_RESUME, f"a new task after a clean stop: {exc}")
            await abort()
            report.skip(SINK_CRASH, "needs a sink that got through `resume after restart`")
        else:
            d.verify(SINK_RESUME, f"a restart (redelivery from {_tps_text(resumed)}), {more} more records put, "
                                  + _after(d.events))
            # 4. no loss across a simulated crash.
            report.run(SINK_CRASH)
            try:
                await d.open(SINK_CRASH)
                await d.put_all(SINK_CRASH, chunk)
                d.produce(more)
                await d.put_all(SINK_CRASH, chunk)
                await d.flush(SINK_CRASH)
                flushed = _after(d.events)
                d.produce(more)
                await d.put_all(SINK_CRASH, chunk)
                await d.close(SINK_CRASH, clean=False)
                d.verify(SINK_CRASH, f"{flushed}, more records put and close() without flush (the engine's "
                                     "abort: only what was not flushed may be gone)", rule=_ABORT_RULE)
                await d.open(SINK_CRASH)
                redelivered = dict(d.position)
                await d.put_all(SINK_CRASH, chunk)
                await d.flush(SINK_CRASH)
                await d.close(SINK_CRASH, clean=True)
            except _Broke as exc:
                report.add(SINK_CRASH, str(exc))
                await abort()
            else:
                d.verify(SINK_CRASH, f"an abort (close without flush) and a restart that redelivered from "
                                     f"{_tps_text(redelivered)}, " + _after(d.events))
    # 6. close is always safe.
    report.run(CLOSE)
    try:
        await d.open(CLOSE)
        await d.close(CLOSE, clean=False)
    except _Broke as exc:
        report.add(CLOSE, f"open() then close() with nothing put: {exc}")
        await abort()
    else:
        d.verify(CLOSE, "a task was opened and closed with nothing put", rule=_OPEN_RULE)
    try:
        sink = d.make()
        task = sink.task()
        await _call("close()", task.close)
    except _Broke as exc:
        report.add(CLOSE, f"close() of a task that was never opened: {exc}; the engine closes a task whose "
                          "start failed, so close must cope with a task open() never ran on")
    except Exception as exc:
        report.add(CLOSE, f"building a task raised {_describe_exc(exc)}")


def _more(records: int) -> int:
    """Records put in each later step of check_sink (after the first `records`)."""
    return max(2, records // 3)


def _after(events: list[str]) -> str:
    if not events:
        return "close()"
    if len(events) == 1:
        return events[0]
    return ", ".join(events[:-1]) + " and " + events[-1]


# -- transforms ---------------------------------------------------------------------------------

APPLY, BOOKKEEPING, SCHEMA, TRANSFORM_ERRORS = (
    "apply returns a batch", "bookkeeping", "output schema", "record errors",
)


def check_transform(
    transform_cls: type[Transform],
    config: dict[str, Any],
    *,
    records: list[dict],
    schema: dict,
    side: str = "sink",
) -> list[dict]:
    """Run the transform conformance checks (see the module docstring); return the output
    rows, or raise ConformanceError listing every failed check."""
    if not (isinstance(transform_cls, type) and issubclass(transform_cls, Transform)):
        raise TypeError(f"check_transform needs a subclass of runner.transform.Transform, got {transform_cls!r}")
    if side not in ("source", "sink"):
        raise ValueError(f"side must be 'source' or 'sink', not {side!r}")
    if side not in transform_cls.sides:
        raise ValueError(f"{transform_cls.__qualname__} works on {' and '.join(transform_cls.sides)} only, "
                         f"not on a {side}")
    checks = [CONFIG, APPLY, BOOKKEEPING, SCHEMA, TRANSFORM_ERRORS]
    report = _Report(f"check_transform({transform_cls.__qualname__})", checks)
    parsed = _check_config(report, transform_cls, dict(config))
    if parsed is None:
        for check in checks[1:]:
            report.skip(check, "the config does not parse")
        report.raise_if_failed()
    rows = [dict(r) for r in records]
    n = len(rows)
    if side == "sink":
        # What a sink's chain gets: the records as the engine decodes them from the topic.
        values, failures = AvroEncoder(1, copy.deepcopy(schema)).encode(rows)
        if failures:
            raise ValueError(f"records[{failures[0].index}] does not fit `schema` (on a sink, the topic's): "
                             f"{failures[0].error}")
        text = json.dumps(schema)
        rows, _ = AvroDecoder(lambda _id: text, copy.deepcopy(schema)).decode(values)
        batch = Batch(rows, positions=[f"record[{i}]" for i in range(n)], topic=NAME, partition=0,
                      record_offsets=list(range(n)), keys=[str(i).encode() for i in range(n)],
                      timestamps=[1_700_000_000_000 + i for i in range(n)])
    else:
        # As a source's batch: no topic offsets yet (an `insert` of offsets gives null here).
        batch = Batch(rows, positions=[f"record[{i}]" for i in range(n)], source_offsets={NAME: n})
    position = f"{side}s[0].transforms[0]"
    try:
        transform = transform_cls(parsed, TransformContext(NAME, side, position))
    except Exception as exc:
        report.add(APPLY, f"building the transform raised {_describe_exc(exc)}")
        report.raise_if_failed()
    report.run(APPLY)
    try:
        out = transform.apply(batch)
    except Exception as exc:
        report.add(APPLY, f"apply() raised {_describe_exc(exc)}: an exception out of apply is a bug that stops the "
                          "run; leave out a record it cannot handle and add self.record_error(batch, i, message)")
        report.raise_if_failed()
    if not isinstance(out, Batch):
        report.add(APPLY, f"apply() returned {type(out).__name__}, not a Batch: return batch.derive(rows, ...) or "
                          "the batch itself")
        report.raise_if_failed()
    try:
        out_rows = out.rows
    except Exception as exc:
        report.add(APPLY, f"the output batch's rows raised {_describe_exc(exc)}")
        report.raise_if_failed()
    for j, row in enumerate(out_rows):
        if not isinstance(row, dict):
            report.add(APPLY, f"output record {j} is a {type(row).__name__}, not a dict")
            break
    # Bookkeeping.
    report.run(BOOKKEEPING)
    lost = [attr for attr in ("positions", "record_offsets", "keys", "timestamps")
            if getattr(out, attr) is None and getattr(batch, attr) is not None and out_rows]
    if lost:
        report.add(BOOKKEEPING, f"the output batch lost the {', '.join(lost)} of its records: build it with "
                                "batch.derive(rows, kept=[index of the input record of each output record]) so "
                                "the per-record bookkeeping follows the records")
    if side == "source" and out.source_offsets != batch.source_offsets:
        report.add(BOOKKEEPING, f"the output batch's source_offsets are {_short(out.source_offsets, 80)}, not the "
                                f"input's {_short(batch.source_offsets, 80)}: on a source the engine commits the "
                                "offsets of the batch that leaves the chain (batch.derive keeps them)")
    for attr in ("positions", "record_offsets", "keys", "timestamps", "headers", "destinations"):
        values = getattr(out, attr)
        if values is None:
            continue
        if len(values) != len(out_rows):
            report.add(BOOKKEEPING, f"the output has {len(out_rows)} records but {len(values)} {attr}: per-record "
                                    "bookkeeping must follow the kept records (batch.derive(rows, kept=[index of "
                                    "the input record of each output record]))")
    if out.record_offsets is not None:
        strays = [o for o in out.record_offsets if o not in range(n)]
        if strays:
            report.add(BOOKKEEPING, f"output record offsets {strays[:5]} are not offsets of input records")
    # Output schema.
    report.run(SCHEMA)
    argument = copy.deepcopy(schema)
    out_schema = None
    if side == "sink":  # on a source the topic's schema is the chain's output: schema() is not called
        try:
            out_schema = transform.schema(argument)
        except Exception as exc:
            report.add(SCHEMA, f"schema(schema) raised {_describe_exc(exc)}")
        if argument != schema:
            report.add(SCHEMA, "schema(schema) modified its argument: return a new dict (copy.deepcopy(schema) "
                               "first); the engine passes the topic's schema, which other connectors share")
    target = out_schema if side == "sink" else schema
    if side == "sink" and out_schema is not None:
        try:
            fastavro.parse_schema(copy.deepcopy(out_schema))
        except Exception as exc:
            report.add(SCHEMA, f"schema(schema) returned a schema fastavro refuses: {_describe_exc(exc)}")
            target = None
    if target is not None and out_rows and all(isinstance(r, dict) for r in out_rows):
        routed = out.destinations or [None] * len(out_rows)
        own = [i for i, d in enumerate(routed) if d is None]
        try:
            encoder = AvroEncoder(1, copy.deepcopy(target))
        except Exception as exc:
            report.add(SCHEMA, f"the output schema does not parse: {_describe_exc(exc)}")
        else:
            _, failures = encoder.encode([out_rows[i] for i in own])
            which = "schema(schema)" if side == "sink" else "the topic's schema"
            for f in failures[:5]:
                j = own[f.index]
                origin = out.position(j)
                report.add(SCHEMA, f"output record {j}{f' (from {origin})' if origin else ''} does not fit {which}: "
                                   f"{f.error}")
            if len(failures) > 5:
                report.add(SCHEMA, f"{len(failures) - 5} more output records do not fit {which}")
    # Record errors.
    report.run(TRANSFORM_ERRORS)
    for error in out.errors:
        if not isinstance(error, RecordError):
            report.add(TRANSFORM_ERRORS, f"the output's errors hold a {type(error).__name__}, not a RecordError")
            continue
        if error.stage != "transform":
            report.add(TRANSFORM_ERRORS, f"a RecordError of stage {error.stage!r} ({_short(error.describe(), 120)}): "
                                         "a transform's errors have stage \"transform\" (use self.record_error)")
        if error.position is None:
            report.add(TRANSFORM_ERRORS, f"a RecordError without a position ({_short(error.describe(), 120)}): "
                                         "say which record failed (self.record_error(batch, i, ...) does)")
    report.raise_if_failed()
    return out_rows


# -- test connectors ----------------------------------------------------------------------------

_ACTIONS = ("records", "pause", "error", "fail", "end")
_EXTRA = {"fail": {"times"}, "error": {"record"}}


def _check_script(script: Any) -> list[tuple[str, str]]:
    if not isinstance(script, list):
        return []
    problems: list[tuple[str, str]] = []
    for i, step in enumerate(script):
        key = f"script[{i}]"
        if not isinstance(step, dict):
            continue  # the type check reports it
        actions = [a for a in _ACTIONS if a in step]
        if len(actions) != 1:
            what = "none" if not actions else " and ".join(actions)
            problems.append((key, f"a step has exactly one of {', '.join(_ACTIONS)}; this one has {what}"))
            continue
        action = actions[0]
        for extra in step:
            if extra != action and extra not in _EXTRA.get(action, ()):
                problems.append((f"{key}.{extra}", f"unknown key in a {action!r} step"))
        value = step[action]
        if action == "records":
            if not isinstance(value, list):
                problems.append((f"{key}.records", f"expected a list of records (mappings), got "
                                                   f"{type(value).__name__}"))
            else:
                for j, record in enumerate(value):
                    if not isinstance(record, dict):
                        problems.append((f"{key}.records[{j}]", f"expected a record (mapping), got "
                                                                f"{type(record).__name__}"))
        elif action == "pause":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append((f"{key}.pause", f"expected a number of seconds (>= 0), got {value!r}"))
        elif action in ("error", "fail"):
            if not isinstance(value, str):
                problems.append((f"{key}.{action}", f"expected a message (string), got {type(value).__name__}"))
            times = step.get("times", 1)
            if action == "fail" and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
                problems.append((f"{key}.times", f"expected a whole number >= 1, got {times!r}"))
        elif action == "end" and value is not True:
            problems.append((f"{key}.end", f"expected true, got {value!r}"))
    return problems


class ScriptedSource(Source):
    """A source that plays a script (see the module docstring): `connector: scripted`."""

    name = "scripted"
    description = "Test source: plays a script of batches, pauses, data errors and failures (runner.testing)."

    class Config(Config):
        script: list[dict[str, Any]] = setting(
            help="The steps, in order: {records: [...]} (a batch), {pause: seconds}, {error: message}, "
            "{fail: message, times: n} (poll raises RetryableError n times), {end: true}."
        )
        follow: bool = setting(
            False, help="After the last step, return empty batches until stopped instead of ending."
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            return _check_script(given.get("script"))

    def tasks(self) -> list[SourceTask]:
        return [_ScriptedTask(self.config)]


class _ScriptedTask(SourceTask):
    WAIT = 0.05  # seconds a poll with nothing to give waits

    def __init__(self, config: Any) -> None:
        self.script = config.script
        self.follow = config.follow
        self.next = 0
        self.pause_until: float | None = None
        self.failed = 0

    async def open(self, offsets: dict[str, Any]) -> None:
        self.next = int(offsets.get("script", 0))

    async def poll(self) -> Batch | None:
        while self.next < len(self.script):
            i = self.next
            step = self.script[i]
            if "records" in step:
                self.next = i + 1
                rows = [dict(r) for r in step["records"]]
                return Batch(rows, source_offsets={"script": i + 1},
                             positions=[f"script[{i}].records[{j}]" for j in range(len(rows))])
            if "pause" in step:
                now = time.monotonic()
                if self.pause_until is None:
                    self.pause_until = now + float(step["pause"])
                if now < self.pause_until:
                    await asyncio.sleep(min(self.WAIT, self.pause_until - now))
                    return Batch([])
                self.pause_until = None
                self.next = i + 1
                continue
            if "error" in step:
                self.next = i + 1
                error = RecordError(error=step["error"], stage="source", record=step.get("record"),
                                    position=f"script[{i}]")
                return Batch([], errors=[error], source_offsets={"script": i + 1})
            if "fail" in step:
                if self.failed < step.get("times", 1):
                    self.failed += 1
                    raise RetryableError(step["fail"])
                self.failed = 0
                self.next = i + 1
                continue
            return None  # {end: true}
        if self.follow:
            await asyncio.sleep(self.WAIT)
            return Batch([])
        return None


class ListSink(Sink):
    """A sink that keeps what it flushes in `ListSink.received[name]`: `connector: list`."""

    name = "list"
    description = "Test sink: appends flushed records to ListSink.received[<name>] (runner.testing)."
    #: sink name in the spec -> the records it flushed, in order (per partition).
    received: ClassVar[dict[str, list[dict]]] = {}

    def task(self) -> SinkTask:
        return _ListSinkTask(self.context.name)


class _ListSinkTask(SinkTask):
    def __init__(self, name: str) -> None:
        self.name = name
        self.held: dict[TopicPartition, list[dict]] = {}

    async def open(self, partitions: list[TopicPartition]) -> None:
        keep = set(partitions)
        self.held = {tp: rows for tp, rows in self.held.items() if tp in keep}
        return None

    async def put(self, batch: Batch) -> None:
        tp = TopicPartition(batch.topic, batch.partition)
        self.held.setdefault(tp, []).extend(dict(row) for row in batch.rows)

    async def flush(self) -> None:
        out = ListSink.received.setdefault(self.name, [])
        for rows in self.held.values():
            out.extend(rows)
        self.held = {}

    async def close(self) -> None:
        self.held = {}  # not flushed: delivered again after a restart


@hookimpl
def register_connectors(register: Callable[[type], None]) -> None:
    register(ScriptedSource)
    register(ListSink)


# -- whole pipelines ----------------------------------------------------------------------------


def run_spec(path: Any, *, plugins: Any = (), once: bool = True) -> engine.RunResult:
    """Check and run the spec at `path` with the installed plugins, this module's test
    connectors (`scripted`, `list`) and `plugins` (modules, or their import names)."""
    host = load_plugins()
    for plugin in (sys.modules[__name__], *plugins):
        if isinstance(plugin, str):
            plugin = importlib.import_module(plugin)
        if host.pm.is_registered(plugin):
            continue  # an installed plugin, loaded through its entry point already
        info = host.add(plugin)
        if info.broken:
            raise FatalError(f"plugin {info.name!r} is broken: {info.error}")
    spec = engine.check_spec(path, host)
    return engine.run(spec, host, once=once)
