"""`pipeline new-plugin`: a new plugin package from the templates in `runner/templates`.

The templates are files under `templates/plugin/common/` (every kind) and
`templates/plugin/<kind>/` (the connector or transform, its tests, the example spec),
each with a `.tmpl` suffix so that nothing picks them up as code or tests. Their text is
rendered with `string.Template` and these names:

- `$dist`: the distribution name, NAME as given (`my-source`), what `pip install` and
  PyPI know it by;
- `$module`: the Python module, NAME lower-cased with `-` and `.` as `_` (`my_source`);
- `$name`: the connector's (or transform's) name in specs (`connector: my-source`), and
  the entry point's, shown by `pipeline plugins`: NAME as given, so what the user typed is
  what they write in specs; only the module, which Python constrains, differs. A
  `pipeline-` prefix, the naming convention of plugin distributions (as `pytest-` and
  `datasette-` are theirs), is left out: `pipeline-sequence` registers `sequence`, as
  the example plugin in `plugins/` does;
- `$cls`: the class, `$name` in CamelCase (`MySource`); its task is `${cls}Task`.

In file names, `{module}` stands for the module and a leading `dot-` for a `.`
(`dot-gitignore` becomes `.gitignore`: package data does not carry dot-files reliably).
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template

from runner.errors import UsageError

KINDS = ("source", "sink", "transform")
SUFFIX = ".tmpl"

# A distribution name (PEP 508) that also gives a Python module: a letter first, a letter
# or digit last, letters, digits, '-', '_', '.' between.
_NAME = re.compile(r"[A-Za-z](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
# Module names a plugin must not take: they would shadow this project or a test helper.
_TAKEN = {"runner", "connectors", "pipeline", "tests", "test", "conftest", "setup"}
# Names the templates import: the class must not shadow them.
_IMPORTED = {
    "Any", "Batch", "Config", "ConfigError", "Path", "Sink", "SinkTask", "Source", "SourceTask",
    "TopicPartition", "Transform", "TransformContext",
}


@dataclass
class Created:
    """What `create` wrote: the package directory and its files, in the order written."""

    root: Path
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Names:
    dist: str
    module: str
    name: str
    cls: str
    kind: str

    def mapping(self) -> dict[str, str]:
        return {
            "dist": self.dist,
            "module": self.module,
            "name": self.name,
            "cls": self.cls,
            "kind": self.kind,
            **{key: text.format(name=self.name) for key, text in _KIND_TEXT[self.kind].items()},
        }


# Kind-specific wording of the common templates (README).
_KIND_TEXT = {
    "source": {
        "what": "source connector",
        "show": "connectors show {name}",
        "flow": "`{name}` (this source) → topic `events` → the built-in `jsonl` sink → `out/`",
    },
    "sink": {
        "what": "sink connector",
        "show": "connectors show {name}",
        "flow": "`sample.jsonl` → the built-in `jsonl` source → topic `orders` → `{name}` (this sink) "
        "→ `out/orders.jsonl`",
    },
    "transform": {
        "what": "record transform",
        "show": "transforms show {name}",
        "flow": "`sample.jsonl` → the built-in `jsonl` source → topic `orders` → `{name}` (this "
        "transform, on the sink) → the built-in `jsonl` sink → `out/`",
    },
}


def names(name: str, kind: str) -> Names:
    """The names derived from NAME, or UsageError when NAME cannot be a plugin's."""
    if kind not in KINDS:
        raise UsageError(f"unknown plugin kind {kind!r}", hint=f"one of: {', '.join(KINDS)}")
    example = {"source": "my-source", "sink": "my-sink", "transform": "my-transform"}[kind]
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid plugin name",
            hint="use letters, digits, '-', '_' and '.', starting with a letter and ending with "
            f"a letter or digit, e.g. {example}",
        )
    module = re.sub(r"[-_.]+", "_", name).lower()
    prefixed = re.fullmatch(r"pipeline[-_.]+(.+)", name, re.IGNORECASE)
    short = prefixed.group(1) if prefixed else name
    if keyword.iskeyword(module) or module in _TAKEN or module in sys.stdlib_module_names:
        raise UsageError(
            f"{name!r} would make a module {module!r}, which shadows "
            f"{'a Python keyword' if keyword.iskeyword(module) else 'an existing module'}",
            hint=f"prefix it, e.g. pipeline-{name}",
        )
    cls = "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_.]+", short) if part)
    if not cls.isidentifier():
        cls = "Plugin" + cls
    if cls in _IMPORTED or keyword.iskeyword(cls):
        cls += kind.title()
    return Names(dist=name, module=module, name=short, cls=cls, kind=kind)


def create(name: str, kind: str, parent: Path) -> Created:
    """Write the plugin package `parent/NAME/` for a `kind` ("source", "sink" or
    "transform") and return what was written. Raises UsageError for an invalid NAME or
    when `parent/NAME` exists and is not an empty directory; nothing is written then."""
    n = names(name, kind)
    root = Path(parent) / name
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        what = "directory" if root.is_dir() else "file"
        raise UsageError(
            f"{root} already exists and is not empty (a {what})",
            hint="choose another NAME, another --dir, or remove it",
        )
    _check_free(n)
    rendered = render(n)
    created = Created(root=root)
    for relative, text in rendered.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        created.files.append(path)
    return created


def _check_free(n: Names) -> None:
    """Refuse a module that would shadow an installed one, and a name that another
    plugin (or a built-in) registers already for this kind: both plugins would be
    unusable."""
    spec = importlib.util.find_spec(n.module)
    if spec is not None:
        where = f" ({spec.origin})" if spec.origin and spec.origin != "built-in" else ""
        raise UsageError(
            f"a module named {n.module!r} is already installed{where}; the plugin's module would clash with it",
            hint=f"choose another NAME, e.g. pipeline-{n.dist}",
        )
    from runner.plugins import load_plugins  # loads every installed plugin: only here

    host = load_plugins()
    for reg in host.registrations(n.kind):
        if reg.name == n.name:
            raise UsageError(
                f"the {n.kind} name {n.name!r} is already registered by {reg.label}",
                hint="choose another NAME (see `pipeline plugins`)",
            )


def render(n: Names) -> dict[str, str]:
    """Relative path -> text of every file of the package (the kind's templates win over
    the common ones of the same path)."""
    base = resources.files("runner") / "templates" / "plugin"
    found: dict[str, Traversable] = {}
    for folder in ("common", n.kind):
        for relative, item in _walk(base / folder):
            found[relative] = item
    values = n.mapping()
    out = {}
    for relative in sorted(found, key=_order):
        target = relative[: -len(SUFFIX)].replace("{module}", n.module)
        target = "/".join("." + p[4:] if p.startswith("dot-") else p for p in target.split("/"))
        try:
            out[target] = Template(found[relative].read_text(encoding="utf-8")).substitute(values)
        except (KeyError, ValueError) as exc:  # a bug in a template, not the user's
            raise RuntimeError(f"template {n.kind}/{relative}: {exc!r}") from exc
    return out


def _walk(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    items = []
    if not folder.is_dir():
        return items
    for item in folder.iterdir():
        relative = prefix + item.name
        if item.is_dir():
            if item.name != "__pycache__":
                items += _walk(item, relative + "/")
        elif item.name.endswith(SUFFIX):
            items.append((relative, item))
    return items


def _order(relative: str) -> tuple[int, str]:
    # The files users look at first come first in the listing.
    first = ["pyproject.toml.tmpl", "README.md.tmpl", "{module}.py.tmpl", "example.yaml.tmpl"]
    return (first.index(relative) if relative in first else len(first), relative)
