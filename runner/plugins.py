"""The plugin host: loads plugins from the `pipeline` entry-point group (built-ins
included) and from a spec's `plugin_paths:` directories, calls their registration hooks,
and keeps the registry of connectors and transforms with the plugin that registered each.

One broken plugin never takes the others down: its import error is recorded and shown by
`pipeline plugins`. `PIPELINE_DISABLE_PLUGINS=a,b` keeps plugins from loading at all, by
entry-point (or module) name or by distribution name.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from runner import hookspecs
from runner.connector import Sink, Source
from runner.errors import suggest
from runner.hookspecs import PROJECT
from runner.transform import Transform

ENTRY_POINT_GROUP = "pipeline"
DISABLE_ENV = "PIPELINE_DISABLE_PLUGINS"
# Which hook registers which kinds.
_HOOK_KINDS = {"register_connectors": ("source", "sink"), "register_transforms": ("transform",)}


@dataclass
class PluginInfo:
    """A plugin as the host saw it: where it came from, what it registered, or its error."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    connectors: list[str] = field(default_factory=list)  # "source:jsonl", "transform:mask"
    error: str | None = None
    detail: str | None = None  # the traceback, for --debug
    path: str | None = None  # loaded from a spec's plugin_paths: the file or package
    disabled: bool = False  # named in PIPELINE_DISABLE_PLUGINS; not loaded

    @property
    def broken(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class Registration:
    kind: str  # "source" | "sink" | "transform"
    name: str
    cls: type
    plugin: PluginInfo

    @property
    def what(self) -> str:
        """"transform", "source connector" or "sink connector"."""
        return _what(self.kind)

    @property
    def label(self) -> str:
        if self.plugin.distribution:
            return f"plugin {self.plugin.name!r} from {self.plugin.distribution}"
        if self.plugin.path:
            return f"plugin {self.plugin.name!r} from {self.plugin.path}"
        return f"plugin {self.plugin.name!r}"


class UnknownConnector(LookupError):
    pass


def kind_of(cls: type) -> str | None:
    if isinstance(cls, type) and issubclass(cls, Source):
        return "source"
    if isinstance(cls, type) and issubclass(cls, Sink):
        return "sink"
    if isinstance(cls, type) and issubclass(cls, Transform):
        return "transform"
    return None


def disabled_names(environ: dict[str, str] | None = None) -> set[str]:
    """The plugin names in PIPELINE_DISABLE_PLUGINS (comma-separated)."""
    value = (os.environ if environ is None else environ).get(DISABLE_ENV, "")
    return {name.strip() for name in value.split(",") if name.strip()}


class PluginHost:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self._registry: dict[tuple[str, str], Registration] = {}
        self._conflicts: dict[tuple[str, str], list[Registration]] = {}

    # -- loading ------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        disabled = disabled_names()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
            if disabled & {info.name, info.distribution, ep.module}:
                info.disabled = True
                self.plugins.append(info)
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import-time failure of someone else's code
                self._broken(info, exc)
                continue
            self.add(module, info)

    def load_paths(self, directories: list[os.PathLike | str]) -> list[tuple[int, PluginInfo]]:
        """Load the plugin modules in these directories (a spec's `plugin_paths:`): each
        `*.py` file and each package (a directory with `__init__.py`) that implements a
        hook, imported as if the directory were on PYTHONPATH. Returns (index of the
        directory, plugin) for every plugin that is broken."""
        disabled = disabled_names()
        broken = []
        for index, directory in enumerate(directories):
            directory = os.path.abspath(directory)
            if directory not in sys.path:
                sys.path.append(directory)  # after the installed packages: no shadowing them
            for entry in sorted(os.listdir(directory)):
                path = os.path.join(directory, entry)
                if entry.startswith(("_", ".")):
                    continue
                if entry.endswith(".py") and os.path.isfile(path):
                    name = entry[:-3]
                elif os.path.isfile(os.path.join(path, "__init__.py")):
                    name = entry
                else:
                    continue
                info = PluginInfo(name=name, module=name, path=path)
                same = next((p for p in self.plugins if p.name == name), None)
                if same is not None:
                    if same.path != path:  # not just the same spec checked twice
                        self._broken(info, ImportError(
                            f"a plugin named {name!r} is loaded already, from {same.path or same.distribution}"))
                        broken.append((index, info))
                    continue
                if name in disabled:
                    info.disabled = True
                    self.plugins.append(info)
                    continue
                try:
                    module = importlib.import_module(name)
                    file = getattr(module, "__file__", None)
                    if file is None or os.path.abspath(file) not in (path, os.path.join(path, "__init__.py")):
                        raise ImportError(f"the name {name!r} is taken by {file or 'a built-in module'}; "
                                          "rename the file")
                except Exception as exc:
                    self._broken(info, exc)
                    broken.append((index, info))
                    continue
                if not any(hasattr(getattr(module, attr, None), "pipeline_impl") for attr in dir(module)):
                    continue  # a helper module, not a plugin
                if self.add(module, info).broken:
                    broken.append((index, info))
        return broken

    def add(self, module: ModuleType | object, info: PluginInfo | None = None) -> PluginInfo:
        """Register a plugin object (usually a module) and run its hooks."""
        if info is None:
            name = getattr(module, "__name__", repr(module))
            info = PluginInfo(name=name, module=name)
        self.plugins.append(info)
        try:
            self.pm.register(module, name=info.name)
            self._check_hook_names(module)
        except Exception as exc:  # misspelled hooks, duplicate plugin names
            self._broken(info, exc, append=False)
            return info
        for hook, kinds in _HOOK_KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != info.name:
                    continue
                try:
                    impl.function(register=lambda cls, _info=info, _kinds=kinds: self._register(cls, _info, _kinds))
                except Exception as exc:
                    self._broken(info, exc, append=False)
        return info

    def _check_hook_names(self, module: object) -> None:
        """Refuse hook implementations that match no hook (a misspelled name would
        otherwise load silently and register nothing)."""
        known = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "pipeline_spec")]
        for name in dir(module):
            attr = getattr(module, name, None)
            if callable(attr) and hasattr(attr, "pipeline_impl") and name not in known:
                self.pm.unregister(module)
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown hook {name!r}{hint} (hooks: {', '.join(known)})")

    def _broken(self, info: PluginInfo, exc: BaseException, append: bool = True) -> None:
        info.error = f"{type(exc).__name__}: {exc}"
        info.detail = "".join(traceback.format_exception(exc))
        if append:
            self.plugins.append(info)

    def _register(self, cls: Any, info: PluginInfo, kinds: tuple[str, ...]) -> None:
        kind = kind_of(cls)
        name = getattr(cls, "name", None)
        if kind not in kinds:
            expected = "runner.transform.Transform" if kinds == ("transform",) else "runner.connector.Source or Sink"
            hook = "register_transforms" if kind == "transform" else "register_connectors"
            hint = f" (register it with the {hook} hook)" if kind is not None else ""
            raise TypeError(f"{cls!r} is not a subclass of {expected}{hint}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} has no `name`")
        reg = Registration(kind, name, cls, info)
        key = (kind, name)
        info.connectors.append(f"{kind}:{name}")
        if key in self._conflicts:
            self._conflicts[key].append(reg)
        elif key in self._registry:
            self._conflicts[key] = [self._registry.pop(key), reg]
        else:
            self._registry[key] = reg

    # -- lookups ------------------------------------------------------------------------

    def registrations(self, kind: str | None = None) -> list[Registration]:
        regs = [r for r in self._registry.values() if kind in (None, r.kind)]
        return sorted(regs, key=lambda r: (r.kind, r.name))

    def conflicts(self) -> dict[tuple[str, str], list[Registration]]:
        return dict(self._conflicts)

    def lookup(self, kind: str, name: str) -> Registration:
        """The registration of a connector, or UnknownConnector with a helpful message."""
        key = (kind, name)
        if key in self._registry:
            return self._registry[key]
        if key in self._conflicts:
            both = " and ".join(r.label for r in self._conflicts[key])
            raise UnknownConnector(
                f"{_what(kind)} {name!r} is registered by both {both}; "
                f"uninstall or disable one of them ({DISABLE_ENV}=name)"
            )
        known = [n for (k, n) in self._registry if k == kind]
        other = [k for (k, n) in self._registry if n == name]
        if other:
            hint = f"; {name!r} is a {_what(other[0])}, not a {_what(kind)}"
        elif example := example_plugin(name):
            hint = f"; the example plugin {example.name} provides it: python -m pip install -e {example}"
        else:
            hint = suggest(name, known)
        broken = [p.name for p in self.plugins if p.broken]
        note = f" (broken plugins: {', '.join(broken)})" if broken else ""
        available = ", ".join(sorted(known)) or "none"
        raise UnknownConnector(f"unknown {_what(kind)} {name!r}{hint} (installed: {available}){note}")


# The example plugins shipped beside the engine in a source checkout (plugins/*).
EXAMPLES = Path(__file__).resolve().parents[1] / "plugins"


def example_plugin(name: str) -> Path | None:
    """The directory of the example plugin whose entry point is `name`, if this is a
    source checkout that has one (so an unknown connector can say how to install it)."""
    for pyproject in sorted(EXAMPLES.glob("*/pyproject.toml")):
        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if name in project.get("project", {}).get("entry-points", {}).get(PROJECT, {}):
            return pyproject.parent
    return None


def _what(kind: str) -> str:
    return "transform" if kind == "transform" else f"{kind} connector"


def load_plugins(*extra: object) -> PluginHost:
    """The plugin host with every entry-point plugin loaded, plus `extra` plugin objects."""
    host = PluginHost()
    host.load_entry_points()
    for obj in extra:
        host.add(obj)
    return host
