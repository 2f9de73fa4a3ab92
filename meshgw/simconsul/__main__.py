"""Serve a simulated Consul agent by hand: ``python -m meshgw.simconsul --port 8500``.

``--state FILE`` loads a JSON document first (see `load_state`); the first line on stdout names
the URL it listens on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from meshgw.simconsul.server import SimConsul


def load_state(sim: SimConsul, state: Mapping[str, Any]) -> None:
    """Apply a JSON state: {"datacenters": [...], "servers": [{"node","address","port"?}],
    "gateways": {"dc2": [{"node","address","port"?,"wan"?: "host:port","status"?}]},
    "services": [{"name","node","address","port"}], "trust_domain": "...",
    "config_entries": [{"Kind": ..., "Name": ..., ...}], "peerings": [{"name",
    "peer_server_name"?, "peer_server_addresses"?, "state"?}]}."""
    if "datacenters" in state:
        sim.catalog.set_datacenters(state["datacenters"])
    for server in state.get("servers", []):
        sim.servers.add(server["node"], server["address"], port=server.get("port", 8300))
    for dc, gateways in state.get("gateways", {}).items():
        for gw in gateways:
            wan = None
            if gw.get("wan"):
                host, _, port = gw["wan"].rpartition(":")
                wan = (host, int(port))
            sim.gateways.add(
                dc,
                gw["node"],
                gw["address"],
                gw.get("port", 8443),
                wan=wan,
                status=gw.get("status", "passing"),
            )
    for svc in state.get("services", []):
        sim.services.add(svc["name"], svc["node"], svc["address"], svc["port"])
    if state.get("trust_domain"):
        sim.ca.set(trust_domain=state["trust_domain"])
    for entry in state.get("config_entries", []):
        sim.config.put(entry)
    for peering in state.get("peerings", []):
        sim.peerings.add(
            peering["name"],
            state=peering.get("state", "ACTIVE"),
            peer_server_name=peering.get("peer_server_name", ""),
            peer_server_addresses=peering.get("peer_server_addresses", ()),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a simulated Consul agent HTTP API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--dc", default="dc1")
    parser.add_argument("--state", help="JSON file with the initial state (see load_state)")
    parser.add_argument(
        "--checks-passing", action="store_true", help="registered checks start passing"
    )
    args = parser.parse_args(argv)

    async def serve() -> None:
        sim = SimConsul(
            args.dc, initial_check_status="passing" if args.checks_passing else "critical"
        )
        if args.state:
            with open(args.state, encoding="utf-8") as handle:
                load_state(sim, json.load(handle))
        await sim.start(args.host, args.port)
        try:
            print(f"simulated consul for {args.dc} at {sim.url}", flush=True)
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
