"""`kafka` source and sink: topics of another Kafka cluster, in and out.

Both name their cluster with `cluster:`, a mapping with the same settings as the spec's
`broker: {kafka: ...}` (bootstrap_servers, client_id, security, producer, consumer,
replication_factor, request_timeout_ms). It is parsed and checked with
`runner.broker.kafka.KafkaOptions` and turned into aiokafka settings with
`runner.broker.kafka.client_settings`; errors become ours with `kafka_error` (`reason`,
`retriable`). Those are the public helpers for connectors that talk to Kafka; this module
uses nothing else of `runner.broker`. Secrets (`security.password`) are never shown in
messages.

The sink: replication (MirrorMaker-style)
-----------------------------------------
The `kafka` sink takes records as they are (`wants = "raw"`: nothing is decoded, so it
reads raw topics, declared without `schema:`, as well as Avro ones) and writes each to
`<topic_prefix><topic>` on the target cluster, in the **same partition**, with the same
key, value bytes, timestamp and headers. Order within a partition is kept. Target topics
that are missing are created with the source topic's partition count (and the cluster's
`replication_factor`); a target topic with fewer partitions stops the run with both counts
named (more partitions is fine: the extra ones stay empty). Topic configs (retention,
compaction) are not copied.

Records go out through aiokafka's batch API with `acks=all`; `put` sends, `flush` waits
for the acknowledgements, so the engine commits the consumer group's offsets only once the
target has the records.

Exactly once across restarts: each record written carries **one added header**,
`pipeline.source.offset`: its offset in the source partition, in ASCII decimal (a header
of that name already on the record, e.g. when mirroring a mirror, is replaced). When a
partition is assigned (`open`), the sink reads the last record of the target partition
and resumes the source partition just after the offset that record names; a target
partition that is empty (or whose last record has no such header) starts at the consumer
group's committed offset, or at the beginning. So a crash after the target acknowledged
but before the group committed (a `kill -9`) repeats nothing, and nothing acknowledged is
skipped.

A produce that fails (the target away longer than `request_timeout_ms`) is retried with
backoff: the sink first reads back what of the unacknowledged records did land on the
target and sends only the rest, so retries add no duplicates either. The one case it
cannot repair is a record that failed while a *later* one of the same partition landed
(possible without idempotence): it stops naming the partition rather than leave a gap. On
a real Kafka cluster, `cluster: {producer: {enable_idempotence: true}}` rules that out
(not on Tansu's in-memory storage, which refuses idempotent producers).

The source
----------
The `kafka` source reads topics of a cluster into a pipeline topic, schema-checked like any
source: with `format: json` each record's value must be one JSON object, which becomes one
row (the record's key, timestamp and headers are not kept; the pipeline topic's `key`
field keys the row). A value that is not a JSON object is a data error at
`topic[partition]@offset`, handled by the spec's error policy. The partitions of the
listed topics are read by assignment (no consumer group), by one task or, with `tasks: N`,
by N tasks: a topic's partitions go round the tasks in order, starting at the task its name
hashes to, so each task keeps its partitions from run to run (partitions added to a topic
move none of the others); a task left without a partition idles (or ends, with
`stop_at_end`). Each keeps `"<topic>/<partition>": next_offset` as source offsets, so a
restart resumes where the last batch that reached the pipeline topic ended. Partitions without a stored offset
start at `start` (earliest or latest). Partitions are read when the source opens:
partitions added later are not seen until the next run.

It follows its topics until stopped, so `pipeline run --once` never ends with it, unless
`stop_at_end: true`: then it ends when every partition reached the end it had when the
source opened (records written after that are left for the next run).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from runner.broker.kafka_options import KafkaOptions
from runner.connector import Config, ConfigError, Sink, SinkTask, Source, SourceTask, setting

#: The one header the sink adds to every record: the record's offset in its source partition.
SOURCE_OFFSET_HEADER = "pipeline.source.offset"

_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]*")


# -- the cluster setting both share -----------------------------------------------------------


class _ClusterConfig(Config):
    cluster: dict[str, Any] = setting(
        help="The cluster: a mapping with the settings of the spec's broker.kafka "
        "(bootstrap_servers required; client_id, security, producer, consumer, "
        "replication_factor, request_timeout_ms)."
    )

    @classmethod
    def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
        cluster = given.get("cluster")
        if not isinstance(cluster, dict):
            return []
        try:
            KafkaOptions.parse(cluster)
        except ConfigError as exc:
            return [(f"cluster.{k}" if k else "cluster", m) for k, m in exc.problems]
        return []

    def options(self) -> KafkaOptions:
        return KafkaOptions.parse(self.cluster)

    def __repr__(self) -> str:
        text = super().__repr__()
        password = (self.cluster.get("security") or {}).get("password")
        return text.replace(repr(password), "'***'") if password else text


# -- the connectors (their tasks, which talk to Kafka, are in tasks.py) -------------------------


class KafkaSink(Sink):
    """Copies topics to another Kafka cluster, exactly once (see the module docstring)."""

    name = "kafka"
    description = (
        "Copies topics to another Kafka cluster (MirrorMaker-style): same partition, key, "
        "value bytes, timestamp and headers, exactly once."
    )
    wants = "raw"

    class Config(_ClusterConfig):
        cluster: dict[str, Any] = setting(
            help="The target cluster, with the settings of the spec's broker.kafka: "
            "bootstrap_servers (required), client_id, security, producer (extra "
            "AIOKafkaProducer settings; acks is always all), replication_factor (of the "
            "topics it creates), request_timeout_ms."
        )
        topic_prefix: str = setting(
            "",
            help="Prepended to each topic's name on the target cluster: with 'primary.', "
            "topic orders is written to primary.orders.",
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = super().check(given)
            prefix = given.get("topic_prefix")
            if isinstance(prefix, str) and not _TOPIC_CHARS.fullmatch(prefix):
                problems.append(("topic_prefix", f"{prefix!r} may hold only letters, digits, '.', '_' and '-' (it becomes part of topic names)"))
            producer = given.get("cluster", {}).get("producer") if isinstance(given.get("cluster"), dict) else None
            if isinstance(producer, dict) and "acks" in producer:
                problems.append(("cluster.producer.acks", "the kafka sink always writes with acks=all (its exactly-once needs it)"))
            return problems

    def target(self) -> str:
        topics = ", ".join(self.config.topic_prefix + t for t in self.context.topics)
        return f"{topics} on {self.config.options().bootstrap_servers}"

    def task(self) -> SinkTask:
        from connectors.kafka.tasks import KafkaSinkTask  # aiokafka loads when a task runs

        return KafkaSinkTask(self.context.name, self.config, dict(self.context.partitions), self.context.topics)


class KafkaSource(Source):
    """Reads topics of a Kafka cluster, each value a JSON object (see the module docstring)."""

    name = "kafka"
    description = "Reads JSON-object records from topics of a Kafka cluster (no consumer group; offsets kept by the pipeline)."

    class Config(_ClusterConfig):
        cluster: dict[str, Any] = setting(
            help="The cluster to read, with the settings of the spec's broker.kafka: "
            "bootstrap_servers (required), client_id, security, consumer (extra "
            "AIOKafkaConsumer settings), request_timeout_ms."
        )
        topics: list[str] = setting(help="Topics of the cluster to read (every partition of each).")
        format: Literal["json"] = setting("json", help="How a value becomes a row: json (one JSON object per value).")
        start: Literal["earliest", "latest"] = setting(
            "earliest", help="Where partitions with no stored offset start: their oldest record, or their end."
        )
        batch_size: int = setting(5000, help="Records per batch at most.", min=1, max=1_000_000)
        stop_at_end: bool = setting(
            False,
            help="End once every partition reached the end it had when the source opened. "
            "Otherwise the source follows its topics until stopped, so `run --once` never "
            "ends with it.",
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = super().check(given)
            if isinstance(given.get("topics"), list) and not given["topics"]:
                problems.append(("topics", "name at least one topic"))
            return problems

    def target(self) -> str:
        return f"{', '.join(self.config.topics)} on {self.config.options().bootstrap_servers}"

    def tasks(self) -> list[SourceTask]:
        from connectors.kafka.tasks import KafkaSourceTask  # aiokafka loads when a task runs

        n = self.context.max_tasks
        return [KafkaSourceTask(self.context.name, self.config, share=(i, n)) for i in range(n)]
