"""The demo's tables and hints, as plain text. Pure: values in, strings out."""

from __future__ import annotations

import re
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path

from meshgw.demo.gateways import Counters, GatewayChild
from meshgw.demo.layout import PRIMARY_DC
from meshgw.demo.protocols import ALPN_RPC
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


def paths_table(results: Sequence[PathResult]) -> str:
    rows = []
    for r in sorted(results, key=_order):
        outcome = "ok" if r.ok else "FAILED " + "; ".join(r.errors)
        remote = _gateway_set(r.remote_gateways)
        rows.append([r.source, r.target, r.local_gateway, remote, rtt_text(r.rtt), outcome])
    return table(["FROM", "TO", "LOCAL GATEWAY", "REMOTE GATEWAY", "RTT", "RESULT"], rows)


def routes_summary(results: Sequence[PathResult]) -> str:
    """Paths per local gateway and destination datacenter, and the remote gateways that carried
    them: the short form of the paths table."""
    groups: dict[tuple[str, str], list[PathResult]] = {}
    for r in results:
        groups.setdefault((r.local_gateway, r.target_dc), []).append(r)
    rows = []
    for (local, dc), paths in sorted(groups.items(), key=lambda item: natural(" ".join(item[0]))):
        remote = sorted({g for r in paths for g in r.remote_gateways})
        ok = sum(r.ok for r in paths)
        rows.append([local, dc, f"{ok}/{len(paths)}", _gateway_set(remote)])
    return table(["LOCAL GATEWAY", "TO DC", "PATHS OK", "REMOTE GATEWAYS"], rows)


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


def gateways_table(children: Sequence[GatewayChild], counters: dict[str, Counters | None]) -> str:
    rows = []
    for child in children:
        if child.running:
            state = "running"
        elif child.stopped_on_purpose:
            state = f"stopped ({child.exit_code})"
        else:
            state = f"DIED ({child.exit_code})"
        c = counters.get(child.name)
        if c is None:
            numbers = ["-"] * 6
        else:
            rejected = sum(n for _, n in c.rejections)
            numbers = [
                str(c.to_local),
                str(c.to_remote),
                str(c.aborted),
                str(c.failovers),
                str(rejected),
                bytes_text(c.bytes),
            ]
        spec = child.spec
        rows.append([child.name, spec.listen, spec.admin, str(child.pid), state, *numbers])
    headers = [
        "GATEWAY",
        "LISTEN",
        "ADMIN",
        "PID",
        "STATE",
        "TO LOCAL",
        "TO REMOTE",
        "ABORTED",
        "FAILOVERS",
        "REJECTED",
        "BYTES",
    ]
    return table(headers, rows)


def failed_paths(results: Sequence[PathResult]) -> list[str]:
    return [
        f"{r.source} -> {r.target} via {r.local_gateway}: {'; '.join(r.errors)}"
        for r in sorted(results, key=_order)
        if not r.ok
    ]


COUNTERS_GREP = "^meshgw_(connections|bytes|rejections)_total"


def try_by_hand(
    ca: Path,
    client_cert: tuple[Path, Path],
    gateway: GatewayChild,
    target_sni: str,
    local_sni: str,
) -> str:
    """Commands a person can paste while the demo runs."""
    spec = gateway.spec
    cert, key = client_cert
    openssl = [
        "openssl",
        "s_client",
        "-connect",
        spec.listen,
        "-servername",
        target_sni,
        "-verify_hostname",
        target_sni,
        "-CAfile",
        str(ca),
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-alpn",
        ALPN_RPC,
        "-quiet",
    ]
    routes = ["meshgw", "routes", "--config", str(spec.config), "--sni", target_sni]
    routes += ["--sni", local_sni]
    lines = [
        f"# An RPC through {spec.name} ({spec.dc}'s gateway) to {target_sni}; then type",
        "# Status.Ping, Status.Leader or Catalog.ListDatacenters:",
        shlex.join(openssl),
        f"# The route table of {spec.name}, and its counters:",
        f"curl -s http://{spec.admin}/v1/routes",
        f"curl -s http://{spec.admin}/metrics | grep -E '{COUNTERS_GREP}'",
        "# How a name is routed, from the same config file:",
        shlex.join(routes),
        "# Its access log:",
        f"tail -f {spec.log}",
    ]
    return "\n".join("  " + line for line in lines)


def banner(datacenters: int, servers: int, gateways: int, root: Path) -> str:
    return (
        f"meshgw demo: {datacenters} datacenters x {servers} servers x {gateways} gateways "
        f"on loopback, primary {PRIMARY_DC}\n  files: {root}"
    )
