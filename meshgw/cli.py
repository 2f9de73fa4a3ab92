"""The command line: flags → Settings → the app. Thin on purpose.

Errors a user can meet end as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from meshgw import __version__
from meshgw.settings import Settings, SettingsError, environ_settings

EXIT_USAGE = 2


def fail(message: str, status: int = EXIT_USAGE) -> None:
    click.echo(f"meshgw: error: {message}", err=True)
    sys.exit(status)


def _help(name: str) -> str:
    return Settings.help_for(name)


# Every option defaults to None so that only what was given overrides the file and environment.
SETTINGS_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--config", type=click.Path(dir_okay=False), help="TOML settings file."),
    click.option("--dc", help=_help("dc")),
    click.option("--domain", help=_help("domain")),
    click.option("--trust-domain", help=_help("trust_domain")),
    click.option("--primary-dc", help=_help("primary_dc")),
    click.option("--listen", metavar="HOST:PORT", help="Address to accept on [0.0.0.0:8443]."),
    click.option(
        "--expose-servers/--no-expose-servers", default=None, help=_help("expose_servers")
    ),
    click.option(
        "--server", "servers", multiple=True, metavar="NODE=HOST:PORT", help=_help("servers")
    ),
    click.option(
        "--gateway", "gateways", multiple=True, metavar="DC[/AP]=HOST:PORT", help=_help("gateways")
    ),
    click.option(
        "--service",
        "service_args",
        multiple=True,
        metavar="NAME=HOST:PORT | NAME",
        help="Local mesh service instance NAME=HOST:PORT (repeatable); a bare NAME sets the "
        "service name to register (as --service-name).",
    ),
    click.option("--service-name", help=_help("service_name") + " [mesh-gateway]"),
    click.option("--admin", metavar="HOST:PORT", help="Admin/metrics address [127.0.0.1:19100]."),
    click.option(
        "--admin-allowed-host",
        multiple=True,
        metavar="NAME",
        help=_help("admin_allowed_host") + " (repeatable).",
    ),
    click.option("--hello-timeout", metavar="SECONDS", help=_help("hello_timeout") + " [10]"),
    click.option("--connect-timeout", metavar="SECONDS", help=_help("connect_timeout") + " [5]"),
    click.option("--idle-timeout", metavar="SECONDS", help=_help("idle_timeout")),
    click.option("--drain-timeout", metavar="SECONDS", help=_help("drain_timeout") + " [30]"),
    click.option("--max-hello-bytes", metavar="N", help=_help("max_hello_bytes") + " [65536]"),
    click.option("--max-connections", metavar="N|auto", help=_help("max_connections") + " [auto]"),
    click.option("--pump", help="auto | splice | userspace [auto]."),
    click.option("--workers", metavar="N|auto", help=_help("workers") + " [auto]"),
    click.option("--access-log/--no-access-log", default=None, help=_help("access_log")),
    click.option("--log-format", help="text | json [text]."),
    click.option("--log-level", help="debug | info | warning | error [info]."),
    click.option("--consul", metavar="URL", help=_help("consul")),
    click.option("--token-file", type=click.Path(dir_okay=False), help=_help("token_file")),
    click.option("--register/--no-register", default=None, help=_help("register")),
    click.option("--proxy-id", help=_help("proxy_id")),
    click.option("--address", metavar="HOST[:PORT]", help=_help("address")),
    click.option("--wan-address", metavar="HOST[:PORT]", help=_help("wan_address")),
    click.option("--deregister-after-critical", help=_help("deregister_after_critical")),
    click.option(
        "--primary-gateway",
        "primary_gateways",
        multiple=True,
        metavar="HOST:PORT",
        help=_help("primary_gateways"),
    ),
    click.option("--primary-gateways-interval", metavar="SECONDS", help="[30]"),
]


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(SETTINGS_OPTIONS):
        command = option(command)
    return command


def load_settings(flags: dict[str, Any]) -> Settings:
    flags = dict(flags)
    config = flags.pop("config", None)
    instances: list[str] = []
    names: list[str] = []
    for value in flags.pop("service_args", ()) or ():
        (instances if "=" in value else names).append(value)
    if instances:
        flags["services"] = instances
    if names and not flags.get("service_name"):
        flags["service_name"] = names[-1]
    return Settings.load(flags, config=config, environ=environ_settings())


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


def _settings_keys() -> frozenset[str]:
    probe = settings_options(lambda: None)
    return frozenset(param.name for param in probe.__click_params__)  # type: ignore[attr-defined]


_SETTINGS_KEYS = _settings_keys()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="meshgw")
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
    sys.exit(status)


@main.command()
@click.option(
    "--sni", "names", multiple=True, metavar="NAME", help="Explain the route a name takes."
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@with_settings
def routes(
    settings: Settings, flags: dict[str, Any], names: tuple[str, ...], as_json: bool
) -> None:
    """Print the route table for these settings, or explain the route of --sni names."""
    from meshgw.routing import RouteTable
    from meshgw.topology import merge
    from meshgw.wire.names import normalize_host_name

    try:
        topology = merge(
            [settings.static_topology()],
            datacenter=settings.dc,
            domain=settings.domain,
            expose_servers=settings.expose_servers,
        )
    except ValueError as error:
        fail(str(error))
    table = RouteTable.build(topology)
    if names:
        refused = False
        for raw in names:
            name = normalize_host_name(raw)
            if name is None:
                click.echo(f"{raw}: refused: not a valid DNS host name")
                refused = True
                continue
            line = table.explain(name)
            refused |= ": refused:" in line
            click.echo(line)
        sys.exit(1 if refused else 0)
    document = table.to_json()
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(
        f"datacenter {document['datacenter']}, domain {document['domain']}, "
        f"trust domain {document['trust_domain'] or '(unknown)'}"
    )
    for route in document["routes"]:
        endpoints = ", ".join(e["address"] for e in route["endpoints"])
        click.echo(f"  {route['match']:<60} {route['kind']:<18} -> {endpoints}")
    for note in document["notes"]:
        click.echo(f"  note: {note}")


def _add_commands(main: click.Group) -> None:
    # Imported here, after the group exists; each module keeps its heavy imports inside its
    # command, so `meshgw run` pays almost nothing for them.
    from meshgw.bench.cli import bench_command
    from meshgw.demo import demo_command
    from meshgw.doctor import doctor_command
    from meshgw.tls.cli import tls_group

    for command in (tls_group, demo_command, doctor_command, bench_command):
        main.add_command(command)


_add_commands(main)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
