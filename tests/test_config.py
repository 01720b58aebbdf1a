"""Typed connector config: one declaration drives validation and the config table."""

from __future__ import annotations

from typing import Literal

import pytest

from runner.config import Config, ConfigError, setting


class Example(Config):
    paths: list[str] = setting(help="Globs.")
    batch_size: int = setting(500, help="Records per batch.")
    ratio: float = setting(0.5, help="A ratio.")
    mode: Literal["fast", "safe"] = setting("safe", help="How.")
    password: str | None = setting(None, help="Secret.", secret=True)
    labels: dict[str, int] = setting({}, help="Labels.")


def test_parse_applies_defaults_and_converts_int_to_float() -> None:
    cfg = Example.parse({"paths": ["a/*.log"], "ratio": 1})
    assert cfg.paths == ["a/*.log"] and cfg.batch_size == 500 and cfg.ratio == 1.0 and cfg.mode == "safe"
    assert Example.parse({"paths": []}).labels == {}


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        Example.parse({"pahts": ["x"], "batch_size": "ten", "mode": "slow", "labels": {"a": "b"}, "batch_sise": 1})
    problems = dict(err.value.problems)
    assert "did you mean 'paths'" in problems["pahts"]
    assert "did you mean 'batch_size'" in problems["batch_sise"]
    assert problems["paths"].startswith("required setting missing")
    assert problems["batch_size"] == "expected int, got str 'ten'"
    assert "'fast', 'safe'" in problems["mode"]
    assert problems["labels.a"] == "expected int, got str 'b'"


def test_bool_is_not_an_int_and_secrets_are_masked() -> None:
    with pytest.raises(ConfigError):
        Example.parse({"paths": [], "batch_size": True})
    cfg = Example.parse({"paths": [], "password": "hunter2"})
    assert "hunter2" not in repr(cfg) and "password=***" in repr(cfg)


def test_settings_table() -> None:
    rows = {s.name: s for s in Example.settings()}
    assert rows["paths"].required and rows["paths"].type == "list[str]"
    assert rows["batch_size"].default == 500 and rows["batch_size"].help == "Records per batch."
    assert rows["mode"].type == "'fast' | 'safe'"
    assert rows["password"].secret and rows["password"].type == "str | null"


class Bounded(Config):
    size: int = setting(10, help="Size.", min=1, max=100)


def test_numeric_bounds_are_checked_and_listed() -> None:
    with pytest.raises(ConfigError) as err:
        Bounded.parse({"size": 0})
    assert err.value.problems == [("size", "must be at least 1, got 0")]
    with pytest.raises(ConfigError, match="at most 100"):
        Bounded.parse({"size": 101})
    (info,) = Bounded.settings()
    assert (info.min, info.max) == (1, 100)
