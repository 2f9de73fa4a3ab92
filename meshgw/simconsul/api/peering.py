"""/v1/peerings, /v1/peering/<name> (peering:read) and /v1/exported-services (mesh:read): the
peerings, with their stream status, and what this cluster exports to whom. All blocking."""

from __future__ import annotations

from aiohttp import web

from meshgw.simconsul.acl import Access, require
from meshgw.simconsul.api.common import Answer, BaseAPI
from meshgw.simconsul.config_entries import KEY as CONFIG_KEY


class PeeringAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/peerings", self.listing)
        app.router.add_get("/v1/peering/{name}", self.read)
        app.router.add_get("/v1/exported-services", self.exported)

    async def listing(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        require(self.token(request), "peering", Access.READ)
        peerings = self.sim.peerings

        def view() -> Answer:
            found = [peerings.render(name) for name in peerings.names()]
            return Answer(peerings.index(), [p for p in found if p is not None])

        return await self.blocking(request, view, state)

    async def read(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        require(self.token(request), "peering", Access.READ)
        name = request.match_info["name"]
        peerings = self.sim.peerings
        missing = f'Peering not found for "{name}"'

        def view() -> Answer:
            found = peerings.render(name)
            return Answer(peerings.index(), found, missing=None if found else missing)

        return await self.blocking(request, view, state)

    async def exported(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        require(self.token(request), "mesh", Access.READ)
        peerings = self.sim.peerings

        def view() -> Answer:
            return Answer(self.sim.raft.view(CONFIG_KEY), peerings.exported())

        return await self.blocking(request, view, state)
