"""Parsing in other processes, so that a long log is parsed on one core while the engine
encodes, stores and writes what was parsed before on another.

Parsing is pure Python (one regex match and a dict per line, about 5 µs a `combined`
line), so threads cannot share it out: the GIL runs one at a time. A task reading at
least `MIN_BYTES` on a machine with more than one core hands its chunks of lines to
worker processes (one per core but one), up to `depth` chunks ahead of the engine, and
gets each back as Arrow columns: building them there takes one more step off the
engine's core. Results come back in the order the chunks were read, so offsets and order
are exactly as when parsing in place; lines that do not match come back with them.

A worker is `python -m connectors.http_log.parse_worker`, talking over its stdin and stdout
(length-prefixed pickles), rather than a `multiprocessing` pool: that would import the
caller's `__main__` again in the worker, which breaks a script that runs a pipeline
without an `if __name__ == "__main__"` guard. A worker ignores Ctrl-C (the engine stops
it) and exits when its stdin closes, which happens however the engine's process ends.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections import deque
from typing import IO

__all__ = ["MIN_BYTES", "ParsePool", "parallel_workers"]

MIN_BYTES = 32 * 1024 * 1024  # below this, starting a process costs more than it saves
_LENGTH = struct.Struct(">Q")


def parallel_workers() -> int:
    """Worker processes to parse with: every core but the engine's."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


class ParsePool:
    """Worker processes parsing chunks of one format, round robin, results in order."""

    def __init__(self, format: str, workers: int) -> None:
        self.depth = workers + 1  # chunks in flight: one per worker, and one waiting
        self._workers = [_Worker(format) for _ in range(workers)]
        self._next = 0

    def submit(self, lines: list[str]) -> concurrent.futures.Future:
        worker = self._workers[self._next]
        self._next = (self._next + 1) % len(self._workers)
        return worker.submit(lines)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


class _Worker:
    """One worker process, a thread writing its requests and one reading its answers."""

    def __init__(self, format: str) -> None:
        # The worker imports what the engine imported, from where the engine found it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "connectors.http_log.parse_worker", format],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.requests: queue.Queue[bytes | None] = queue.Queue()
        self.waiting: deque[concurrent.futures.Future] = deque()
        self.lock = threading.Lock()
        self.failure: BaseException | None = None
        threading.Thread(target=self._write, name="http_log-parse-write", daemon=True).start()
        threading.Thread(target=self._read, name="http_log-parse-read", daemon=True).start()

    def submit(self, lines: list[str]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.failure is not None:
                future.set_exception(self.failure)
                return future
            self.waiting.append(future)
        # As one string: pickling a list of strings costs the engine about 1 µs a line.
        self.requests.put(pickle.dumps(("\n".join(lines), len(lines)), pickle.HIGHEST_PROTOCOL))
        return future

    def _write(self) -> None:
        stdin = self.process.stdin
        try:
            while (request := self.requests.get()) is not None:
                send(stdin, request)
        except OSError as exc:  # the worker died; _read reports it
            self._fail(exc)
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _read(self) -> None:
        stdout = self.process.stdout
        try:
            while (answer := receive(stdout)) is not None:
                with self.lock:
                    future = self.waiting.popleft()
                kind, value = pickle.loads(answer)
                if future.cancelled():  # the task closed meanwhile
                    continue
                if kind == "ok":
                    future.set_result(value)
                else:
                    future.set_exception(RuntimeError(f"http_log parse worker: {value}"))
        except Exception as exc:  # noqa: BLE001 - any failure here fails the waiting chunks
            self._fail(exc)
        code = self.process.wait()
        self._fail(RuntimeError(f"http_log parse worker ended (exit code {code})"))

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = exc
            waiting, self.waiting = list(self.waiting), deque()
        for future in waiting:
            if not future.done():
                future.set_exception(self.failure)

    def close(self) -> None:
        self.requests.put(None)  # the worker ends when its stdin closes
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def send(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def receive(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload
