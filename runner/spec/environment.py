"""`${VAR}` and `${VAR:-default}` in the spec's string scalars, from the environment.

A value that is one whole expression (`partitions: ${PARTS:-4}`, `password: "${PW}"`)
keeps the substituted text as a `Substituted` string that also knows what the text means
as a YAML scalar (`.value`: 4, true, a date...). Settings typed as strings take the text
exactly as it came (`"true"`, `"0x1F"` and `"2031-07-19"` stay strings); settings typed
otherwise take `.value` (see `typed`). A whole value that is a flow mapping or list
(`PIPELINE_BROKER='{kafka: {bootstrap_servers: "k:9092"}}'`) is read as YAML at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver

__all__ = ["Interpolation", "Substituted", "interpolate", "typed"]

# `$${` is an escaped literal; `${...}` an expression; a lone `${` is unterminated.
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_EXPR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_STR_TAG = "tag:yaml.org,2002:str"
_resolver = VersionedResolver()
_safe_yaml = YAML(typ="safe", pure=True)


class Substituted(str):
    """A whole value substituted from the environment: the text, and (`.value`) what the
    text means as a YAML scalar."""

    __slots__ = ()

    @property
    def value(self) -> Any:
        return _scalar(str(self))


class Interpolation:
    """The result of interpolating one scalar: its value, or the problems that kept it
    from being substituted (then `value` is the text as written)."""

    __slots__ = ("value", "problems")

    def __init__(self, value: Any, problems: list[str]) -> None:
        self.value = value
        self.problems = problems


def interpolate(text: str, env: Mapping[str, str]) -> Interpolation:
    """Substitute every `${...}` of `text` from `env`."""
    if "${" not in text:
        return Interpolation(text, [])
    out: list[str] = []
    problems: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(text):
        out.append(text[pos : m.start()])
        pos = m.end()
        token = m.group(0)
        if token == "$${":
            out.append("${")
            continue
        body = m.group(1)
        expr = _EXPR.fullmatch(body) if body is not None else None
        if expr is None or "${" in (expr.group(2) or ""):
            what = "unterminated ${" if body is None else f"malformed expression {token!r}"
            problems.append(f"{what}; expected ${{NAME}} or ${{NAME:-default}} "
                            "(write $${ for a literal ${, nesting is not supported)")
            continue
        name, default = expr.group(1), expr.group(2)
        value = env.get(name)
        if not value and default is not None:  # like the shell: unset or empty
            value = default
        if value is None:
            problems.append(f"environment variable {name!r} is not set "
                            f"(set it, or give a default: ${{{name}:-default}})")
            continue
        out.append(value)
    out.append(text[pos:])
    if problems:
        return Interpolation(text, problems)
    result = "".join(out)
    whole = _TOKEN.fullmatch(text)
    if whole is None or whole.group(1) is None:
        return Interpolation(result, [])
    if result.lstrip()[:1] in ("{", "["):
        # A flow mapping or list, e.g. PIPELINE_BROKER='{kafka: {bootstrap_servers: "k:9092"}}'.
        try:
            return Interpolation(_safe_yaml.load(result), [])
        except Exception:
            pass  # not YAML after all: the checks report the text where it is used
    return Interpolation(Substituted(result), [])


def typed(value: Any) -> Any:
    """`value` with every `Substituted` text replaced by its YAML meaning, for a setting
    whose type is not a string."""
    if isinstance(value, Substituted):
        return value.value
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return value


def _scalar(text: str) -> Any:
    """`text` as a plain YAML scalar (int, float, bool, null, date, or the text)."""
    if not text:
        return text  # an empty substitution stays an empty string rather than null
    if _resolver.resolve(ScalarNode, text, (True, False)) == _STR_TAG:
        return text
    try:
        return _safe_yaml.load(text)
    except Exception:  # e.g. "2024-13-45" looks like a date but is none: keep the text
        return text
