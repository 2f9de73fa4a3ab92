"""The addresses of the host names endpoints carry (a gateway behind a cloud load balancer).

Every name any source gives is resolved, A and AAAA, off the event loop (the loop's
getaddrinfo runs in a thread); all of its addresses become targets, next to the IP endpoints
of the same cluster. Consul's Envoy keeps one name per cluster, and drops the IPs when names and
IPs are mixed; meshgw keeps every name and every IP (docs/consul.md#host-names). Names are
resolved again every interval, sooner while a name fails (its last good addresses stay), and at
once when a new one appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable

from meshgw.topology import Source, TopologyPart

log = logging.getLogger("meshgw.resolver")

REFRESH_INTERVAL = 10.0  # as Envoy's DNS refresh for Consul's host-name clusters
RETRY_FIRST = 1.0


class NameResolver:
    def __init__(
        self, publish: Callable[[TopologyPart], None], interval: float = REFRESH_INTERVAL
    ) -> None:
        self.publish = publish
        self.interval = interval
        self.addresses: dict[str, tuple[str, ...]] = {}
        self.due: dict[str, float] = {}  # name → when to resolve it next (time.monotonic)
        self.retry: dict[str, float] = {}  # name → the back-off while it fails
        self._wake = asyncio.Event()

    def follow(self, names: Iterable[str]) -> None:
        """The names the topology holds now: new ones are resolved at once, gone ones dropped."""
        names = set(names)
        changed = False
        for name in names - self.due.keys():
            self.due[name] = 0.0
            self._wake.set()
        for name in self.due.keys() - names:
            del self.due[name]
            self.retry.pop(name, None)
            changed |= self.addresses.pop(name, None) is not None
        if changed:
            self._publish()

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            ready = [name for name, at in self.due.items() if at <= now]
            if ready:
                results = await asyncio.gather(*(self._resolve(n) for n in ready))
                if any(results):
                    self._publish()
                continue
            wait = min(self.due.values(), default=now + self.interval) - now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))

    async def resolve_now(self) -> None:
        """Resolve every followed name once, at once: for a one-shot view (`meshgw routes`)."""
        if any(await asyncio.gather(*(self._resolve(name) for name in list(self.due)))):
            self._publish()

    async def _resolve(self, name: str) -> bool:
        """Resolve one name; True if its addresses changed."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError as error:
            backoff = min(self.retry.get(name, RETRY_FIRST / 2) * 2, self.interval)
            self.retry[name] = backoff
            if name in self.due:
                self.due[name] = time.monotonic() + backoff
            if backoff == RETRY_FIRST:
                log.warning("cannot resolve %s (keeping what it was): %s", name, error)
            return False
        if self.retry.pop(name, None) is not None:
            log.info("%s resolves again", name)
        if name in self.due:
            self.due[name] = time.monotonic() + self.interval
        found = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if found == self.addresses.get(name) or name not in self.due:
            return False
        self.addresses[name] = found
        return True

    def _publish(self) -> None:
        self.publish(TopologyPart(source=Source.DNS, addresses=dict(self.addresses)))
