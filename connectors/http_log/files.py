"""The files behind an `http_log` source: found by globs, known by identity, read in chunks.

A file is known by its identity, `"<st_dev>:<st_ino>"`, not by its name, so a renamed
file (`access.log` -> `access.log.1`) keeps its position. Each file's state is its source
offset::

    {"path": "/var/log/nginx/access.log", "pos": 18734, "line": 97, "head": [1024, 2882137012]}
    {"path": "/var/log/nginx/access.log.2.gz", "pos": 50012, "line": 260, "gz": true, "done": true}

- `pos`: bytes consumed (complete lines only); uncompressed bytes for a `.gz`.
- `line`: lines consumed, for `file:line` positions in errors.
- `path`: where the file was last seen (for people; the identity is what counts).
- `head`: length and CRC-32 of the file's first consumed bytes (up to 1 KiB). A file whose
  first bytes no longer match was truncated and rewritten (copytruncate that refilled past
  our position before we looked) or is a new file that reuses a freed inode: it is read
  from the start.
- `done` (`.gz` only): read to its end; never opened again.

Truncation (the size drops below `pos`) means `copytruncate` rotation: reading restarts at
0, as `tail -F` does.

A `.gz` is read once per identity; an empty or incomplete one (logrotate still writing it)
waits while following. A `.gz` seen for the first time whose first bytes are the `head` of
a file already read is that file compressed (`access.log.1` -> `access.log.2.gz`): it
continues from that file's position, so rotated lines are neither read twice nor lost.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from typing import Any

from runner.connector import task_of

log = logging.getLogger("pipeline.http_log")

HEAD_BYTES = 1024
MIN_BLOCK = 64 * 1024
MAX_BLOCK = 64 * 1024 * 1024
MAX_LINE = 16 * 1024 * 1024  # longer "lines" (a binary file matched by mistake) are cut


def identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


@dataclass
class TrackedFile:
    ident: str
    path: str
    gz: bool
    pos: int = 0
    line: int = 0
    head: tuple[int, int] | None = None  # (length, crc32) of the first consumed bytes
    done: bool = False  # a .gz read to its end
    handle: Any = None  # plain: an fd; gz: a GzipFile positioned at pos + len(carry)
    carry: bytes = b""  # gz: bytes read past pos, not consumed yet
    waiting: int | None = None  # size when last seen ending in an unfinished line
    matched: bool = True  # found by the globs at the last scan
    broken: bool = False  # unreadable (a corrupt .gz): skipped for good
    avg_line: float = 200.0
    # For progress, in bytes of the file (compressed, for a .gz): its size when last looked
    # at, what was read of it before this run, and (gz) what the decompressor has taken.
    size: int = 0
    base: int = 0
    zpos: int = 0
    done_before: bool = False  # gz: read to its end by an earlier run
    copy_checked: bool = False  # gz: compared with the files already read (see resume_copy)
    prefix: bytes | None = None  # gz: its first uncompressed bytes, for that comparison

    @classmethod
    def from_offset(cls, ident: str, offset: dict[str, Any]) -> TrackedFile:
        head = offset.get("head")
        return cls(
            ident=ident,
            path=str(offset.get("path", "")),
            gz=bool(offset.get("gz", False)),
            pos=int(offset.get("pos", 0)),
            line=int(offset.get("line", 0)),
            head=(int(head[0]), int(head[1])) if head else None,
            done=bool(offset.get("done", False)),
            copy_checked=True,
            base=0 if offset.get("gz") else int(offset.get("pos", 0)),  # gz: known once opened
            done_before=bool(offset.get("gz") and offset.get("done")),
        )

    def offset(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "pos": self.pos, "line": self.line}
        if self.gz:
            out["gz"] = True
            out["done"] = self.done
        elif self.head is not None:
            out["head"] = list(self.head)
        return out

    def restart(self) -> None:
        """Read again from the start (the file was truncated or replaced)."""
        self.pos = self.line = self.base = 0
        self.head = None
        self.waiting = None

    def close(self) -> None:
        if self.handle is not None:
            if self.gz:
                self.handle.close()
            else:
                os.close(self.handle)
            self.handle = None
        self.carry = b""


@dataclass
class Chunk:
    """Complete lines read from one file, and what was consumed."""

    file: TrackedFile
    lines: list[str]
    first_line: int  # line number of lines[0]
    error: str | None = None  # the file could not be read further (a corrupt .gz)


@dataclass
class FileSet:
    """The files matched by `patterns`, with their read state, keyed by identity.

    With `share=(i, n)` (task i of a source split into n), only the files of the logs
    that `task_of` gives task i are tracked. A log is its files' `log_name`, so a live
    file and its rotated predecessors are one task's: rotation renames a file within its
    log (`access.log` -> `access.log.1`) and `.gz` copies continue from the file they
    were compressed from, and both need that file in the same set."""

    patterns: list[str]
    follow: bool
    encoding: str = "utf-8"
    share: tuple[int, int] = (0, 1)  # (this task, of how many)
    files: dict[str, TrackedFile] = field(default_factory=dict)  # identity -> file
    known: dict[str, dict[str, Any]] = field(default_factory=dict)  # identity -> stored offset
    matched_any: bool = False  # the globs matched a regular file at the last scan, this task's or not

    def load(self, offsets: dict[str, Any]) -> None:
        self.known = {k: v for k, v in offsets.items() if isinstance(v, dict)}

    # -- finding files ---------------------------------------------------------------------

    def scan(self) -> None:
        """Match the globs again: new identities are tracked (resuming from a stored offset
        if there is one), renamed ones get their new path, vanished ones are marked."""
        found: dict[str, tuple[str, int]] = {}  # identity -> (path, size)
        self.matched_any = False
        for pattern in self.patterns:
            for path in sorted(glob.glob(pattern, recursive=True)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                self.matched_any = True
                if task_of(log_name(os.path.abspath(path)), self.share[1]) == self.share[0]:
                    found.setdefault(identity(st), (path, st.st_size))
        for tf in self.files.values():
            tf.matched = tf.ident in found
        for ident, (path, size) in found.items():
            tf = self.files.get(ident)
            if tf is None:
                stored = self.known.get(ident)
                tf = TrackedFile.from_offset(ident, stored) if stored else TrackedFile(ident, path, path.endswith(".gz"))
                self.files[ident] = tf
            tf.path = path
            tf.size = size

    def next_file(self) -> TrackedFile | None:
        """The file with unread data that was modified longest ago (so rotated files are
        finished before the file that replaced them; files modified within the same second,
        as a copy or a checkout leaves them, in rotation order: `x.log.2.gz`, `x.log.1`,
        `x.log`); None if there is nothing to read."""
        best: tuple[float, int, str] | None = None
        chosen = None
        for ident, tf in list(self.files.items()):
            mtime = self._readable(tf)
            if mtime is None:
                if not tf.matched and tf.handle is None:
                    # Rotated away or deleted, and drained. Should it be matched again, it
                    # resumes from here.
                    self.known[ident] = tf.offset()
                    del self.files[ident]
                continue
            key = (int(mtime), -_rotation(tf.path), tf.path)  # mtimes within a second: one
            if best is None or key < best:
                best, chosen = key, tf
        return chosen

    def _readable(self, tf: TrackedFile) -> float | None:
        """mtime if `tf` has bytes to read now, else None (and drop what is drained)."""
        if tf.broken or tf.done:
            return None
        try:
            if tf.handle is None:
                if not tf.matched:
                    return None
                try:
                    st = os.stat(tf.path)
                except PermissionError:
                    raise  # the source stops, naming the path
                except OSError as exc:
                    self._vanished(tf, exc.strerror or str(exc))
                    return None
                if identity(st) != tf.ident:
                    # The name now belongs to another file; following, the next scan sorts it.
                    self._vanished(tf, "replaced by another file")
                    return None
            elif tf.gz:
                st = os.fstat(tf.handle.fileobj.fileno())  # deleted or renamed meanwhile: read on
            else:
                st = os.fstat(tf.handle)
        except OSError:
            tf.close()
            return None
        tf.size = st.st_size
        if tf.gz:  # empty: just created by logrotate, which is about to fill it
            if not st.st_size or st.st_size == tf.waiting:
                return None
            if not tf.copy_checked:
                try:
                    if not self._resume_copy(tf):
                        return None
                except PermissionError:
                    raise  # not something waiting mends: the source says so
                except (EOFError, zlib.error, OSError):
                    if self.follow:
                        tf.waiting = st.st_size  # not complete yet
                        return None
                    tf.copy_checked = True  # corrupt: `read` reports it
            return st.st_mtime
        size = st.st_size
        if size < tf.pos:
            self._restart(tf)  # truncated: copytruncate rotation
        if size > tf.pos and size != tf.waiting:
            return st.st_mtime
        if not tf.matched or not self.follow:
            tf.close()  # drained: a following source keeps only files the globs still match
        return None

    def _vanished(self, tf: TrackedFile, why: str) -> None:
        """`tf` is no longer at its path. Following, that is rotation, which the next scan
        sorts out; otherwise the file is skipped, with a warning."""
        if not self.follow:
            tf.matched = False
            log.warning("http_log: skipped %s: %s", tf.path, why)

    def _resume_copy(self, tf: TrackedFile) -> bool:
        """A `.gz` seen for the first time may be the compressed copy of a file already
        read: logrotate's `compress` turns `access.log.1` into `access.log.2.gz`, a new
        identity with the same bytes. If its first bytes are the `head` of such a file, it
        continues from that file's position instead of being read again. Returns False
        (not yet) while that file is still there, to be read to its end first."""
        heads: dict[tuple[int, int], tuple[int, int, bool]] = {}  # head -> (pos, line, live)

        def add(head: tuple[int, int], pos: int, line: int, live: bool) -> None:
            seen = heads.get(head)
            if seen is None or pos > seen[0]:  # the same bytes: the furthest read counts
                heads[head] = (pos, line, live or bool(seen and seen[2]))
            elif live:
                heads[head] = (seen[0], seen[1], True)

        for offset in self.known.values():
            head = offset.get("head")
            if head and not offset.get("gz"):
                add((int(head[0]), int(head[1])), int(offset.get("pos", 0)), int(offset.get("line", 0)), False)
        for other in self.files.values():
            if other.head is not None and not other.gz:
                add(other.head, other.pos, other.line, True)
        if heads:
            if tf.prefix is None:
                with gzip.open(tf.path, "rb") as f:
                    tf.prefix = f.read(HEAD_BYTES)
            for length in sorted({length for length, _ in heads}):
                found = heads.get((length, zlib.crc32(tf.prefix[:length])))
                if found is not None and len(tf.prefix) >= length:
                    pos, line, live = found
                    if live:
                        return False
                    tf.pos, tf.line = pos, line
                    break
        tf.copy_checked = True
        tf.prefix = None
        return True

    def _restart(self, tf: TrackedFile) -> None:
        """Read `tf` again from the start; what was read of its former content is kept
        (under a key that is no identity), for compressed copies of it (`copytruncate`
        then `compress`)."""
        if tf.head is not None:
            self.known[f"{tf.ident}@{tf.pos}"] = {"path": tf.path, "pos": tf.pos, "line": tf.line, "head": list(tf.head)}
        tf.restart()

    # -- reading ---------------------------------------------------------------------------

    def read(self, tf: TrackedFile, max_lines: int) -> Chunk:
        """Up to `max_lines` complete lines from `tf`'s position; the position advances.

        An unfinished last line is left for later when following a plain file (and the file
        is skipped until it grows); it is read as a line when not following, and in a
        `.gz`, which is complete.
        """
        if not tf.gz:
            if tf.handle is None:
                self._open(tf)
            self._check_head(tf)
        first_line = tf.line + 1
        block = int(min(MAX_BLOCK, max(MIN_BLOCK, max_lines * tf.avg_line * 0.95)))
        while True:
            try:
                if tf.handle is None:
                    self._open(tf)
                data = self._fetch(tf, block)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                if not tf.gz:
                    raise
                return self._gz_failed(tf, exc, first_line)
            eof = len(data) < block
            if eof or b"\n" in data or block >= MAX_LINE:
                break
            block *= 2  # a line longer than the block
        count = data.count(b"\n")
        unfinished = False  # the data ends in a line that may still be being written
        if count > max_lines:
            consumed = len(data) - len(data.split(b"\n", max_lines)[-1])
        elif not count and not eof:
            consumed = len(data)  # MAX_LINE bytes without a line end: taken as a line
        else:
            consumed = data.rfind(b"\n") + 1
            if eof and consumed < len(data):
                if tf.gz or not self.follow:
                    consumed = len(data)  # the last line, unterminated but complete
                else:
                    unfinished = True
        # Undecodable bytes become `\\xhh` text, as the servers write such bytes (see formats.py).
        text = str(memoryview(data)[:consumed], self.encoding, "backslashreplace")
        lines = text.split("\n")
        if text.endswith("\n") or not text:
            lines.pop()
        if tf.gz:
            tf.carry = data[consumed:]
            if eof and consumed == len(data):
                tf.done = True
                tf.close()
            else:
                tf.zpos = tf.handle.fileobj.tell()  # compressed bytes the decompressor took
        elif unfinished:
            tf.waiting = tf.pos + len(data)  # skip the file until it grows
        else:
            tf.waiting = None
        tf.pos += consumed
        if not tf.gz and tf.pos > tf.size:
            tf.size = tf.pos  # grew since we looked
        tf.line += len(lines)
        if lines:
            tf.avg_line = 0.5 * tf.avg_line + 0.5 * (consumed / len(lines))
        if not tf.gz and (tf.head is None or tf.head[0] < HEAD_BYTES) and tf.pos:
            head = os.pread(tf.handle, min(HEAD_BYTES, tf.pos), 0)
            tf.head = (len(head), zlib.crc32(head))
        return Chunk(tf, lines, first_line)

    def _open(self, tf: TrackedFile) -> None:
        if tf.gz:
            tf.handle = gzip.open(tf.path, "rb")
            if tf.pos:
                tf.handle.seek(tf.pos)  # decompresses up to pos: once per run
            if not tf.zpos:  # first opened in this run: what was read before, compressed
                tf.base = tf.zpos = tf.handle.fileobj.tell() if tf.pos else 0
            tf.carry = b""
            return
        fd = os.open(tf.path, os.O_RDONLY)
        if identity(os.fstat(fd)) != tf.ident:
            os.close(fd)
            raise FileNotFoundError(f"{tf.path} was replaced while opening it")
        tf.handle = fd

    def _check_head(self, tf: TrackedFile) -> None:
        size = os.fstat(tf.handle).st_size
        if size < tf.pos:
            self._restart(tf)
        elif tf.head is not None:
            length, crc = tf.head
            head = os.pread(tf.handle, length, 0)
            if len(head) < length or zlib.crc32(head) != crc:
                self._restart(tf)  # another file under the same identity, or truncated and refilled

    def _fetch(self, tf: TrackedFile, block: int) -> bytes:
        if not tf.gz:
            return os.pread(tf.handle, block, tf.pos)
        carry = tf.carry
        if len(carry) >= block:
            return carry
        data = carry + tf.handle.read(block - len(carry))
        tf.carry = data  # kept until `read` decides what was consumed
        return data

    def _gz_failed(self, tf: TrackedFile, exc: Exception, first_line: int) -> Chunk:
        """A .gz that ends early or is corrupt. Following, it may still be being written
        (logrotate compresses into the final name): wait until it changes, then read it
        again from our position. Otherwise it is reported and skipped."""
        tf.close()
        if self.follow and isinstance(exc, EOFError):
            try:
                tf.waiting = os.stat(tf.path).st_size
            except OSError:
                tf.broken = True
            return Chunk(tf, [], first_line)
        tf.broken = True
        return Chunk(tf, [], first_line, error=f"cannot read {tf.path}: {exc}")

    def progress(self) -> tuple[int, int]:
        """(bytes read, bytes to read) in this run over the tracked files, from what the last
        scan and reads saw; no I/O. What earlier runs read counts in neither, so the rate and
        ETA shown are this run's. A `.gz` counts in compressed bytes (its size, and how far
        its decompressor got); one read to its end by an earlier run counts not at all, one
        resumed mid-way counts whole until it is opened."""
        done = total = 0
        for tf in self.files.values():
            if tf.gz:
                if tf.done_before:
                    continue
                reached = tf.size if tf.done or tf.broken else tf.zpos
            else:
                reached = tf.pos
            base = min(tf.base, tf.size)
            done += max(min(reached, tf.size) - base, 0)
            total += tf.size - base
        return done, total

    def close(self) -> None:
        for tf in self.files.values():
            tf.close()


_ROTATED = re.compile(r"\.(\d+)(?:\.gz)?$")
# What rotation appends to a log's name: a number or a date (`.1`, `-20240501`,
# `.2024-05-01`, `_1714557600`), then maybe `.gz`.
_ROTATION_SUFFIX = re.compile(r"(?:[._-]\d[\d._-]*)?(?:\.gz)?$")


def log_name(path: str) -> str:
    """The log a file belongs to: its path without a rotation suffix. `access.log`,
    `access.log.1`, `access.log.2.gz` (logrotate), `access.log-20240501.gz` (its
    `dateext`) and `access_log.1714557600` (Apache's rotatelogs, of `access_log`) are
    one log, so a source split into tasks keeps them in one task."""
    head, base = os.path.split(path)
    return os.path.join(head, _ROTATION_SUFFIX.sub("", base, count=1))


def _rotation(path: str) -> int:
    """A rotated log's number (`access.log.2.gz` -> 2; the live `access.log` -> 0)."""
    m = _ROTATED.search(path)
    return int(m.group(1)) if m else 0
