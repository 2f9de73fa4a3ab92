"""Learn the federation and the peerings from Consul; publish them as one TopologyPart.

What is watched (blocking queries unless said), each in its own module:
- `/v1/agent/self` once: the local datacenter, DNS domain, primary datacenter, dual stack;
- `/v1/status/leader` every few seconds: the one way to see a hung agent;
- `/v1/health/service/consul`: local servers (node → RPC address; and the gRPC TLS port peers
  dial), with --expose-servers or when peering runs through gateways;
- remote datacenters' gateways of any name (remote_gateways.py);
- `/v1/connect/ca/roots`: the trust domain for mesh names;
- local mesh services and their subsets (local_services.py);
- this gateway's central config: its merged `Proxy.Config` (`/v1/agent/service/<id>`) and its
  service-defaults' connection limit (gateway config below);
- peering: the switch, peerings, exports and imports (peerings.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from meshgw.control import catalog, central
from meshgw.control.consul.client import ConsulClient, Response
from meshgw.control.consul.errors import ConsulRequestError
from meshgw.control.local_services import DEFAULT_WATCH_LIMIT, LocalServices
from meshgw.control.peerings import PeeringWatch
from meshgw.control.remote_gateways import RemoteGateways
from meshgw.control.watching import Watches, WatchOptions
from meshgw.topology import ClusterSettings, Endpoint, Endpoints, Source, TopologyPart

log = logging.getLogger("meshgw.discovery")

# A blocking query cannot tell a quiet catalog from a hung agent for up to its whole wait
# (minutes); a small request every few seconds can. /v1/status/leader needs no ACL.
AGENT_PROBE = "/v1/status/leader"
AGENT_PROBE_INTERVAL = 10.0
AGENT_PROBE_TIMEOUT = 5.0


class Discovery:
    def __init__(
        self,
        client: ConsulClient,
        publish: Callable[[TopologyPart], None],
        *,
        datacenter: str | None = None,
        expose_servers: bool = False,
        gateway_service: str = "mesh-gateway",
        gateway_id: str | None = None,
        service_watch_limit: int = DEFAULT_WATCH_LIMIT,
        options: WatchOptions | None = None,
        on_health: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.client = client
        self.publish_part = publish
        self.datacenter = datacenter
        self.expose_servers = expose_servers
        self.gateway_service = gateway_service
        self.gateway_id = gateway_id or gateway_service
        self.watches = Watches(
            client, self._publish, options=options or WatchOptions(), on_health=on_health
        )
        self.identity: catalog.AgentIdentity | None = None
        self.servers: dict[str, Endpoint] = {}
        self.peering_servers: Endpoints = ()
        self.trust_domain: str | None = None
        self.gateway_config = central.GatewayConfig()
        self.services = LocalServices(
            self.watches, frozenset({"consul", gateway_service}), service_watch_limit
        )
        self.gateways: RemoteGateways | None = None
        self.peering: PeeringWatch | None = None

    # --- life ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Learn the agent's identity, then follow every source until cancelled."""
        watches = self.watches
        watches.start("agent", self._probe_agent())
        try:
            self.identity = await self._identity()
            self.datacenter = self.datacenter or self.identity.datacenter
            dc = self.datacenter or ""
            self._publish()
            if self.expose_servers:
                self._watch_servers()
            self.gateways = RemoteGateways(watches, dc)
            self.gateways.start()
            watches.follow("ca-roots", "/v1/connect/ca/roots", self._on_roots)
            self.services.start()
            self._watch_gateway_config()
            self.peering = PeeringWatch(watches, dc)
            self.peering.start()
            await asyncio.Event().wait()  # the watches run until this task is cancelled
        finally:
            await watches.stop_all()  # the agent probe too, if cancelled before the identity

    async def _identity(self) -> catalog.AgentIdentity:
        failures = 0
        while True:
            try:
                answer = await self.client.get("/v1/agent/self")
                identity = catalog.agent_identity(answer.body)
            except (ConsulRequestError, catalog.CatalogError) as error:
                failures += 1
                self.watches.failed("agent-self", error)
                await asyncio.sleep(self.watches.options.backoff.delay(failures))
                continue
            self.watches.recovered("agent-self")
            log.info(
                "Consul agent",
                extra={
                    "fields": {
                        "address": self.client.config.address,
                        "dc": identity.datacenter,
                        "domain": identity.domain,
                        "primary_dc": identity.primary_datacenter,
                    }
                },
            )
            return identity

    async def _probe_agent(self) -> None:
        """Ask the agent something small every interval: the one way to see it hang."""
        while True:
            try:
                await self.client.get(AGENT_PROBE, timeout=AGENT_PROBE_TIMEOUT)
            except ConsulRequestError as error:
                self.watches.failed("agent", error)
            else:
                self.watches.recovered("agent")
            await asyncio.sleep(AGENT_PROBE_INTERVAL)

    def pending(self) -> list[str]:
        """The sources yet to answer (or fail) once: the agent's identity, then the watches."""
        if self.identity is None and "agent-self" not in self.watches.health:
            return ["agent-self"]
        return self.watches.pending()

    def demand(self, service: str) -> bool:
        """A connection asked for a local service that is not watched (see local_services)."""
        return self.services.demand(service)

    # --- the small watches --------------------------------------------------------------------

    def _watch_servers(self) -> None:
        if not self.watches.running("servers"):
            self.watches.follow("servers", "/v1/health/service/consul", self._on_servers)

    def _on_servers(self, answer: Response) -> None:
        found = catalog.local_servers(answer.body)
        for reason in found.skipped:
            log.debug("skipped: %s", reason)
        self.servers = found.rpc
        self.peering_servers = found.grpc_tls

    def _on_roots(self, answer: Response) -> None:
        self.trust_domain = catalog.trust_domain(answer.body)

    def _watch_gateway_config(self) -> None:
        """This gateway's merged Proxy.Config and its service-defaults' connection limit."""

        def on_proxy(answer: Response) -> None:
            limit = self.gateway_config.max_connections
            found = central.proxy_config(answer.body)
            self.gateway_config = central.GatewayConfig(
                found.connect_timeout, found.keepalive, limit
            )

        def on_defaults(answer: Response) -> None:
            old = self.gateway_config
            limit = central.gateway_limits(answer.body)
            self.gateway_config = central.GatewayConfig(old.connect_timeout, old.keepalive, limit)

        def no_proxy() -> None:
            old = self.gateway_config
            self.gateway_config = central.GatewayConfig(max_connections=old.max_connections)

        def no_defaults() -> None:
            old = self.gateway_config
            self.gateway_config = central.GatewayConfig(old.connect_timeout, old.keepalive)

        self.watches.follow(
            "gateway proxy config", f"/v1/agent/service/{self.gateway_id}", on_proxy,
            missing=no_proxy,
        )  # fmt: skip
        self.watches.follow(
            "gateway service-defaults",
            f"/v1/config/service-defaults/{self.gateway_service}",
            on_defaults,
            missing=no_defaults,
        )

    # --- the part -----------------------------------------------------------------------------

    def part(self) -> TopologyPart:
        identity = self.identity
        peering = None
        if self.peering is not None:
            if self.peering.through_gateways:
                self._watch_servers()  # peers dial the servers: learn their gRPC TLS ports
            peering = self.peering.peering(self.peering_servers, self.trust_domain)
        config = self.gateway_config
        return TopologyPart(
            source=Source.CONSUL,
            datacenter=self.datacenter,
            domain=identity.domain if identity else None,
            trust_domain=self.trust_domain,
            primary_datacenter=identity.primary_datacenter if identity else None,
            servers=dict(self.servers) if self.expose_servers else {},
            gateways=self.gateways.gateways() if self.gateways is not None else {},
            services=self.services.services(),
            service_settings=self.services.settings(),
            cluster_defaults=ClusterSettings(
                connect_timeout=config.connect_timeout,
                max_connections=config.max_connections,
                keepalive=config.keepalive,
            ),
            peering=peering,
            on_demand=self.services.on_demand,
        )

    def _publish(self) -> None:
        self.publish_part(self.part())

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "address": self.client.config.address,
            "sources": self.watches.status(),
            "services": {
                "in_catalog": len(self.services.names),
                "watched": len(self.services.watched),
                "on_demand": self.services.on_demand,
            },
        }
        if self.peering is not None:
            status["peering"] = self.peering.status()
        return status
