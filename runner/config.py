"""Typed connector configuration, declared once.

A connector declares its settings as a nested `Config` class::

    class Config(runner.connector.Config):
        paths: list[str] = setting(help="Glob patterns of files to read.")
        batch_size: int = setting(5000, help="Records per batch.")
        password: str = setting("", help="Server password.", secret=True)

That one declaration drives validation of the spec's `config:` mapping (unknown keys,
missing required keys and wrong types are reported all at once, each with its key),
`pipeline connectors show NAME` (type, default, description), and safe printing (secrets
are masked in `repr` and in every listing). Checks the types cannot say (a value's form,
one setting against another) go in a `check` classmethod; their problems are reported
together with the rest.

Supported annotations: `str`, `int`, `float`, `bool`, `list[X]`, `dict[str, X]`,
`Literal[...]`, `X | None` and `Any`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Literal, get_args, get_origin

from runner.errors import suggest
from runner.spec.environment import Substituted, typed


def setting(
    default: Any = MISSING,
    *,
    help: str,
    secret: bool = False,
    min: float | None = None,
    max: float | None = None,
) -> Any:
    """Declare one config setting: its default (omit for a required setting), its
    description (shown by `pipeline connectors show`), whether it is a secret, and for
    numbers the smallest and largest value allowed."""
    metadata = {"help": help, "secret": secret, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SettingInfo:
    """One row of a connector's config table."""

    name: str
    type: str
    required: bool
    default: Any
    help: str
    secret: bool
    min: float | None = None
    max: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": None if self.required else self.default,
            "help": self.help,
            "secret": self.secret,
            "min": self.min,
            "max": self.max,
        }


class ConfigError(Exception):
    """Problems found in a config mapping: a list of (key, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in problems))
        self.problems = problems


@dataclass(kw_only=True)
class Config:
    """Base of every connector's typed config. Subclasses become keyword-only dataclasses."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(kw_only=True, repr=False)(cls)

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            required = f.default is MISSING and f.default_factory is MISSING
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = None
            rows.append(
                SettingInfo(
                    name=f.name,
                    type=_type_name(hints[f.name]),
                    required=required,
                    default=default,
                    help=f.metadata.get("help", ""),
                    secret=f.metadata.get("secret", False),
                    min=f.metadata.get("min"),
                    max=f.metadata.get("max"),
                )
            )
        return rows

    @classmethod
    def parse(cls, mapping: dict[str, Any] | None) -> Config:
        """Validate a `config:` mapping and build the config; raise ConfigError listing
        every problem (unknown keys with suggestions, missing keys, wrong types)."""
        mapping = dict(mapping or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        problems: list[tuple[str, str]] = []
        values: dict[str, Any] = {}
        for key in mapping:
            if key not in fields:
                hint = suggest(str(key), list(fields))
                known = ", ".join(fields) or "none"
                problems.append((str(key), f"unknown setting{hint} (known: {known})"))
        for info in cls.settings():
            if info.name not in mapping:
                if info.required:
                    problems.append((info.name, f"required setting missing ({info.help})"))
                continue
            try:
                value = _check(mapping[info.name], hints[info.name], info.name)
            except _TypeProblem as exc:
                # A secret's value is never shown, not even when it has the wrong type.
                message = exc.message.split(", got ")[0] + ", got a value of another type" if info.secret else exc.message
                problems.append((exc.key, message))
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if info.min is not None and value < info.min:
                    problems.append((info.name, f"must be at least {info.min:g}, got {value}"))
                    continue
                if info.max is not None and value > info.max:
                    problems.append((info.name, f"must be at most {info.max:g}, got {value}"))
                    continue
            values[info.name] = value
        problems += cls.check(mapping)
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    @classmethod
    def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
        """Problems beyond the types, as (key, message): override to check a value's form
        or one setting against another. `given` is the raw mapping, and may hold values of
        the wrong type (those are reported already): check only what has the right type."""
        return []

    def __repr__(self) -> str:
        parts = []
        for info in self.settings():
            value = getattr(self, info.name)
            parts.append(f"{info.name}={'***' if info.secret and value else repr(value)}")
        return f"{type(self).__qualname__}({', '.join(parts)})"


class _TypeProblem(Exception):
    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message


def _check(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to `hint` where it is lossless (int → float), or raise.
    A whole value substituted from the environment is its text where a string is
    expected, and what the text means in YAML elsewhere (see runner.spec.environment)."""
    origin = get_origin(hint)
    if isinstance(value, Substituted):
        if hint is str:
            return str(value)
        if origin not in (typing.Union, types.UnionType) or str not in get_args(hint):
            value = value.value
    if hint is Any:
        return typed(value)
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except _TypeProblem as exc:
                errors.append(exc)
        raise _TypeProblem(key, f"expected {_type_name(hint)}, got {_describe(value)}")
    if origin is Literal:
        if value in get_args(hint):
            return value
        choices = ", ".join(repr(a) for a in get_args(hint))
        hint_text = suggest(value, [a for a in get_args(hint) if isinstance(a, str)])
        raise _TypeProblem(key, f"expected one of {choices}, got {_describe(value)}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            raise _TypeProblem(key, f"expected {_type_name(hint)}, got {_describe(value)}")
        (item,) = get_args(hint) or (Any,)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _TypeProblem(key, f"expected {_type_name(hint)}, got {_describe(value)}")
        _, item = get_args(hint) or (str, Any)
        return {str(k): _check(v, item, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return str(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _TypeProblem(key, f"expected {_type_name(hint)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:60] + "…"
    return f"{type(value).__name__} {text}"


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if hint is Any:
        return "any"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin is list:
        args = get_args(hint)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        args = get_args(hint)
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]" if args else "dict"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
