"""Hostile or broken spec files are refused by their limits (runner/spec/reading.py),
naming what is wrong, before they can take the machine's memory or time."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import SpecError
from runner.spec import load_spec
from runner.spec.reading import MAX_SPEC_BYTES, MAX_VALUE_CHARS
from tests.conftest import run_cli


def alias_bomb() -> str:
    """The "billion laughs": 9 levels of 9 aliases each, 9**9 strings once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\nname: *a9\n"


def refusal(tmp_path: Path, text: str) -> str:
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError) as raised:
        load_spec(tmp_path / "spec.yaml", env={})
    return str(raised.value)


def test_an_alias_bomb_is_refused_through_validate(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(alias_bomb())
    result = run_cli("validate", tmp_path / "bomb.yaml", timeout=60)
    assert result.returncode == 2
    assert "bomb.yaml:1: the spec expands to more than 100,000 values" in result.stderr


@pytest.mark.parametrize("nested", [
    "z: " + "[" * 5000 + "]" * 5000,  # flow collections
    "z: " + "{a: " * 3000 + "1" + "}" * 3000,
    "z:\n  " + "- " * 5000 + "x",  # compact block sequences
    "z:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(900)),  # block mappings
])
def test_yaml_nested_past_the_limit_is_refused(tmp_path: Path, nested: str) -> None:
    assert "the YAML nests more than about 100 levels deep" in refusal(tmp_path, "name: x\n" + nested + "\n")


def test_a_spec_too_large_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    message = refusal(tmp_path, "name: x\n# " + "a" * MAX_SPEC_BYTES + "\n")
    assert f"the spec is larger than {MAX_SPEC_BYTES:,} bytes" in message


def test_a_value_too_long_is_named_with_its_line_and_not_echoed(tmp_path: Path) -> None:
    path = "p" * (MAX_VALUE_CHARS + 1)
    message = refusal(tmp_path, f"name: x\ntopics: {{t: {{}}}}\nsinks:\n  - name: s\n    connector: parquet\n"
                                f"    topics: [t]\n    config: {{path: {path}}}\n")
    assert f"spec.yaml:7: sinks[0].config.path: a value of {MAX_VALUE_CHARS + 1:,} characters" in message
    assert "ppppp" not in message


def test_long_values_are_shortened_in_messages(tmp_path: Path) -> None:
    """A value under the limit but long (60,000 characters) is quoted shortened."""
    name = "n" * 60_000
    (tmp_path / "spec.yaml").write_text(f"name: x\ntopics: {{t: {{}}}}\nsinks:\n  - {{name: s, connector: {name}, topics: [t]}}\n")
    result = run_cli("validate", tmp_path / "spec.yaml")
    assert result.returncode == 2
    line = next(line for line in result.stderr.splitlines() if "nnnn" in line)
    assert len(line) < 1200 and "characters]…" in line
