"""`SimConsul`: one simulated cluster seen through one agent's HTTP API.

It owns the parts (catalog, servers, gateways, services, agent, federation states, CA, ACLs,
faults, the request log, the raft index) and the aiohttp server that answers for them. Every
helper that shapes state is synchronous and thread-safe; `start`/`stop`/`down`/`up` are
coroutines on the server's loop (`SimConsulThread` offers synchronous ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from meshgw.simconsul.acl import Acl, AclToken, Denied
from meshgw.simconsul.agent import Agent
from meshgw.simconsul.api.agent import AgentAPI
from meshgw.simconsul.api.catalog import CatalogAPI
from meshgw.simconsul.api.common import HTTPAnswer
from meshgw.simconsul.api.config import ConfigAPI
from meshgw.simconsul.api.connect import ConnectAPI
from meshgw.simconsul.api.federation import FederationAPI
from meshgw.simconsul.api.peering import PeeringAPI
from meshgw.simconsul.api.status import StatusAPI
from meshgw.simconsul.ca import ConnectCA
from meshgw.simconsul.catalog import Catalog
from meshgw.simconsul.config_entries import ConfigEntries
from meshgw.simconsul.faults import Faults, RecordedRequest, RequestLog
from meshgw.simconsul.federation import FederationStates
from meshgw.simconsul.gateways import Gateways
from meshgw.simconsul.index import RaftIndex
from meshgw.simconsul.peering import Peerings
from meshgw.simconsul.servers import Servers
from meshgw.simconsul.services import Services


class SimConsul:
    """Knobs: ``servers`` Consul servers in the agent's datacenter (``consul-server-N`` at
    10.0.0.1N:8300, the first leads); ``acl_tokens`` turns ACLs on (default deny;
    ``anonymous_rules`` for the anonymous token); ``anti_entropy_delay`` seconds before federation
    states follow the catalog; ``jitter`` adds Consul's up-to-wait/16 to blocking waits;
    ``initial_check_status`` of newly registered checks (Consul: critical);
    ``deregister_unknown_404`` answers deregistration of an unknown ID with 404, as current Consul
    does (False: 200, as older versions did); ``check_interval`` probes registered TCP checks;
    ``bind_addr`` is the agent's Config.BindAddr (``"::"`` makes it dual-stack for `consul connect
    envoy`, whose gateway TCP check then falls back to ``::1``).
    """

    def __init__(
        self,
        datacenter: str = "dc1",
        *,
        node_name: str = "consul-client-0",
        node_address: str = "127.0.0.1",
        domain: str = "consul.",
        primary_datacenter: str | None = None,
        servers: int = 1,
        trust_domain: str | None = None,
        acl_tokens: Iterable[AclToken] | None = None,
        anonymous_rules: tuple[str, ...] = (),
        anti_entropy_delay: float = 0.0,
        jitter: bool = True,
        initial_check_status: str = "critical",
        deregister_unknown_404: bool = True,
        check_interval: float | None = None,
        bind_addr: str = "0.0.0.0",
    ) -> None:
        self.domain = domain
        self.primary_datacenter = primary_datacenter or datacenter
        self.jitter = jitter
        self.deregister_unknown_404 = deregister_unknown_404
        self.check_interval = check_interval
        self.stopping = False

        self.raft = RaftIndex()
        self.acl = Acl(acl_tokens, anonymous_rules)
        self.requests = RequestLog(self.raft)
        self.faults = Faults(self.raft, lambda: self.stopping)
        self.catalog = Catalog(self.raft, datacenter)
        self.servers = Servers(self.catalog)
        self.gateways = Gateways(self.catalog)
        self.services = Services(self.catalog)
        self.federation = FederationStates(self.catalog, delay=anti_entropy_delay)
        self.ca = ConnectCA(self.raft, trust_domain)
        self.config = ConfigEntries(self.raft)
        self.peerings = Peerings(self.raft, self.config, datacenter)
        self.agent = Agent(
            self.catalog,
            self.config,
            node_name=node_name,
            node_address=node_address,
            initial_check_status=initial_check_status,
            bind_addr=bind_addr,
        )
        for i in range(servers):
            self.servers.add(f"consul-server-{i}", f"10.0.0.{10 + i}")

        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._bind: tuple[str, int] | None = None
        self._unix_path: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self._checker: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> SimConsul:
        loop = asyncio.get_running_loop()
        self.raft.signal.bind(loop)
        self.raft.observed.bind(loop)
        self.stopping = False
        app = web.Application(middlewares=[self._middleware])
        apis = (AgentAPI, CatalogAPI, FederationAPI, ConfigAPI, PeeringAPI, ConnectAPI, StatusAPI)
        for api in apis:
            api(self).routes(app)
        # handler_cancellation: a client that goes away frees its blocked query, as in Consul.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        self._ssl = ssl_context
        self._unix_path = unix_path
        self._bind = (host, port)
        await self._open_site()
        if self.check_interval is not None:
            self._checker = asyncio.create_task(self.agent.probe_tcp_checks(self.check_interval))
        return self

    async def _open_site(self) -> None:
        assert self._runner is not None
        site: web.BaseSite
        if self._unix_path is not None:
            site = web.UnixSite(self._runner, self._unix_path, ssl_context=self._ssl)
        else:
            assert self._bind is not None
            site = web.TCPSite(self._runner, self._bind[0], self._bind[1], ssl_context=self._ssl)
        await site.start()
        self._site = site
        if self._unix_path is None and self._bind is not None and self._bind[1] == 0:
            bound = self._runner.addresses[0]
            self._bind = (self._bind[0], int(bound[1]))

    async def stop(self) -> None:
        self.stopping = True
        self.raft.signal.notify()
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> SimConsul:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def down(self) -> None:
        """The agent goes away: close the listening socket and every open connection."""
        assert self._runner is not None
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server
        if server is not None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    async def up(self) -> None:
        """Listen again on the same address."""
        if self._site is None:
            await self._open_site()

    # --- where it listens -----------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._bind is not None

    @property
    def host(self) -> str:
        assert self._bind is not None, "start() the server first"
        return self._bind[0]

    @property
    def port(self) -> int:
        assert self._bind is not None, "start() the server first"
        return self._bind[1]

    @property
    def url(self) -> str:
        if self._unix_path is not None:
            return f"unix://{self._unix_path}"
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """HOST:PORT, as CONSUL_HTTP_ADDR takes it."""
        return f"{self.host}:{self.port}"

    # --- every request --------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        body = await request.read()
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self.requests.record(
            RecordedRequest(request.method, request.path, request.query, headers, body)
        )
        fault = self.faults.take(request.method, request.path)
        if fault is not None:
            answer = await self.faults.answer(request, fault)
            if answer is not None:
                return answer
        try:
            response: web.StreamResponse = await handler(request)
        except HTTPAnswer as exc:
            return web.Response(status=exc.status, text=exc.text, content_type="text/plain")
        except Denied as exc:
            return web.Response(status=403, text=exc.text, content_type="text/plain")
        return response
