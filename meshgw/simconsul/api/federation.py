"""/v1/internal/federation-state*: the replicated federation states (operator:read), and every
datacenter's mesh gateways from them (filtered by service:read and node:read instead)."""

from __future__ import annotations

from aiohttp import web

from meshgw.simconsul.acl import Access, can_see, require
from meshgw.simconsul.api.common import Answer, BaseAPI
from meshgw.simconsul.shapes import Json


class FederationAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/internal/federation-states", self.listing)
        app.router.add_get("/v1/internal/federation-states/mesh-gateways", self.mesh_gateways)
        app.router.add_get("/v1/internal/federation-state/{dc}", self.one)

    async def listing(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        require(self.token(request), "operator", Access.READ)
        fed = self.sim.federation

        def view() -> Answer:
            return Answer(self.sim.raft.view(("fed",)), fed.listing())

        return await self.blocking(request, view, state)

    async def one(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        require(self.token(request), "operator", Access.READ)
        dc = request.match_info["dc"]
        fed = self.sim.federation
        consistency = "stale" if "stale" in request.query else "leader"

        def view() -> Answer:
            index = self.sim.raft.view(("fed",))
            found = fed.state(dc)
            if found is None:
                return Answer(index, None, missing="")  # 404 with an empty body, as Consul
            # QueryMeta is embedded without json tags, so its fields sit beside State.
            body = {
                "Index": index,
                "LastContact": 0,
                "KnownLeader": state.has_leader,
                "ConsistencyLevel": consistency,
                "NotModified": False,
                "Backend": 0,
                "ResultsFilteredByACLs": False,
                "State": found,
            }
            return Answer(index, body)

        return await self.blocking(request, view, state)

    async def mesh_gateways(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        token = self.token(request)
        fed = self.sim.federation

        def view() -> Answer:
            out: dict[str, list[dict[str, Json]]] = {}
            filtered = False
            for entry in fed.listing():
                gateways = entry.get("MeshGateways") or []
                visible = [g for g in gateways if can_see(token, g)]
                filtered |= len(visible) != len(gateways)
                if visible:
                    out[entry["Datacenter"]] = visible
            return Answer(self.sim.raft.view(("fed",)), out, filtered)

        return await self.blocking(request, view, state)
