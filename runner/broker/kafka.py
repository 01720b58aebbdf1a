"""The Kafka broker: the same interface as the embedded one, on a Kafka cluster (aiokafka).

Spec::

    broker:
      kafka:
        bootstrap_servers: "kafka1:9092,kafka2:9092"
        client_id: pipeline
        security: {protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-512,
                   username: "${KAFKA_USER}", password: "${KAFKA_PASSWORD}", ssl_cafile: ca.pem}
        producer: {linger_ms: 5}            # passed to AIOKafkaProducer
        consumer: {session_timeout_ms: 6000}   # passed to AIOKafkaConsumer

- Producing goes through aiokafka's batch path (`create_batch` / `send_batch`, one call per
  topic-partition batch rather than one `send` per record) with `acks=all`; `produce`
  returns when every batch is acknowledged. Partitions are chosen by the worker with Kafka's
  default partitioner (murmur2), so other clients agree on where a key lives.
- Sinks consume in a consumer group; offsets are committed only as the worker says (after a
  sink's flush), never automatically. Rebalances are incremental and sticky
  (`kafka_groups`): a process joining or leaving moves only the partitions and tasks that
  change hands.
- Source offsets live in a compacted topic (`offsets_topic`, default `_pipeline_offsets`),
  keyed by `[pipeline, connector, source partition]` as JSON, like Kafka Connect's
  `connect-offsets`. They are written after the records they describe are acknowledged:
  a crash in between sends those records again (at least once from source to topic).
- Secrets (`security.password`) are never shown: not in errors, `validate` or summaries.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)

from runner.broker.base import (
    FetchedBatch,
    ProduceBatch,
    Rebalance,
    SourceOffsetCommit,
    TopicInfo,
    TopicPartition,
    as_list,
)
from runner.broker.kafka_fetch import RUNS, install
from runner.broker.kafka_groups import KafkaMembership
from runner.broker.kafka_options import KafkaOptions, SecurityOptions, client_settings
from runner.errors import FatalError, PipelineError, RetryableError

log = logging.getLogger("pipeline.kafka")

# A record's largest encoding beyond its key and value (Kafka's v2 format: length, attributes,
# timestamp and offset deltas, key and value lengths, header count, as varints), a header's
# beyond its key and value (two varint lengths), and a record batch's header.
RECORD_OVERHEAD, HEADER_OVERHEAD, BATCH_OVERHEAD = 40, 10, 61
TASK_HEADER, COUNT_HEADER = "pipeline.task", "pipeline.count"  # a source task's marks (kafka_sources)
_MARKS = frozenset((TASK_HEADER, COUNT_HEADER))
install()  # consumers made with value_deserializer=RUNS fetch runs of records (kafka_fetch.py)


def reason(exc: BaseException) -> str:
    """aiokafka's message in one line, without its repeated type name or Python reprs of
    addresses (and never the settings, which hold secrets)."""
    if isinstance(exc, KafkaConnectionError):
        return "no broker answered"
    if isinstance(exc, (KafkaTimeoutError, asyncio.TimeoutError)):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = re.sub(r"\s*<[^>]*>", "", text).rstrip(":. ")  # no Python reprs
    name = type(exc).__name__
    text = text[len(name) + 2 :] if text.startswith(f"{name}: ") else text
    return f"{name}: {text}" if text else name


def retriable(exc: BaseException) -> bool:
    """Worth trying again: what Kafka marks retriable (leader moved, broker away), and
    timeouts (aiokafka does not mark its own KafkaTimeoutError)."""
    return isinstance(exc, (KafkaTimeoutError, asyncio.TimeoutError)) or (isinstance(exc, KafkaError) and exc.retriable)


def kafka_error(exc: BaseException, doing: str) -> Exception:
    """An aiokafka error as ours, '<doing>: <reason>': retriable ones are retried by the
    engine with backoff; the rest stop the run. Connectors that talk to Kafka use it too."""
    if isinstance(exc, (RetryableError, FatalError)):
        return exc
    if retriable(exc):
        return RetryableError(f"{doing}: {reason(exc)}")
    return FatalError(f"{doing}: {reason(exc)}")


class _ConnectFailures(logging.Handler):
    """Keeps the last reason aiokafka gives for not connecting (it logs the reason, and
    raises only "Unable to bootstrap")."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if args and isinstance(args[-1], BaseException):
            self.last = args[-1]


def _connect_failure(exc: BaseException, security: SecurityOptions) -> tuple[str, str]:
    """Why the cluster could not be reached, in a few words, and what to check."""
    check_security = "check broker.kafka.security against the listener's settings"
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"the broker does not accept SASL mechanism {security.sasl_mechanism}", check_security
    if isinstance(exc, (SaslAuthenticationFailed, AuthenticationFailedError)):
        return f"the broker refused the credentials of user {security.username!r}", check_security
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})", check_security
    if security.protocol in ("SSL", "SASL_SSL") and isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return "no TLS handshake (is the listener plain text?)", check_security
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", "check broker.kafka.bootstrap_servers and that the cluster is up"
    return reason(exc), "check broker.kafka.bootstrap_servers and that the cluster is up"


def _error(exc: BaseException, doing: str) -> Exception:
    return kafka_error(exc, f"kafka: {doing}")


class KafkaBroker:
    distributed = True  # processes of one pipeline share partitions and source tasks

    def __init__(self, options: dict[str, Any], pipeline: str, *, read_only: bool = False) -> None:
        self.options = KafkaOptions.parse(options)
        self.pipeline = pipeline
        self.read_only = read_only
        self.settings = client_settings(self.options)
        self._admin: AIOKafkaAdminClient | None = None
        # What every group member of this process tells its group of the spec it runs
        # (`Pipeline` sets it): members on another spec are refused.
        self.identity: dict[str, str] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        failures = _ConnectFailures()
        logging.getLogger("aiokafka").addHandler(failures)
        try:
            self._admin = AIOKafkaAdminClient(**self.settings)
            await self._admin.start()
            if not self.read_only:
                self._producer = await self._start_producer()
        except BaseException as exc:
            await self.close()
            if not isinstance(exc, Exception):
                raise  # cancelled: the clients are closed, nothing to report
            cause, hint = _connect_failure(failures.last or exc, self.options.security_options())
            raise FatalError(f"cannot reach Kafka at {self.options.bootstrap_servers}: {cause}", hint=hint) from exc
        finally:
            logging.getLogger("aiokafka").removeHandler(failures)

    async def _start_producer(self) -> AIOKafkaProducer:
        """An idempotent producer (a batch retried after a lost acknowledgement is not
        written twice), unless the cluster cannot give out producer ids: then a plain one,
        with a warning. `producer: {enable_idempotence: false}` asks for a plain one."""
        # Record batches of up to 512 KiB, not aiokafka's 16 KiB: a produce call sends
        # thousands of records, about 70 activity records to a 16 KiB batch (and a request
        # each); 512 KiB stays under a broker's default message.max.bytes (1 MiB).
        extra = {"max_batch_size": 512 * 1024, **self.options.producer}
        self._batch_bytes = extra["max_batch_size"]
        asked = "enable_idempotence" in extra
        if extra.pop("enable_idempotence", True):
            producer = AIOKafkaProducer(**self.settings, acks="all", enable_idempotence=True, **extra)
            try:
                await producer.start()
                return producer
            except KafkaError as exc:
                await producer.stop()
                if asked or isinstance(exc, KafkaConnectionError):
                    raise
                log.warning(
                    "kafka: the cluster at %s gives no producer ids (%s); producing without "
                    "idempotence: a batch retried after a lost acknowledgement may be written twice",
                    self.options.bootstrap_servers, reason(exc),
                )
        producer = AIOKafkaProducer(**self.settings, acks="all", **extra)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def close(self) -> None:
        for client, stop in ((self._producer, "stop"), (self._admin, "close")):
            if client is not None:
                try:
                    await getattr(client, stop)()
                except Exception:  # closing: nothing left to save
                    log.debug("closing a Kafka client failed", exc_info=True)
        self._producer = self._admin = None

    # -- topics --------------------------------------------------------------------------

    async def _describe(self, names: list[str]) -> dict[str, int]:
        """Partition counts of the topics among `names` that exist."""
        assert self._admin is not None
        try:
            # Listed first: describing a missing topic may auto-create it on some brokers.
            existing = set(await self._admin.list_topics())
            names = [n for n in names if n in existing]
            described = await self._admin.describe_topics(names) if names else []
        except Exception as exc:
            raise _error(exc, f"describe topics {names}") from exc
        return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0 and t["partitions"]}

    async def ensure_topic(self, name: str, partitions: int, *, compact: bool = False) -> None:
        existing = (await self._describe([name])).get(name)
        if existing is None:
            assert self._admin is not None
            configs = {"cleanup.policy": "compact"} if compact else {}
            try:
                await self._admin.create_topics(
                    [NewTopic(name, partitions, self.options.replication_factor, topic_configs=configs)]
                )
            except TopicAlreadyExistsError:
                pass  # another process of this pipeline created it first
            except Exception as exc:
                raise _error(exc, f"create topic {name!r}") from exc
            existing = await self._wait_for_topic(name)
        if existing != partitions:
            raise FatalError(
                f"topic {name!r} exists on the Kafka cluster with {existing} partition(s), "
                f"the spec says {partitions}",
                hint="change `partitions` in the spec, or add partitions to the topic with "
                "Kafka's tools (keys then move to other partitions)",
            )
        self._partitions[name] = existing

    async def _wait_for_topic(self, name: str) -> int:
        for _ in range(100):  # metadata may lag the creation briefly
            found = (await self._describe([name])).get(name)
            if found:
                return found
            await asyncio.sleep(0.1)
        raise RetryableError(f"kafka: topic {name!r} was created but does not show in the metadata yet")

    async def topics(self) -> list[TopicInfo]:
        assert self._admin is not None
        try:
            names = [
                n for n in await self._admin.list_topics()
                # Kafka's own, and ours (source offsets, source-task control topics)
                if not n.startswith("__") and n != self.options.offsets_topic and not _is_control_topic(n)
            ]
        except Exception as exc:
            raise _error(exc, "list topics") from exc
        counts = await self._describe(sorted(names)) if names else {}
        return [TopicInfo(n, c, await self.end_offsets(n)) for n, c in sorted(counts.items())]

    async def _partition_count(self, topic: str) -> int:
        if topic not in self._partitions:
            count = (await self._describe([topic])).get(topic)
            if count is None:
                raise FatalError(f"topic {topic!r} does not exist on the Kafka cluster")
            self._partitions[topic] = count
        return self._partitions[topic]

    async def end_offsets(self, topic: str) -> list[int]:
        """Next offset per partition: the high watermark a fetch reports.

        (ListOffsets alone is not used as the answer: some Kafka-protocol brokers, among
        them the Tansu build the tests run, answer it with the last batch's base offset
        + 1. The fetch's high watermark is right on all of them; ListOffsets gives the
        place to fetch from.)"""
        count = await self._partition_count(topic)
        tps = [KafkaTP(topic, p) for p in range(count)]
        probe = AIOKafkaConsumer(**self.settings, enable_auto_commit=False)
        try:
            await probe.start()
            listed = await probe.end_offsets(tps)
            probe.assign([tp for tp in tps if listed[tp] > 0])
            ends = {tp: 0 for tp in tps}
            waiting = {tp for tp in tps if listed[tp] > 0}
            for tp in waiting:
                probe.seek(tp, listed[tp] - 1)
            for _ in range(50):
                if not waiting:
                    break
                await probe.getmany(*waiting, timeout_ms=100, max_records=1)
                for tp in list(waiting):
                    high = probe.highwater(tp)
                    if high is not None:
                        ends[tp] = max(high, listed[tp])
                        waiting.discard(tp)
            for tp in waiting:  # no fetch answer in time: ListOffsets is all there is
                ends[tp] = listed[tp]
            return [ends[tp] for tp in tps]
        except Exception as exc:
            raise _error(exc, f"end offsets of {topic!r}") from exc
        finally:
            await probe.stop()

    # -- producing -------------------------------------------------------------------------

    async def produce(self, batches: list[ProduceBatch], source_offsets: SourceOffsetCommit | None = None) -> None:
        assert self._producer is not None, "broker opened read-only"
        futures: list[asyncio.Future] = []
        try:
            for b in batches:
                futures += await self._send(b)
            await _settle(futures)
            if source_offsets is not None and source_offsets.offsets:
                offsets = await self._offsets_batch(source_offsets)
                await _settle(await self._send(offsets))
        except BaseException as exc:
            await asyncio.gather(*futures, return_exceptions=True)  # none left unawaited
            if isinstance(exc, (FatalError, RetryableError)) or not isinstance(exc, Exception):
                raise
            raise _error(exc, "produce") from exc

    async def _send(self, b: ProduceBatch, tag: tuple[str, bytes] | None = None) -> list[asyncio.Future]:
        """Send one topic-partition's records as few Kafka batches as fit; the futures of
        their acknowledgements (each gives the batch's end offset). With a `tag`, the first
        record of each Kafka batch carries it and the batch's record count (`kafka_sources`)."""
        assert self._producer is not None
        keys, values, stamps = as_list(b.keys), as_list(b.values), b.timestamps
        headers = [list(h.items()) if h else [] for h in b.headers] if b.headers else [[]] * len(values)
        futures = []
        try:
            if tag is None:
                futures += await self._send_records(b, keys, values, stamps, headers)
            else:
                # Batches cut where they certainly fit: the count goes in before the rest.
                start = 0
                for end in self._batch_ends(b, headers, tag):
                    first = [*headers[start], tag, (COUNT_HEADER, str(end - start).encode())]
                    sent = await self._send_records(b, keys[start:end], values[start:end], stamps[start:end],
                                                    [first, *headers[start + 1:end]])
                    if len(sent) != 1:  # cannot happen with _batch_ends right: the count would be wrong
                        raise FatalError(f"kafka: {end - start} records to {b.topic!r} did not fit one batch")
                    futures += sent
                    start = end
        except BaseException:
            await asyncio.gather(*futures, return_exceptions=True)  # none left unawaited
            raise
        return futures

    async def _send_records(self, b: ProduceBatch, keys: list[Any], values: list[Any], stamps: list[int],
                            headers: list[list[tuple[str, bytes]]]) -> list[asyncio.Future]:
        futures = []
        try:
            batch = self._producer.create_batch()
            for key, value, ts, hs in zip(keys, values, stamps, headers):
                if batch.append(key=key, value=value, timestamp=ts, headers=hs) is None:
                    futures.append(await self._send_batch(batch, b))
                    batch = self._producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=ts, headers=hs) is None:
                        raise FatalError(f"a record of {b.topic!r} is larger than the producer's max batch size")
            if batch.record_count():
                futures.append(await self._send_batch(batch, b))
        except BaseException:
            await asyncio.gather(*futures, return_exceptions=True)  # none left unawaited
            raise
        return futures

    def _batch_ends(self, b: ProduceBatch, headers: list[list[tuple[str, bytes]]], tag: tuple[str, bytes]) -> list[int]:
        """Where the Kafka batches of `b` end (exclusive indexes): as many records as
        certainly fit `max_batch_size`, each counted at its largest encoding, with room for
        the first record's tag and count. A record alone in its batch always fits."""
        if isinstance(b.values, pa.Array) and isinstance(b.keys, pa.Array) and not b.headers:
            sizes = pc.add(pc.add(_byte_lengths(b.values), _byte_lengths(b.keys)), RECORD_OVERHEAD)
            totals = pc.cumulative_sum(sizes).to_pylist()  # vectorised: a columnar source's batch
        else:
            sizes = [RECORD_OVERHEAD + (len(v) if v is not None else 0) + (len(k) if k is not None else 0)
                     for k, v in zip(as_list(b.keys), as_list(b.values))]
            if b.headers:
                for i, hs in enumerate(headers):
                    sizes[i] += sum(HEADER_OVERHEAD + len(k.encode()) + len(v or b"") for k, v in hs)
            totals = list(itertools.accumulate(sizes))
        marks = 2 * HEADER_OVERHEAD + len(tag[0].encode()) + len(tag[1]) + len(COUNT_HEADER) + 20  # count digits
        room = self._batch_bytes - BATCH_OVERHEAD - marks
        ends, done = [], 0
        while len(ends) == 0 or ends[-1] < len(totals):
            start = ends[-1] if ends else 0
            end = max(start + 1, bisect.bisect_right(totals, done + room))
            ends.append(end)
            done = totals[end - 1]
        return ends

    async def _send_batch(self, batch: Any, b: ProduceBatch) -> asyncio.Future:
        count = batch.record_count()
        batch.close()
        sent = await self._producer.send_batch(batch, b.topic, partition=b.partition)
        # The acknowledgement gives the batch's first offset; its end is what callers need.
        return asyncio.ensure_future(_end_of(sent, count))

    async def _offsets_batch(self, commit: SourceOffsetCommit) -> ProduceBatch:
        topic = self.options.offsets_topic
        if topic not in self._partitions:
            await self.ensure_topic(topic, 1, compact=True)
        keys = [json.dumps([self.pipeline, commit.connector, p]).encode() for p in commit.offsets]
        values = [json.dumps(o).encode() for o in commit.offsets.values()]
        return ProduceBatch(topic, 0, keys, values, [None] * len(keys))  # type: ignore[list-item]

    async def source_offsets(self, connector: str) -> dict[str, Any]:
        return (await self.source_state(connector))[0]

    def source_writer(self, connector: str, task: int, topics: list[str], *, replays_exactly: bool = True) -> Any:
        from runner.broker.kafka_sources import KafkaSourceWriter  # it builds on this module

        return KafkaSourceWriter(self, connector, task, topics, count_landed=replays_exactly)

    async def send_tagged(self, b: ProduceBatch, tag: tuple[str, bytes]) -> list[asyncio.Future]:
        """Send `b` with the header `tag` on every record; futures of each Kafka batch's
        end offset (see `kafka_sources`)."""
        try:
            return await self._send(b, tag)
        except (FatalError, RetryableError):
            raise
        except Exception as exc:
            raise _error(exc, "produce") from exc

    async def store_offsets_record(self, key: list[Any], value: Any) -> None:
        """Write one record to the offsets topic (JSON key and value) and wait for it."""
        topic = self.options.offsets_topic
        if topic not in self._partitions:
            await self.ensure_topic(topic, 1, compact=True)
        record = ProduceBatch(topic, 0, [json.dumps(key).encode()], [json.dumps(value).encode()], [None])  # type: ignore[list-item]
        try:
            await _settle(await self._send(record))
        except (FatalError, RetryableError):
            raise
        except Exception as exc:
            raise _error(exc, "store source offsets") from exc

    async def count_tagged(self, starts: dict[tuple[str, int], int], tag: tuple[str, bytes]) -> dict[tuple[str, int], tuple[int, int]]:
        """Per (topic, partition): how many records `send_tagged` sent with `tag` from
        offset `starts[...]` to the partition's end, and the offset after the last of them."""
        ends: dict[tuple[str, int], int] = {}
        for topic in {t for t, _ in starts}:
            for p, end in enumerate(await self.end_offsets(topic)):
                ends[(topic, p)] = end
        todo = {KafkaTP(t, p): start for (t, p), start in starts.items() if ends.get((t, p), 0) > start}
        found: dict[tuple[str, int], tuple[int, int]] = {}
        if not todo:
            return found
        reader = AIOKafkaConsumer(**self.settings, enable_auto_commit=False)
        try:
            await reader.start()
            reader.assign(list(todo))
            for ktp, start in todo.items():
                reader.seek(ktp, start)
            waiting, idle = set(todo), 0
            while waiting:
                got = await reader.getmany(*waiting, timeout_ms=1000)
                idle = 0 if got else idle + 1
                if idle >= 30:
                    raise RetryableError(f"kafka: no records for 30 s while reading {sorted(map(str, waiting))} to their end")
                for ktp, records in got.items():
                    key = (ktp.topic, ktp.partition)
                    count, after = found.get(key, (0, 0))
                    for r in records:
                        if tag in (r.headers or ()):
                            # A Kafka batch's first record counts the batch; a tag without a
                            # count (each record tagged, as earlier versions wrote) counts 1.
                            n = int(dict(r.headers).get(COUNT_HEADER, b"1"))
                            count, after = count + n, r.offset + n
                    if count:
                        found[key] = (count, after)
                for ktp in list(waiting):
                    if await reader.position(ktp) >= ends[(ktp.topic, ktp.partition)]:
                        waiting.discard(ktp)
        except RetryableError:
            raise
        except Exception as exc:
            raise _error(exc, "read back what a source task wrote") from exc
        finally:
            await reader.stop()
        return found

    async def source_state(self, connector: str) -> tuple[dict[str, Any], dict[int, Any]]:
        """The latest stored offset of each source partition of `connector`, and the
        latest checkpoint of each of its tasks (see `kafka_sources`): the offsets topic
        read from its start to its end, later records overriding earlier ones."""
        topic = self.options.offsets_topic
        if not (await self._describe([topic])).get(topic):
            return {}, {}
        self._partitions[topic] = 1
        end = (await self.end_offsets(topic))[0]
        found: dict[str, Any] = {}
        tasks: dict[int, Any] = {}
        reader = AIOKafkaConsumer(**self.settings, enable_auto_commit=False)
        tp = KafkaTP(topic, 0)
        try:
            await reader.start()
            reader.assign([tp])
            reader.seek(tp, 0)
            idle = 0
            while await reader.position(tp) < end:
                got = await reader.getmany(tp, timeout_ms=1000)
                idle = 0 if got else idle + 1
                if idle >= 30:
                    raise RetryableError(f"kafka: {topic!r} gave no records for 30 s below its end offset {end}")
                for records in got.values():
                    for r in records:
                        # [pipeline, connector, partition] holds one source partition's
                        # offset; [pipeline, connector, "task", n] a task's checkpoint.
                        key = json.loads(r.key)
                        if key[:2] != [self.pipeline, connector]:
                            continue
                        value = json.loads(r.value) if r.value is not None else None
                        if len(key) == 3:
                            found[key[2]] = value
                        elif value is not None:
                            tasks[key[3]] = value
                            found.update(value["offsets"])
        except RetryableError:
            raise
        except Exception as exc:
            raise _error(exc, f"read source offsets of {connector!r}") from exc
        finally:
            await reader.stop()
        return {p: o for p, o in found.items() if o is not None}, tasks

    # -- consumer groups -----------------------------------------------------------------

    async def consumer(self, group: str | None, topics: list[str], *,
                       only: list[TopicPartition] | None = None) -> KafkaConsumer:
        consumer = KafkaConsumer(self, group, topics, only)
        await consumer.start()
        return consumer

    def group_options(self) -> dict[str, Any]:
        """A group member's settings: the spec's `consumer:` over ours. A session of 6 s
        (the least a Kafka broker allows by default): a killed process's work moves on
        within about 10 s."""
        return {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000, **dict(self.options.consumer)}

    def reader_options(self) -> dict[str, Any]:
        return dict(self.options.consumer)

    def join_timeout(self) -> float:
        """How long a first join may take: a few rounds, while members leave or die (a
        dead one is waited for until its session times out)."""
        return max(60.0, self.group_options()["session_timeout_ms"] / 1000 * 10)

    def membership(self, group: str, topics: list[str],
                   note: Callable[[], dict[str, Any]] | None = None) -> KafkaMembership:
        """A member of `group` that fetches nothing (`kafka_groups`); start it to join.
        Every member of this process tells the group `identity` (the spec's fingerprint)
        besides its own `note`."""
        settings = {**self.settings, **self.group_options()}
        # A JoinGroup request may take up to the session timeout to be answered.
        settings["request_timeout_ms"] = max(settings["request_timeout_ms"], settings["session_timeout_ms"] + 5_000)
        identity = self.identity

        def full_note() -> dict[str, Any]:
            return {**({"spec": identity} if identity else {}), **(note() if note else {})}

        return KafkaMembership(group, topics, settings, full_note)

    async def group_is_empty(self, group: str) -> bool:
        """True when `group` has no member now (a new group, or all left): the first to
        join will wait out the broker's first round alone. False when unsure."""
        assert self._admin is not None
        try:
            described = await self._admin.describe_consumer_groups([group])
            # Raw responses: a group is (error_code, group, state, protocol_type, protocol, members).
            return all(g[0] == 0 and not g[5] for response in described for g in response.groups)
        except Exception:  # a broker that does not describe groups: assume company
            return False

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        # Through a consumer of the group that does not join it (OffsetFetch), which every
        # Kafka-protocol broker answers; the admin client's variant is not understood by all.
        count = await self._partition_count(topic)
        reader = AIOKafkaConsumer(**self.settings, group_id=group, enable_auto_commit=False)
        try:
            await reader.start()
            offsets = {p: await reader.committed(KafkaTP(topic, p)) for p in range(count)}
        except Exception as exc:
            raise _error(exc, f"committed offsets of group {group!r}") from exc
        finally:
            await reader.stop()
        return {p: off for p, off in offsets.items() if off is not None and off >= 0}

    async def groups(self, topic: str) -> list[str]:
        assert self._admin is not None
        try:
            listed = await self._admin.list_consumer_groups()
        except Exception as exc:
            raise _error(exc, "list consumer groups") from exc
        return sorted([group for group, *_ in listed if await self.committed(group, topic)])


async def _settle(futures: list[asyncio.Future]) -> None:
    """Wait for every future, then raise the first failure (none is left unawaited)."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _headers(runs: list[Any]) -> list[dict[str, bytes]] | None:
    """The records' headers, one dict a record, or None when no record has any besides
    the source tasks' own marks (`kafka_sources`: bookkeeping, not data)."""
    found: list[tuple[int, dict[str, bytes]]] = []
    base = 0
    for run in runs:
        for i, items in run.headers or ():
            headers = {k: v for k, v in items if k not in _MARKS}
            if headers:
                found.append((base + i, headers))
        base += len(run.offsets)
    if not found:
        return None
    out: list[dict[str, bytes]] = [{} for _ in range(base)]
    for i, headers in found:
        out[i] = headers
    return out


def _byte_lengths(items: pa.Array) -> pa.Array:
    """Byte lengths of keys or values, 0 for None, as int64."""
    return pc.fill_null(pc.binary_length(items), 0).cast(pa.int64())


def _is_control_topic(name: str) -> bool:
    return name.startswith("_pipeline-") and name.endswith(("-source-tasks", "-processors"))  # see worker.WorkerGroup


async def _end_of(sent: asyncio.Future, count: int) -> int:
    try:
        return (await sent).offset + count
    except Exception as exc:
        raise _error(exc, "produce") from exc


class KafkaConsumer:
    """The worker's Consumer on Kafka. In a group (a sink's), two clients: a member of the
    group (`KafkaMembership`: incremental, sticky rebalances) and a reader outside any
    group, assigned what the member holds. A rebalance changes the reader's partitions
    only where they changed hands: what is kept is read on without a pause, from where
    it was. Without a group, the reader alone (`pipeline consume`, processors)."""

    def __init__(self, broker: KafkaBroker, group: str | None, topics: list[str],
                 only: list[TopicPartition] | None = None) -> None:
        self.broker = broker
        self.group = group
        self.topics = list(dict.fromkeys(topics))
        self.only = only  # (no group) the partitions to read; None: every one
        self._revoked: Rebalance | None = None
        self._assigned_cb: Rebalance | None = None
        self._consumer = AIOKafkaConsumer(
            **broker.settings,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            value_deserializer=RUNS,
            **broker.reader_options(),
        )
        self.membership = broker.membership(group, self.topics) if group is not None else None
        self._reading = asyncio.Lock()  # a fetch, or a change of the reader's partitions
        self._join_timeout = broker.join_timeout()

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self._join_timeout):  # not wait_for: it may lose a cancellation
                await self._start()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise RetryableError(
                    f"kafka: consumer group {self.group!r} assigned no partitions within {self._join_timeout:.0f} s"
                ) from None
            if not isinstance(exc, Exception) or isinstance(exc, PipelineError):
                raise
            raise _error(exc, "start a consumer") from exc

    async def _start(self) -> None:
        await self._consumer.start()
        if self.membership is None:
            self._consumer.assign([
                KafkaTP(t, p) for t in self.topics for p in range(await self.broker._partition_count(t))
                if self.only is None or TopicPartition(t, p) in self.only
            ])
            return
        m = self.membership
        m.release_cb, m.assigned_cb, m.lost_cb = self._release, self._now_assigned, self._release
        # The group's first rebalance round; a member may be given nothing (more processes
        # than partitions), and still stands by to take over.
        await m.start()

    def on_rebalance(self, revoked: Rebalance | None, assigned: Rebalance | None) -> None:
        self._revoked, self._assigned_cb = revoked, assigned

    async def _release(self, partitions: list[TopicPartition]) -> None:
        if self._revoked is not None:
            await self._revoked(partitions)
        gone = {KafkaTP(tp.topic, tp.partition) for tp in partitions}
        await self._read(set(self._consumer.assignment()) - gone)

    async def _now_assigned(self, partitions: list[TopicPartition]) -> None:
        await self._read({KafkaTP(tp.topic, tp.partition) for tp in partitions})
        if self._assigned_cb is not None:
            await self._assigned_cb(partitions)

    async def _read(self, partitions: set[KafkaTP]) -> None:
        """Point the reader at `partitions`: the ones it reads already keep their
        positions; new ones start at the group's committed offset (or the earliest)."""
        async with self._reading:
            current = set(self._consumer.assignment())
            if partitions == current:
                return
            kept = {tp: await self._consumer.position(tp) for tp in current & partitions}
            self._consumer.assign(sorted(partitions))
            for tp, offset in kept.items():
                self._consumer.seek(tp, offset)
            for tp in sorted(partitions - current):
                committed = await self.membership.committed(TopicPartition(tp.topic, tp.partition))
                if committed is None or committed < 0:
                    await self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed)

    def _assigned(self, tp: TopicPartition) -> KafkaTP:
        ktp = KafkaTP(tp.topic, tp.partition)
        if ktp not in self._consumer.assignment():
            raise FatalError(f"{tp} is not assigned to this consumer of group {self.group!r}")
        return ktp

    async def assignment(self) -> list[TopicPartition]:
        return sorted(TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment())

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(self._assigned(tp), offset)

    async def fetch(self, max_records: int, timeout: float) -> list[FetchedBatch]:
        if self.membership is not None and self.membership.failure is not None:
            raise self.membership.failure
        if not self._consumer.assignment():  # (aiokafka's getmany never returns on nothing)
            await asyncio.sleep(timeout)
            return []
        try:
            # A run is one record batch; the fetch size bounds how many come at once.
            async with self._reading:
                got = await self._consumer.getmany(timeout_ms=int(timeout * 1000))
        except Exception as exc:
            raise _error(exc, "fetch") from exc
        out = []
        for tp, runs in got.items():
            if not runs:
                continue
            headers = _headers(runs)
            first = runs[0]
            for run in runs[1:]:
                first.offsets += run.offsets
                first.keys += run.keys
                first.values += run.values
                first.timestamps += run.timestamps
            out.append(FetchedBatch(tp.topic, tp.partition, first.offsets, first.keys, first.values, first.timestamps, headers))
        return out

    async def position(self, tp: TopicPartition) -> int:
        return await self._consumer.position(self._assigned(tp))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.membership is None:
            raise FatalError("kafka: commit: a reader outside any consumer group has nothing to commit to")
        try:
            await self.membership.commit(offsets)
        except Exception as exc:
            raise _error(exc, "commit") from exc

    async def close(self) -> None:
        # One loop turn first: stopping a consumer whose coordinator task has not run yet
        # raises CancelledError out of aiokafka (aio-libs/aiokafka#647).
        await asyncio.sleep(0)
        try:
            await self._consumer.stop()
        except Exception:  # closing: nothing left to save
            log.debug("closing a Kafka consumer failed", exc_info=True)
        if self.membership is not None:
            await self.membership.close()

