"""Built-in connectors. They register through the same hook and entry-point group as any
third-party plugin (see the `builtin` entry point in pyproject.toml)."""

from runner.connector import hookimpl

from connectors.jsonl import JsonlSink, JsonlSource


@hookimpl
def register_connectors(register):
    register(JsonlSource)
    register(JsonlSink)
