"""Schemas: the embedded registry, the Avro serde, dead letters, and the Arrow mapping.

- `registry.SchemaRegistry`: Confluent semantics (subjects, versions, global ids,
  compatibility modes checked by Apache Avro's checker) in a SQLite file in the state dir.
- `serde.AvroEncoder` / `serde.AvroDecoder`: Avro binary in Confluent framing (magic byte
  0, 4-byte big-endian schema id, body). The encoder is the schema check.
- `serde.DEAD_LETTER_SCHEMA` / `serde.dead_letter_rows`: the record that goes to a
  dead-letter topic.
- `arrow.avro_to_arrow`: the Arrow schema for a topic's Avro record schema.
"""

from runner.schema.arrow import UnsupportedSchemaError, avro_to_arrow
from runner.schema.registry import (
    COMPATIBILITY_MODES,
    DEFAULT_COMPATIBILITY,
    IncompatibleSchemaError,
    InvalidSchemaError,
    RegisteredSchema,
    SchemaNotFoundError,
    SchemaRegistry,
)
from runner.schema.serde import (
    DEAD_LETTER_SCHEMA,
    AvroDecoder,
    AvroEncoder,
    DecodeFailure,
    EncodeFailure,
    FramingError,
    dead_letter_rows,
    frame,
    unframe,
)

__all__ = [
    "COMPATIBILITY_MODES",
    "DEAD_LETTER_SCHEMA",
    "DEFAULT_COMPATIBILITY",
    "AvroDecoder",
    "AvroEncoder",
    "DecodeFailure",
    "EncodeFailure",
    "FramingError",
    "IncompatibleSchemaError",
    "InvalidSchemaError",
    "RegisteredSchema",
    "SchemaNotFoundError",
    "SchemaRegistry",
    "UnsupportedSchemaError",
    "avro_to_arrow",
    "dead_letter_rows",
    "frame",
    "unframe",
]
