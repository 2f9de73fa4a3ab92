"""The composition root: the one place that knows every layer and wires them together.

Settings → topology parts → merged Topology → RouteTable → data plane; the admin face reads the
gateway's state. Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads settings in place.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from meshgw.admin import AdminServer, AdminViews
from meshgw.control.bootstrap import PrimaryGateways
from meshgw.control.consul import ConsulClient, ConsulConfig, ConsulConfigError
from meshgw.control.discovery import Discovery
from meshgw.control.registrar import GatewayRegistration, Registrar
from meshgw.dataplane.budget import DescriptorBudget
from meshgw.dataplane.context import DataPlaneConfig
from meshgw.dataplane.listener import Listener
from meshgw.dataplane.service import DataPlaneService
from meshgw.dataplane.workers import WorkerPool
from meshgw.metrics import Metrics, merge_metrics
from meshgw.routing import RouteKind, RouteTable
from meshgw.settings import Settings, SettingsError
from meshgw.topology import Source, Topology, TopologyPart, merge

log = logging.getLogger("meshgw")


def dataplane_config(settings: Settings, budget: DescriptorBudget) -> DataPlaneConfig:
    return DataPlaneConfig(
        hello_timeout=settings.hello_timeout,
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout,
        max_hello_bytes=settings.max_hello_bytes,
        max_connections=budget.connections,
        max_pipes=budget.pipes,
        pump=settings.pump,
        access_log=settings.access_log,
    )


class ControlPlane:
    """Consul discovery, the registrar and the primary_gateways bootstrap, as settings ask.

    Consul is used with --consul or --register (address and token also from CONSUL_* variables).
    Each source publishes TopologyParts to the gateway; none of them touches the data plane.
    """

    def __init__(
        self,
        settings: Settings,
        publish: Callable[[TopologyPart], None],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.publish = publish
        self.metrics = metrics
        self.client: ConsulClient | None = None
        self.discovery: Discovery | None = None
        self.registrar: Registrar | None = None
        self.listen_port = settings.listen.port
        self.tasks: list[asyncio.Task[None]] = []
        if settings.consul is not None or settings.register:
            try:
                config = ConsulConfig.from_env(
                    address=settings.consul, token_file=settings.token_file
                )
            except ConsulConfigError as error:
                raise SettingsError(str(error)) from None
            self.config: ConsulConfig | None = config
        else:
            self.config = None

    async def start(self, listen_port: int) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        if settings.primary_gateways and settings.primary_dc:
            bootstrap = PrimaryGateways(
                settings.primary_dc,
                [(a.host, a.port) for a in settings.primary_gateways],
                settings.primary_gateways_interval,
                self.publish,
            )
            await bootstrap.refresh()  # static addresses route at once
            self.tasks.append(loop.create_task(bootstrap.run()))
        if self.config is None:
            return
        self.client = client = ConsulClient(self.config)

        def health(source: str, ok: bool) -> None:
            self.metrics.consul_up.labels(source).set(1 if ok else 0)

        self.discovery = Discovery(
            client,
            self.publish,
            datacenter=settings.dc,
            expose_servers=settings.expose_servers,
            gateway_service=settings.service_name,
            on_health=health,
        )
        self.tasks.append(loop.create_task(self.discovery.run()))
        if settings.register:
            self.listen_port = listen_port
            self.registrar = Registrar(
                client,
                self.registration(settings),
                on_state=lambda ok: health("registration", ok),
            )
            self.tasks.append(loop.create_task(self.registrar.run()))

    def registration(self, settings: Settings) -> GatewayRegistration:
        address, wan = settings.address, settings.wan_address
        return GatewayRegistration(
            name=settings.service_name,
            service_id=settings.proxy_id,
            # Without --address, Consul's CLI registers "" and its default port; the port this
            # gateway really listens on is the one to advertise.
            address=(address.host, address.port) if address else ("", self.listen_port),
            wan_address=(wan.host, wan.port) if wan else None,
            expose_servers=settings.expose_servers,
            deregister_after_critical=settings.deregister_after_critical,
        )

    def reload(self, settings: Settings) -> None:
        """SIGHUP: register again with what the new settings say."""
        self.settings = settings
        if self.registrar is not None:
            self.registrar.replace(self.registration(settings))

    def watch_status(self) -> dict[str, Any]:
        if self.discovery is None:
            return {}
        return {
            "address": self.discovery.client.config.address,
            "indexes": dict(self.discovery.indexes),
            "sources": self.discovery.status(),
        }

    async def deregister(self) -> None:
        if self.registrar is not None:
            for task in self.tasks:
                task.cancel()  # the registrar must not register again while we leave
            await self.registrar.deregister()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task, outcome in zip(
            self.tasks, await asyncio.gather(*self.tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, Exception):
                log.error("%s had failed: %r", task.get_name(), outcome)
        self.tasks.clear()
        if self.client is not None:
            await self.client.close()


class Gateway:
    """One running gateway: its topology sources, route table, listener and admin face."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload = reload
        self.parts: dict[Source, TopologyPart] = {}
        self.part_times: dict[Source, float] = {}
        self.metrics = Metrics()
        # Until the local datacenter is known (from --dc or the Consul agent) nothing routes.
        self.topology: Topology | None = None
        self.table = RouteTable.empty()
        self.listener: DataPlaneService | None = None
        self.admin: AdminServer | None = None
        self.budget = DescriptorBudget(0, 0)  # per process; settled at start
        self.control = ControlPlane(settings, self.update_part, self.metrics)
        self.stopping = asyncio.Event()
        self._build_error: str | None = None
        self._skip_reasons: set[str] = set()
        self.update_part(settings.static_topology())

    # --- topology -----------------------------------------------------------------------------

    def update_part(self, part: TopologyPart) -> None:
        """A source learned something: merge, rebuild the table and swap it atomically."""
        self.parts[part.source] = part
        self.part_times[part.source] = time.time()
        # Later wins: discovered gateways replace the primary_gateways bootstrap once they
        # exist, and what the operator wrote in the settings wins over both.
        order = [Source.PRIMARY_GATEWAYS, Source.CONSUL, Source.STATIC]
        try:
            topology = merge(
                [self.parts[s] for s in order if s in self.parts],
                datacenter=self.settings.dc,
                domain=self.settings.domain,
                expose_servers=self.settings.expose_servers,
            )
        except ValueError:
            return  # the local datacenter is not known yet
        if topology == self.topology:
            return
        try:
            table = RouteTable.build(topology)
        except Exception as error:
            # Nothing a source publishes may stop the sources: keep routing by the last
            # good table, say so once per distinct failure, count every one.
            self.metrics.route_table_failures.inc()
            if str(error) != self._build_error:
                self._build_error = str(error)
                log.exception("cannot build a route table; keeping the last good one")
            return
        self._build_error = None
        self._install(topology, table)

    def _install(self, topology: Topology, table: RouteTable) -> None:
        self.topology = topology
        old_skipped = set(self.table.skipped)
        self.table = table
        if self.listener is not None:
            self.listener.set_table(self.table)
        for skipped in table.skipped:
            if skipped not in old_skipped:
                log.warning("route skipped: %s", skipped)
        counts = collections.Counter(skipped.reason for skipped in table.skipped)
        self._skip_reasons |= counts.keys()  # a reason seen once is reported at 0 after
        for reason in self._skip_reasons:
            self.metrics.routes_skipped.labels(reason).set(counts[reason])
        self.metrics.route_table_updates.inc()
        per_kind = dict.fromkeys(RouteKind, 0)
        for route in [*self.table.exact.values(), *self.table.wildcard.values()]:
            per_kind[route.kind] += 1
        for kind, count in per_kind.items():
            self.metrics.routes.labels(kind.value).set(count)
        log.info(
            "route table installed",
            extra={"fields": {"routes": sum(per_kind.values()), "dc": topology.datacenter}},
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        self.budget = DescriptorBudget.for_limit(settings.max_connections)
        try:
            self.listener = await self._start_dataplane()
        except OSError as error:
            raise SettingsError(f"--listen {settings.listen}: {error.strerror}") from None
        listener = self.listener
        admin = AdminServer(
            self.admin_views(),
            settings.admin.host,
            settings.admin.port,
            stats=self.metrics.admin,
            allowed_hosts=settings.admin_allowed_host,
        )
        try:
            await admin.start()
        except OSError as error:
            await listener.drain(0)
            raise SettingsError(f"--admin {settings.admin}: {error.strerror}") from None
        self.admin = admin
        # Registration waits for the listener: Consul's TCP check must find it up.
        await self.control.start(listener.port)
        log.info(
            "meshgw listening",
            extra={
                "fields": {
                    "listen": f"{listener.host}:{listener.port}",
                    "admin": f"{admin.host}:{admin.port}",
                    "dc": self.topology.datacenter if self.topology else None,
                    "pump": listener.pump_mode,
                    "workers": settings.worker_count,
                    "max_connections": self.budget.connections,
                    "max_pipes": self.budget.pipes,
                    "expose_servers": settings.expose_servers,
                }
            },
        )

    async def _start_dataplane(self) -> DataPlaneService:
        settings = self.settings
        config = dataplane_config(settings, self.budget)
        host, port = settings.listen.host, settings.listen.port
        if settings.worker_count > 1:
            pool = WorkerPool(
                config,
                self.table,
                host,
                port,
                settings.worker_count,
                log_settings=(settings.log_format, settings.log_level),
                metrics=self.metrics,
            )
            try:
                await pool.start()
            except OSError:
                await pool.drain(0)
                raise
            return pool
        loop = asyncio.get_running_loop()
        listener = Listener(loop, config, self.table, host, port, metrics=self.metrics)
        listener.start()
        return listener

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT, then drain. Returns the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.serve()
        return 0

    async def serve(self) -> None:
        """Start, run until `stopping` is set, then drain (for embedding, without signals)."""
        await self.start()
        await self.stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        # Deregister first, so that Consul stops sending traffic before the drain begins.
        await self.control.deregister()
        listener = self.listener
        if listener is not None:
            listener.stop_accepting()
            self.metrics.draining.set(1)
            open_now = await listener.open_connections()
            timeout = self.settings.drain_timeout
            log.info(
                "draining",
                extra={"fields": {"open_connections": open_now, "deadline_s": timeout}},
            )
            closed = await listener.drain(timeout)
            log.info("drained", extra={"fields": {"closed_at_deadline": closed}})
        await self.control.stop()
        if self.admin is not None:
            await self.admin.stop()

    def reload(self) -> None:
        """SIGHUP: re-read settings; routes change in place, connections stay."""
        if self._reload is None:
            return
        try:
            new = self._reload()
        except SettingsError as error:
            log.error("reload refused, keeping the running settings: %s", error)
            return
        fixed = (
            "listen",
            "admin",
            "workers",
            "pump",
            "max_hello_bytes",
            "max_connections",
            "log_format",
            "log_level",
        )
        changed = [name for name in fixed if getattr(new, name) != getattr(self.settings, name)]
        if changed:
            log.warning("reload: %s take effect only after a restart", ", ".join(changed))
        self.settings = new
        self.update_part(new.static_topology())
        self.control.reload(new)
        log.info("settings reloaded")

    # --- views for the admin face -------------------------------------------------------------

    def admin_views(self) -> AdminViews:
        return AdminViews(
            routes=self.table_json,
            topology=self.topology_json,
            ready=self.ready,
            metrics=self.metrics_text,
        )

    async def metrics_text(self) -> bytes:
        own = generate_latest(self.metrics.registry)
        others = await self.listener.extra_metrics() if self.listener is not None else []
        return merge_metrics([own, *others]) if others else own

    def table_json(self) -> dict[str, Any]:
        return self.table.to_json()

    def topology_json(self) -> dict[str, Any]:
        now = time.time()
        sources: dict[str, dict[str, Any]] = {
            source.value: {"age_s": round(now - self.part_times[source], 3)}
            for source in self.parts
        }
        if Source.CONSUL.value in sources:
            sources[Source.CONSUL.value]["watches"] = self.control.watch_status()
        topo = self.topology
        if topo is None:
            return {"datacenter": None, "sources": sources}
        return {
            "datacenter": topo.datacenter,
            "domain": topo.domain,
            "trust_domain": topo.trust_domain,
            "primary_datacenter": topo.primary_datacenter,
            "servers": {node: str(e) for node, e in topo.servers.items()},
            "gateways": {
                f"{k.datacenter}/{k.partition}": [str(e) for e in v]
                for k, v in topo.gateways.items()
            },
            "services": {
                f"{k.namespace}/{k.name}": [str(e) for e in v] for k, v in topo.services.items()
            },
            "sources": sources,
        }

    def ready(self) -> tuple[bool, str]:
        if self.listener is None or not self.listener.listening:
            return False, "not listening"
        if self.topology is None:
            return False, "the local datacenter is not known yet (waiting for the Consul agent)"
        if not (self.table.exact or self.table.wildcard):
            return False, "no routes yet"
        return True, "ready"


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    import uvloop

    gateway = Gateway(settings, reload)
    return uvloop.run(gateway.run())
