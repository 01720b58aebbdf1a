"""pipeline-sqlite: the `sqlite` sink, upserting records into SQLite tables by key,
exactly once (see `pipeline_sqlite.sink`)."""

from __future__ import annotations

from runner.connector import hookimpl

from pipeline_sqlite.sink import SqliteSink, SqliteSinkTask

__all__ = ["SqliteSink", "SqliteSinkTask", "register_connectors"]


@hookimpl
def register_connectors(register):
    register(SqliteSink)
