"""`primary_gateways`: reach the primary datacenter before federation states know its gateways.

Addresses may be IP literals or DNS names; names are resolved now and again every interval, so a
primary whose gateways move behind a stable name is followed. The part this produces is merged
below Consul's, so discovered gateways win as soon as they exist, and these come back if the
discovered ones vanish.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

from meshgw.topology import Endpoint, GatewayKey, Source, TopologyPart

log = logging.getLogger("meshgw.bootstrap")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(addresses: Sequence[tuple[str, int]]) -> tuple[list[Endpoint], list[str]]:
    """Every address as endpoints (names expanded to all their IPs) and the errors met."""
    loop = asyncio.get_running_loop()
    endpoints: list[Endpoint] = []
    errors: list[str] = []
    for host, port in addresses:
        if _is_ip(host):
            endpoints.append(Endpoint(host, port, source=Source.PRIMARY_GATEWAYS))
            continue
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            errors.append(f"{host}: {error}")
            continue
        seen = set()
        for _, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            if ip not in seen:
                seen.add(ip)
                endpoints.append(Endpoint(ip, port, source=Source.PRIMARY_GATEWAYS))
    return endpoints, errors


class PrimaryGateways:
    def __init__(
        self,
        primary_dc: str,
        addresses: Sequence[tuple[str, int]],
        interval: float,
        publish: Callable[[TopologyPart], None],
    ) -> None:
        self.primary_dc = primary_dc
        self.addresses = list(addresses)
        self.interval = max(interval, 1.0)  # Consul's minimum too
        self.publish = publish
        self.last: tuple[Endpoint, ...] | None = None

    async def refresh(self) -> None:
        endpoints, errors = await resolve(self.addresses)
        for error in errors:
            log.warning("primary gateway not resolved: %s", error)
        current = tuple(endpoints)
        if current != self.last:
            self.last = current
            log.info(
                "primary gateways",
                extra={"fields": {"dc": self.primary_dc, "gateways": ",".join(map(str, current))}},
            )
            self.publish(
                TopologyPart(
                    source=Source.PRIMARY_GATEWAYS,
                    primary_datacenter=self.primary_dc,
                    gateways={GatewayKey(self.primary_dc): current},
                )
            )

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)
