"""The mesh gateways of every other datacenter, whatever service name they are registered under.

Two views, as Consul's own gateway keeps them (docs/consul.md#remote-gateways):
- the federation states' list of every datacenter's gateways
  (`/v1/internal/federation-states/mesh-gateways`);
- each remote datacenter's own catalog: the names of its services of kind mesh-gateway
  (`/v1/catalog/services?dc=X&filter=ServiceKind == "mesh-gateway"`, so consul-k8s or Nomad
  gateways named otherwise are seen too), then each name's health
  (`/v1/health/service/<name>?dc=X`).
Per datacenter the fresher view (higher Service.ModifyIndex) wins.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshgw.control import catalog
from meshgw.control.consul.client import Response
from meshgw.control.consul.errors import ConsulRequestError
from meshgw.control.watching import Watches
from meshgw.topology import Endpoints, GatewayKey

DATACENTERS_INTERVAL = 30.0  # Consul's own MaxAge for the datacenter list
GATEWAY_KIND_FILTER = 'ServiceKind == "mesh-gateway"'


class RemoteGateways:
    def __init__(self, watches: Watches, local_dc: str) -> None:
        self.watches = watches
        self.local_dc = local_dc
        self.fed_state = catalog.Parsed()
        # Per remote datacenter: each gateway service name's last health answer.
        self.documents: dict[str, dict[str, Any]] = {}
        self.views: dict[str, catalog.Parsed] = {}

    def start(self) -> None:
        self.watches.follow(
            "federation-states",
            "/v1/internal/federation-states/mesh-gateways",
            self._on_fed_state,
        )
        self.watches.start("datacenters", self._follow_datacenters())

    def _on_fed_state(self, answer: Response) -> None:
        self.fed_state = catalog.federation_state_gateways(answer.body)

    async def _follow_datacenters(self) -> None:
        """Keep the watches of each remote datacenter as the datacenter list changes."""
        failures = 0
        while True:
            try:
                answer = await self.watches.client.get("/v1/catalog/datacenters")
            except ConsulRequestError as error:
                failures += 1
                self.watches.failed("datacenters", error)
                await asyncio.sleep(self.watches.options.backoff.delay(failures))
                continue
            failures = 0
            self.watches.recovered("datacenters")
            remote = {dc for dc in answer.body if isinstance(dc, str)} - {self.local_dc}
            for dc in remote - self.documents.keys():
                self.documents[dc] = {}
                self.watches.follow(
                    f"gateway names of {dc}",
                    "/v1/catalog/services",
                    lambda a, dc=dc: self._on_names(dc, a),  # type: ignore[misc]
                    dc=dc,
                    params={"filter": GATEWAY_KIND_FILTER},
                )
            for dc in self.documents.keys() - remote:
                for name in self.watches.names(f"gateways {dc}/"):
                    self.watches.stop(name)
                self.watches.stop(f"gateway names of {dc}")
                del self.documents[dc]
                self.views.pop(dc, None)
                self.watches.changed()
            await asyncio.sleep(DATACENTERS_INTERVAL)

    def _on_names(self, dc: str, answer: Response) -> None:
        names = set(catalog.gateway_names(answer.body))
        documents = self.documents[dc]
        for name in names - documents.keys():
            documents[name] = []
            self.watches.follow(
                f"gateways {dc}/{name}",
                f"/v1/health/service/{name}",
                lambda a, dc=dc, name=name: self._on_gateways(dc, name, a),  # type: ignore[misc]
                dc=dc,
            )
        for name in documents.keys() - names:
            self.watches.stop(f"gateways {dc}/{name}")
            del documents[name]
        self._parse(dc)

    def _on_gateways(self, dc: str, name: str, answer: Response) -> None:
        catalog.entries(answer.body, f"gateways of {dc}")  # refuse garbage before keeping it
        self.documents[dc][name] = answer.body
        self._parse(dc)

    def _parse(self, dc: str) -> None:
        self.views[dc] = catalog.datacenter_gateways(list(self.documents[dc].values()), dc)

    def gateways(self) -> dict[GatewayKey, Endpoints]:
        """Per datacenter, the fresher of the federation state and that datacenter's catalog."""
        merged: dict[GatewayKey, Endpoints] = dict(self.fed_state.endpoints)
        for view in self.views.values():
            for key, endpoints in view.endpoints.items():
                fed_index = self.fed_state.max_modify_index.get(key, -1)
                if endpoints and view.max_modify_index.get(key, 0) > fed_index:
                    merged[key] = endpoints
        return merged
