"""Mesh gateways in any datacenter's catalog, as `consul connect envoy -gateway=mesh -register`
makes them; the leaders' anti-entropy then carries them into the federation states.

Addresses (LAN and the ``wan`` tagged one) may be host names, as consul-k8s registers gateways
behind a cloud load balancer.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshgw.control.catalog import WAN_FEDERATION_META
from meshgw.simconsul.catalog import Catalog
from meshgw.simconsul.shapes import mesh_gateway_node


class Gateways:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def add(
        self,
        dc: str,
        node: str,
        address: str,
        port: int = 8443,
        *,
        wan: tuple[str, int] | None = None,
        service_id: str = "mesh-gateway",
        name: str = "mesh-gateway",
        wanfed: bool = True,
        status: str = "passing",
        meta: Mapping[str, str] | None = None,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        """A mesh gateway on `node` in `dc`; `wanfed` adds Meta consul-wan-federation=1."""
        csn = mesh_gateway_node(
            node,
            address,
            port,
            dc=dc,
            wan=wan,
            service_id=service_id,
            name=name,
            wanfed=wanfed,
            status=status,
            meta=meta,
            weights=weights,
        )
        self.catalog.put(dc, csn)

    def update(
        self,
        dc: str,
        node: str,
        *,
        service_id: str = "mesh-gateway",
        address: str | None = None,
        port: int | None = None,
        wan: tuple[str, int] | None = None,
        status: str | None = None,
        wanfed: bool | None = None,
    ) -> None:
        """Change a gateway: new address/port/WAN address, health, or wanfed meta."""
        with self.catalog.raft.lock:
            state = self.catalog.dc(dc)
            inst = state.instances.get((node, service_id))
            if inst is None:
                raise KeyError(f"no gateway {service_id!r} on {node!r} in {dc}")
            svc = inst.service
            old_meta = dict(svc.get("Meta") or {})
            old_wan = (svc.get("TaggedAddresses") or {}).get("wan")
            check = inst.checks.get(f"service:{service_id}")
            csn = mesh_gateway_node(
                node,
                address or str(svc["Address"]),
                port or int(svc["Port"]),
                dc=dc,
                wan=wan or ((old_wan["Address"], old_wan["Port"]) if old_wan else None),
                service_id=service_id,
                name=inst.name,
                wanfed=(old_meta.get(WAN_FEDERATION_META) == "1") if wanfed is None else wanfed,
                status=status or (str(check["Status"]) if check else "passing"),
                meta={k: v for k, v in old_meta.items() if k != WAN_FEDERATION_META},
                weights=svc.get("Weights"),
            )
            self.catalog.put(dc, csn, node_checks=False)

    def remove(self, dc: str, node: str, service_id: str = "mesh-gateway") -> None:
        self.catalog.drop(dc, node, service_id)
