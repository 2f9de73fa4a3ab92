"""/v1/catalog/* and /v1/health/*: datacenters, services, and service instances with health.

Lists are filtered by ACLs (service:read and node:read), never refused, as in Consul.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from meshgw.simconsul.acl import Access, AclToken, can_see
from meshgw.simconsul.api.common import Answer, BaseAPI, View
from meshgw.simconsul.bexpr import CHECK_SERVICE_NODE, SERVICE_NODE
from meshgw.simconsul.catalog import Datacenter, Instance, Key
from meshgw.simconsul.shapes import flat_service_node


class CatalogAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/catalog/datacenters", self.datacenters)
        app.router.add_get("/v1/catalog/services", self.services)
        app.router.add_get("/v1/catalog/service/{name}", self.service)
        app.router.add_get("/v1/health/service/{name}", self.health_service)
        app.router.add_get("/v1/health/connect/{name}", self.health_connect)

    async def datacenters(self, request: web.Request) -> web.Response:
        with self.sim.raft.lock:
            return web.json_response(list(self.sim.catalog.order))

    async def services(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        token = self.token(request)
        expr = self.filter(request, SERVICE_NODE)
        catalog = self.sim.catalog

        def view() -> Answer:
            services: dict[str, list[str]] = {}
            filtered = False
            for inst in catalog.instances(state):
                if inst.peer:
                    continue  # imported services are listed with ?peer= only
                if token is not None and not token.allows("service", Access.READ, inst.name):
                    filtered = True
                    continue
                if expr is not None and not expr.matches(
                    flat_service_node(catalog.render(state, inst))
                ):
                    continue
                tags = services.setdefault(inst.name, [])
                tags += [t for t in inst.service["Tags"] if t not in tags]
            return Answer(self.sim.raft.view(("catalog", state.name)), services, filtered)

        return await self.blocking(request, view, state)

    async def service(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        name = request.match_info["name"]
        entries = self.entries(
            request, state, lambda i: i.name == name, self._keys(state, "service", name), False
        )
        expr = self.filter(request, SERVICE_NODE)

        def view() -> Answer:
            # This endpoint's filter sees the flat ServiceNode shape.
            answer = entries()
            flat = [flat_service_node(c) for c in answer.body]
            answer.body = [f for f in flat if expr is None or expr.matches(f)]
            return answer

        return await self.blocking(request, view, state)

    async def health_service(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        name = request.match_info["name"]
        peer = request.query.get("peer", "")
        keys = self._keys(state, "service", name, peer)
        view = self.entries(request, state, lambda i: i.name == name and i.peer == peer, keys)
        return await self.blocking(request, view, state)

    async def health_connect(self, request: web.Request) -> web.Response:
        """Local connect-capable instances; with ?peer=, those imported from that peer."""
        state = self.target_dc(request)
        name = request.match_info["name"]
        peer = request.query.get("peer", "")
        if peer:
            keys = [self.sim.peerings.connect_key(name, peer)]
            view = self.entries(request, state, None, keys, imported=(peer, name))
        else:
            keys = self._keys(state, "connect", name)
            view = self.entries(request, state, lambda i: i.connect_target() == name, keys)
        return await self.blocking(request, view, state)

    def _keys(self, state: Datacenter, kind: str, name: str, peer: str = "") -> list[Key]:
        with self.sim.raft.lock:
            return self.sim.catalog.service_keys(state, kind, name, peer)

    def entries(
        self,
        request: web.Request,
        state: Datacenter,
        select: Callable[[Instance], bool] | None,
        keys: list[Key],
        apply_filter: bool = True,
        imported: tuple[str, str] | None = None,
    ) -> View:
        """A view of the CheckServiceNodes `select` picks (or, with `imported` (peer, service),
        those imported from the peer), with ?passing, ?tag and ?filter."""
        token: AclToken | None = self.token(request)
        passing = self.flag(request, "passing")
        tags = request.query.getall("tag", [])
        expr = self.filter(request, CHECK_SERVICE_NODE) if apply_filter else None
        catalog = self.sim.catalog

        def view() -> Answer:
            if imported is not None:
                entries = self.sim.peerings.imported(*imported)
            else:
                assert select is not None
                entries = [catalog.render(state, i) for i in catalog.instances(state) if select(i)]
            visible = [e for e in entries if can_see(token, e)]
            filtered = len(visible) != len(entries)
            if tags:
                visible = [e for e in visible if all(t in e["Service"]["Tags"] for t in tags)]
            if passing:
                visible = [e for e in visible if all(c["Status"] == "passing" for c in e["Checks"])]
            if expr is not None:
                visible = [e for e in visible if expr.matches(e)]
            return Answer(self.sim.raft.view(*keys), visible, filtered)

        return view
