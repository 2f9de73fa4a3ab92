"""The data plane as the gateway sees it: one Listener in this process, or a pool of worker
processes. Both implement `DataPlaneService`, so the gateway never asks which one it has."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from meshgw.routing import RouteTable


class DataPlaneService(Protocol):
    host: str
    port: int  # the port really bound (the kernel's choice for port 0)

    @property
    def listening(self) -> bool: ...

    @property
    def pump_mode(self) -> str: ...

    def set_table(self, table: RouteTable) -> None:
        """New connections route by `table`; connections in flight keep their upstream."""

    def stop_accepting(self) -> None:
        """Close the listening socket(s); open connections go on."""

    async def open_connections(self) -> int: ...

    async def drain(self, timeout: float) -> int:
        """Stop accepting, wait up to `timeout` for connections to finish, close the rest;
        returns how many had to be closed."""

    async def extra_metrics(self) -> list[bytes]:
        """Exposition texts kept outside the gateway's own registry (other processes')."""

    async def down_endpoints(self) -> dict[str, str]:
        """Upstream addresses seen failing lately (passive health) → the last error."""

    def set_demand(self, demand: Callable[[str], None]) -> None:
        """Whom to ask to watch a local service a connection wants (services on demand)."""
