"""The `meshgw doctor` click command: flags to `DoctorOptions`, `gather`, print, exit status."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from meshgw.addresses import parse_address
from meshgw.doctor.checks import Status
from meshgw.doctor.gateway_settings import load_gateway_settings
from meshgw.doctor.runner import gather, render_json, render_text
from meshgw.doctor.tls import DoctorOptions, tls_context
from meshgw.durations import parse_duration
from meshgw.settings import Settings

__all__ = ["doctor_command"]

# --- the command ----------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _usage(message: str) -> None:
    click.echo(f"meshgw: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _options(
    gateways: Sequence[str],
    server_ca_file: str | None,
    cert: str | None,
    key: str | None,
    timeout: str,
) -> DoctorOptions:
    """Flags → options; raises ValueError with a one-line message naming the flag."""
    addresses = []
    for text in gateways:
        try:
            address = parse_address(text)
        except ValueError as error:
            raise ValueError(f"--gateway {text!r}: {error}") from None
        addresses.append((address.host, address.port))
    try:
        seconds = parse_duration(timeout)
    except ValueError as error:
        raise ValueError(f"--timeout: {error}") from None
    if seconds <= 0:
        raise ValueError(f"--timeout {timeout!r}: give a positive number of seconds")
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together: give both, or neither")
    if cert is not None and server_ca_file is None:
        raise ValueError(
            "--cert/--key need --server-ca-file: the TLS check verifies the servers against that CA"
        )
    for flag, path in (("--server-ca-file", server_ca_file), ("--cert", cert), ("--key", key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return DoctorOptions(tuple(addresses), server_ca_file, cert, key, seconds)


@click.command("doctor")
@click.option(
    "--consul",
    metavar="URL",
    help="Consul agent HTTP address [CONSUL_HTTP_ADDR, else http://127.0.0.1:8500].",
)
@click.option(
    "--token-file",
    metavar="PATH",
    help="File holding the ACL token [CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE].",
)
@click.option(
    "--ca-file",
    metavar="PATH",
    help="CA of the agent's HTTPS certificate, as for meshgw run and Consul's -ca-file "
    "[CONSUL_CACERT].",
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    metavar="HOST:PORT",
    help="Local gateway to run the TLS and peering checks through (repeatable) [the local "
    "datacenter's wanfed gateways from the catalog, and for peering all its mesh gateways, at "
    "their LAN address].",
)
@click.option(
    "--server-ca-file",
    metavar="PATH",
    help="CA of the Consul servers' RPC certificates (consul-agent-ca.pem), for the TLS check "
    "through the gateway; without it that check is skipped.",
)
@click.option(
    "--cert",
    metavar="PATH",
    help="Client certificate for the TLS check: a server certificate of the local datacenter, "
    "as a Consul server presents.",
)
@click.option("--key", metavar="PATH", help="Private key of --cert.")
@click.option(
    "--timeout",
    metavar="SECONDS",
    default="5",
    show_default=True,
    help="Bound on each Consul request, TLS handshake and peering probe.",
)
@click.option(
    "--config",
    metavar="PATH",
    help="The gateway's settings file, as given to meshgw run --config: check what they leave "
    "unroutable (MESHGW_* variables count too, as for meshgw run); their consul, token_file "
    "and ca_file stand in for the flags not given.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON list of {check, subject, status (pass, warn, fail, skip), detail, fix}.",
)
def doctor_command(
    consul: str | None,
    token_file: str | None,
    ca_file: str | None,
    gateways: tuple[str, ...],
    server_ca_file: str | None,
    cert: str | None,
    key: str | None,
    timeout: str,
    config: str | None,
    as_json: bool,
) -> None:
    """Check a WAN federation via mesh gateways, the way its bootstrap checklist does.

    Asks the Consul agent (and, through a local gateway, the remote servers) whether every
    datacenter has healthy wanfed gateways with WAN addresses, federation states, working ?dc=
    forwarding, dot-free names and server certificates valid for their names; given the
    gateway's settings (--config, MESHGW_*), also what they leave unroutable. For cluster
    peering: each peering's state, and whether every local mesh gateway forwards the names
    peering traffic carries. Exit status: 0 when nothing failed (skips and warnings allowed), 1
    when a check failed, 2 for a usage error.
    """
    from meshgw.control.consul.config import ConsulConfig
    from meshgw.control.consul.errors import ConsulConfigError

    gateway_settings = load_gateway_settings(config, os.environ)
    names: dict[str, str] = {}  # where a value came from, for messages
    own = gateway_settings[0] if gateway_settings is not None else None
    if gateway_settings is not None and isinstance(own, Settings):
        # Ask the agent the gateway asks, as it asks it, unless told otherwise.
        source = gateway_settings[1]
        if consul is None and own.consul is not None:
            consul, names["address"] = own.consul, f"consul of {source}"
        if token_file is None and own.token_file is not None:
            token_file, names["token_file"] = own.token_file, f"token_file of {source}"
        if ca_file is None and own.ca_file is not None:
            ca_file, names["ca_file"] = own.ca_file, f"ca_file of {source}"
    try:
        if config is not None and not Path(config).is_file():
            raise ValueError(f"--config {config}: no such file")
        consul_config = ConsulConfig.from_env(
            address=consul, token_file=token_file, ca_file=ca_file, names=names
        )
        options = _options(gateways, server_ca_file, cert, key, timeout)
        context = tls_context(options) if options.server_ca_file is not None else None
    except (ConsulConfigError, ValueError) as error:
        _usage(str(error))
        return
    try:
        checks = asyncio.run(gather(consul_config, options, context, gateway_settings))
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(render_json(checks) if as_json else render_text(checks))
    sys.exit(EXIT_FAILED if any(c.status is Status.FAIL for c in checks) else EXIT_OK)
