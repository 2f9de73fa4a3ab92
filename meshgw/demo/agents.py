"""The demo's Consul agents: one simulated agent HTTP API (`SimConsul`) per datacenter.

Why one per datacenter: an operator (and `meshgw doctor`, and each gateway) talks to its own
datacenter's agent, which answers for its datacenter and forwards `?dc=` requests to the others.
Each agent therefore holds its own datacenter's catalog, where its gateways register, and a copy
of every other datacenter's catalog, brought up to date the moment that datacenter's catalog
changes: what the servers' `?dc=` forwarding would fetch. (The copy is made in this process, not
through the gateways: the demo's servers speak only a stand-in of Consul's RPC.) Each agent's
leader anti-entropy then writes the federation state of every datacenter from those catalogs,
as the replicated federation states hold them (docs/consul.md#federation-states).

The servers are registered as the `consul` service at their RPC addresses; every agent shares one
trust domain (one federation, one Connect CA). New checks start passing, so that a gateway is
usable as soon as it registers; the agent then probes each gateway's TCP check.

All agents run on the demo's own event loop, beside the simulated servers.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshgw.control.catalog import WAN_FEDERATION_META, lan_address
from meshgw.demo.layout import AGENT_PORT, DOMAIN, free_port
from meshgw.simconsul import SimConsul

AGENT_NODE = "gateways"  # the node of each datacenter's agent, where its gateways register
CHECK_INTERVAL = 10.0  # the agents probe registered TCP checks this often, as registered


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """A Consul server as the `consul` service lists it."""

    node: str
    host: str
    port: int
    grpc_tls_port: int | None = None


def new_trust_domain() -> str:
    """`<cluster id>.consul`, as a Connect CA names its trust domain."""
    return f"{uuid.uuid4()}.consul"


async def start_agent(
    dc: str, host: str, *, primary: str, trust_domain: str, well_known_port: bool
) -> SimConsul:
    """One agent listening on host, on Consul's port 8500 when it is free."""
    sim = SimConsul(
        dc,
        node_name=AGENT_NODE,
        node_address=host,
        domain=f"{DOMAIN}.",
        primary_datacenter=primary,
        servers=0,
        trust_domain=trust_domain,
        initial_check_status="passing",
        check_interval=CHECK_INTERVAL,
    )
    port = free_port(host, AGENT_PORT if well_known_port else None)
    try:
        return await sim.start(host, port)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
    await sim.stop()  # taken between the look and the bind: let the kernel pick
    return await sim.start(host, 0)


class Agents:
    """The agents of one WAN federation, keyed by datacenter; the first datacenter is primary."""

    def __init__(self, datacenters: Iterable[str], trust_domain: str | None = None) -> None:
        self.datacenters = tuple(datacenters)
        self.primary = self.datacenters[0]
        self.trust_domain = trust_domain or new_trust_domain()
        self.sims: dict[str, SimConsul] = {}
        self._copied: dict[str, int] = {}  # datacenter → catalog stamp last copied to the others
        self._pending: set[str] = set()

    async def start(
        self,
        hosts: Mapping[str, str],
        servers: Mapping[str, list[ServerEntry]],
        well_known_ports: bool,
    ) -> None:
        """Start an agent per datacenter on `hosts[dc]`, its servers registered."""
        for dc in self.datacenters:
            sim = await start_agent(
                dc,
                hosts[dc],
                primary=self.primary,
                trust_domain=self.trust_domain,
                well_known_port=well_known_ports,
            )
            self.sims[dc] = sim
            # Its own datacenter first, as /v1/catalog/datacenters lists them (by RTT).
            sim.catalog.set_datacenters([dc, *self.datacenters])
            for other, entries in servers.items():
                for entry in entries:
                    sim.servers.add(
                        entry.node,
                        entry.host,
                        port=entry.port,
                        dc=other,
                        grpc_tls_port=entry.grpc_tls_port,
                    )
            sim.catalog.listeners.append(lambda dc=dc: self._changed(dc))  # type: ignore[misc]
        for dc in self.datacenters:
            self._copied[dc] = self.sims[dc].raft.stamp(("catalog", dc))

    def url(self, dc: str) -> str:
        return self.sims[dc].url

    async def stop(self) -> None:
        for sim in self.sims.values():
            await sim.stop()

    # --- ?dc= forwarding ----------------------------------------------------------------------

    def _changed(self, dc: str) -> None:
        # Called inside the catalog's write (its lock held): copy on the next loop turn, once
        # for any number of writes.
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._copy_pending)
        self._pending.add(dc)

    def _copy_pending(self) -> None:
        pending, self._pending = self._pending, set()
        for dc in sorted(pending):
            self.copy_catalog(dc)

    def copy_catalog(self, dc: str) -> None:
        """Bring every other agent's copy of dc's catalog in line with dc's own agent."""
        source = self.sims[dc]
        stamp = source.raft.stamp(("catalog", dc))
        if self._copied.get(dc) == stamp:
            return  # a copy written into dc's agent (another datacenter's): nothing of dc's own
        self._copied[dc] = stamp
        with source.raft.lock:
            state = source.catalog.dc()
            entries = {
                key: source.catalog.render(state, inst) for key, inst in state.instances.items()
            }
            bare_nodes = {
                name: node.json
                for name, node in state.nodes.items()
                if not any(key[0] == name for key in entries)
            }
        for other, sim in self.sims.items():
            if other == dc:
                continue
            for name, body in bare_nodes.items():
                sim.catalog.ensure_node(dc, name, str(body["Address"]), body=body)
            for entry in entries.values():
                sim.catalog.put(dc, entry)
            with sim.raft.lock:
                gone = [key for key in sim.catalog.dc(dc).instances if key not in entries]
            for node, service_id in gone:
                sim.catalog.drop(dc, node, service_id)

    # --- what the servers and the tests read --------------------------------------------------

    def gateway_locator(self, dc: str) -> list[str]:
        """The gateways dc's servers dial, as Consul's gateway locator picks them from the
        federation state in their own store: wanfed meta, no critical check, LAN address
        (docs/consul.md#gateway-locator)."""
        state = self.sims[dc].federation.state(dc) or {}
        found = []
        for entry in state.get("MeshGateways") or []:
            meta = entry["Service"].get("Meta") or {}
            checks = entry.get("Checks") or []
            if meta.get(WAN_FEDERATION_META) != "1" or any(
                c.get("Status") == "critical" for c in checks
            ):
                continue
            address = lan_address(entry)
            if address is not None:
                found.append(f"{address[0]}:{address[1]}")
        return found

    def registrations(self, dc: str) -> dict[str, dict[str, Any]]:
        """The services registered with dc's agent, by ID (as /v1/agent/services)."""
        sim = self.sims[dc]
        with sim.raft.lock:
            ids = list(sim.agent.services)
        return {sid: service for sid in ids if (service := sim.agent.render(sid)) is not None}

    def check_status(self, dc: str, service_id: str) -> str:
        return registration_status(self.sims[dc], service_id)


def registration_status(sim: SimConsul, service_id: str) -> str:
    """How an agent lists a service registered with it: its worst check status, or "-" when
    it is not registered (any more)."""
    if sim.agent.service(service_id) is None:
        return "-"
    statuses = {str(c["Status"]) for c in sim.agent.checks(service_id)}
    return next((s for s in ("critical", "warning", "passing") if s in statuses), "no check")
