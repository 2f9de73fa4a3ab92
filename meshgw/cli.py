"""The command line: flags → Settings → the app. Thin on purpose.

Errors a user can meet end as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from meshgw import __version__
from meshgw.settings import Settings, SettingsError, process_environment, specs

EXIT_USAGE = 2


def fail(message: str, status: int = EXIT_USAGE) -> None:
    click.echo(f"meshgw: error: {message}", err=True)
    sys.exit(status)


def _option(spec: Any) -> Callable[[Any], Any]:
    """The flag of one setting, from its declaration in settings.py: name, help, default,
    choices. It defaults to None so that only what was given overrides file and environment."""
    name, meta = spec.name, spec.metadata
    flag = "--" + name.replace("_", "-")
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    choices = getattr(meta["parse"], "choices", None)
    help_text = meta["help"]
    if choices:
        help_text += f" One of {', '.join(choices)}."
    if isinstance(default, list | dict):
        help_text += " Repeatable."
    if meta["show"]:
        help_text += f" [default: {meta['show']}]"
    if isinstance(default, bool):
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    metavar = meta["metavar"] or ("|".join(choices) if choices else None)
    return click.option(
        flag, name, multiple=isinstance(default, list | dict), metavar=metavar, help=help_text
    )


CONFIG_OPTION = click.option(
    "--config",
    type=click.Path(dir_okay=False),
    help="TOML settings file; keys are the flag names (also MESHGW_CONFIG).",
)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for spec in reversed(specs()):
        command = _option(spec)(command)
    return CONFIG_OPTION(command)


def load_settings(flags: dict[str, Any]) -> Settings:
    flags = dict(flags)
    config = flags.pop("config", None)
    return Settings.load(flags, config=config, environ=process_environment())


def with_settings(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the settings flags into a Settings (or a one-line error) before the command runs."""

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        own = {k: kwargs.pop(k) for k in list(kwargs) if k not in _SETTINGS_KEYS}
        try:
            settings = load_settings(kwargs)
        except SettingsError as error:
            fail(str(error))
        return command(settings, kwargs, **own)

    return settings_options(wrapper)


_SETTINGS_KEYS = frozenset({"config", *(spec.name for spec in specs())})


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from meshgw.buildinfo import build

    click.echo(f"meshgw, version {__version__}, {build()}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the build (compiled with mypyc, or pure Python), and exit.",
)
def main() -> None:
    """meshgw: a mesh gateway for federating Consul datacenters.

    It routes TLS by the SNI of the ClientHello, exactly as Consul's mesh gateway does, without
    ever terminating TLS.
    """


@main.command()
@with_settings
def run(settings: Settings, flags: dict[str, Any]) -> None:
    """Run the gateway."""
    from meshgw import app, logs

    logs.configure(settings.log_format, settings.log_level)

    def reload() -> Settings:
        return load_settings(flags)

    try:
        status = app.run(settings, reload)
    except SettingsError as error:
        fail(str(error))
    except app.StartupError as error:
        fail(str(error), status=1)
    sys.exit(status)


@main.command()
@click.option(
    "--sni", "names", multiple=True, metavar="NAME", help="Explain the route a name takes."
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option(
    "--timeout",
    metavar="SECONDS",
    default="10",
    show_default=True,
    help="How long the sources may take: Consul's to answer once each, then host names to "
    "resolve (with what is left, at least a second).",
)
@with_settings
def routes(
    settings: Settings,
    flags: dict[str, Any],
    names: tuple[str, ...],
    as_json: bool,
    timeout: str,
) -> None:
    """Print the route table a gateway with these settings would build, or explain the route
    of --sni names.

    With Consul (--consul, CONSUL_HTTP_ADDR, or --register, as for meshgw run) the gateway's
    own discovery runs until every source has answered once; a source that fails is named on
    stderr. Exit status: 0; 1 when an --sni name is refused; 2 for a usage error, or when the
    Consul agent cannot be asked.
    """
    import asyncio

    from meshgw.control.consul.errors import ConsulConfigError
    from meshgw.durations import parse_duration
    from meshgw.routes_command import RoutesError, build_view, consul_config, explain, render_text

    try:
        seconds = parse_duration(timeout)
        if seconds <= 0:
            raise ValueError("give a positive number of seconds")
    except ValueError as error:
        fail(f"--timeout {timeout!r}: {error}")
    try:
        config = consul_config(settings)
        view = asyncio.run(build_view(settings, config, seconds, names))
    except (ConsulConfigError, RoutesError) as error:
        fail(str(error))
    for warning in view.warnings():
        click.echo(f"meshgw: warning: {warning}", err=True)
    if names:
        lines, refused = explain(view.table, names)
        click.echo("\n".join(lines))
        sys.exit(1 if refused else 0)
    if as_json:
        click.echo(json.dumps(view.to_json(), indent=2))
        return
    click.echo("\n".join(render_text(view)))


def _add_commands(main: click.Group) -> None:
    # Imported here, after the group exists; each module keeps its heavy imports inside its
    # command, so `meshgw run` pays almost nothing for them.
    from meshgw.bench.cli import bench_command
    from meshgw.demo import demo_command
    from meshgw.doctor import doctor_command
    from meshgw.healthcheck import health_command
    from meshgw.tls.cli import tls_group

    for command in (tls_group, demo_command, doctor_command, bench_command, health_command):
        main.add_command(command)


_add_commands(main)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
