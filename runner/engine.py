"""The engine's front door: load and check a spec, open its broker and schema registry,
build its connectors and run them. The CLI calls only this module (and reads what it
returns); tests call it the same way.
"""

from __future__ import annotations

import asyncio
import gc
import copy
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fastavro

from runner.broker.base import Broker, TopicPartition
from runner.broker.embedded import EmbeddedBroker
from runner.broker.kafka_options import KafkaOptions
from runner.chain import Chain, build_chain
from runner.config import Config, ConfigError
from runner.connector import ConnectorContext
from runner.errors import FatalError, PipelineError, Problem, SpecError, UsageError, os_error
from runner.plugins import PluginHost, UnknownConnector, load_plugins
from runner.processing.plan import keyed_by_group, plan
from runner.schema.registry import SchemaRegistry
from runner.schema.remote import RegistryOptions, RemoteSchemaRegistry
from runner.schema.serde import DEAD_LETTER_SCHEMA
from runner.spec import ConnectorSpec, Spec, load_spec
from runner.spec.fingerprint import fingerprint
from runner.spec.model import ProcessorSpec
from runner.runs import RunHistory
from runner.schedule import Clock, SystemClock
from runner.worker import (
    Counters,
    DeadLetters,
    ProcessorRunner,
    Task,
    ScheduledRunner,
    SinkRunner,
    WorkerGroup,
    SourceRunner,
    TaskSlot,
    Topic,
    first_error,
)

log = logging.getLogger("pipeline")
T = TypeVar("T")


def check_spec(path: str | os.PathLike, host: PluginHost | None = None) -> Spec:
    """Load a spec and check everything that can be checked without running it: the
    structure, the schemas, the connector and transform names and their configs. Loads
    the plugins of its `plugin_paths:` into `host`. Raises SpecError listing every
    problem."""
    host = host or load_plugins()

    def load_paths(paths: list[pathlib.Path]) -> list[tuple[int, str]]:
        return [(index, f"plugin {info.name!r} ({info.path}) is broken: {info.error}")
                for index, info in host.load_paths(paths)]

    chains: dict[str, Chain] = {}  # by key path: built once, checked against the spec below

    def check_connector(kind: str, entry: ConnectorSpec, key_path: str) -> list[Problem]:
        chains[key_path], problems = build_chain(host, entry)
        try:
            reg = host.lookup(kind, entry.connector)
        except UnknownConnector as exc:
            return [Problem(str(exc), path=f"{key_path}.connector"), *problems]
        try:
            reg.cls.Config.parse(entry.config)
        except ConfigError as exc:
            problems += [
                Problem(message, path=f"{key_path}.config.{key}" if key else f"{key_path}.config")
                for key, message in exc.problems
            ]
        if kind == "sink" and entry.transforms and reg.cls.wants == "raw":
            problems.append(Problem(f"sink {entry.connector!r} copies bytes (wants = \"raw\"); transforms need "
                                    "decoded records", path=f"{key_path}.transforms"))
        return problems

    spec = load_spec(path, check_connector=check_connector, load_plugin_paths=load_paths)
    problems = _plan_processors(spec)
    problems += [
        Problem(
            f"topic {t!r} has no schema (a raw topic); only sinks that take bytes "
            f"(wants = \"raw\") can read it, and {entry.connector!r} decodes records",
            path=f"{entry.key_path}.topics",
        )
        for entry in spec.sinks
        if host.lookup("sink", entry.connector).cls.wants != "raw"
        for t in entry.topics
        if t in spec.topics and spec.topics[t].schema is None
    ]
    for entry in spec.sources + spec.sinks:
        problems += _check_chain(spec, entry, chains[entry.key_path])
    if spec.schema_registry is not None:
        problems += _options_problems(RegistryOptions, spec.schema_registry, "schema_registry")
    if spec.broker.kind == "kafka":
        problems += _options_problems(KafkaOptions, spec.broker.options, "broker.kafka")
    if not problems:  # connectors are built only from a sound spec
        for entry in spec.sources + spec.sinks:
            problems += _check_connector_built(spec, host, entry, chains[entry.key_path])
    if "state_dir" in spec.lines:  # set in the spec (the default is under the spec's directory)
        problems += _outside(spec, "state_dir", "the state directory is", spec.state_dir)
    located = [spec.problem(p.path, p.message, level=p.level) for p in problems]
    if any(p.level == "error" for p in located):
        raise SpecError(sorted(located, key=lambda p: (p.line is None, p.line or 0)))
    spec.warnings = located
    return spec


def _plan_processors(spec: Spec) -> list[Problem]:
    """Check each processor against its inputs' schemas and give its output topic the
    derived schema (in the order they feed each other: one's output may be another's input)."""
    problems: list[Problem] = []
    todo = list(spec.processors)
    while todo:
        outputs = {p.output for p in todo}
        ready = [p for p in todo if not outputs & set(p.reads)] or todo  # a cycle was refused already
        for p in ready:
            output = spec.topics.get(p.output)
            found = plan(p, {t: spec.topics[t].schema if t in spec.topics else None for t in p.reads},
                         output.schema if output is not None else None)
            problems += [Problem(message, path=path) for path, message in found.problems]
            if not found.problems:
                spec.topics[p.output].schema = found.schema
            todo.remove(p)
    return problems


def _options_problems(options: type[Config], value: dict, key_path: str) -> list[Problem]:
    try:
        options.parse(value)
    except ConfigError as exc:
        return [Problem(message, path=f"{key_path}.{key}" if key else key_path) for key, message in exc.problems]
    return []


def _check_chain(spec: Spec, entry: ConnectorSpec, chain: Chain) -> list[Problem]:
    """What a chain needs of the spec: routes to declared topics with a schema, and (on a
    sink) an output schema that is valid Avro for each topic it reads."""
    problems = []
    for transform in chain.transforms:
        where = f"{transform.context.position}.{transform.name}"
        for target in transform.topics():
            topic = spec.topics.get(target)
            if topic is None or topic.schema is None:
                what = "is not declared under topics" if topic is None else "has no schema"
                problems.append(Problem(f"routes to topic {target!r}, which {what}", path=where))
    if entry.kind == "sink" and chain:
        for name in entry.topics:
            schema = DEAD_LETTER_SCHEMA if name == spec.errors.dead_letter_topic else (
                spec.topics[name].schema if name in spec.topics else None)
            if schema is None:
                continue
            try:
                fastavro.parse_schema(chain.schema(copy.deepcopy(schema)))
            except Exception as exc:  # a transform's schema() refusing the topic's schema
                problems.append(Problem(f"on topic {name!r}: {exc}", path=f"{entry.key_path}.transforms"))
    return problems


def _check_connector_built(spec: Spec, host: PluginHost, entry: ConnectorSpec, chain: Chain) -> list[Problem]:
    """What a connector says of itself once built: a `ConfigError` its constructor raises
    (a setting that does not fit its topics' schemas, which only the built connector
    sees), its `preflight` warnings (a glob that matches nothing) and, for a source that
    knows what it produces, whether that fits the schema of each topic it writes (after
    its transform chain)."""
    own = [entry.topic] if entry.kind == "source" else entry.topics
    try:
        connector = Pipeline(spec, host)._build(entry.kind, entry, own, chain=chain)
    except ConfigError as exc:  # located at the key when the spec sets it, else at the entry
        return [
            Problem(message, path=f"{entry.key_path}.config.{key}" if key in entry.config else entry.key_path)
            for key, message in exc.problems
        ]
    problems = [
        Problem(message, path=f"{entry.key_path}.config.{key}" if key else entry.key_path, level="warning")
        for key, message in connector.preflight()
    ]
    target = connector.target() if entry.kind == "sink" else None
    if target and "://" not in target:  # a local path (not a URL)
        problems += _outside(spec, f"{entry.key_path}.config.path" if "path" in entry.config else entry.key_path,
                             f"sink {entry.name!r} writes to", target)
    produced = connector.produces() if entry.kind == "source" else None
    if produced is None:
        return problems
    try:
        produced = chain.schema(copy.deepcopy(produced))
    except Exception:  # a transform that cannot map this schema: the records will tell
        return problems
    fields = {f["name"] for f in produced.get("fields", [])}
    for name in dict.fromkeys([entry.topic, *chain.topics()]):
        schema = spec.topics[name].schema if name in spec.topics else None
        if schema is None:
            continue
        declared = {f["name"]: f for f in schema.get("fields", [])}
        for field_name, field in declared.items():
            if field_name not in fields and "default" not in field:
                problems.append(Problem(
                    f"topic {name!r} requires field {field_name!r} (it has no default), which source "
                    f"{entry.name!r} never produces (it produces {', '.join(sorted(fields))})",
                    path=f"{entry.key_path}.topic"))
        for field_name in sorted(fields - declared.keys()):
            problems.append(Problem(
                f"source {entry.name!r} produces field {field_name!r}, which the schema of topic {name!r} "
                "lacks: it will be dropped from every record (add it to the schema to keep it)",
                path=f"{entry.key_path}.topic", level="warning"))
    return problems


def _outside(spec: Spec, key_path: str, what: str, path: str | os.PathLike) -> list[Problem]:
    """A warning when `path` lies outside the spec's directory: a `../..` or an absolute
    path that leaves the project deserves a second look (`validate --strict` refuses it)."""
    base = spec.path.parent.resolve()
    where = pathlib.Path(os.path.abspath(path)).resolve()
    if where == base or base in where.parents:
        return []
    return [Problem(f"{what} {str(where)!r}, outside the spec's directory {str(base)!r}", path=key_path,
                    level="warning")]


def load_for_inspection(path: str | os.PathLike) -> Spec:
    """A spec for the read-side commands (topics, consume, schemas): only what locates the
    state directory must be right, so a typo in a connector's config does not lock a
    user out of their data."""
    return load_spec(path)


def open_broker(spec: Spec, *, read_only: bool = False) -> Broker:
    if spec.broker.kind == "kafka":
        from runner.broker.kafka import KafkaBroker  # aiokafka only for a pipeline on Kafka

        return KafkaBroker(spec.broker.options, spec.name, read_only=read_only)
    return EmbeddedBroker(spec.state_dir, read_only=read_only)


def open_registry(spec: Spec, *, read_only: bool = False) -> SchemaRegistry | RemoteSchemaRegistry:
    """The spec's external registry, or the embedded one; `read_only` for read-side
    commands, which must neither create a state directory nor write to one."""
    if spec.schema_registry is not None:
        try:
            return RegistryOptions.parse(spec.schema_registry).open()
        except ConfigError as exc:
            raise FatalError(f"schema_registry: {exc}") from None
    path = spec.state_dir / "schemas.db"
    if read_only and not path.exists():
        raise UsageError(
            f"no schemas registered in {spec.state_dir} yet",
            hint="`pipeline run` registers each topic's schema when it starts",
        )
    return SchemaRegistry(path, read_only=read_only)


@dataclass
class RunResult:
    counters: list[Counters]
    stopped_by_signal: bool = False
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """One run of a spec. `run()` returns when the sources are exhausted and the sinks
    caught up (`once=True`), or when stopped by a signal or `stop()`."""

    def __init__(
        self,
        spec: Spec,
        host: PluginHost,
        *,
        once: bool = False,
        progress: Callable[[list[Counters], float], None] | None = None,
        only_sources: list[str] | None = None,
        now: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self.spec = spec
        self.host = host
        # `only_sources`: run just these sources (no sinks); with `now`, scheduled ones run
        # once, at once, and the run ends.
        self.only_sources = only_sources
        self.now = now
        self.once = once or now
        self.progress = progress
        self.clock = clock or SystemClock()
        self.history: RunHistory | None = None  # opened when a source has a schedule
        self.stop_event = asyncio.Event()
        self.counters: list[Counters] = []
        self.dead_letters: DeadLetters | None = None  # once the run has started
        self.signalled = 0
        self._watchers: list[asyncio.Task] = []  # see _fed_by

    def stop(self) -> None:
        self.stop_event.set()

    def _on_signal(self, signum: int) -> None:
        self.signalled += 1
        if self.signalled > 1:
            print("pipeline: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(
            f"pipeline: {signal.Signals(signum).name} received, flushing and stopping "
            "(send again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        self.stop()

    async def run(self) -> RunResult:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        start = loop.time()
        try:
            await self._run()
        except BaseExceptionGroup as group:
            exc = first_error(group)
            raise self._with_result(exc, loop.time() - start) from exc.__cause__
        except PipelineError as exc:
            raise self._with_result(exc, loop.time() - start)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        result = RunResult(self.counters, bool(self.signalled), loop.time() - start)
        if self.once and not self.signalled:
            self._check_delivered(result)
        return result

    def _check_delivered(self, result: RunResult) -> None:
        """A bounded run that read records and delivered none, while some went to the
        dead-letter topic, failed: say so with the first error, and how to see the rest."""
        # Read from the input: by the sources, or the sinks of a spec without any. (A sink
        # may re-read a filtered tail of its last run: that is no new input.)
        sources = [c for c in self.counters if c.kind == "source"]
        ends = [c for c in self.counters if c.kind == "sink"] or self.counters
        read = sum(c.records_in for c in sources or self.counters)
        dead = sum(c.dead_lettered for c in self.counters)
        if read and dead and not sum(c.records_out for c in ends):
            first = self.dead_letters.first
            exc = FatalError(
                f"nothing was delivered: {dead:,} record(s) went to the dead-letter topic"
                + (f"; the first: {first.describe()}" if first is not None else ""),
                hint=f"see them all: {self.dead_letters.consume_command()}",
            )
            exc.result = result
            raise exc

    def _with_result(self, exc: BaseException, elapsed: float) -> BaseException:
        """A failed run still reports what it did (the CLI prints the summary)."""
        if isinstance(exc, PipelineError):
            exc.result = RunResult(self.counters, bool(self.signalled), elapsed)
        return exc

    async def _run(self) -> None:
        spec = self.spec
        broker = open_broker(spec)
        if broker.distributed:  # processes sharing the pipeline must run the same spec
            broker.identity = fingerprint(spec, once=self.once)
        try:
            await broker.start()
        except OSError as exc:
            raise os_error(exc, "state directory", str(spec.state_dir)) from exc
        registry = open_registry(spec)
        try:
            topics = await self._prepare_topics(broker, registry)
            dlq = None
            if spec.errors.dead_letter_topic:
                name = spec.errors.dead_letter_topic
                schema_id = registry.register(f"{name}-value", DEAD_LETTER_SCHEMA)
                await broker.ensure_topic(name, 1)
                dlq = topics[name] = Topic(name, 1, DEAD_LETTER_SCHEMA, schema_id)
            dead_letters = self.dead_letters = DeadLetters(spec, dlq, warn=not self.once)
            sources_done = asyncio.Event() if self.once else None
            source_group = WorkerGroup(spec.name, "source-tasks", self._source_slots(topics, broker, dead_letters),
                                       broker, self.stop_event, self.once)
            # With --once, each processor ends when what feeds it has ended (the sources, and
            # the processors that write its inputs); the sinks when all of them have.
            upstream_done = asyncio.Event() if self.once else None
            processors = [] if self.only_sources is not None else self.spec.processors
            done = {p.name: asyncio.Event() for p in processors}
            fed_by = {p.name: self._fed_by(p, processors, sources_done, done) for p in processors}
            self._processor_counters = {p.name: Counters(p.name, "processor", target=f"{', '.join(p.inputs)} → {p.output}")
                                        for p in processors}
            self.counters += self._processor_counters.values()
            # Each processor's tasks, shared among all the processes of the pipeline (Kafka:
            # a task not assigned here runs in another process).
            slots = []
            for p in processors:
                slots += await self._processor_slots(p, topics, broker, registry, dead_letters, fed_by[p.name],
                                                     done[p.name])
            processor_group = WorkerGroup(spec.name, "processors", slots, broker, self.stop_event, self.once)
            sink_runners = (
                [] if self.only_sources is not None
                else self._sink_runners(topics, broker, registry, dead_letters, upstream_done)
            )

            async def sources() -> None:
                await source_group.run()
                if sources_done is not None:
                    sources_done.set()
                    await asyncio.gather(*(event.wait() for event in done.values()))
                    upstream_done.set()

            async def process() -> None:
                await processor_group.run()
                # (--once: every processor task has ended, wherever it ran; stopped: so is the run)
                for event in done.values():
                    event.set()

            # Sinks run until stopped (or, with --once, until they have caught up with
            # everything the sources produced); a run with no sinks ends with its sources.
            ticker = asyncio.create_task(self._tick()) if self.progress else None
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(sources())
                    group.create_task(process())
                    for runner in sink_runners:
                        group.create_task(runner.run())
            finally:
                if ticker is not None:
                    ticker.cancel()
                for watcher in self._watchers:
                    watcher.cancel()
        finally:
            registry.close()
            if self.history is not None:
                self.history.close()
            await broker.close()

    async def _tick(self) -> None:
        start = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(1.0)
            self.progress(self.counters, asyncio.get_running_loop().time() - start)

    async def _prepare_topics(self, broker: Broker, registry: SchemaRegistry) -> dict[str, Topic]:
        topics = {}
        for name, t in self.spec.topics.items():
            schema_id = registry.register(f"{name}-value", t.schema) if t.schema is not None else None
            await broker.ensure_topic(name, t.partitions)
            topics[name] = Topic(name, t.partitions, t.schema, schema_id, t.key)
        return topics

    def _context(self, entry: ConnectorSpec, topics: list[str], schemas: dict[str, dict]) -> ConnectorContext:
        state = self.spec.state_dir / "connectors" / entry.name
        return ConnectorContext(
            name=entry.name,
            pipeline=self.spec.name,
            spec_dir=self.spec.path.parent,
            state_dir=state,
            topics=tuple(topics),
            schemas=schemas,
            partitions={
                t: self.spec.topics[t].partitions if t in self.spec.topics else 1  # the DLQ has 1
                for t in topics
            },
            max_tasks=entry.tasks,
        )

    def _build(self, kind: str, entry: ConnectorSpec, topics: list[str], *, chain: Chain | None = None) -> Any:
        """The connector of an entry, built with `chain` (its transform chain). A sink is
        told the schemas of its records as they leave the chain."""
        try:
            reg = self.host.lookup(kind, entry.connector)
        except UnknownConnector as exc:
            raise FatalError(str(exc)) from None
        try:
            config = reg.cls.Config.parse(entry.config)
        except ConfigError as exc:
            raise FatalError(f"{entry.name}: invalid config: {exc}") from None
        if chain is None:
            chain = self._chain(entry)
        declared = {t: schema for t in topics if (schema := self._schema_of(t)) is not None}
        schemas = {t: chain.schema(copy.deepcopy(schema)) for t, schema in declared.items()} if kind == "sink" else declared
        return reg.cls(config, self._context(entry, topics, schemas))

    def _chain(self, entry: ConnectorSpec) -> Chain:
        chain, problems = build_chain(self.host, entry)
        if problems:
            raise FatalError(f"{entry.name}: {problems[0].path}: {problems[0].message}")
        return chain

    def _schema_of(self, topic: str) -> dict | None:
        """A topic's Avro schema: the spec's, or the dead-letter record's (None: raw)."""
        if topic == self.spec.errors.dead_letter_topic:
            return DEAD_LETTER_SCHEMA
        return self.spec.topics[topic].schema if topic in self.spec.topics else None

    def _source_slots(self, topics: dict[str, Topic], broker: Broker, dead_letters: DeadLetters) -> list[TaskSlot]:
        slots = []
        writes = [dead_letters.topic.name] if dead_letters.topic is not None else []
        entries = [e for e in self.spec.sources if self.only_sources is None or e.name in self.only_sources]
        if any(e.schedule is not None for e in entries):
            self.history = RunHistory(self.spec.state_dir / "runs.db")
        for entry in entries:
            chain = self._chain(entry)
            source = self._build("source", entry, [entry.topic], chain=chain)
            counters = Counters(entry.name, "source", target=source.target())
            self.counters.append(counters)
            routes = [t for t in dict.fromkeys(chain.topics()) if t != entry.topic]
            for index in range(len(source.tasks())):

                def runner(stop: asyncio.Event, entry: ConnectorSpec = entry, source: Any = source,
                           counters: Counters = counters, index: int = index, chain: Chain = chain,
                           routes: list[str] = routes) -> SourceRunner:
                    writer = broker.source_writer(entry.name, index, [entry.topic, *routes, *writes])
                    task = source.tasks()[index]
                    return SourceRunner(entry.name, task, topics[entry.topic], writer, dead_letters, counters, stop,
                                        chain=chain, routes={t: topics[t] for t in routes}, index=index,
                                        fresh_task=lambda: source.tasks()[index])

                if entry.schedule is not None:
                    assert self.history is not None
                    once = ("now" if self.now else "once") if self.once else None
                    scheduled = ScheduledRunner(entry.name, index, runner, entry.schedule, self.clock, self.history,
                                                self.stop_event, once)
                    slots.append(TaskSlot(entry.name, index, lambda stop, r=scheduled: r))
                else:
                    slots.append(TaskSlot(entry.name, index, runner))
        return slots

    def _fed_by(self, p: Any, processors: list[Any], sources_done: asyncio.Event | None,
                done: dict[str, asyncio.Event]) -> asyncio.Event | None:
        """An event set when everything feeding processor `p` has ended (--once only)."""
        if sources_done is None:
            return None
        feeding = [done[q.name] for q in processors if q.output in p.reads]
        event = asyncio.Event()

        async def watch() -> None:
            await sources_done.wait()
            for upstream in feeding:
                await upstream.wait()
            event.set()

        self._watchers.append(asyncio.create_task(watch()))
        return event

    async def _processor_slots(self, p: ProcessorSpec, topics: dict[str, Topic], broker: Broker,
                               registry: SchemaRegistry, dead_letters: DeadLetters,
                               upstream_done: asyncio.Event | None, done: asyncio.Event) -> list[TaskSlot]:
        """A processor's tasks: one, reading every partition of its inputs; or, for an
        aggregation by a key its one input topic is keyed by already (`keyed_by_group`),
        one per partition, each aggregating its partition's keys with its own stream time
        and state (as Kafka Streams' tasks do), so that on Kafka they spread over the
        pipeline's processes. `done` is set when the last of them has ended (--once)."""
        found = plan(p, {t: self.spec.topics[t].schema for t in p.reads})
        table = topics[p.join.table] if p.join is not None else None
        inputs, output = {t: topics[t] for t in p.inputs}, topics[p.output]
        counters = self._processor_counters[p.name]

        def slot(index: int, task: Task, ended: asyncio.Event) -> TaskSlot:
            return TaskSlot(p.name, index, lambda stop: ProcessorRunner(
                p, inputs, output, broker, registry.schema_by_id, dead_letters, counters, stop, upstream_done,
                found.time_is_timestamp, table=table, done=ended, task=task), ended=ended)

        written = {q.output for q in self.spec.processors}
        if not keyed_by_group(p, {name: t.key for name, t in self.spec.topics.items()}, written):
            return [slot(0, Task(), done)]
        source = p.inputs[0]
        ended = [asyncio.Event() for _ in range(topics[source].partitions)]
        self._watchers.append(asyncio.create_task(_all_set(ended, done)))
        return [slot(i, Task(i, [TopicPartition(source, i)], count=len(ended)), ended[i]) for i in range(len(ended))]

    def _sink_runners(self, topics: dict[str, Topic], broker: Broker, registry: SchemaRegistry, dead_letters: DeadLetters, sources_done: asyncio.Event | None) -> list[SinkRunner]:
        runners = []
        for entry in self.spec.sinks:
            chain = self._chain(entry)
            sink = self._build("sink", entry, entry.topics, chain=chain)
            counters = Counters(entry.name, "sink", target=sink.target())
            self.counters.append(counters)
            runners.append(
                SinkRunner(
                    entry.name,
                    group_name(self.spec, entry),
                    sink.task(),
                    sink.wants,
                    {t: topics[t] for t in entry.topics},
                    broker,
                    registry.schema_by_id,
                    dead_letters,
                    counters,
                    self.stop_event,
                    sources_done,
                    chain=chain,
                    schemas=sink.context.schemas,
                )
            )
        return runners


def compact(spec: Spec, host: PluginHost, sinks: list[str] | None = None, *,
            dry_run: bool = False) -> dict[str, list[str] | None]:
    """Compact the output of the spec's sinks (all, or those named): per sink, the lines
    its `Sink.compact` reports, or None for a sink with nothing to compact."""
    names = [s.name for s in spec.sinks]
    unknown = [n for n in sinks or () if n not in names]
    if unknown:
        raise UsageError(f"no sink {unknown[0]!r} in {spec.file}", hint=f"sinks: {', '.join(names) or 'none'}")
    pipeline = Pipeline(spec, host)
    return {
        entry.name: pipeline._build("sink", entry, entry.topics).compact(dry_run=dry_run)
        for entry in spec.sinks
        if sinks is None or entry.name in sinks
    }


async def _all_set(events: list[asyncio.Event], then: asyncio.Event) -> None:
    """Set `then` once every one of `events` is set."""
    for event in events:
        await event.wait()
    then.set()


def group_name(spec: Spec, sink: ConnectorSpec) -> str:
    """The consumer group of a sink, as Kafka Connect names them: one per connector."""
    return f"pipeline-{spec.name}-{sink.name}"


def run(
    spec: Spec,
    host: PluginHost,
    *,
    once: bool = False,
    progress: Callable[[list[Counters], float], None] | None = None,
    only_sources: list[str] | None = None,
    now: bool = False,
    clock: Clock | None = None,
) -> RunResult:
    """Run a pipeline to its end; `progress` is called about once a second. See
    `Pipeline` for `only_sources`, `now` and `clock`."""
    pipeline = Pipeline(spec, host, once=once, progress=progress, only_sources=only_sources, now=now, clock=clock)
    # What was loaded so far (modules, plugins, the spec) lives as long as the run: out of
    # the cyclic collector's sight, its full collections stay short while records flow.
    gc.freeze()
    return run_async(pipeline.run)


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """The one place the engine enters asyncio."""

    async def wrapped() -> T:
        return await main()

    return asyncio.run(wrapped())
