"""Helpers for driving a connector's tasks directly (no engine), shared by the
connector tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from runner.batch import Batch
from runner.connector import ConnectorContext


def context(
    tmp: Path, *, name: str = "c", topics: tuple[str, ...] = ("t",), schemas: dict | None = None, max_tasks: int = 1
) -> ConnectorContext:
    """A connector context whose spec directory (relative paths) is `tmp`."""
    return ConnectorContext(
        name=name, pipeline="p", spec_dir=tmp, state_dir=tmp / "state", topics=topics, schemas=schemas or {},
        max_tasks=max_tasks,
    )


def write(path: Path, text: str, mode: str = "w") -> None:
    """Write text exactly as given (no newline translation), creating directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8", newline="") as f:
        f.write(text)


def drain(task, offsets: dict | None = None, *, limit: int = 1000) -> list[Batch]:
    """open(offsets), poll until None, close; the batches."""

    async def main() -> list[Batch]:
        await task.open(offsets or {})
        out = []
        try:
            for _ in range(limit):
                batch = await task.poll()
                if batch is None:
                    return out
                out.append(batch)
            raise AssertionError("poll never returned None")
        finally:
            await task.close()

    return asyncio.run(main())
