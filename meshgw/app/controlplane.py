"""The control plane as the settings ask for it: Consul discovery, the registrar, the
primary_gateways bootstrap. Each source publishes TopologyParts; none touches the data plane."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from meshgw.addresses import is_ip
from meshgw.control.bootstrap import PrimaryGateways
from meshgw.control.consul import ConsulClient, ConsulConfig, ConsulConfigError
from meshgw.control.discovery import Discovery
from meshgw.control.registrar import GatewayRegistration, Registrar
from meshgw.control.resolver import NameResolver
from meshgw.metrics import Metrics
from meshgw.settings import Settings, SettingsError
from meshgw.topology import TopologyPart

log = logging.getLogger("meshgw")


# Watches besides the local services' (gateways per datacenter and name, peerings, exports,
# imports, central config): what the connection pool to the agent keeps room for.
OTHER_WATCHES = 128


def agent_connections(settings: Settings) -> int:
    """Connections to the Consul agent at most: each blocking query holds one for its wait."""
    if settings.consul is None and not settings.register:
        return 0
    return settings.service_watch_limit + OTHER_WATCHES


def discovery_for(
    settings: Settings,
    client: ConsulClient,
    publish: Callable[[TopologyPart], None],
    on_health: Callable[[str, bool], None],
) -> Discovery:
    """The Consul discovery these settings ask for (a gateway's, or `meshgw routes`' once)."""
    return Discovery(
        client,
        publish,
        datacenter=settings.dc,
        expose_servers=settings.expose_servers,
        gateway_service=settings.service_name,
        gateway_id=settings.proxy_id,
        service_watch_limit=settings.service_watch_limit,
        on_health=on_health,
    )


class ControlPlane:
    """Consul discovery, the registrar and the primary_gateways bootstrap, as settings ask.

    Consul is used with --consul or --register (address and token also from CONSUL_* variables).
    Each source publishes TopologyParts to the gateway; none of them touches the data plane.
    """

    def __init__(
        self,
        settings: Settings,
        publish: Callable[[TopologyPart], None],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.publish = publish
        self.metrics = metrics
        self.client: ConsulClient | None = None
        self.discovery: Discovery | None = None
        self.registrar: Registrar | None = None
        self.listen_port = settings.listen.port
        self.tasks: list[asyncio.Task[None]] = []
        self.resolver = NameResolver(publish)
        if settings.consul is not None or settings.register:
            try:
                config = ConsulConfig.from_env(
                    address=settings.consul,
                    token_file=settings.token_file,
                    ca_file=settings.ca_file,
                )
            except ConsulConfigError as error:
                raise SettingsError(str(error)) from None
            self.config: ConsulConfig | None = config
        else:
            self.config = None

    async def start(self, listen_port: int) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self.resolver.run()))
        if settings.primary_gateway and settings.primary_dc:
            bootstrap = PrimaryGateways(
                settings.primary_dc,
                [(a.host, a.port) for a in settings.primary_gateway],
                settings.primary_gateways_interval,
                self.publish,
            )
            await bootstrap.refresh()  # static addresses route at once
            self.tasks.append(loop.create_task(bootstrap.run()))
        if self.config is None:
            return
        self.client = client = ConsulClient(
            self.config, max_connections=agent_connections(settings)
        )

        def health(source: str, ok: bool) -> None:
            self.metrics.consul_up.labels(source).set(1 if ok else 0)

        self.discovery = discovery_for(settings, client, self.publish, health)
        self.tasks.append(loop.create_task(self.discovery.run()))
        if settings.register:
            self.listen_port = listen_port
            self.registrar = Registrar(
                client,
                self.registration(settings),
                on_state=lambda ok: health("registration", ok),
            )
            self.tasks.append(loop.create_task(self.registrar.run()))

    def registration(self, settings: Settings) -> GatewayRegistration:
        address, wan, listen = settings.address, settings.wan_address, settings.listen
        if address is not None:
            lan: tuple[str, int] = (address.host, address.port)
        elif is_ip(listen.host) and not ipaddress.ip_address(listen.host).is_unspecified:
            # What the gateway really listens on, so that the check dials it there.
            lan = (listen.host, self.listen_port)
        else:
            # Listening everywhere: Consul's CLI registers "" (the agent's node address) with
            # the port; this gateway's real port is the one to advertise.
            lan = ("", self.listen_port)
        return GatewayRegistration(
            name=settings.service_name,
            service_id=settings.proxy_id,
            address=lan,
            wan_address=(wan.host, wan.port) if wan else None,
            expose_servers=settings.expose_servers,
            deregister_after_critical=settings.deregister_after_critical,
        )

    def reload(self, settings: Settings) -> None:
        """SIGHUP: register again with what the new settings say."""
        self.settings = settings
        if self.registrar is not None:
            self.registrar.replace(self.registration(settings))

    def demand(self, service: str) -> None:
        """A connection wants a local service that is watched only on demand."""
        if self.discovery is not None:
            self.discovery.demand(service)

    def watch_status(self) -> dict[str, Any]:
        return self.discovery.status() if self.discovery is not None else {}

    async def deregister(self) -> None:
        if self.registrar is not None:
            for task in self.tasks:
                task.cancel()  # the registrar must not register again while we leave
            await self.registrar.deregister()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task, outcome in zip(
            self.tasks, await asyncio.gather(*self.tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, Exception):
                log.error("%s had failed: %r", task.get_name(), outcome)
        self.tasks.clear()
        if self.client is not None:
            await self.client.close()
