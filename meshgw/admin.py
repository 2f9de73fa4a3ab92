"""The admin HTTP face: /metrics, /healthz, /ready, /v1/routes, /v1/topology.

It binds to loopback unless told otherwise and only reads state through the callables it is
given, so it knows nothing of how the gateway is built.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class AdminViews:
    routes: Callable[[], dict[str, Any]]
    topology: Callable[[], dict[str, Any]]
    # (ready, reason): ready once the listener is up and a first usable topology exists.
    ready: Callable[[], tuple[bool, str]]
    # Prometheus exposition text, of every worker when there are several.
    metrics: Callable[[], Awaitable[bytes]]


class AdminServer:
    def __init__(self, views: AdminViews, host: str, port: int) -> None:
        self.views = views
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        views = self.views

        async def metrics(_: web.Request) -> web.Response:
            body = await views.metrics()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def ready(_: web.Request) -> web.Response:
            is_ready, reason = views.ready()
            return web.Response(status=200 if is_ready else 503, text=reason + "\n")

        async def routes(_: web.Request) -> web.Response:
            return web.json_response(views.routes(), dumps=_dumps)

        async def topology(_: web.Request) -> web.Response:
            return web.json_response(views.topology(), dumps=_dumps)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/ready", ready)
        app.router.add_get("/v1/routes", routes)
        app.router.add_get("/v1/topology", topology)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:  # report the port the kernel chose
            self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str) + "\n"
