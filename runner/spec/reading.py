"""Reading a spec file: YAML with marks, turned into plain Python values and a line map.

ruamel's round-trip loader knows the line of every node. Reading converts the tree to
plain dicts, lists and scalars, interpolating `${VAR}` in every string scalar (see
`runner.spec.environment`), and records the line of every key path (`sources[0].config`)
so that problems found later name their line.

A spec is read with limits, so that a hostile or broken file is refused in well under a
second and a few MB: its size, how deep it nests, how many values it expands to (aliases
repeat what an anchor holds, and an "alias bomb" multiplies them) and a value's length.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean

from runner.errors import Problem, SpecError
from runner.spec.environment import interpolate
from runner.spec.model import join

MAX_SPEC_BYTES = 1 << 20  # a spec is a few KB; 1 MiB leaves room for long inline schemas
MAX_DEPTH = 100  # nesting levels (a spec needs about 8)
MAX_VALUES = 100_000  # values after aliases are expanded
MAX_VALUE_CHARS = 1 << 16  # one string value (an inline schema, a long SQL-ish condition)


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
        with abs_path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError([Problem(f"the spec is larger than {MAX_SPEC_BYTES:,} bytes, the most a spec may be "
                                     "(is this the right file?)", file=file)])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError([Problem(f"cannot read spec: {reason}", file=file)]) from None
    try:
        tree = _load(text)
    except RecursionError:
        raise SpecError([Problem(f"the YAML nests more than about {MAX_DEPTH} levels deep, more than a spec may",
                                 file=file)]) from None
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
    except TypeError:  # ruamel building a mapping whose key is a mapping or list (`? {a: 1}`)
        raise SpecError([Problem("invalid YAML: a key that is itself a mapping or a list (`? ...`); spec keys "
                                 "are names", file=file)]) from None
    except ReaderError as e:  # a character YAML does not allow (a control character)
        line = text.count("\n", 0, e.position) + 1
        raise SpecError([Problem(f"invalid YAML: character {e.character:#06x} is not allowed in YAML "
                                 f"(column {e.position - text.rfind(chr(10), 0, e.position)})",
                                 file=file, line=line)]) from None
    doc = Document(file, abs_path, None)
    root_line = tree.lc.line + 1 if isinstance(tree, (CommentedMap, CommentedSeq)) else 1
    doc.lines[""] = root_line
    doc.root = _Plain(doc, env).value(tree, "", root_line)
    return doc


def _load(text: str) -> Any:
    """ruamel's round-trip load, with the recursion it may use bounded: its parser
    recurses a few frames per nesting level. Deep flow collections (`[[[…`) are refused
    before it sees them: its scanner takes time quadratic in their depth (2 s for 1,000)."""
    if _flow_depth(text) > MAX_DEPTH:
        raise RecursionError
    frames, frame = 0, sys._getframe()
    while frame is not None:
        frames, frame = frames + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames + 4 * MAX_DEPTH + 100)
    try:
        return YAML(typ="rt").load(text)
    finally:
        sys.setrecursionlimit(limit)


_OPEN, _CLOSE = frozenset("[{"), frozenset("]}")


def _flow_depth(text: str) -> int:
    """How deep `[`/`{` nest in `text`, roughly: outside quotes and comments, by line (a
    stray bracket in a plain value counts too, which only matters by the hundred)."""
    depth = deepest = 0
    for line in text.splitlines():
        quote = None
        for ch in line:
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in _OPEN:
                depth += 1
                deepest = max(deepest, depth)
            elif ch in _CLOSE:
                depth = max(0, depth - 1)
    return deepest


class _Plain:
    def __init__(self, doc: Document, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.values = 0  # values visited, aliases expanded (see MAX_VALUES)

    def value(self, node: Any, path: str, line: int) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise SpecError([Problem(
                f"the spec expands to more than {MAX_VALUES:,} values, more than a spec may: aliases (*name) "
                "repeat what an anchor (&name) holds, and aliases of aliases multiply (an alias bomb?)",
                file=self.doc.file, line=line)])
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
            if len(node) > MAX_VALUE_CHARS:
                self.doc.problems.append(Problem(
                    f"a value of {len(node):,} characters; a value may have at most {MAX_VALUE_CHARS:,}",
                    path=path, line=line))
                self.doc.muted.add(path)
                return ""
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
