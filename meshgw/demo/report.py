"""The demo's tables and hints, as plain text. Pure: values in, strings out."""

from __future__ import annotations

import re
import shlex
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgw.demo.gateways import Counters, GatewayChild
from meshgw.demo.layout import PRIMARY_DC
from meshgw.demo.peering_round import PeeringPath
from meshgw.demo.protocols import ALPN_PROTOCOLS, ALPN_RPC
from meshgw.demo.servers import PathResult, SimServer


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def rtt_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def bytes_text(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def natural(text: str) -> tuple[str | int, ...]:
    """A sort key with numbers as numbers: dc2 before dc10, node-9 before node-10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _member_key(member: str) -> tuple[str | int, ...]:
    # By datacenter, then node: node-0.dc1 < node-1.dc1 < node-0.dc2.
    node, _, dc = member.partition(".")
    return natural(f"{dc}.{node}")


def _order(result: PathResult) -> tuple[tuple[str | int, ...], ...]:
    return _member_key(result.source), _member_key(result.target)


def _gateway_set(names: Sequence[str]) -> str:
    """dc2/gw-0 and dc2/gw-1 as `dc2/gw-0+gw-1`."""
    if not names:
        return "?"
    dc = names[0].partition("/")[0]
    if all(n.startswith(dc + "/") for n in names):
        return dc + "/" + "+".join(n.partition("/")[2] for n in names)
    return "+".join(names)


def _dc_of(member: str) -> str:
    return member.partition(".")[2]


def verdict(results: Sequence[PathResult]) -> str:
    """One line: how many paths worked, and where the others were headed."""
    ok = sum(r.ok for r in results)
    line = f"{ok} of {len(results)} paths work through the gateways"
    if ok < len(results):
        targets = sorted({r.target for r in results if not r.ok}, key=_member_key)
        shown = ", ".join(targets[:6]) + (", ..." if len(targets) > 6 else "")
        line += f"; {len(results) - ok} FAIL, towards {shown}"
    return line


def pairs_table(results: Sequence[PathResult]) -> str:
    """Paths per source and destination datacenter: how many worked, through which gateways,
    the connections of each ALPN protocol that worked, and the median gossip round trip."""
    groups: dict[tuple[str, str], list[PathResult]] = {}
    for r in results:
        groups.setdefault((_dc_of(r.source), r.target_dc), []).append(r)
    rows = []
    for (source, target), paths in sorted(groups.items(), key=lambda i: natural(" ".join(i[0]))):
        local = sorted({r.local_gateway for r in paths if r.local_gateway != "-"}, key=natural)
        remote = sorted({g for r in paths for g in r.remote_gateways}, key=natural)
        per_alpn = []
        for protocol in ALPN_PROTOCOLS:
            exchanges = [e for r in paths for e in r.exchanges if e.protocol == protocol]
            per_alpn.append(f"{sum(e.ok for e in exchanges)}/{len(exchanges)}")
        rtts = [r.rtt for r in paths if r.ok and r.rtt is not None]
        ok = sum(r.ok for r in paths)
        rtt = rtt_text(statistics.median(rtts) if rtts else None)
        row = [source, target, f"{ok}/{len(paths)}", _gateway_set(local), _gateway_set(remote)]
        rows.append([*row, *per_alpn, rtt])
    headers = ["FROM", "TO", "PATHS OK", "VIA LOCAL", "VIA REMOTE", *ALPN_PROTOCOLS, "RTT"]
    return table(headers, rows)


def members_table(servers: Sequence[SimServer], results: Sequence[PathResult]) -> str:
    """Like `consul members -wan`: each member, alive when every other datacenter reached it."""
    learned = {m.name: m.address for r in results for e in r.exchanges for m in e.learned if r.ok}
    rows = []
    for server in servers:
        into = [r for r in results if r.target == server.member]
        ok = [r for r in into if r.ok]
        status = "alive" if into and len(ok) == len(into) else "failed"
        rtts = [r.rtt for r in ok if r.rtt is not None]
        rows.append(
            [
                server.member,
                learned.get(server.member, server.address),
                status,
                "server",
                server.spec.dc,
                f"{len(ok)}/{len(into)}",
                rtt_text(statistics.median(rtts) if rtts else None),
            ]
        )
    return table(["Node", "Address", "Status", "Type", "DC", "Paths in", "RTT"], rows)


def gateway_state(child: GatewayChild) -> str:
    if child.running:
        return "running"
    if child.stopped_on_purpose:
        return f"stopped ({child.exit_code})"
    return f"DIED ({child.exit_code})"


def gateways_table(
    children: Sequence[GatewayChild],
    counters: Mapping[str, Counters | None],
    in_consul: Mapping[str, str] | None = None,
) -> str:
    """Each gateway: where it listens, its process, how its agent lists it (`in_consul`: the
    status of its registered check, by gateway name; "-" when not registered), its counters."""
    rows = []
    for child in children:
        c = counters.get(child.name)
        if c is None:
            numbers = ["-"] * 6
        else:
            rejected = ", ".join(f"{n} {reason}" for reason, n in c.rejections if n) or "0"
            numbers = [
                str(c.to_local),
                str(c.to_remote),
                str(c.aborted),
                str(c.failovers),
                bytes_text(c.bytes),
                rejected,
            ]
        spec = child.spec
        registered = (in_consul or {}).get(child.name, "-")
        row = [child.name, spec.listen, spec.admin, str(child.pid), gateway_state(child)]
        rows.append([*row, registered, *numbers])
    headers = [
        "GATEWAY",
        "LISTEN",
        "ADMIN",
        "PID",
        "STATE",
        "IN CONSUL",
        "TO LOCAL",
        "TO REMOTE",
        "ABORTED",
        "FAILOVERS",
        "BYTES",
        "REJECTED",
    ]
    return table(headers, rows)


def failed_paths(results: Sequence[PathResult]) -> list[str]:
    return [
        f"{r.source} -> {r.target} via {r.local_gateway}: {'; '.join(r.errors)}"
        for r in sorted(results, key=_order)
        if not r.ok
    ]


COUNTERS_GREP = "^meshgw_(connections|bytes|rejections)_total"


def meshgw_command() -> list[str]:
    """How to run this very meshgw from a shell: `meshgw` when PATH finds this one, else the
    full path of the one beside this Python, else `python -m meshgw`."""
    beside = Path(sys.executable).with_name("meshgw")
    if not beside.exists():
        return [sys.executable, "-m", "meshgw"]
    found = shutil.which("meshgw")
    if found is not None and Path(found).resolve() == beside.resolve():
        return ["meshgw"]
    return [str(beside)]


@dataclass(frozen=True, slots=True)
class Hints:
    """What the commands to try by hand name."""

    agent: str  # the local datacenter's agent URL
    ca: Path  # the servers' CA
    client_cert: tuple[Path, Path]  # a local server's certificate and key
    gateway: GatewayChild
    target_sni: str  # a remote server's name
    local_sni: str  # a local server's name


def doctor_command(hints: Hints) -> list[str]:
    cert, key = hints.client_cert
    return [
        *meshgw_command(),
        "doctor",
        "--consul",
        hints.agent,
        "--server-ca-file",
        str(hints.ca),
        "--cert",
        str(cert),
        "--key",
        str(key),
    ]


def try_by_hand(hints: Hints) -> str:
    """Commands a person can paste while the demo runs."""
    spec = hints.gateway.spec
    cert, key = hints.client_cert
    target = hints.target_sni
    openssl = ["openssl", "s_client", "-connect", spec.listen, "-servername", target]
    openssl += ["-verify_hostname", target, "-CAfile", str(hints.ca), "-cert", str(cert)]
    openssl += ["-key", str(key), "-alpn", ALPN_RPC, "-quiet"]
    routes = [*meshgw_command(), "routes", "--config", str(spec.config)]
    routes += ["--sni", target, "--sni", hints.local_sni]
    lines = [
        f"# The federation as {spec.dc}'s agent shows it (the WAN federation checklist), and a",
        f"# TLS handshake with every remote server through {spec.dc}'s gateways:",
        shlex.join(doctor_command(hints)),
        f"# What {spec.name} routes, and what it learned from its agent:",
        f"curl -s http://{spec.admin}/v1/routes",
        f"curl -s http://{spec.admin}/v1/topology",
        f"# The agent's side: {spec.dc}'s gateways as registered, and the federation states:",
        f"curl -s {hints.agent}/v1/health/service/mesh-gateway",
        f"curl -s {hints.agent}/v1/internal/federation-states",
        f"# How a name is routed: {spec.name}'s settings, and what its agent tells them:",
        shlex.join(routes),
        f"# An RPC through {spec.name} to {target}; then type",
        "# Status.Ping, Status.Leader or Catalog.ListDatacenters:",
        shlex.join(openssl),
        f"# The counters of {spec.name}, and its access log:",
        f"curl -s http://{spec.admin}/metrics | grep -E '{COUNTERS_GREP}'",
        f"tail -f {spec.log}",
    ]
    return "\n".join("  " + line for line in lines)


def banner(datacenters: int, servers: int, gateways: int, root: Path) -> str:
    return (
        f"meshgw demo: {datacenters} datacenters x {servers} servers x {gateways} gateways "
        f"on loopback, primary {PRIMARY_DC}\n  files: {root}"
    )


# --- the peering story ---------------------------------------------------------------------------


def peerings_table(peerings: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Each cluster's peerings, as `consul peering list` and `/v1/peering/<name>` show them."""
    rows = []
    for cluster, peering in peerings:
        status = peering.get("StreamStatus") or {}
        rows.append(
            [
                cluster,
                str(peering.get("Name")),
                str(peering.get("State")),
                str(peering.get("PeerServerName") or "-"),
                ",".join(peering.get("PeerServerAddresses") or []) or "-",
                ", ".join(status.get("ImportedServices") or []) or "-",
                ", ".join(status.get("ExportedServices") or []) or "-",
            ]
        )
    headers = ["CLUSTER", "PEERING", "STATE", "PEER SERVER NAME", "PEER SERVER ADDRESSES"]
    return table([*headers, "IMPORTED", "EXPORTED"], rows)


PATH_KINDS = {
    "peering": "peering dial",
    "service": "tcp service",
    "l7": "http export",
}


def peering_verdict(paths: Sequence[PeeringPath]) -> str:
    ok = sum(p.ok for p in paths)
    counts = {kind: sum(p.kind == kind for p in paths) for kind in PATH_KINDS}
    line = (
        f"{ok} of {len(paths)} connections went as they should through the gateways: "
        f"{counts['peering']} peering dials (both ways), {counts['service']} to the imported "
        f"TCP service, {counts['l7']} to the HTTP export, refused"
    )
    return line if ok == len(paths) else line + f"; {len(paths) - ok} did NOT"


def peering_paths_table(paths: Sequence[PeeringPath], names: Mapping[str, str]) -> str:
    """One line per connection: `names` says what each dialed name is (SNIs are long)."""
    rows = [
        [
            PATH_KINDS.get(p.kind, p.kind),
            p.source,
            p.local_gateway,
            p.remote_gateway,
            names.get(p.target, p.target),
            ("ok: " if p.ok else "WRONG: ") + p.detail,
        ]
        for p in paths
    ]
    headers = ["CONNECTION", "FROM", "LOCAL GATEWAY", "PEER'S GATEWAY", "TO", "RESULT"]
    return table(headers, rows)
