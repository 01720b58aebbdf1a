"""The plugin authoring guide (docs/plugins.md) keeps up with the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

from runner import hookspecs
from runner.plugins import load_plugins

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "pipeline_spec")]


def test_every_hook_has_a_section_in_the_guide_and_a_full_docstring() -> None:
    guide = GUIDE.read_text()
    sections = set(re.findall(r"^### `(\w+)`$", guide, re.MULTILINE))
    hooks = hook_names()
    assert hooks, "no hooks found in runner.hookspecs"
    missing = [h for h in hooks if h not in sections]
    assert not missing, f"hooks without a '### `name`' section in docs/plugins.md: {missing}"
    stale = sections - set(hooks)
    assert not stale, f"docs/plugins.md documents hooks that do not exist: {sorted(stale)}"
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        for part in ("Called:", "Parameters:", "Returns:"):
            assert part in doc, f"the docstring of hook {name!r} lacks {part!r}"


def test_every_builtin_transform_is_in_the_guide() -> None:
    guide = GUIDE.read_text()
    names = [r.name for r in load_plugins().registrations("transform") if r.plugin.name == "builtin"]
    assert names
    missing = [n for n in names if f"| `{n}` |" not in guide]
    assert not missing, f"built-in transforms missing from the table in docs/plugins.md: {missing}"


def test_the_readme_links_the_guide() -> None:
    assert "(docs/plugins.md)" in (REPO / "README.md").read_text()
