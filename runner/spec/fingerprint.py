"""A spec's fingerprint: a short hash per part (each topic, source, processor and sink,
the error policy), so that processes sharing a pipeline on Kafka can tell they run the
same spec and, when not, name the parts that differ."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from runner.spec.model import Spec


def fingerprint(spec: Spec, *, once: bool) -> dict[str, str]:
    parts: dict[str, Any] = {f"topic {name!r}": _plain(t, drop=("schema_file",)) for name, t in spec.topics.items()}
    parts.update({f"source {e.name!r}": _plain(e) for e in spec.sources})
    parts.update({f"processor {p.name!r}": _plain(p) for p in spec.processors})
    parts.update({f"sink {e.name!r}": _plain(e) for e in spec.sinks})
    parts["the error policy"] = _plain(spec.errors)
    # Processes in --once mode end together when the input is drained; one that follows
    # would never let them.
    parts["the run mode (--once or not)"] = once
    return {part: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for part, value in parts.items()}


def _plain(obj: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass as JSON-able values (its own order of entries kept: `key_path` says
    where in the spec an entry is, and the task numbering follows it)."""
    return {f.name: getattr(obj, f.name) if not dataclasses.is_dataclass(getattr(obj, f.name))
            else _plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj) if f.name not in drop}
