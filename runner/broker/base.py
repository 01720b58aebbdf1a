"""The broker interface: what the worker needs from a log of topics.

Two implementations stand behind it: `embedded` (SQLite in the state directory, the
default) and `kafka` (aiokafka). Everything is batch-shaped: one call produces many
records, one fetch returns many.

Partitioning is Kafka's default (murmur2 of the key bytes, see `runner.broker.partitioner`)
in both, so a pipeline moved from embedded to Kafka keeps each key in its partition.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, order=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass
class ProduceBatch:
    """Records for one topic-partition, in order. Parallel lists, one entry per record.

    `keys` and `values` may also be pyarrow binary arrays (the engine's columnar path
    makes them so, to build no bytes object per record): the embedded broker stores them
    as they are; `as_list` gives their Python values where a client wants them.
    """

    topic: str
    partition: int
    keys: Sequence[bytes | None]  # or a pyarrow binary array
    values: Sequence[bytes]  # or a pyarrow binary array
    timestamps: list[int]  # epoch milliseconds
    headers: list[dict[str, bytes]] | None = None


@dataclass
class SourceOffsetCommit:
    """Source offsets to store atomically with (embedded) or after (kafka) a produce."""

    connector: str  # the source's name in the spec
    offsets: dict[str, Any]  # source partition -> JSON-serialisable offset


@dataclass
class FetchedBatch:
    """Records read from one topic-partition, in offset order. Parallel lists."""

    topic: str
    partition: int
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes]
    timestamps: list[int]
    headers: list[dict[str, bytes]] | None = None
    # The values as one binary array too, when the broker has them so (embedded): the
    # compiled decoder takes it without a bytes object per record.
    value_array: Any = None

    @property
    def next_offset(self) -> int:
        return self.offsets[-1] + 1


@dataclass
class TopicInfo:
    name: str
    partitions: int
    end_offsets: list[int] = field(default_factory=list)  # per partition, next offset


Rebalance = Callable[[list[TopicPartition]], Awaitable[None]]


class Consumer(Protocol):
    """A consumer-group member reading a set of topics.

    Positions start at the group's committed offset, or 0 (earliest) if none, unless
    `seek` moves them. `commit` stores the *next* offset to read, as Kafka does.
    """

    async def assignment(self) -> list[TopicPartition]: ...

    async def seek(self, tp: TopicPartition, offset: int) -> None: ...

    async def fetch(self, max_records: int, timeout: float) -> list[FetchedBatch]:
        """About `max_records` records from the current positions, grouped per partition
        (Kafka hands out whole record batches, so a fetch may hold more; the fetch size
        bounds it); waits up to `timeout` seconds when nothing is available, then returns []."""
        ...

    async def position(self, tp: TopicPartition) -> int: ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...

    def on_rebalance(self, revoked: Rebalance | None, assigned: Rebalance | None) -> None:
        """Rebalances are incremental: `revoked(partitions)` is called when the group
        asks this member to give these up (they are still held until it returns: commit
        what was put of them), `assigned(partitions)` (the whole assignment, kept and
        gained) after a rebalance; a gained partition starts at the group's commit, a kept
        one reads on from where it was (unless sought). None removes them. A broker without rebalances (embedded: one process)
        never calls them."""
        ...

    async def close(self) -> None: ...


class SourceWriter(Protocol):
    """Writes the batches of one source task and stores its offsets with them.

    The engine makes one per running source task (`Broker.source_writer`). Embedded: the
    records and the offsets commit in one SQLite transaction. Kafka: see
    `runner.broker.kafka_sources` — records are tagged with the task, and after a crash
    the task's next run skips what the topic already holds, so nothing is written twice
    as long as the source reads the same records again from its stored offsets.
    """

    async def open(self) -> dict[str, Any]:
        """The source connector's stored offsets (source partition -> offset), after
        putting right what a crash of this task's previous run left half done."""
        ...

    async def stored(self) -> dict[str, Any]:
        """The source connector's stored offsets as they stand, changing nothing: what a
        task reading ahead (before this process knows it runs the task) starts from."""
        ...

    async def produce(self, batches: list[ProduceBatch], offsets: dict[str, Any]) -> None:
        """Append the batches (records in the order the source gave them, per partition)
        and store `offsets` (where the source stands after them; may be empty). On return
        both are durable. After a RetryableError, call again with the same arguments."""
        ...


class Broker(Protocol):
    #: True when several processes of one pipeline share its work (Kafka): the source
    #: tasks are then shared out through a consumer group on a control topic.
    distributed: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ensure_topic(self, name: str, partitions: int) -> None:
        """Create the topic if missing. An existing topic with a different partition
        count raises FatalError."""
        ...

    async def produce(
        self,
        batches: list[ProduceBatch],
        source_offsets: SourceOffsetCommit | None = None,
    ) -> None:
        """Append the batches; on return they are durable (acknowledged). With the
        embedded broker the records and the source offsets commit in one transaction."""
        ...

    async def source_offsets(self, connector: str) -> dict[str, Any]:
        """The stored source offsets of a source connector (partition -> offset)."""
        ...

    def source_writer(self, connector: str, task: int, topics: list[str], *, replays_exactly: bool = True) -> SourceWriter:
        """The writer for task number `task` of source `connector`, which produces to
        `topics` (its topic and the dead-letter topic). `replays_exactly`: after a crash
        the task writes again exactly what it wrote since its last commit, in the same
        order (a source re-reading its files does), which a broker without transactions
        may use to write it once; False (a processor, whose batches may fall otherwise)
        gives at-least-once there instead."""
        ...

    async def consumer(self, group: str | None, topics: list[str], *,
                       only: list[TopicPartition] | None = None) -> Consumer:
        """A consumer of `topics` in consumer group `group`; with None, a reader outside any
        group, assigned every partition (or the partitions `only` names), that must not
        commit (`pipeline consume`, processors)."""
        ...

    async def topics(self) -> list[TopicInfo]: ...

    async def end_offsets(self, topic: str) -> list[int]: ...

    async def committed(self, group: str, topic: str) -> dict[int, int]: ...

    async def groups(self, topic: str) -> list[str]:
        """Groups that have committed offsets for the topic."""
        ...


def as_list(values: Any) -> list[Any]:
    """A ProduceBatch's keys or values as a list (pyarrow arrays become their values)."""
    return values.to_pylist() if hasattr(values, "to_pylist") else values
