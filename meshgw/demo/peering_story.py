"""`meshgw demo --peering`'s story: start two peered clusters, dial every kind of peering
connection through the gateways, show the route each took, then wait (or, with --check, exit
0 only if every connection went as it should)."""

from __future__ import annotations

import asyncio
import shlex
import time

from meshgw.demo import report
from meshgw.demo.agents import registration_status
from meshgw.demo.console import EXIT_FAILED, EXIT_OK, say, watch
from meshgw.demo.peering import L7_SERVICE, TCP_SERVICE, PeeringDemo
from meshgw.demo.peering_round import peering_round


async def peering_story(demo: PeeringDemo, check: bool, interrupted: asyncio.Event) -> int:
    began = time.monotonic()
    shape = demo.shape
    say(
        f"meshgw demo --peering: two clusters of {shape.servers_per_dc} servers and "
        f"{shape.gateways_per_dc} gateways each, peered through meshgw gateways on loopback"
        f"\n  files: {demo.root}"
    )
    await demo.start(lambda line: say("  " + line))
    say(
        "  discovery: every gateway registered with its cluster's agent and learned from it "
        f"the peerings, the exports and the imports ({time.monotonic() - began:.1f} s in all)"
    )
    say("\nPeerings (as each cluster's agent lists them: /v1/peering/<name>)")
    say(report.peerings_table(demo.peerings()))

    exporter, importer = demo.exporter, demo.importer
    say(
        f"\nRound: each cluster's leader dials the other's servers through each of its gateways; "
        f"{importer.name}'s web dials {TCP_SERVICE} and {L7_SERVICE} through each of its gateways"
    )
    paths = await peering_round(demo)
    counters = await demo.counters()
    names = {
        exporter.peering_name: f"{exporter.name} servers",
        importer.peering_name: f"{importer.name} servers",
        demo.service_sni(TCP_SERVICE): f"{TCP_SERVICE} (tcp)",
        demo.service_sni(L7_SERVICE): f"{L7_SERVICE} (http)",
    }
    say("\n" + report.peering_verdict(paths))
    say("\nConnections (the route each took, from the local gateway's access log)")
    say(report.peering_paths_table(paths, names))
    say("  the names dialed (SNI):")
    for name, meaning in names.items():
        say(f"    {meaning:<20} {name}")
    in_consul = {
        child.name: registration_status(cluster.agent, child.spec.service_id)
        for cluster in demo.clusters
        if cluster.agent is not None
        for child in cluster.gateways
    }
    say(
        "\nGateways (IN CONSUL: as their cluster's agent lists them; counters from each one's "
        "/metrics; peered_l7: an L7 export refused)"
    )
    say(report.gateways_table(demo.children, counters, in_consul))

    if check:
        elapsed = time.monotonic() - began
        wrong = [p for p in paths if not p.ok]
        if wrong:
            say(f"\ncheck FAILED after {elapsed:.1f} s: {len(wrong)} connections went wrong")
            return EXIT_FAILED
        say(f"\ncheck passed in {elapsed:.1f} s: {len(paths)}/{len(paths)} connections went right")
        return EXIT_OK
    say("\nTry it by hand (the demo keeps running; Ctrl-C stops every gateway and exits):")
    say("\n".join("  " + line for line in try_by_hand(demo)))
    await watch(demo.children, interrupted)
    return EXIT_OK


def try_by_hand(demo: PeeringDemo) -> list[str]:
    """Commands a person can paste while the peering demo runs."""
    exporter, importer = demo.exporter, demo.importer
    gateway = importer.gateways[0]
    spec = gateway.spec
    db, api = demo.service_sni(TCP_SERVICE), demo.service_sni(L7_SERVICE)
    ca = str(exporter.ca)
    peers = exporter.peering_name
    meshgw = report.meshgw_command()
    routes = [*meshgw, "routes", "--config", str(spec.config)]
    routes += ["--sni", db, "--sni", api, "--sni", exporter.peering_name]
    openssl = ["openssl", "s_client", "-connect", spec.listen, "-CAfile", ca, "-quiet"]
    return [
        f"# {importer.name}'s peering, and the {TCP_SERVICE} instances it imports (at "
        f"{exporter.name}'s gateways, PeerMeta.SNI set), as its agent lists them:",
        f"curl -s {importer.url}/v1/peering/{exporter.name}",
        f"curl -s '{importer.url}/v1/health/connect/{TCP_SERVICE}?peer={exporter.name}'",
        f"# What {spec.name} routes, and what it learned from its agent:",
        f"curl -s http://{spec.admin}/v1/routes",
        f"curl -s http://{spec.admin}/v1/topology",
        f"# How the names are routed: {spec.name}'s settings, and what its agent tells them:",
        shlex.join(routes),
        f"# {TCP_SERVICE} through both clusters' gateways (type a line; TLS is end to end):",
        shlex.join([*openssl, "-servername", db, "-verify_hostname", db]),
        f"# {L7_SERVICE}, exported as http: {exporter.name}'s gateway refuses it (peered_l7):",
        shlex.join([*openssl, "-servername", api]),
        f"# {exporter.name}'s servers, as {importer.name}'s leader dials them (gRPC, ALPN h2):",
        shlex.join([*openssl, "-servername", peers, "-verify_hostname", peers, "-alpn", "h2"]),
        f"# The refusals counted by {exporter.name}'s gateways:",
        *(
            f"curl -s http://{child.spec.admin}/metrics | grep peered_l7"
            for child in exporter.gateways
        ),
        f"tail -f {spec.log}",
    ]
