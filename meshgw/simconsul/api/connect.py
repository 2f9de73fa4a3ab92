"""/v1/connect/ca/roots: the trust domain and CA roots (no ACL needed, but a token must exist)."""

from __future__ import annotations

from aiohttp import web

from meshgw.simconsul.api.common import Answer, BaseAPI


class ConnectAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/connect/ca/roots", self.roots)

    async def roots(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        self.token(request)  # no ACL needed, but an unknown token is still refused

        def view() -> Answer:
            return Answer(*self.sim.ca.view())

        return await self.blocking(request, view, state)
