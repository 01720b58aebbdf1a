"""What the runners share: counters, a topic as the worker sees it, the error policy,
retries, and how a connector's failure is reported."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from runner.batch import Batch
from runner.broker.base import ProduceBatch
from runner.chain import Chain
from runner.connector import Progress
from runner.errors import (
    DataError,
    FatalError,
    PipelineError,
    RecordError,
    RetryableError,
    os_error,
)
from runner.schema.codec import BatchEncoder
from runner.schema.serde import dead_letter_rows
from runner.spec import Spec

log = logging.getLogger("pipeline.worker")

QUEUE_BATCHES = 4  # batches in flight between the two halves of a runner
MAX_BACKOFF = 30.0


@dataclass
class Counters:
    """What one connector did; shown live and in the run summary. They add up:
    records_in = records_out + filtered + dead_lettered + pending."""

    name: str
    kind: str
    records_in: int = 0  # source: records and unreadable input polled; sink: records read from topics
    records_out: int = 0  # source: records produced; sink: records flushed
    dead_lettered: int = 0
    errors: int = 0  # data errors (dead-lettered or not)
    filtered: int = 0  # records a transform chain left out on purpose (not errors)
    retries: int = 0
    windows: int = 0  # processor: windows emitted (its records_out are the records aggregated)
    target: str | None = None  # where the connector reads or writes, from its target()
    # Source: fields the topic's schema lacks, dropped before encoding -> how many records had them.
    dropped: dict[str, int] = field(default_factory=dict)
    # Source: each task's `progress()` after its last poll (None: it cannot know its size).
    progress: dict[int, Progress | None] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Read but not yet delivered, filtered or dead-lettered (in flight, or left
        behind by a failure)."""
        return self.records_in - self.records_out - self.filtered - self.dead_lettered

    def filter(self, chain: Chain, batch: Batch) -> Batch:
        """`batch` through a transform chain, counting the records it filtered out."""
        records, errors = len(batch), len(batch.errors)
        batch = chain.apply(batch)
        self.filtered += records - len(batch) - (len(batch.errors) - errors)
        return batch


@dataclass
class Topic:
    """A topic as the worker needs it: its schema id, encoder and partition count."""

    name: str
    partitions: int
    schema: dict | None  # None: a raw topic (bytes, read only by raw sinks)
    schema_id: int | None
    key: str | None = None
    encoder: BatchEncoder | None = field(init=False)
    fields: frozenset[str] = field(init=False)  # the schema's top-level field names

    def __post_init__(self) -> None:
        self.encoder = BatchEncoder(self.schema_id, self.schema) if self.schema is not None else None
        self.fields = frozenset(f["name"] for f in (self.schema or {}).get("fields", ()))


class DeadLetters:
    """Applies the error policy to bad records: stop, or produce them to the DLQ topic.
    Remembers the first error (a run that delivered nothing reports it) and warns once
    when many records in a row went to the dead-letter topic and none was delivered."""

    WARN_IN_A_ROW = 1000

    def __init__(self, spec: Spec, topic: Topic | None, *, warn: bool = True) -> None:
        self.tolerate = spec.errors.tolerance == "all"
        self.topic = topic
        self.spec = spec
        self.warn = warn  # a bounded run says it at its end instead (engine.Pipeline)
        self.first: RecordError | None = None
        self.in_a_row = 0
        self.warned = False

    def batches(self, errors: list[RecordError]) -> list[ProduceBatch]:
        """DLQ produce batches for these errors, or DataError if the policy is to stop."""
        if not errors:
            return []
        if self.first is None:
            self.first = min(errors, key=_input_order)
        if not self.tolerate or self.topic is None:
            raise DataError(errors)
        now = int(time.time() * 1000)
        values, failures = self.topic.encoder.encode(dead_letter_rows(errors, now))
        if failures:  # our own schema: a failure here is a bug, not a data error
            raise RuntimeError(f"dead-letter record did not encode: {failures[0]}")
        return [ProduceBatch(self.topic.name, 0, [None] * len(values), values, [now] * len(values))]

    def settled(self, delivered: int, dead_lettered: int) -> None:
        """After records were delivered and/or dead-lettered: count the run of dead
        letters with nothing delivered, and warn once when it reaches WARN_IN_A_ROW."""
        self.in_a_row = 0 if delivered else self.in_a_row + dead_lettered
        if self.warn and self.in_a_row >= self.WARN_IN_A_ROW and not self.warned:
            self.warned = True
            log.warning("%s records in a row went to the dead-letter topic and none was delivered; the first: %s. "
                        "See them: %s", f"{self.in_a_row:,}", self.first.describe() if self.first else "?",
                        self.consume_command())

    def consume_command(self) -> str:
        """The command that shows the dead-letter topic's records."""
        return f"pipeline consume {self.topic.name if self.topic else '<dead-letter topic>'} --from-beginning " \
               f"--spec {self.spec.file or self.spec.path}"


def _input_order(error: RecordError) -> tuple[str, int]:
    """A record error's place in the input ("path:line"), to tell which came first."""
    where, _, line = (error.position or "").rpartition(":")
    return (where, int(line)) if line.isdigit() else (error.position or "", 0)


async def retrying(call: Callable[[], Any], counters: Counters, what: str) -> Any:
    """Await `call()` until it does not raise RetryableError, backing off exponentially."""
    delay = 0.1
    while True:
        try:
            return await call()
        except RetryableError as exc:
            counters.retries += 1
            wait = exc.retry_after or delay
            log.warning("%s: %s; retrying in %.1fs", what, exc, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF)


@contextlib.asynccontextmanager
async def errors_named(connector: str, target: str | None = None) -> AsyncIterator[None]:
    """Report a connector's failure as one error naming it: a file-system error names the
    path (the connector's `target` where the error has none), the cause and what to do;
    any other unexpected exception becomes '<connector>: <Type>: <message>' (traceback
    with --debug)."""
    try:
        yield
    except (BaseExceptionGroup, Exception) as caught:
        exc = first_error(caught) if isinstance(caught, BaseExceptionGroup) else caught
        if isinstance(exc, PipelineError) or not isinstance(exc, Exception):
            raise exc from exc.__cause__
        if isinstance(exc, OSError):
            raise os_error(exc, connector, target) from exc
        raise FatalError(f"{connector}: {type(exc).__name__}: {exc}") from exc


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a task group's failures: the first of ours, else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    ours = [e for e in leaves if isinstance(e, PipelineError)]
    return (ours or leaves)[0]
