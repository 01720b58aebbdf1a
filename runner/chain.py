"""A connector's transform chain as the engine runs it: the spec's `transforms:` built into
Transform instances, applied to each batch in order (see `runner.transform`)."""

from __future__ import annotations

from runner.batch import Batch
from runner.config import ConfigError
from runner.errors import FatalError, PipelineError, Problem
from runner.plugins import PluginHost, UnknownConnector
from runner.spec import ConnectorSpec
from runner.transform import Transform, TransformContext


class Chain:
    def __init__(self, connector: str, transforms: list[Transform]) -> None:
        self.connector = connector
        self.transforms = transforms

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def apply(self, batch: Batch) -> Batch:
        for transform in self.transforms:
            try:
                out = transform.apply(batch)
            except PipelineError:
                raise
            except Exception as exc:  # a bug in the transform, not bad data: stop, naming it
                raise FatalError(
                    f"{self.connector}: transform {transform.name!r} ({transform.context.position}) failed: "
                    f"{type(exc).__name__}: {exc}",
                    hint="a transform reports a record it cannot handle with record_error(); "
                    "an exception stops the run (--debug shows the traceback)",
                ) from exc
            if out is not batch:
                _check_bookkeeping(transform, batch, out)
            batch = out
        return batch

    def schema(self, schema: dict) -> dict:
        """The Avro schema of the records leaving the chain, given the topic's."""
        for transform in self.transforms:
            schema = transform.schema(schema)
        return schema

    def topics(self) -> list[str]:
        """Every topic the chain may route records to."""
        return [t for transform in self.transforms for t in transform.topics()]


def _check_bookkeeping(transform: Transform, before: Batch, after: object) -> None:
    """A batch that lost its source offsets, errors or origin would lose or repeat records
    further on: stop, naming the transform (a new Batch(...) instead of batch.derive)."""
    lost = [] if isinstance(after, Batch) else ["everything: it is no Batch"]
    if not lost:
        if after.source_offsets != before.source_offsets:
            lost.append("the source offsets")
        if after.errors[: len(before.errors)] != before.errors:
            lost.append("the errors of earlier stages")
        if (after.topic, after.partition) != (before.topic, before.partition):
            lost.append("the topic-partition its records came from")
    if lost:
        raise FatalError(
            f"transform {transform.name!r} ({transform.context.position}) returned a batch that lost "
            f"{', '.join(lost)}",
            hint="build the output with batch.derive(rows, kept=..., errors=...), which carries them along",
        )


def build_chain(host: PluginHost, entry: ConnectorSpec) -> tuple[Chain, list[Problem]]:
    """The chain of a source or sink entry, and the problems of its transforms (unknown
    name, wrong side, bad config), each at its key path. Transforms with problems are
    left out of the chain."""
    transforms: list[Transform] = []
    problems: list[Problem] = []
    for t in entry.transforms:
        where = f"{t.key_path}.{t.name}"
        try:
            reg = host.lookup("transform", t.name)
        except UnknownConnector as exc:
            problems.append(Problem(str(exc), path=where))
            continue
        cls = reg.cls
        if entry.kind not in cls.sides:
            problems.append(Problem(
                f"transform {t.name!r} works on {' and '.join(s + 's' for s in cls.sides)} only, not on a {entry.kind}",
                path=where,
            ))
            continue
        try:
            config = cls.Config.parse(t.config)
        except ConfigError as exc:
            problems += [Problem(message, path=f"{where}.{key}" if key else where) for key, message in exc.problems]
            continue
        try:
            transforms.append(cls(config, TransformContext(entry.name, entry.kind, t.key_path)))
        except Exception as exc:  # e.g. a lookup file that is not there
            problems.append(Problem(f"transform {t.name!r} could not be set up: {type(exc).__name__}: {exc}",
                                    path=where))
    return Chain(entry.name, transforms), problems
