"""Cluster peering through this gateway, as Consul's gateway routes it (docs/consul.md#peering).

- The control plane, both ways, when the mesh config entry says `PeerThroughMeshGateways`:
  `server.<localdc>.peering.<td>` to the local servers peers may dial (servers.py gives them),
  and each dialled peering's `PeerServerName` to its addresses (`/v1/peerings`).
- Exported services, whatever the switch: for each service `/v1/exported-services` exports and each
  consumer peer, `<svc>.<ns>.<ap>.<peer>.external.<localtd>` to the local instances of the
  service's discovery-chain target (`/v1/discovery-chain/<svc>`, then `/v1/health/connect/<target>`
  with the target subset's filter); an HTTP, HTTP/2 or gRPC one is refused instead (peered_l7).
- Imported services: for each peering and each service it imports,
  `/v1/health/connect/<svc>?peer=<name>` gives the SNI (`PeerMeta.SNI`) and the exporter's gateways.
"""

from __future__ import annotations

import logging

from meshgw.control import catalog, central
from meshgw.control.consul.client import Response
from meshgw.control.watching import Params, Watches
from meshgw.topology import DEFAULT_NAMESPACE, Endpoints, Peering, PeerRoute
from meshgw.wire.names import peered_service_sni

log = logging.getLogger("meshgw.discovery")


class PeeringWatch:
    def __init__(self, watches: Watches, local_dc: str) -> None:
        self.watches = watches
        self.local_dc = local_dc
        self.through_gateways = False  # the mesh config entry's switch
        self.peerings: list[central.PeeringInfo] = []
        self.exports: dict[str, central.Export] = {}
        self.targets: dict[str, central.ChainTarget] = {}  # exported service → chain target
        self.export_instances: dict[str, Endpoints] = {}
        self.imports: dict[tuple[str, str], dict[str, Endpoints]] = {}  # (peer, svc) → SNI → eps
        self._warned: set[str] = set()

    def start(self) -> None:
        self.watches.follow("mesh", "/v1/config/mesh/mesh", self._on_mesh, missing=self._no_mesh)
        self.watches.follow("peerings", "/v1/peerings", self._on_peerings)
        self.watches.follow("exported-services", "/v1/exported-services", self._on_exports)

    # --- the switch and the peerings ---------------------------------------------------------

    def _on_mesh(self, answer: Response) -> None:
        self.through_gateways = central.peer_through_mesh_gateways(answer.body)

    def _no_mesh(self) -> None:
        self.through_gateways = False

    def _on_peerings(self, answer: Response) -> None:
        self.peerings = central.peerings(answer.body)
        wanted = {
            (p.name, service)
            for p in self.peerings
            if p.state not in central.ENDED_PEERING_STATES
            for service in p.imported
        }
        for peer, service in wanted - self.imports.keys():
            self.imports[peer, service] = {}
            self.watches.follow(
                f"import {peer}/{service}",
                f"/v1/health/connect/{service}",
                lambda a, k=(peer, service): self._on_import(k, a),  # type: ignore[misc]
                params={"peer": peer},
            )
        for key in self.imports.keys() - wanted:
            self.watches.stop(f"import {key[0]}/{key[1]}")
            del self.imports[key]

    def _on_import(self, key: tuple[str, str], answer: Response) -> None:
        self.imports[key] = catalog.imported_instances(answer.body, key[1])

    # --- exports -----------------------------------------------------------------------------

    def _on_exports(self, answer: Response) -> None:
        exports = {e.service: e for e in central.exported_services(answer.body)}
        for service in exports.keys() - self.exports.keys():
            self.watches.follow(
                f"export chain {service}",
                f"/v1/discovery-chain/{service}",
                lambda a, s=service: self._on_chain(s, a),  # type: ignore[misc]
            )
        for service in self.exports.keys() - exports.keys():
            self.watches.stop(f"export chain {service}")
            self.watches.stop(f"export {service}")
            self.targets.pop(service, None)
            self.export_instances.pop(service, None)
        self.exports = exports

    def _on_chain(self, service: str, answer: Response) -> None:
        target = central.chain_target(answer.body, self.local_dc)
        if target is None:
            self._warn(service, "its discovery chain leads out of this datacenter")
            self.targets.pop(service, None)
            self.watches.stop(f"export {service}")
            return
        if self.targets.get(service) == target:
            return
        self.targets[service] = target
        subset = target.subset
        params: Params | None = None
        if subset is not None and subset.filter:
            params = {"filter": subset.filter}
        only_passing = subset is not None and subset.only_passing

        def on_instances(instances: Response) -> None:
            parsed = catalog.service_instances(
                instances.body, target.service, only_passing=only_passing
            )
            self.export_instances[service] = next(iter(parsed.endpoints.values()), ())

        self.watches.follow(
            f"export {service}", f"/v1/health/connect/{target.service}", on_instances, params=params
        )

    def _warn(self, service: str, why: str) -> None:
        if service not in self._warned:
            self._warned.add(service)
            log.warning("exported service %s is not routed: %s", service, why)

    # --- the part ----------------------------------------------------------------------------

    def peering(self, local_servers: Endpoints, trust_domain: str | None) -> Peering:
        remote = {}
        if self.through_gateways:
            remote = {
                sni: PeerRoute(peer, endpoints)
                for sni, (peer, endpoints) in central.peer_servers(self.peerings).items()
            }
        exports, exports_l7 = self._exports(trust_domain)
        imports = {
            sni: PeerRoute(peer, endpoints)
            for (peer, _), by_sni in sorted(self.imports.items())
            for sni, endpoints in by_sni.items()
        }
        return Peering(
            local_servers=local_servers if self.through_gateways else (),
            remote_servers=remote,
            exports=exports,
            exports_l7=frozenset(exports_l7),
            imports=imports,
        )

    def _exports(self, trust_domain: str | None) -> tuple[dict[str, PeerRoute], set[str]]:
        routes: dict[str, PeerRoute] = {}
        refused: set[str] = set()
        if trust_domain is None:
            return routes, refused
        for service, export in self.exports.items():
            target = self.targets.get(service)
            instances = self.export_instances.get(service, ())
            if target is None or not (instances or target.protocol in central.L7_PROTOCOLS):
                continue  # as Consul: no instances yet, no route yet
            for peer in export.peers:
                try:
                    sni = peered_service_sni(
                        service, export.namespace or DEFAULT_NAMESPACE, export.partition, peer,
                        trust_domain,
                    )  # fmt: skip
                except ValueError:
                    continue
                if target.protocol in central.L7_PROTOCOLS:
                    refused.add(sni)
                else:
                    routes[sni] = PeerRoute(peer, instances)
        return routes, refused

    def status(self) -> dict[str, object]:
        return {
            "peer_through_mesh_gateways": self.through_gateways,
            "peerings": {p.name: p.state for p in self.peerings},
            "exported": sorted(self.exports),
        }
