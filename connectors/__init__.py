"""Built-in connectors and transforms. They register through the same hook and entry-point group as any
third-party plugin (see the `builtin` entry point in pyproject.toml)."""

from runner.connector import hookimpl

from connectors.files import FilesSource
from connectors.http_log import HttpLogSource
from connectors.jsonl import JsonlSink, JsonlSource
from connectors.kafka import KafkaSink, KafkaSource
from connectors.parquet import ParquetSink
from connectors.transforms import TRANSFORMS


@hookimpl
def register_connectors(register):
    register(JsonlSource)
    register(JsonlSink)
    register(HttpLogSource)
    register(FilesSource)
    register(ParquetSink)
    register(KafkaSource)
    register(KafkaSink)


@hookimpl
def register_transforms(register):
    for transform in TRANSFORMS:
        register(transform)
