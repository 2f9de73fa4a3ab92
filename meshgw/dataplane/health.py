"""Passive health: endpoints that refuse or time out are tried last for a while.

Consul's Envoy gets an (empty, so default) outlier detection on every gateway cluster; meshgw does
the part that matters to a splicer, per process and without probes: an upstream address whose
connect fails is marked down for a back-off that doubles with each failure in a row (1 s up to a
minute); a connect that works clears it. A down endpoint is not skipped, only tried after the
others of its kind, so that a cluster whose every endpoint is down still gets its chance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


@dataclass(slots=True)
class _Down:
    until: float  # time.monotonic()
    failures: int
    reason: str


class Outliers:
    """Upstream addresses seen failing, by `host:port` as connected to."""

    __slots__ = ("_down", "failures")

    def __init__(self) -> None:
        self._down: dict[str, _Down] = {}
        self.failures: dict[tuple[str, str], int] = {}  # (address, reason) → count, for metrics

    def failed(self, address: str, reason: str) -> None:
        previous = self._down.get(address)
        streak = previous.failures + 1 if previous is not None else 1
        backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (streak - 1))
        self._down[address] = _Down(time.monotonic() + backoff, streak, reason)
        key = (address, reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    def succeeded(self, address: str) -> None:
        if self._down:
            self._down.pop(address, None)

    def is_down(self, address: str) -> bool:
        down = self._down.get(address)
        return down is not None and down.until > time.monotonic()

    def down_now(self) -> dict[str, str]:
        """Addresses down now → why (the last error). Forgets those long recovered, so that
        addresses gone from the topology do not stay here."""
        now = time.monotonic()
        for address in [a for a, d in self._down.items() if d.until + MAX_BACKOFF < now]:
            del self._down[address]
        return {address: d.reason for address, d in self._down.items() if d.until > now}
