"""The plugin contract: the hooks a `pipeline` plugin may implement.

A plugin is a Python module that implements one or more of the hooks below, decorated
with `runner.hookspecs.hookimpl`, and is found through the entry-point group `pipeline`::

    # pyproject.toml of your plugin
    [project.entry-points.pipeline]
    my_plugin = "my_plugin"          # the module holding the hook implementations

    # my_plugin.py
    from runner.hookspecs import hookimpl

    @hookimpl
    def register_connectors(register):
        register(MySource)
        register(MySink)

    @hookimpl
    def register_transforms(register):
        register(MyTransform)

The built-in connectors and transforms are registered exactly this way (the `builtin` entry point of
this distribution points at the `connectors` package).

How plugins are loaded
----------------------
At start the host loads every entry point of the group, one at a time. A plugin whose
import fails (or whose hook raises) is reported as broken — with its name, distribution
and the error — by `pipeline plugins`, and the other plugins still load; a spec only fails
if it uses a connector that could not be registered. Misspelled hook names are refused at
registration by pluggy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "pipeline"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate your hook implementations with this.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_connectors(register: Callable[[type[Any]], None]) -> None:
    """Register source and sink connector classes.

    Called: once per plugin, when the plugin host loads (before any spec is validated).

    Parameters:
        register: call it once per connector class, a subclass of
            `runner.connector.Source` or `runner.connector.Sink` with a `name`. The host
            records which plugin registered it. Registering a class that is neither, or
            without a name, is an error reported against your plugin. Two plugins
            registering the same name for the same kind (source or sink) is a conflict:
            the name is unusable and both plugins are named in the error.

    Returns: nothing (the return value is ignored).
    """


@hookspec
def register_transforms(register: Callable[[type[Any]], None]) -> None:
    """Register record transform classes (single-message transforms).

    Called: once per plugin, when the plugin host loads, right after
    `register_connectors`.

    Parameters:
        register: call it once per transform class, a subclass of
            `runner.transform.Transform` with a `name`. A spec chains it on a source or
            a sink under `transforms:` by that name (`- NAME: {config}`). Registering a
            class that is no Transform, or has no name, is an error reported against your
            plugin; two plugins registering the same name is a conflict, as for
            connectors.

    Returns: nothing (the return value is ignored).
    """
