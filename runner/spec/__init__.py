"""The pipeline spec: a YAML file turned into a validated, typed `Spec`.

Every problem is collected and reported at once (`SpecError`), each with file:line and the
key path it concerns, so a user fixes a spec in one round rather than one error per run.

The parts, in the order a spec goes through them:
- `reading`: YAML with marks → plain values and the line of every key path;
- `environment`: `${VAR}` / `${VAR:-default}` in every string scalar;
- `checking` (the top level), `topics` (partitions, keys, the schemas they reference) and
  `entries` (sources, sinks, schedules, transform chains): every problem at its key path.
  Connector-specific checks (a connector's `config:`, its transforms) are delegated to a
  callback from the engine; the plugins of `plugin_paths:` are loaded (by another
  callback) before those checks, so a spec may use connectors from them.
- `model`: the dataclasses a checked spec is made of.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from runner.errors import SpecError
from runner.spec.checking import CheckConnector, LoadPluginPaths, check
from runner.spec.model import BrokerSpec, ConnectorSpec, ErrorPolicy, ProcessorSpec, Spec, TopicSpec, TransformSpec
from runner.spec.reading import read

__all__ = [
    "BrokerSpec",
    "ConnectorSpec",
    "ErrorPolicy",
    "ProcessorSpec",
    "Spec",
    "TopicSpec",
    "TransformSpec",
    "load_spec",
]


def load_spec(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    check_connector: CheckConnector | None = None,
    load_plugin_paths: LoadPluginPaths | None = None,
) -> Spec:
    """Read, interpolate and check the spec at `path`; raise `SpecError` listing every
    problem found (sorted by line)."""
    doc = read(path, os.environ if env is None else env)
    spec, problems = check(doc, check_connector, load_plugin_paths)
    if spec is None:
        raise SpecError(problems)
    return spec
