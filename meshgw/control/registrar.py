"""Registers the gateway as `consul connect envoy -gateway=mesh -register` does.

The body is the one that command sends: Kind mesh-gateway; Name and ID default "mesh-gateway";
Address/Port from --address (without it, the address --listen binds if it is not a wildcard, else
Address "" and the listening port); TaggedAddresses
lan/wan only for the addresses given, as {Address, Port}; Meta consul-wan-federation=1 only with
--expose-servers; one TCP check, "mesh-gateway listening", every 10s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshgw.addresses import hostport
from meshgw.control import catalog
from meshgw.control.catalog import WAN_FEDERATION_META
from meshgw.control.consul.blocking import Backoff
from meshgw.control.consul.client import ConsulClient
from meshgw.control.consul.errors import ConsulForbidden, ConsulNotFound, ConsulRequestError
from meshgw.durations import go_duration

log = logging.getLogger("meshgw.registrar")

DEFAULT_GATEWAY_PORT = 8443


@dataclass(frozen=True)
class GatewayRegistration:
    name: str = "mesh-gateway"
    service_id: str | None = None
    address: tuple[str, int] | None = None  # LAN: where local servers dial this gateway
    wan_address: tuple[str, int] | None = None  # where other datacenters dial it
    expose_servers: bool = False
    deregister_after_critical: float = 6 * 3600.0  # seconds

    @property
    def id(self) -> str:
        return self.service_id or self.name

    def body(self, loopback: str = "127.0.0.1") -> dict[str, Any]:
        """The registration; without an address the TCP check dials the agent's `loopback`."""
        host, port = self.address or ("", DEFAULT_GATEWAY_PORT)
        body: dict[str, Any] = {
            "Kind": "mesh-gateway",
            "ID": self.id,
            "Name": self.name,
            "Address": host,
            "Port": port,
        }
        tagged: dict[str, dict[str, Any]] = {}
        if host:
            tagged["lan"] = {"Address": host, "Port": port}
        if self.wan_address is not None and self.wan_address[0]:
            tagged["wan"] = {"Address": self.wan_address[0], "Port": self.wan_address[1]}
        if tagged:
            body["TaggedAddresses"] = tagged
        if self.expose_servers:
            body["Meta"] = {WAN_FEDERATION_META: "1"}
        # Without an address the agent must share the gateway's network namespace (Consul's
        # own comment): the check dials loopback.
        check_host = host or loopback
        body["Check"] = {
            "Name": "mesh-gateway listening",
            "TCP": hostport(check_host, port),
            "Interval": "10s",
            "DeregisterCriticalServiceAfter": go_duration(self.deregister_after_critical),
        }
        return body


class Registrar:
    """Registers this gateway with the local agent, keeps it registered, deregisters on exit.

    The agent forgets services when it restarts with a fresh data directory; a periodic look at
    `/v1/agent/service/<id>` notices that and registers again.
    """

    def __init__(
        self,
        client: ConsulClient,
        registration: GatewayRegistration,
        *,
        check_interval: float = 10.0,
        backoff: Backoff = Backoff(),
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.registration = registration
        self.check_interval = check_interval
        self.backoff = backoff
        self.on_state = on_state
        # What the agent last accepted. Compared with `registration`, not a flag: settings
        # replaced while a PUT is in flight must still be sent once that PUT returns.
        self.registered_as: GatewayRegistration | None = None
        # Set before the first PUT leaves: a stop that cancels a register still in flight must
        # deregister, since the agent may have applied it.
        self._attempted = False
        self._replaced_ids: list[str] = []  # registered under an ID the settings no longer use
        self._failures = 0
        self.loopback: str | None = None  # learned from the agent before the first register
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Check the registration now rather than at the next interval."""
        self._wake.set()

    def replace(self, registration: GatewayRegistration) -> None:
        """Register what new settings say, now. The same ID is updated in place by the agent;
        a new one would leave the old entry passing its check on the same port, so it goes."""
        if registration.id != self.registration.id and self._attempted:
            self._replaced_ids.append(self.registration.id)
        self.registration = registration
        self.wake()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _agent_loopback(self) -> str:
        """Without an address the check dials the agent's loopback: ::1 when the agent is
        dual-stack, as Consul's CLI chooses (docs/consul.md#request-body). Asked once."""
        if self.loopback is None:
            try:
                answer = await self.client.get("/v1/agent/self")
                dual_stack = catalog.agent_identity(answer.body).dual_stack
            except ConsulForbidden:
                dual_stack = False  # a token without agent:read: assume IPv4, as before
            self.loopback = "::1" if dual_stack else "127.0.0.1"
        return self.loopback

    async def register(self) -> None:
        while self._replaced_ids:
            await self._remove(self._replaced_ids[0])
            self._replaced_ids.pop(0)
        address = self.registration.address
        loopback = "127.0.0.1" if address and address[0] else await self._agent_loopback()
        registration = self.registration  # as it is now, after the awaits
        self._attempted = True
        await self.client.put("/v1/agent/service/register", registration.body(loopback))
        if registration != self.registered_as:
            log.info(
                "registered in Consul",
                extra={"fields": {"service": registration.name, "id": registration.id}},
            )
        self.registered_as = registration

    async def still_registered(self) -> bool:
        try:
            await self.client.get(f"/v1/agent/service/{self.registration.id}")
        except ConsulNotFound:
            return False
        return True

    async def run(self) -> None:
        """Register until it works, then check every interval; never raises on Consul errors."""
        while True:
            try:
                if self.registered_as != self.registration:
                    await self.register()
                elif not await self.still_registered():
                    log.warning("the agent lost this gateway's registration: registering again")
                    await self.register()
                if self._failures:
                    log.info("Consul answers the registrar again")
                    self._failures = 0
                if self.on_state is not None:
                    self.on_state(True)
                await self._pause(self.check_interval)
            except ConsulRequestError as error:
                self._failures += 1
                if self._failures == 1:  # once per change of state, not once per retry
                    log.error("cannot register this gateway: %s", error)
                if self.on_state is not None:
                    self.on_state(False)
                await self._pause(self.backoff.delay(self._failures))

    async def deregister(self, timeout: float = 5.0) -> None:
        """Remove the registration so Consul stops sending traffic here. Bounded in time."""
        ids = [*self._replaced_ids, self.registration.id] if self._attempted else []
        for service_id in ids:
            try:
                await asyncio.wait_for(self._remove(service_id), timeout)
            except (ConsulRequestError, TimeoutError) as error:
                log.error(
                    "deregistration of %s failed (Consul removes it once its check fails): %s",
                    service_id,
                    error,
                )
        self._replaced_ids.clear()
        self.registered_as = None

    async def _remove(self, service_id: str) -> None:
        # Newer agents answer 404 for an unknown ID: gone is what we wanted.
        with contextlib.suppress(ConsulNotFound):
            await self.client.put(f"/v1/agent/service/deregister/{service_id}")
        log.info("deregistered from Consul", extra={"fields": {"id": service_id}})
