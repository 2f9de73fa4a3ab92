"""Mesh services in the catalog: an application instance and, unless native, its sidecar proxy.

Addresses may be host names. `tags` and `meta` go on the application instance and, as
`consul connect` copies them, are what subset filters (``Service.Meta.version``) select on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshgw.simconsul.catalog import Catalog
from meshgw.simconsul.shapes import check_service_node


class Services:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def add(
        self,
        name: str,
        node: str,
        address: str,
        port: int,
        *,
        proxy_port: int | None = 21000,
        native: bool = False,
        dc: str | None = None,
        status: str = "passing",
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        service_id: str | None = None,
        node_meta: Mapping[str, str] | None = None,
    ) -> None:
        """Register `name` on `node` (created if new); its sidecar `<name>-sidecar-proxy` listens
        on proxy_port and carries the same tags and meta."""
        dc = dc or self.catalog.local_dc
        sid = service_id or name
        tags = list(tags)
        with self.catalog.raft.lock:
            self.catalog.put(
                dc,
                check_service_node(
                    node,
                    address,
                    name,
                    port,
                    service_id=sid,
                    tags=tags,
                    meta=meta,
                    connect={"Native": True} if native else None,
                    status=status,
                    node_meta=node_meta,
                    dc=dc,
                ),
            )
            if native or proxy_port is None:
                return
            self.catalog.put(
                dc,
                check_service_node(
                    node,
                    address,
                    f"{name}-sidecar-proxy",
                    proxy_port,
                    service_id=f"{sid}-sidecar-proxy",
                    kind="connect-proxy",
                    tags=tags,
                    meta=meta,
                    proxy={
                        "DestinationServiceName": name,
                        "DestinationServiceID": sid,
                        "LocalServiceAddress": "127.0.0.1",
                        "LocalServicePort": port,
                    },
                    status=status,
                    node_meta=node_meta,
                    dc=dc,
                ),
            )

    def remove(self, name: str, node: str, *, dc: str | None = None) -> None:
        """Deregister the instance with ID `name` on `node` and its sidecar."""
        dc = dc or self.catalog.local_dc
        self.catalog.drop(dc, node, name)
        self.catalog.drop(dc, node, f"{name}-sidecar-proxy")
