"""/v1/status/*: the leader's and the servers' RPC addresses (no ACL, not blocking)."""

from __future__ import annotations

from aiohttp import web

from meshgw.simconsul.api.common import BaseAPI


class StatusAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/status/leader", self.leader)
        app.router.add_get("/v1/status/peers", self.peers)

    async def leader(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        with self.sim.raft.lock:
            return web.json_response(state.leader if state.has_leader else "")

    async def peers(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        return web.json_response(self.sim.servers.addresses(state))
