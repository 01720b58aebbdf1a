"""The error taxonomy. Every error a user sees is one of these, turned into a message in
one place (`runner.cli`).

- `DataError`: one record is bad (a malformed line, a record that does not fit its schema).
  Governed by the spec's `errors.tolerance`: `none` stops the run naming the record,
  `all` sends it to the dead-letter topic and goes on.
- `RetryableError`: the world is briefly unavailable (a broker, a disk, a server). The
  engine retries with backoff and never drops what it holds.
- `FatalError`: the run cannot go on (bad config, auth, an incompatible schema). Stops the
  run with a one-line message and a hint.
- `SpecError`: the spec is invalid; carries every problem found, each with file:line.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class PipelineError(Exception):
    """Base of every error the engine reports to users."""

    hint: str | None = None
    exit_code: int = 1
    #: For a failed run: what it did before failing (a `runner.engine.RunResult`).
    result: Any = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class FatalError(PipelineError):
    """The run cannot continue. Exit code 1."""


class UsageError(PipelineError):
    """The command asked for something that is not there (a topic, a subject). Exit 2."""

    exit_code = 2


class RetryableError(PipelineError):
    """A transient failure; the engine retries the operation with backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class RecordError:
    """What went wrong with one record, with enough context to find and replay it.

    Sources put these in `Batch.errors` for input they could not turn into a record (a
    malformed line); the engine makes them for records that fail their schema. They go to
    the dead-letter topic under `tolerance: all`.
    """

    error: str
    stage: str  # "source", "encode", "decode", "transform", "sink"
    record: Any = None  # the record (dict) or the raw line (str) or bytes
    field: str | None = None  # the offending field, where known
    position: str | None = None  # where it came from, e.g. "logs/a.jsonl:17"
    connector: str | None = None  # filled in by the engine
    topic: str | None = None  # the topic it was meant for (or read from)

    def describe(self) -> str:
        where = f" at {self.position}" if self.position else ""
        fld = f" (field {self.field!r})" if self.field else ""
        who = f"{self.connector}: " if self.connector else ""
        return f"{who}{self.stage} error{where}{fld}: {self.error}"


class DataError(PipelineError):
    """One or more records are bad and the error policy says stop."""

    def __init__(self, errors: list[RecordError], *, hint: str | None = None) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
        record = _short(first.record)
        super().__init__(
            f"{first.describe()}{more}; record: {record}",
            hint=hint
            or "set `errors: {tolerance: all, dead_letter_topic: NAME}` to route bad "
            "records to a dead-letter topic instead of stopping",
        )
        self.errors = errors


@dataclass
class Problem:
    """One problem in a spec: where (file:line, key path) and what. A `warning` is worth
    saying but does not stop the spec from running."""

    message: str
    path: str = ""  # key path, e.g. "sources[0].config.paths"
    file: str | None = None
    line: int | None = None  # 1-based
    level: str = "error"  # or "warning"

    def __str__(self) -> str:
        loc = self.file or "<spec>"
        if self.line is not None:
            loc += f":{self.line}"
        key = f" {self.path}:" if self.path else ""
        level = " warning:" if self.level == "warning" else ""
        return f"{loc}:{key}{level} {clip(self.message)}"

    def as_json(self) -> dict[str, Any]:
        return {"level": self.level, "file": self.file, "line": self.line, "path": self.path,
                "message": clip(self.message)}


def clip(text: str, limit: int = 1000) -> str:
    """`text` at most about `limit` characters: a message that quotes a huge value (a
    50 MB path) keeps its start and end and says how much was left out."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}…[{len(text) - 2 * keep:,} characters]…{text[-keep:]}"


# What to do about a file-system error, by errno.
_OS_HINTS = {
    errno.EACCES: "give this user access to it, or point the spec elsewhere (state_dir, the connector's path)",
    errno.EPERM: "give this user access to it, or point the spec elsewhere (state_dir, the connector's path)",
    errno.EROFS: "point the spec at a writable file system (state_dir, the connector's path)",
    errno.ENOENT: "check the path (relative paths are relative to the spec's directory)",
    errno.ENOSPC: "free some space there (df -h shows how much is left) and run again: nothing acknowledged is "
                  "lost, and what was not flushed is delivered again",
    errno.EDQUOT: "free some space within your quota and run again: nothing acknowledged is lost",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "the path is a directory where a file is expected: check the path",
}


def os_error(exc: OSError, who: str = "", where: str | None = None) -> FatalError:
    """One line for an error of the file system: who met it, the path (the error's, else
    `where` the connector works), the cause, and what to do (a hint by errno)."""
    reason = (exc.strerror or type(exc).__name__).lower() if exc.strerror else str(exc)
    path = exc.filename if exc.filename is not None else where
    path = f"{path}: " if path else ""
    error = FatalError(f"{who}: {path}{reason}" if who else f"{path}{reason}",
                       hint=_OS_HINTS.get(exc.errno or 0))
    error.__cause__ = exc
    return error


def suggest(word: Any, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" when `word` is a likely misspelling of one of `choices`, else
    "" (no suggestion of an unrelated name)."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass
class SpecError(PipelineError):
    """The spec is invalid. Exit code 2."""

    problems: list[Problem] = field(default_factory=list)
    exit_code = 2

    def __post_init__(self) -> None:
        n = len(self.problems)
        PipelineError.__init__(self, f"{n} problem{'s' if n != 1 else ''} in spec")

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
