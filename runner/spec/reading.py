"""Reading a spec file: YAML with marks, turned into plain Python values and a line map.

ruamel's round-trip loader knows the line of every node. Reading converts the tree to
plain dicts, lists and scalars, interpolating `${VAR}` in every string scalar (see
`runner.spec.environment`), and records the line of every key path (`sources[0].config`)
so that problems found later name their line.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from runner.errors import Problem, SpecError
from runner.spec.environment import interpolate
from runner.spec.model import join


@dataclass
class Document:
    """A spec file read: its plain values, the line of every key path, and the problems
    of interpolation (the paths they concern are `muted`: their value is meaningless, so
    further problems about them would only repeat the first)."""

    file: str  # as given, for messages
    path: pathlib.Path  # absolute
    root: Any
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    muted: set[str] = field(default_factory=set)


def read(path: str | os.PathLike[str], env: Mapping[str, str]) -> Document:
    """Read the spec at `path`; raise SpecError if it is not readable YAML."""
    file = os.fspath(path)
    abs_path = pathlib.Path(os.path.abspath(file))
    try:
        text = abs_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError([Problem(f"cannot read spec: {reason}", file=file)]) from None
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = e.problem or "invalid YAML"
        if e.context:
            msg += f" ({e.context})"
        line = mark.line + 1 if mark is not None else None
        # `{` is a flow indicator, so an unquoted ${VAR} inside {...} or [...] breaks YAML.
        if line is not None and "${" in "".join(text.splitlines()[line - 1 : line]):
            msg += '; inside {...} or [...] quote ${...} expressions, e.g. "${VAR}"'
        raise SpecError([Problem(f"invalid YAML: {msg}", file=file, line=line)]) from None
    doc = Document(file, abs_path, None)
    root_line = tree.lc.line + 1 if isinstance(tree, (CommentedMap, CommentedSeq)) else 1
    doc.lines[""] = root_line
    doc.root = _Plain(doc, env).value(tree, "", root_line)
    return doc


class _Plain:
    def __init__(self, doc: Document, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env

    def value(self, node: Any, path: str, line: int) -> Any:
        if isinstance(node, CommentedMap):
            out: dict[Any, Any] = {}
            for k, v in node.items():
                key = _plain_key(k)
                child = join(path, key)
                # Keys merged in with `<<: *anchor` have no position of their own.
                pos = node.lc.data.get(k)
                self.doc.lines.setdefault(child, pos[0] + 1 if pos else line)
                out[key] = self.value(v, child, pos[2] + 1 if pos else line)
            return out
        if isinstance(node, CommentedSeq):
            items = []
            for i, v in enumerate(node):
                child = f"{path}[{i}]"
                pos = node.lc.data.get(i)
                item_line = pos[0] + 1 if pos else line
                self.doc.lines.setdefault(child, item_line)
                items.append(self.value(v, child, item_line))
            return items
        if isinstance(node, str):
            result = interpolate(str(node), self.env)
            for message in result.problems:
                self.doc.problems.append(Problem(message, path=path, line=line))
            if result.problems:
                self.doc.muted.add(path)
            return result.value
        if isinstance(node, (bool, ScalarBoolean)):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        return node  # None, dates


def _plain_key(key: Any) -> Any:
    if isinstance(key, str):
        return str(key)
    if isinstance(key, (bool, ScalarBoolean)):
        return bool(key)
    if isinstance(key, (int, float)) or key is None:
        return key
    return str(key)  # complex keys: only good for a message
