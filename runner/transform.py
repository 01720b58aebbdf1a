"""The transform contract: record transforms (single-message transforms, in Kafka
Connect's words) that a spec chains on a source or a sink.

    sources:
      - name: access-logs
        connector: http_log
        topic: pageviews
        transforms:                       # applied in order, to each batch
          - rename: {fields: {remote_host: client_ip}}
          - mask: {fields: [client_ip]}
          - filter: {drop: "status >= 500"}

A transform is a class with a `name`, a typed `Config` (the mapping under its name in the
spec, validated like a connector's) and `apply(batch)`, registered by the
`register_transforms` hook (`runner.hookspecs`). It is called once per batch, never per
record, and returns the batch to pass on::

    from runner.transform import Batch, Config, Transform, hookimpl, setting

    class Upper(Transform):
        name = "upper"
        description = "Upper-case string fields."

        class Config(Config):
            fields: list[str] = setting(help="The fields to upper-case.")

        def apply(self, batch: Batch) -> Batch:
            fields = self.config.fields
            rows = [{k: v.upper() if k in fields and isinstance(v, str) else v
                     for k, v in row.items()} for row in batch.rows]
            return batch.derive(rows)

    @hookimpl
    def register_transforms(register):
        register(Upper)

Where a chain runs
------------------
- **On a source**, between `poll` and the Avro encode: the chain's output is what is
  checked against the topic's schema, so the topic declares the records as they leave the
  chain. A transform may send records to other topics of the spec (`route`): it sets
  `destinations` and names those topics in `topics()`.
- **On a sink**, between the Avro decode and `put`: the sink sees the records as they
  leave the chain. Because sinks learn the shape of their records from the topic's schema
  (the Parquet sink builds its Arrow schema from it), a transform that changes the shape
  (adds, removes, renames or retypes a field) says so in `schema()`; the engine hands the
  sink the schema that comes out of the chain.

Records that fail
-----------------
A transform that cannot handle one record (a cast of "abc" to int) leaves that record out
of the batch it returns and adds a `RecordError` for it (`self.record_error(...)`, stage
"transform"). The spec's error policy then applies, as for a malformed line: the run
stops naming the record, or the record goes to the dead-letter topic and the rest flows
on. An exception raised out of `apply` is a bug, not bad data: it stops the run, naming
the connector and the transform.
"""

from __future__ import annotations

from typing import Any, ClassVar

from runner.batch import Batch
from runner.config import Config, ConfigError, SettingInfo, setting
from runner.errors import RecordError
from runner.hookspecs import hookimpl

__all__ = [
    "Batch",
    "Config",
    "ConfigError",
    "RecordError",
    "SettingInfo",
    "Transform",
    "TransformContext",
    "hookimpl",
    "setting",
]


class TransformContext:
    """Where a transform runs: the connector it is chained on, and which side."""

    def __init__(self, connector: str, side: str, position: str) -> None:
        self.connector = connector  # the source's or sink's name in the spec
        self.side = side  # "source" or "sink"
        self.position = position  # e.g. "sources[0].transforms[2]", for messages


class Transform:
    """A record transform. Subclass it, set `name`, declare `Config`, implement `apply`.

    Lifecycle: the engine builds one instance per place it appears in a spec, with the
    validated config, when the run starts (`__init__`: no I/O that can fail slowly; a
    lookup table may be loaded here). Then `apply` is called for every batch, in the
    order the batches flow (one call at a time per instance). There is no close: a
    transform holds no resources that need releasing.
    """

    #: The name specs use (`- mask: {...}`). Unique among transforms.
    name: ClassVar[str]
    #: One line shown by `pipeline transforms list`.
    description: ClassVar[str] = ""
    #: The typed config; override with a nested `class Config(Config)`.
    Config: ClassVar[type[Config]] = Config
    #: Where it may be chained. A transform that routes records to other topics only
    #: makes sense on a source (a sink's records have already been written to theirs).
    sides: ClassVar[tuple[str, ...]] = ("source", "sink")

    def __init__(self, config: Any, context: TransformContext) -> None:
        self.config = config
        self.context = context

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        return cls.Config.settings()

    def apply(self, batch: Batch) -> Batch:
        """Transform one batch and return the result: `batch.derive(rows, ...)` for new
        rows, or `batch` itself if nothing changed. Keep per-record bookkeeping right by
        going through `derive` (it carries offsets, keys, positions of the kept records).
        """
        raise NotImplementedError

    def schema(self, schema: dict) -> dict:
        """The Avro record schema of this transform's output, given its input's (a parsed
        JSON dict; return a new dict, do not modify the argument). Used on sinks. The
        default says the shape does not change."""
        return schema

    def topics(self) -> list[str]:
        """The topics this transform may send records to (via `destinations`). The spec
        must declare each, with a schema; `validate` checks it."""
        return []

    def record_error(self, batch: Batch, index: int, message: str, field: str | None = None) -> RecordError:
        """A data error for record `index` of `batch`, naming this transform."""
        return RecordError(
            error=f"{self.name}: {message}",
            stage="transform",
            record=batch.rows[index],
            field=field,
            position=batch.position(index),
        )
