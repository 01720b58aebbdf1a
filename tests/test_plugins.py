"""The plugin host: registration through the hook, conflicts, broken plugins."""

from __future__ import annotations

import types

import pytest

from runner.connector import Sink, Source
from runner.hookspecs import hookimpl
from runner.plugins import PluginHost, UnknownConnector, load_plugins


def plugin(name: str, *classes: type, fail: bool = False) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_connectors(register):
        if fail:
            raise RuntimeError("boom")
        for cls in classes:
            register(cls)

    module.register_connectors = register_connectors
    return module


class FileSource(Source):
    name = "file"


class OtherFileSource(Source):
    name = "file"


class FileSink(Sink):
    name = "file"


def test_builtins_register_through_the_entry_point() -> None:
    host = load_plugins()
    builtin = next(p for p in host.plugins if p.name == "builtin")
    assert builtin.distribution == "pipeline" and "source:jsonl" in builtin.connectors
    assert host.lookup("sink", "jsonl").plugin is builtin


def test_same_name_for_a_source_and_a_sink_is_fine_but_two_sources_conflict() -> None:
    host = PluginHost()
    host.add(plugin("a", FileSource, FileSink))
    assert host.lookup("sink", "file").cls is FileSink
    host.add(plugin("b", OtherFileSource))
    with pytest.raises(UnknownConnector) as err:
        host.lookup("source", "file")
    assert "plugin 'a'" in str(err.value) and "plugin 'b'" in str(err.value)
    assert ("source", "file") in host.conflicts()


def test_failing_hook_marks_the_plugin_broken_and_others_still_work() -> None:
    host = PluginHost()
    host.add(plugin("bad", fail=True))
    host.add(plugin("good", FileSource))
    bad = next(p for p in host.plugins if p.name == "bad")
    assert bad.broken and "boom" in bad.error
    assert host.lookup("source", "file").cls is FileSource


def test_registering_something_that_is_not_a_connector_is_reported() -> None:
    host = PluginHost()
    host.add(plugin("odd", dict))
    assert "not a subclass" in host.plugins[0].error


def test_unknown_name_suggests_close_matches() -> None:
    host = PluginHost()
    host.add(plugin("a", FileSource))
    with pytest.raises(UnknownConnector, match="did you mean 'file'"):
        host.lookup("source", "flie")


def test_a_misspelled_hook_marks_the_plugin_broken() -> None:
    module = types.ModuleType("typo")

    @hookimpl
    def register_connector(register):  # missing the final "s"
        register(FileSource)

    module.register_connector = register_connector
    host = PluginHost()
    host.add(module)
    assert "did you mean 'register_connectors'" in host.plugins[0].error
    with pytest.raises(UnknownConnector):
        host.lookup("source", "file")
