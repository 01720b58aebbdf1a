"""The `pipeline` command. Thin: parse, call the engine, print. User errors become one line
with a hint (exit 2 for a bad spec or usage, 1 for a failed run); `--debug` shows the
traceback."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any

import click

from runner import __version__, admin, engine
from runner.errors import PipelineError, SpecError, UsageError, os_error
from runner.plugins import DISABLE_ENV, PluginHost, UnknownConnector, load_plugins
from runner.spec import Spec
from runner.progress import progress_display
from runner.worker import Counters

DEFAULT_SPEC = "pipeline.yaml"
SPEC_OPTION_HELP = "The pipeline spec, instead of the SPEC argument (default: $PIPELINE_SPEC, else ./pipeline.yaml)."


class PipelineGroup(click.Group):
    """Turns engine errors into one-line messages, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`pipeline consume ... | head`): stop quietly, as cat does.
            # Point stdout at /dev/null so the interpreter's final flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as exc:  # the file system: a state directory, a spec's path
            self._report(ctx, os_error(exc))
        except PipelineError as exc:
            self._report(ctx, exc)
        except Exception as exc:  # a bug
            if (ctx.obj or {}).get("debug", False):
                traceback.print_exc()
            else:
                click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
                click.echo("(run with --debug for the traceback)", err=True)
            ctx.exit(1)

    @staticmethod
    def _report(ctx: click.Context, exc: PipelineError) -> None:
        debug = (ctx.obj or {}).get("debug", False)
        if debug:
            traceback.print_exc()
        if isinstance(exc, SpecError):
            click.echo(str(exc), err=True)
            click.echo(f"error: {exc.args[0]}", err=True)
            ctx.exit(exc.exit_code)
        click.echo(f"error: {exc}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        # A file-system error says all there is to say; anything else has a traceback to show.
        if exc.__cause__ is not None and not debug and not isinstance(exc.__cause__, OSError):
            click.echo("(run with --debug for the traceback)", err=True)
        ctx.exit(exc.exit_code)


@click.group(cls=PipelineGroup)
@click.version_option(__version__, prog_name="pipeline")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run pipelines of source and sink connectors through schema-checked topics.

    \b
    Example:
      pipeline validate pipelines/jsonl-roundtrip.yaml
      pipeline run pipelines/jsonl-roundtrip.yaml --once
    """
    ctx.obj = {"debug": debug}
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
    else:
        # Warnings (retries, a cluster without idempotent producers) as one line each.
        # The Kafka client's own logs only with --debug: its failures reach the user as
        # our errors, which say what to check.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("pipeline: %(message)s"))
        handler.addFilter(lambda record: not record.name.startswith("aiokafka"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])


def _host() -> PluginHost:
    return load_plugins()


def _spec(path: str) -> Spec:
    """The spec for read-side commands: only what locates the state directory must be right."""
    return engine.load_for_inspection(path)


def spec_argument(command: Callable[..., Any] | None = None, *, required: bool = True) -> Any:
    """Every command takes its spec the same way: an optional last argument SPEC, or
    -s/--spec SPEC, or $PIPELINE_SPEC, else ./pipeline.yaml. The command gets `spec_path`
    (None when the spec is not `required` and none is there)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @click.argument("spec_arg", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False))
        @click.option("-s", "--spec", "spec_opt", envvar="PIPELINE_SPEC", type=click.Path(dir_okay=False),
                      help=SPEC_OPTION_HELP)
        @functools.wraps(command)
        def wrapper(*args: Any, spec_arg: str | None, spec_opt: str | None, **kwargs: Any) -> Any:
            if spec_arg is not None and spec_opt is not None and spec_arg != spec_opt:
                raise click.UsageError(f"two specs given: {spec_arg} and --spec {spec_opt}; give one")
            given = spec_arg or spec_opt
            path = given or DEFAULT_SPEC
            if not Path(path).is_file():
                if given is None and not required:
                    return command(*args, spec_path=None, **kwargs)
                raise UsageError(
                    f"no spec at {path}" if given else f"no spec given, and there is no ./{DEFAULT_SPEC}",
                    hint="pass SPEC or --spec SPEC, or set PIPELINE_SPEC",
                )
            return command(*args, spec_path=path, **kwargs)

        return wrapper

    return decorate(command) if command is not None else decorate


# -- run / validate ----------------------------------------------------------------------


@cli.command()
@click.option("--once", is_flag=True, help="Stop when the sources are exhausted and the sinks have flushed.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress on stderr: a live line on a terminal (done / total, rate, ETA for sources that "
    "know their size), a plain line every 10 s otherwise (default: on).",
)
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Run only this source (repeatable); sinks are not started.")
@click.option("--now", is_flag=True, help="With --source: run it once now, even if it has a schedule, and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON on stdout.")
@spec_argument
def run(once: bool, progress: bool | None, sources: tuple[str, ...], now: bool, as_json: bool, spec_path: str) -> None:
    """Run a pipeline: every source and sink of SPEC, until stopped (Ctrl-C flushes,
    commits and exits; a second Ctrl-C exits at once). Sources with a `schedule:` run at
    each tick (with --once: one run each). A --once run that read records, delivered
    none and dead-lettered some exits 1.

    \b
    Examples:
      pipeline run pipelines/jsonl-roundtrip.yaml --once
      pipeline run pipelines/batch-to-stream.yaml --source exports-csv --now
    """
    host = _host()
    spec = engine.check_spec(spec_path, host)
    if now and not sources:
        raise UsageError("--now runs the sources named by --source", hint="add --source NAME")
    unknown = [name for name in sources if name not in {s.name for s in spec.sources}]
    if unknown:
        raise UsageError(
            f"no source {unknown[0]!r} in {spec_path}",
            hint=f"sources: {', '.join(s.name for s in spec.sources) or 'none'}",
        )
    for plugin in host.plugins:
        if plugin.broken:
            click.echo(f"warning: plugin {plugin.name!r} is broken ({plugin.error}); see `pipeline plugins`", err=True)
    for warning in spec.warnings:
        click.echo(str(warning), err=True)
    show = progress_display(sys.stderr, live=sys.stderr.isatty()) if progress is not False else None
    try:
        result = engine.run(spec, host, once=once, progress=show, only_sources=list(sources) or None, now=now)
    except PipelineError as exc:
        if show is not None:
            show.clear()
        if exc.result is not None:
            _summary(spec, exc.result, as_json, failure=exc)
        elif as_json:
            click.echo(json.dumps({"pipeline": spec.name, "outcome": "failed", "error": str(exc), "hint": exc.hint}))
        raise
    if show is not None:
        show.clear()
    _summary(spec, result, as_json)


# The summary's columns: (title, value of a connector's counters, shown when no counter has it).
_COLUMNS: list[tuple[str, Callable[[Counters], int], bool]] = [
    ("read", lambda c: c.records_in, True),
    ("delivered", lambda c: c.records_out, True),
    ("filtered", lambda c: c.filtered, False),
    ("dead-lettered", lambda c: c.dead_lettered, True),
    ("pending", lambda c: c.pending, False),
]


def _summary(spec: Spec, result: engine.RunResult, as_json: bool, failure: PipelineError | None = None) -> None:
    """What each connector did, adding up: read = delivered + filtered + dead-lettered + pending."""
    how = "failed" if failure else "stopped" if result.stopped_by_signal else "finished"
    counters = result.counters
    if as_json:
        click.echo(json.dumps({
            "pipeline": spec.name,
            "outcome": how,
            "elapsed_seconds": round(result.elapsed, 3),
            "connectors": [
                {"name": c.name, "kind": c.kind, **{title.replace("-", "_"): value(c) for title, value, _ in _COLUMNS},
                 "errors": c.errors, "retries": c.retries, "dropped_fields": c.dropped, "where": c.target}
                for c in counters
            ],
            **({"error": str(failure), "hint": failure.hint} if failure else {}),
        }, indent=2))
        return
    click.echo(f"pipeline {spec.name!r} {'stopped by signal' if how == 'stopped' else how} in {result.elapsed:.1f}s",
               err=True)
    # Columns that say nothing in this run are left out.
    columns = [(t, v) for t, v, always in _COLUMNS if always or any(v(c) for c in counters)]
    errors_apart = any(c.errors != c.dead_lettered for c in counters)  # tolerance none: errors stop the run
    rows = [("connector", "kind", *(t for t, _ in columns), *(("errors",) if errors_apart else ()), "where")]
    for c in counters:
        rows.append((c.name, c.kind, *(f"{v(c):,}" for _, v in columns),
                     *((f"{c.errors:,}",) if errors_apart else ()), c.target or ""))
    if not any(c.target for c in counters):
        rows = [r[:-1] for r in rows]
    _table(rows, err=True)
    click.echo(f"({columns[0][0]} = {' + '.join(t for t, _ in columns[1:])})", err=True)
    for c in counters:
        for name, count in c.dropped.items():
            click.echo(f"{c.name}: dropped field {name!r} from {count:,} record(s): not in the topic's schema",
                       err=True)


def _table(rows: list[tuple[str, ...]], err: bool = False) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip(), err=err)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Output JSON: ok, warnings and problems.")
@click.option("--strict", is_flag=True, help="Count warnings as problems (exit 2 on any).")
@spec_argument
def validate(as_json: bool, strict: bool, spec_path: str) -> None:
    """Check SPEC without running it: structure, schemas, connector names and configs,
    and whether what each source produces fits its topic's schema. Prints every problem
    and warning with file:line; exits 2 if there are problems (warnings alone exit 0,
    unless --strict). Warnings include a sink or state directory outside the spec's
    directory, and a glob that matches no file."""
    try:
        spec = engine.check_spec(spec_path, _host())
        if strict and spec.warnings:
            raise SpecError([dataclasses.replace(w, level="error") for w in spec.warnings])
    except SpecError as exc:
        if as_json:
            click.echo(json.dumps({"spec": spec_path, "ok": False, "problems": [p.as_json() for p in exc.problems]},
                                  indent=2))
            raise click.exceptions.Exit(exc.exit_code) from None
        raise
    if as_json:
        click.echo(json.dumps({
            "spec": spec_path, "ok": True, "problems": [p.as_json() for p in spec.warnings],
            "sources": len(spec.sources), "sinks": len(spec.sinks), "processors": len(spec.processors),
            "topics": len(spec.topics),
            "broker": spec.broker.kind, "state_dir": str(spec.state_dir),
        }, indent=2))
        return
    for warning in spec.warnings:
        click.echo(str(warning), err=True)
    click.echo(
        f"{spec_path}: ok — {len(spec.sources)} source(s), {len(spec.sinks)} sink(s), "
        + (f"{len(spec.processors)} processor(s), " if spec.processors else "")
        + f"{len(spec.topics)} topic(s), broker {spec.broker.kind}, state in {spec.state_dir}"
        + (f"; {len(spec.warnings)} warning(s)" if spec.warnings else "")
    )


@cli.command()
@click.option("--sink", "sinks", multiple=True, metavar="NAME", help="Only this sink (repeatable).")
@click.option("--dry-run", is_flag=True, help="Say what would be merged, change nothing.")
@spec_argument
def compact(sinks: tuple[str, ...], dry_run: bool, spec_path: str) -> None:
    """Merge each sink's small output files into fewer large ones (the parquet sink: a
    partition's consecutive files into one named by their first and last offsets),
    atomically, so exactly-once resume still holds. Safe while `pipeline run` writes.

    \b
    Example:
      pipeline compact pipelines/activity-tracking.yaml --dry-run
    """
    host = _host()
    spec = engine.check_spec(spec_path, host)
    for name, lines in engine.compact(spec, host, list(sinks) or None, dry_run=dry_run).items():
        if lines is None:
            click.echo(f"{name}: nothing to compact (its connector does not compact)", err=True)
            continue
        for line in lines:
            click.echo(f"{name}: {line}")
        if not lines:
            click.echo(f"{name}: nothing to compact", err=True)


# -- schedules and run history -------------------------------------------------------------


@cli.command()
@click.option("--source", metavar="NAME", help="Only this source's runs.")
@click.option("--last", "limit", type=click.IntRange(1), default=50, show_default=True, help="How many runs to show.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument
def runs(spec_path: str, source: str | None, limit: int, as_json: bool) -> None:
    """The run history of the spec's scheduled sources: start, end, outcome, records,
    files, errors, next run (skipped ticks and interrupted runs too). The spec is SPEC or
    --spec."""
    spec = _spec(spec_path)
    listed = admin.runs(spec, source, limit)
    if as_json:
        click.echo(json.dumps([r.as_json() for r in listed], indent=2))
        return
    if not listed:
        click.echo("no runs yet", err=True)
        return
    rows = [("id", "source", "trigger", "started", "ended", "outcome", "records", "files", "errors", "next run", "message")]
    for r in listed:
        name = r.source if r.task == 0 else f"{r.source}#{r.task}"
        rows.append((str(r.id), name, r.trigger, _when(r.started), _when(r.ended), r.outcome, f"{r.records:,}",
                     str(r.files), str(r.errors), _when(r.next_run), (r.message or "")[:60]))
    _table(rows)


@cli.command()
@click.option("--count", type=click.IntRange(1, 100), default=3, show_default=True, help="Next run times per source.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument
def schedule(count: int, as_json: bool, spec_path: str) -> None:
    """Each scheduled source of SPEC: its schedule, its last run and its next run times."""
    spec = engine.check_spec(spec_path, _host())
    listed = admin.schedules(spec, count)
    if as_json:
        click.echo(json.dumps([
            {"source": name, "schedule": described, "catchup": catchup, "last_run": last if last != "-" else None,
             "next_runs": [t.isoformat() for t in upcoming]}
            for name, described, catchup, last, upcoming in listed
        ], indent=2))
        return
    rows = [("source", "schedule", "catchup", "last run", "next runs (UTC)")]
    for name, described, catchup, last, upcoming in listed:
        rows.append((name, described, catchup, last, ", ".join(_when(t) for t in upcoming)))
    if len(rows) == 1:
        click.echo(f"{spec_path}: no source has a schedule", err=True)
        return
    _table(rows)


def _when(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


# -- plugins and connectors --------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument(required=False)
def plugins(as_json: bool, spec_path: str | None) -> None:
    """List loaded plugins: distribution and version (or the file of a plugin_paths:
    module), what each registered, or why it is broken or disabled
    (PIPELINE_DISABLE_PLUGINS=a,b disables plugins by name or distribution). With a
    spec, the plugin modules of its plugin_paths: too."""
    host = _host()
    if spec_path is not None:
        host.load_paths(engine.load_for_inspection(spec_path).plugin_paths)
    if as_json:
        out = [
            {
                "name": p.name,
                "module": p.module,
                "distribution": p.distribution,
                "version": p.version,
                "path": p.path,
                "connectors": p.connectors,
                "error": p.error,
                "disabled": p.disabled,
            }
            for p in host.plugins
        ]
        click.echo(json.dumps(out, indent=2))
        return
    for p in host.plugins:
        where = f"{p.distribution} {p.version}" if p.distribution else (p.path or p.module)
        if p.disabled:
            click.echo(f"{p.name} ({where}): disabled by {DISABLE_ENV}")
        elif p.broken:
            click.echo(f"{p.name} ({where}): BROKEN: {p.error}")
        else:
            click.echo(f"{p.name} ({where}): {', '.join(p.connectors) or 'nothing registered'}")
    for (kind, name), regs in host.conflicts().items():
        both = " and ".join(r.label for r in regs)
        click.echo(f"conflict: {kind} {name!r} is registered by both {both}")


@cli.group()
def connectors() -> None:
    """Inspect the available connectors."""


@connectors.command("list")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
def connectors_list(as_json: bool) -> None:
    """List source and sink connectors with the plugin that registered each."""
    host = _host()
    _list(host.registrations("source") + host.registrations("sink"), as_json, with_kind=True)


@connectors.command("show")
@click.argument("name")
@click.option("--kind", type=click.Choice(["source", "sink"]), help="When a source and a sink share NAME.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
def connectors_show(name: str, kind: str | None, as_json: bool) -> None:
    """Show a connector's config settings: type, default, description."""
    host = _host()
    regs = [r for r in host.registrations() if r.name == name and r.kind != "transform" and kind in (None, r.kind)]
    if not regs:
        try:
            host.lookup(kind or "source", name)
        except UnknownConnector as exc:
            raise click.UsageError(str(exc)) from None
        raise click.UsageError(f"no {kind} connector {name!r}; see `pipeline connectors list`")
    _show(regs, as_json)


@cli.group()
def transforms() -> None:
    """Inspect the available record transforms (the `transforms:` of a source or sink)."""


@transforms.command("list")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
def transforms_list(as_json: bool) -> None:
    """List transforms with the plugin that registered each."""
    _list(_host().registrations("transform"), as_json, with_kind=False)


@transforms.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
def transforms_show(name: str, as_json: bool) -> None:
    """Show a transform's config settings: type, default, description."""
    host = _host()
    try:
        reg = host.lookup("transform", name)
    except UnknownConnector as exc:
        raise click.UsageError(str(exc)) from None
    _show([reg], as_json)


def _list(regs: list[Any], as_json: bool, *, with_kind: bool) -> None:
    if as_json:
        click.echo(json.dumps([
            {"kind": r.kind, "name": r.name, "plugin": r.plugin.name, "description": r.cls.description}
            for r in regs
        ], indent=2))
        return
    rows = [("kind", "name", "plugin", "description") if with_kind else ("name", "plugin", "description")]
    rows += [(r.kind, r.name, r.plugin.name, r.cls.description)[0 if with_kind else 1:] for r in regs]
    _table(rows)


def _show(regs: list[Any], as_json: bool) -> None:
    """Config tables of connectors or transforms."""
    if as_json:
        click.echo(json.dumps([
            {"kind": r.kind, "name": r.name, "plugin": r.plugin.name, "description": r.cls.description,
             "config": [s.as_dict() for s in r.cls.settings()]}
            for r in regs
        ], indent=2, default=str))
        return
    for r in regs:
        click.echo(f"{r.what} {r.name!r} ({r.label}): {r.cls.description}")
        rows = [("setting", "type", "default", "description")]
        for s in r.cls.settings():
            default = "(required)" if s.required else ("***" if s.secret and s.default else json.dumps(s.default, default=str))
            bounds = [f">= {_num(s.min)}" if s.min is not None else "", f"<= {_num(s.max)}" if s.max is not None else ""]
            kind = " ".join([s.type, *filter(None, bounds)])
            rows.append((s.name, kind, default, s.help))
        _table(rows)
        click.echo()


@cli.command("new-plugin")
@click.argument("name")
@click.option("--source", "kind", flag_value="source", default=True, help="A source connector (the default).")
@click.option("--sink", "kind", flag_value="sink", help="A sink connector.")
@click.option("--transform", "kind", flag_value="transform", help="A record transform.")
@click.option("--dir", "parent", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where to create the plugin's directory.")
def new_plugin(name: str, kind: str, parent: str) -> None:
    """Create an installable plugin package NAME/: a connector (or transform) with a typed
    Config, its tests (using runner.testing's conformance suite), an example spec, a
    README and a pyproject.toml with the `pipeline` entry point.

    \b
    Example:
      pipeline new-plugin my-source --source
      pip install -e "./my-source[test]" && (cd my-source && python -m pytest -q)
    """
    from runner import scaffold  # only this command needs the templates

    created = scaffold.create(name, kind, Path(parent))
    for path in created.files:
        click.echo(f"created {path}")
    # "./" keeps pip from taking a bare name for a package on PyPI.
    root = str(created.root) if created.root.is_absolute() else f"./{created.root}"
    click.echo(f"\nnext:\n  pip install -e \"{root}[test]\"\n  (cd {root} && python -m pytest -q)\n"
               f"  pipeline plugins\n  pipeline run {root}/example.yaml --once")


def _num(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


# -- topics, consume, schemas ------------------------------------------------------------


@cli.group()
def topics() -> None:
    """Inspect the topics of a pipeline's broker."""


@topics.command("list")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument
def topics_list(spec_path: str, as_json: bool) -> None:
    """List topics with partitions and record counts."""
    described = admin.describe_topics(_spec(spec_path))
    if as_json:
        click.echo(json.dumps([t.as_dict() for t in described], indent=2))
        return
    rows = [("topic", "partitions", "records")]
    rows += [(t.name, str(t.partitions), f"{t.records:,}") for t in described]
    _table(rows)


@topics.command("describe")
@click.argument("topic")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument
def topics_describe(topic: str, spec_path: str, as_json: bool) -> None:
    """Partitions, end offsets and consumer-group lag of TOPIC."""
    (t,) = admin.describe_topics(_spec(spec_path), topic)
    if as_json:
        click.echo(json.dumps(t.as_dict(), indent=2))
        return
    click.echo(f"topic {t.name}: {t.partitions} partitions, {t.records:,} records")
    rows = [("partition", "end offset")] + [(str(p), str(e)) for p, e in enumerate(t.end_offsets)]
    _table(rows)
    for group, lags in t.groups.items():
        click.echo(f"group {group}: lag {sum(lags.values()):,} ({', '.join(f'{p}:{l}' for p, l in lags.items())})")


@cli.command()
@click.argument("topic")
@click.option("--from-beginning", is_flag=True, help="Start at the first record (default: the end).")
@click.option("--max", "max_records", type=click.IntRange(min=1), help="Stop after N records.")
@click.option(
    "--follow/--no-follow",
    default=None,
    help="Wait for new records (default: follow unless --from-beginning).",
)
@click.option("--meta", is_flag=True, help="Wrap each value with partition, offset, timestamp and key.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of JSON lines.")
@spec_argument
def consume(topic: str, from_beginning: bool, max_records: int | None, follow: bool | None, meta: bool,
            as_json: bool, spec_path: str) -> None:
    """Print TOPIC's records as JSON lines (or, with --json, one JSON array), decoded
    from Avro.

    \b
    Example:
      pipeline consume orders-dlq --from-beginning pipelines/jsonl-roundtrip.yaml
    """
    if follow is None:
        follow = not from_beginning
    emit = click.echo
    if as_json:
        out = _JsonArray()
        emit = out.item
    admin.consume(
        _spec(spec_path),
        topic,
        emit,
        from_beginning=from_beginning,
        max_records=max_records,
        follow=follow,
        meta=meta,
    )
    if as_json:
        out.close()


class _JsonArray:
    """Writes JSON texts as the items of one array, as they come (a followed topic never ends)."""

    def __init__(self) -> None:
        self.count = 0

    def item(self, text: str) -> None:
        click.echo(("[\n" if not self.count else ",\n") + text, nl=False)
        self.count += 1

    def close(self) -> None:
        click.echo("\n]" if self.count else "[]")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument
def offsets(as_json: bool, spec_path: str) -> None:
    """Where each source stands (its stored source offsets: file, byte, line...), each
    processor (its stored position in each input partition, the partition's end, the lag;
    per task its stream time and window state: bytes and open windows) and each sink (its
    consumer group's committed offset, the end of each topic-partition, the lag).

    \b
    Example:
      pipeline offsets pipelines/jsonl-roundtrip.yaml
    """
    found = admin.offsets(_spec(spec_path))
    if as_json:
        click.echo(json.dumps(found, indent=2, default=str))
        return

    def _count(n: int | None) -> str:
        return "-" if n is None else f"{n:,}"

    tables = []
    rows = [("source", "source partition", "offset")]
    for s in found["sources"]:
        for part, offset in sorted(s["offsets"].items()) or [("-", None)]:
            rows.append((s["name"], part, json.dumps(offset) if offset is not None else "-"))
    tables.append(rows)
    rows = [("processor", "topic", "partition", "position", "end", "lag")]
    for pr in found["processors"]:
        for p in pr["partitions"]:
            rows.append((pr["name"], p["topic"], str(p["partition"]), _count(p["position"]), _count(p["end"]),
                         _count(p["lag"])))
        if not pr["partitions"]:  # not run yet
            rows.append((pr["name"], "-", "-", "-", "-", "-"))
    tables.append(rows)
    rows = [("processor", "task", "stream time", "state bytes", "open windows")]
    for pr in found["processors"]:
        for t in pr["tasks"]:
            rows.append((pr["name"], str(t["task"]), t["stream_time_utc"] or "-", _count(t["state_bytes"]),
                         _count(t["open_windows"])))
    tables.append(rows)
    rows = [("sink", "topic", "partition", "committed", "end", "lag")]
    for k in found["sinks"]:
        for p in k["partitions"]:
            rows.append((k["name"], p["topic"], str(p["partition"]), _count(p["committed"]), _count(p["end"]),
                         _count(p["lag"])))
    tables.append(rows)
    for i, rows in enumerate([t for t in tables if len(t) > 1]):
        if i:
            click.echo()
        _table(rows)


@cli.group()
def schemas() -> None:
    """Inspect and register schemas in the pipeline's schema registry."""


@schemas.command("list")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@spec_argument
def schemas_list(as_json: bool, spec_path: str) -> None:
    """List subjects with their versions and compatibility mode."""
    registry = engine.open_registry(_spec(spec_path), read_only=True)
    try:
        listed = [
            {"subject": subject, "versions": registry.versions(subject),
             "latest_id": registry.get(subject, "latest").id, "compatibility": registry.compatibility(subject)}
            for subject in registry.subjects()
        ]
    finally:
        registry.close()
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    rows = [("subject", "versions", "latest id", "compatibility")]
    rows += [(s["subject"], ",".join(map(str, s["versions"])), str(s["latest_id"]), s["compatibility"]) for s in listed]
    _table(rows)


@schemas.command("show")
@click.argument("subject")
@click.option("--version", "version", default="latest", help="A version number or 'latest'.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON: subject, version, id and the schema.")
@spec_argument
def schemas_show(subject: str, version: str, as_json: bool, spec_path: str) -> None:
    """Print a subject's schema (the latest version unless --version)."""
    if version != "latest" and not version.isdigit():
        raise click.BadParameter(f"{version!r} is neither a version number nor 'latest'", param_hint="--version")
    registry = engine.open_registry(_spec(spec_path), read_only=True)
    try:
        if subject not in registry.subjects():
            raise UsageError(f"no subject {subject!r}", hint="see `pipeline schemas list`")
        got = registry.get(subject, version if version == "latest" else int(version))
        if as_json:
            click.echo(json.dumps({"subject": got.subject, "version": got.version, "id": got.id,
                                   "schema": json.loads(got.schema)}, indent=2))
            return
        click.echo(f"# subject {got.subject} version {got.version} id {got.id}", err=True)
        click.echo(json.dumps(json.loads(got.schema), indent=2))
    finally:
        registry.close()


@schemas.command("register")
@click.argument("subject")
@click.argument("schema_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Output JSON: subject, id and version.")
@spec_argument
def schemas_register(subject: str, schema_file: str, as_json: bool, spec_path: str) -> None:
    """Register SCHEMA_FILE (.avsc) under SUBJECT, checked against the subject's
    compatibility mode (default BACKWARD); an incompatible change is refused with the reason."""
    registry = engine.open_registry(_spec(spec_path))
    try:
        schema_id = registry.register(subject, Path(schema_file).read_text())
        latest = registry.get(subject, "latest")
        if as_json:
            click.echo(json.dumps({"subject": subject, "id": schema_id, "version": latest.version}))
            return
        click.echo(f"{subject}: id {schema_id}, version {latest.version}")
    finally:
        registry.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@cli.group()
def registry() -> None:
    """Serve the pipeline's schema registry to other tools."""


@registry.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@spec_argument
def registry_serve(spec_path: str, host: str, port: int) -> None:
    """Serve the state directory's schema registry over Confluent's Schema Registry REST
    API, so Confluent clients (SchemaRegistryClient, AvroDeserializer) read our topics.
    Runs until interrupted."""
    from runner.schema.rest import make_server

    spec = _spec(spec_path)
    if spec.schema_registry is not None:
        raise UsageError(
            f"the spec uses the schema registry at {engine.open_registry(spec).urls[0]}; there is nothing to serve",
            hint="point Confluent clients at that registry",
        )
    reg = engine.open_registry(spec)
    try:
        try:
            server = make_server(reg, host, port)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}", hint="choose another --port") from None
        bound_host, bound_port = server.server_address[:2]
        click.echo(f"schema registry of {spec.state_dir} on http://{bound_host}:{bound_port}", err=True)
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        reg.close()


def main() -> None:
    cli(prog_name="pipeline")
