"""Learn the federation from Consul and publish it as one TopologyPart, on every change.

Watches (blocking queries), each feeding one field of the part:
- `/v1/agent/self` once: the local datacenter, DNS domain and primary datacenter;
- `/v1/health/service/consul`: local servers (node name → RPC address), with --expose-servers;
- `/v1/internal/federation-states/mesh-gateways`: every datacenter's gateways at their WAN address;
- `/v1/health/service/<gateway>?dc=X` for each remote datacenter of `/v1/catalog/datacenters`:
  the same gateways from that datacenter's own catalog. Per datacenter the fresher of the two
  views (higher Service.ModifyIndex) wins, as Consul's gateway does since it fixed stale IPs;
- `/v1/connect/ca/roots`: the trust domain for `*.internal.<td>` names;
- `/v1/catalog/services` then `/v1/health/connect/<svc>`: local mesh service instances.

Consul down or answering nonsense never clears what is known: each watch keeps its last good
answer, says once in the log (and in `meshgw_consul_up{source}`) when it starts or stops failing,
and retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshgw.control import catalog
from meshgw.control.consul.blocking import Backoff, BlockingQuery, RateLimit
from meshgw.control.consul.client import ConsulClient, Response
from meshgw.control.consul.errors import ConsulForbidden, ConsulRequestError
from meshgw.topology import Endpoint, GatewayKey, ServiceKey, Source, TopologyPart

log = logging.getLogger("meshgw.discovery")

SKIPPED_SERVICES = frozenset({"consul"})
DATACENTERS_INTERVAL = 30.0  # Consul's own MaxAge for the datacenter list
# A blocking query cannot tell a quiet catalog from a hung agent for up to its whole wait
# (minutes); a small request every few seconds can. /v1/status/leader needs no ACL.
AGENT_PROBE = "/v1/status/leader"
AGENT_PROBE_INTERVAL = 10.0
AGENT_PROBE_TIMEOUT = 5.0


@dataclass
class SourceHealth:
    """How one source (a watch, or the agent probe) fares, for /v1/topology."""

    ok: bool = False
    last_ok: float | None = None  # time.time() of the last good answer
    error: str | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        age = None if self.last_ok is None else round(now - self.last_ok, 3)
        return {
            "state": "ok" if self.ok else "failing",
            "last_answer_age_s": age,
            "error": self.error,
        }


class Discovery:
    def __init__(
        self,
        client: ConsulClient,
        publish: Callable[[TopologyPart], None],
        *,
        datacenter: str | None = None,
        expose_servers: bool = False,
        gateway_service: str = "mesh-gateway",
        wait: str | float = "5m",
        rate_limit: RateLimit = RateLimit(),
        backoff: Backoff = Backoff(),
        on_health: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.client = client
        self.publish_part = publish
        self.datacenter = datacenter
        self.expose_servers = expose_servers
        self.gateway_service = gateway_service
        self.watch_options: dict[str, Any] = {
            "wait": wait,
            "rate_limit": rate_limit,
            "backoff": backoff,
        }
        self.on_health = on_health
        self.identity: catalog.AgentIdentity | None = None
        self.servers: dict[str, Endpoint] = {}
        self.fed_state: catalog.Parsed = catalog.Parsed()
        self.dc_views: dict[str, catalog.Parsed] = {}
        self.trust_domain: str | None = None
        self.services: dict[ServiceKey, tuple[Endpoint, ...]] = {}
        self.indexes: dict[str, int] = {}  # last index per source, for /v1/topology
        self.health: dict[str, SourceHealth] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # --- life ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Learn the agent's identity, then follow every source until cancelled."""
        self._start("agent", self._probe_agent())
        self.identity = await self._identity()
        if self.datacenter is None:
            self.datacenter = self.identity.datacenter
        self._publish()
        if self.expose_servers:
            self._start("servers", self._follow("/v1/health/service/consul", self._on_servers))
        self._start(
            "federation-states",
            self._follow("/v1/internal/federation-states/mesh-gateways", self._on_fed_state),
        )
        self._start("datacenters", self._follow_datacenters())
        self._start("ca-roots", self._follow("/v1/connect/ca/roots", self._on_roots))
        self._start("services", self._follow("/v1/catalog/services", self._on_service_list))
        try:
            await asyncio.Event().wait()  # the watches run until this task is cancelled
        finally:
            await self.stop()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def _start(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(coroutine, name=name)

    async def _identity(self) -> catalog.AgentIdentity:
        failures = 0
        while True:
            try:
                answer = await self.client.get("/v1/agent/self")
                identity = catalog.agent_identity(answer.body)
            except (ConsulRequestError, catalog.CatalogError) as error:
                failures += 1
                self._failed("agent-self", error)
                await asyncio.sleep(self.watch_options["backoff"].delay(failures))
                continue
            self._recovered("agent-self")
            log.info(
                "Consul agent",
                extra={
                    "fields": {
                        "address": self.client.config.address,
                        "dc": identity.datacenter,
                        "domain": identity.domain,
                        "primary_dc": identity.primary_datacenter,
                    }
                },
            )
            return identity

    # --- watches ------------------------------------------------------------------------------

    async def _follow(
        self,
        path: str,
        handle: Callable[[Response], None],
        *,
        source: str | None = None,
        dc: str | None = None,
        params: dict[str, str | int | bool | None] | None = None,
    ) -> None:
        name = source or path
        query = BlockingQuery(
            self.client,
            path,
            params=params,
            dc=dc,
            on_error=lambda error, _failures, _delay: self._failed(name, error),
            on_recover=lambda _failures: self._recovered(name),
            **self.watch_options,
        )
        async for answer in query:
            self._recovered(name)
            try:
                handle(answer)
            except catalog.CatalogError as error:
                # Consul answered, but not in the documented shape: keep the last good view.
                log.error("ignoring an answer from Consul: %s", error)
                continue
            except Exception:
                # Whatever an answer holds, the watch goes on with the last good view.
                log.exception("cannot use the answer to %s; keeping the last good view", name)
                continue
            self.indexes[name] = answer.index
            self._publish()

    async def _probe_agent(self) -> None:
        """Ask the agent something small every interval: the one way to see it hang."""
        while True:
            try:
                await self.client.get(AGENT_PROBE, timeout=AGENT_PROBE_TIMEOUT)
            except ConsulRequestError as error:
                self._failed("agent", error)
            else:
                self._recovered("agent")
            await asyncio.sleep(AGENT_PROBE_INTERVAL)

    def _failed(self, source: str, error: Exception) -> None:
        if self.on_health is not None:
            self.on_health(source, False)
        health = self.health.setdefault(source, SourceHealth())
        failing_already = health.error is not None
        health.ok, health.error = False, str(error)
        if failing_already:
            return  # said once, when it began
        if isinstance(error, ConsulForbidden):
            log.error("Consul refused %s: %s", source, error)
        else:
            log.warning("Consul unavailable for %s, keeping what is known: %s", source, error)

    def _recovered(self, source: str) -> None:
        if self.on_health is not None:
            self.on_health(source, True)
        health = self.health.setdefault(source, SourceHealth())
        if health.error is not None:
            log.info("Consul answers %s again", source)
        health.ok, health.error, health.last_ok = True, None, time.time()

    def status(self) -> dict[str, Any]:
        """Each source's state and the age of its last good answer; every source is stale
        while the agent itself does not answer."""
        now = time.time()
        agent = self.health.get("agent")
        stale = agent is not None and not agent.ok
        return {
            name: {**health.to_json(now), "stale": stale or not health.ok}
            for name, health in sorted(self.health.items())
        }

    def _on_servers(self, answer: Response) -> None:
        parsed = catalog.local_servers(answer.body)
        self._skipped(parsed)
        self.servers = {node: endpoints[0] for node, endpoints in parsed.endpoints.items()}

    def _on_fed_state(self, answer: Response) -> None:
        self.fed_state = catalog.federation_state_gateways(answer.body)
        self._skipped(self.fed_state)

    def _on_roots(self, answer: Response) -> None:
        self.trust_domain = catalog.trust_domain(answer.body)

    async def _follow_datacenters(self) -> None:
        """Keep one catalog watch per remote datacenter, as the datacenter list changes."""
        failures = 0
        while True:
            try:
                answer = await self.client.get("/v1/catalog/datacenters")
                failures = 0
                self._recovered("/v1/catalog/datacenters")
            except ConsulRequestError as error:
                failures += 1
                self._failed("/v1/catalog/datacenters", error)
                await asyncio.sleep(self.watch_options["backoff"].delay(failures))
                continue
            remote = {str(dc) for dc in answer.body if isinstance(dc, str)} - {self.datacenter}
            for dc in remote - self.dc_views.keys():
                self.dc_views[dc] = catalog.Parsed()
                self._start(
                    f"gateways-{dc}",
                    self._follow(
                        f"/v1/health/service/{self.gateway_service}",
                        lambda a, dc=dc: self._on_dc_view(dc, a),  # type: ignore[misc]
                        source=f"gateways of {dc}",
                        dc=dc,
                    ),
                )
            for dc in self.dc_views.keys() - remote:
                self._tasks.pop(f"gateways-{dc}").cancel()
                del self.dc_views[dc]
            await asyncio.sleep(DATACENTERS_INTERVAL)

    def _on_dc_view(self, dc: str, answer: Response) -> None:
        self.dc_views[dc] = catalog.datacenter_gateways(answer.body, dc)

    def _on_service_list(self, answer: Response) -> None:
        body = answer.body
        if not isinstance(body, dict):
            raise catalog.CatalogError("/v1/catalog/services: expected a JSON object")
        names = {str(n) for n in body} - SKIPPED_SERVICES - {self.gateway_service}
        for name in names:
            if f"service-{name}" not in self._tasks:
                self._start(
                    f"service-{name}",
                    self._follow(
                        f"/v1/health/connect/{name}",
                        lambda a, name=name: self._on_service(name, a),  # type: ignore[misc]
                    ),
                )
        for task_name in [t for t in self._tasks if t.startswith("service-")]:
            if task_name.removeprefix("service-") not in names:
                self._tasks.pop(task_name).cancel()
                self.services = {k: v for k, v in self.services.items() if k.name != task_name[8:]}

    def _on_service(self, name: str, answer: Response) -> None:
        parsed = catalog.local_service_instances(answer.body, name)
        self.services = {k: v for k, v in self.services.items() if k.name != name}
        self.services.update((k, v) for k, v in parsed.endpoints.items() if v)

    def _skipped(self, parsed: catalog.Parsed) -> None:
        for reason in parsed.skipped:
            log.debug("skipped: %s", reason)

    # --- the part -----------------------------------------------------------------------------

    def gateways(self) -> dict[GatewayKey, tuple[Endpoint, ...]]:
        """Per datacenter, the fresher of the federation state and that datacenter's catalog."""
        merged: dict[GatewayKey, tuple[Endpoint, ...]] = dict(self.fed_state.endpoints)
        for view in self.dc_views.values():
            for key, endpoints in view.endpoints.items():
                fed_index = self.fed_state.max_modify_index.get(key, -1)
                if endpoints and view.max_modify_index.get(key, 0) > fed_index:
                    merged[key] = endpoints
        return merged

    def part(self) -> TopologyPart:
        identity = self.identity
        return TopologyPart(
            source=Source.CONSUL,
            datacenter=self.datacenter,
            domain=identity.domain if identity else None,
            trust_domain=self.trust_domain,
            primary_datacenter=identity.primary_datacenter if identity else None,
            servers=dict(self.servers),
            gateways=self.gateways(),
            services=dict(self.services),
        )

    def _publish(self) -> None:
        self.publish_part(self.part())
