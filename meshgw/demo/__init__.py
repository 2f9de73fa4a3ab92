"""`meshgw demo`: a Consul WAN federation on loopback, routed by real meshgw gateways.

Only the click command lives here, so that importing it (cli.py does, at start) costs nothing;
the demo itself is imported when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["demo_command"]

# The same limits as meshgw.demo.layout's MAX_* (not imported here: it loads cryptography, and
# this module is imported by every meshgw command); tests/test_demo.py checks they agree.
MAX_DATACENTERS = 50
MAX_SERVERS_PER_DC = 50
MAX_GATEWAYS_PER_DC = 9


@click.command("demo")
@click.option(
    "--dcs",
    "datacenters",
    type=click.IntRange(2, MAX_DATACENTERS),
    default=3,
    show_default=True,
    help="Datacenters; dc1 is the primary.",
)
@click.option(
    "--servers-per-dc",
    type=click.IntRange(1, MAX_SERVERS_PER_DC),
    default=3,
    show_default=True,
    help="Simulated Consul servers per datacenter (all in the demo's own process).",
)
@click.option(
    "--gateways-per-dc",
    type=click.IntRange(1, MAX_GATEWAYS_PER_DC),
    default=2,
    show_default=True,
    help="meshgw gateways per datacenter, each a `meshgw run` process.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep certificates, gateway configs and logs in this new or empty folder "
    "[default: a temporary folder, removed on exit].",
)
@click.option(
    "--check",
    is_flag=True,
    help="Verify every path, stop one gateway per datacenter, verify again, and exit: 0 only "
    "if every path worked (with --peering: verify every connection once).",
)
@click.option(
    "--peering",
    is_flag=True,
    help="Instead: two clusters peered through meshgw gateways (peering dials both ways, an "
    "imported TCP service, an HTTP export refused).",
)
@click.pass_context
def demo_command(
    context: click.Context,
    datacenters: int,
    servers_per_dc: int,
    gateways_per_dc: int,
    directory: Path | None,
    check: bool,
    peering: bool,
) -> None:
    """Run a Consul WAN federation on loopback through meshgw gateways.

    Each datacenter has simulated Consul servers (mTLS, ALPN rpc-multi and WAN gossip packet and
    stream), a simulated Consul agent API, and real gateway processes that register with their
    agent and learn the servers and the other datacenters' gateways from it. Every server dials
    every server of the other datacenters through a gateway of its own, as Consul does; the demo
    prints the WAN members, the paths by datacenter pair and each gateway's counters, then
    commands to try by hand (meshgw doctor among them), and runs until Ctrl-C.
    """
    from meshgw.demo.federation import Shape
    from meshgw.demo.runner import DemoOptions, run

    given = context.get_parameter_source("datacenters") is not click.core.ParameterSource.DEFAULT
    if peering and given:
        raise click.UsageError("--peering runs two clusters of one datacenter each: drop --dcs")
    if check and gateways_per_dc < 2 and not peering:
        raise click.UsageError(
            "--check stops one gateway per datacenter to show failover: "
            "use --gateways-per-dc 2 or more"
        )
    shape = Shape(2 if peering else datacenters, servers_per_dc, gateways_per_dc)
    sys.exit(run(DemoOptions(shape, directory, check, peering)))
