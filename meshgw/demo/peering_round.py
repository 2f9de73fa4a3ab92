"""A round of the peering demo: every kind of peering connection through the gateways, the route
each took (from the local gateway's access log), and each one's verdict."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from meshgw.demo.gateways import GatewayChild, fetch_metrics, parse_counters
from meshgw.demo.layout import service_host
from meshgw.demo.peer_endpoints import (
    ALPN_H2,
    Dial,
    Talk,
    ask_service,
    client_context,
    dial,
    open_peering_stream,
)
from meshgw.demo.peering import CLIENT, L7_SERVICE, TCP_SERVICE, Cluster, PeeringDemo

DIAL_TIMEOUT = 5.0
ACCESS_LOG_WAIT = 3.0  # for the local gateway's access line after the connection closed


@dataclass(frozen=True, slots=True)
class Caller:
    """Who dials: a name for the tables, and the address it dials from."""

    name: str
    host: str


@dataclass(slots=True)
class PeeringPath:
    """One connection of a round and the route it took."""

    kind: str  # "peering", "service" or "l7"
    source: str  # cluster/node
    local_gateway: str
    target: str  # the name it dialed
    far: str  # the cluster it should reach
    dialed: Dial
    remote_gateway: str = "?"  # from the local gateway's access log
    ok: bool = False
    detail: str = ""


async def peering_round(demo: PeeringDemo) -> list[PeeringPath]:
    """Each cluster's leader dials the other's servers through each of its gateways; the
    importer's client dials the TCP and the L7 export through each of its gateways."""
    jobs = []
    for cluster in demo.clusters:
        leader, other = cluster.servers[0], demo.other(cluster)
        caller = Caller(f"{cluster.name}/{leader.name}", leader.host)
        context = client_context(other.ca, [ALPN_H2])
        for child in cluster.gateways:
            how = (context, open_peering_stream)
            jobs.append(_path(demo, "peering", caller, child, other, other.peering_name, how))
    importer, exporter = demo.importer, demo.exporter
    web = Caller(f"{importer.name}/{CLIENT}", service_host(importer.index, 0, demo.spread))
    context = client_context(exporter.ca, [])
    for kind, service in (("service", TCP_SERVICE), ("l7", L7_SERVICE)):
        sni = demo.service_sni(service)
        for child in importer.gateways:
            jobs.append(_path(demo, kind, web, child, exporter, sni, (context, ask_service)))
    paths = list(await asyncio.gather(*jobs))
    demo.l7_dials += sum(p.kind == "l7" for p in paths)
    refused = await peered_l7(demo)
    for path in paths:
        _judge(demo, path, refused)
    return paths


async def _path(
    demo: PeeringDemo,
    kind: str,
    caller: Caller,
    child: GatewayChild,
    far: Cluster,
    sni: str,
    how: tuple[ssl.SSLContext, Talk],
) -> PeeringPath:
    """One connection through `child`, and which gateway it went on to (its access log)."""
    spec = child.spec
    context, talk = how
    dialed = await dial(
        (spec.host, spec.port), sni, context, talk, local_host=caller.host, timeout=DIAL_TIMEOUT
    )
    path = PeeringPath(kind, caller.name, child.name, sni, far.name, dialed)
    if dialed.client:
        upstream = await child.upstream_of(dialed.client, ACCESS_LOG_WAIT)
        path.remote_gateway = demo.gateway_named(upstream or "")
    return path


def _judge(demo: PeeringDemo, path: PeeringPath, refused: int) -> None:
    """Answered by the right far end through the far cluster's gateways; or, for the L7 export,
    sent to the exporter's gateways, refused there, counted, and never connected onwards."""
    far = next(c for c in demo.clusters if c.name == path.far)
    through_far = path.remote_gateway in {g.name for g in far.gateways}
    dialed = path.dialed
    if path.kind == "l7":
        untouched = far.instances[L7_SERVICE].accepted == 0
        path.ok = not dialed.ok and through_far and untouched and refused == demo.l7_dials
        path.detail = (
            f"refused ({dialed.error}): meshgw never terminates TLS; {refused} counted peered_l7"
            if not dialed.ok
            else f"answered by {dialed.answered}: should have been refused"
        )
    elif not dialed.ok:
        path.detail = f"FAILED: {dialed.error}"
    else:
        right = path.kind != "service" or dialed.answered == far.instances[TCP_SERVICE].name
        path.ok = through_far and right
        path.detail = f"answered by {far.name}/{dialed.answered}"
        path.detail += f", ALPN {dialed.alpn}" if dialed.alpn else ""
        if not through_far:
            path.detail += f"; but not through {far.name}'s gateways"
    if not through_far and path.kind == "l7":
        path.detail += f"; but not through {far.name}'s gateways"


async def peered_l7(demo: PeeringDemo) -> int:
    """The exporter's gateways' count of refused L7 exports."""
    total = 0
    for child in demo.exporter.gateways:
        text = await fetch_metrics(child.spec.admin)
        total += dict(parse_counters(text).rejections).get("peered_l7", 0)
    return total
