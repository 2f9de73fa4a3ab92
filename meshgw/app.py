"""The composition root: the one place that knows every layer and wires them together.

Settings → topology parts → merged Topology → RouteTable → data plane; the admin face reads the
gateway's state. Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads settings in place.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from meshgw.admin import AdminServer, AdminViews
from meshgw.dataplane.listener import DataPlaneConfig, Listener
from meshgw.dataplane.workers import WorkerPool, merge_metrics
from meshgw.metrics import Metrics
from meshgw.routing import RouteKind, RouteTable
from meshgw.settings import Settings, SettingsError
from meshgw.topology import Source, Topology, TopologyPart, merge

log = logging.getLogger("meshgw")

# Descriptors kept for everything that is not a proxied connection (admin, Consul, logs, pipes).
RESERVED_FDS = 256


def dataplane_config(settings: Settings) -> DataPlaneConfig:
    return DataPlaneConfig(
        hello_timeout=settings.hello_timeout,
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout,
        max_hello_bytes=settings.max_hello_bytes,
        max_connections=settings.max_connections,
        pump=settings.pump,
        access_log=settings.access_log,
    )


def raise_fd_limit(max_connections: int) -> int:
    """Lift the soft open-file limit towards what the connection cap needs (two per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + RESERVED_FDS
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < wanted:
        log.warning(
            "open-file limit %d is below the %d that --max-connections %d needs; raise "
            "`ulimit -n` or lower --max-connections",
            soft,
            wanted,
            max_connections,
        )
    return soft


class Gateway:
    """One running gateway: its topology sources, route table, listener and admin face."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload = reload
        self.parts: dict[Source, TopologyPart] = {Source.STATIC: settings.static_topology()}
        self.part_times: dict[Source, float] = {Source.STATIC: time.time()}
        self.topology: Topology = self._merge()
        self.table = RouteTable.build(self.topology)
        self.metrics = Metrics()
        self.listener: Listener | WorkerPool | None = None
        self.admin: AdminServer | None = None
        self.stopping = asyncio.Event()

    # --- topology -----------------------------------------------------------------------------

    def _merge(self) -> Topology:
        order = [Source.CONSUL, Source.PRIMARY_GATEWAYS, Source.STATIC]  # later wins
        return merge(
            [self.parts[s] for s in order if s in self.parts],
            datacenter=self.settings.dc,
            domain=self.settings.domain,
            expose_servers=self.settings.expose_servers,
        )

    def update_part(self, part: TopologyPart) -> None:
        """A source learned something: merge, rebuild the table and swap it atomically."""
        self.parts[part.source] = part
        self.part_times[part.source] = time.time()
        self._install(self._merge())

    def _install(self, topology: Topology) -> None:
        self.topology = topology
        self.table = RouteTable.build(topology)
        if self.listener is not None:
            self.listener.set_table(self.table)
        self.metrics.route_table_updates.inc()
        counts = dict.fromkeys(RouteKind, 0)
        for route in [*self.table.exact.values(), *self.table.wildcard.values()]:
            counts[route.kind] += 1
        for kind, count in counts.items():
            self.metrics.routes.labels(kind.value).set(count)
        log.info(
            "route table installed",
            extra={"fields": {"routes": sum(counts.values()), "dc": topology.datacenter}},
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        raise_fd_limit(settings.max_connections)
        try:
            self.listener = await self._start_dataplane()
        except OSError as error:
            raise SettingsError(f"--listen {settings.listen}: {error.strerror}") from None
        listener = self.listener
        admin = AdminServer(self.admin_views(), settings.admin.host, settings.admin.port)
        try:
            await admin.start()
        except OSError as error:
            await listener.drain(0)
            raise SettingsError(f"--admin {settings.admin}: {error.strerror}") from None
        self.admin = admin
        log.info(
            "meshgw listening",
            extra={
                "fields": {
                    "listen": f"{listener.host}:{listener.port}",
                    "admin": f"{admin.host}:{admin.port}",
                    "dc": self.topology.datacenter if self.topology else None,
                    "pump": listener.pump_mode,
                    "workers": settings.workers,
                    "expose_servers": settings.expose_servers,
                }
            },
        )

    async def _start_dataplane(self) -> Listener | WorkerPool:
        settings = self.settings
        config = dataplane_config(settings)
        host, port = settings.listen.host, settings.listen.port
        if settings.workers > 1:
            pool = WorkerPool(
                config,
                self.table,
                host,
                port,
                settings.workers,
                log_settings=(settings.log_format, settings.log_level),
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
        listener = self.listener
        if listener is not None:
            listener.stop_accepting()
            self.metrics.draining.set(1)
            open_now = listener.open_connections()
            timeout = self.settings.drain_timeout
            log.info(
                "draining",
                extra={"fields": {"open_connections": open_now, "deadline_s": timeout}},
            )
            closed = await listener.drain(timeout)
            log.info("drained", extra={"fields": {"closed_at_deadline": closed}})
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
        fixed = ("listen", "admin", "workers", "pump", "max_hello_bytes")
        changed = [name for name in fixed if getattr(new, name) != getattr(self.settings, name)]
        if changed:
            log.warning("reload: %s take effect only after a restart", ", ".join(changed))
        self.settings = new
        self.parts[Source.STATIC] = new.static_topology()
        self._install(self._merge())
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
        if isinstance(self.listener, WorkerPool):
            return merge_metrics([own, *await self.listener.metrics()])
        return own

    def table_json(self) -> dict[str, Any]:
        return self.table.to_json()

    def topology_json(self) -> dict[str, Any]:
        now = time.time()
        topo = self.topology
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
            "sources": {
                source.value: {"age_s": round(now - self.part_times[source], 3)}
                for source in self.parts
            },
        }

    def ready(self) -> tuple[bool, str]:
        if self.listener is None or not self.listener.listening:
            return False, "not listening"
        if not (self.table.exact or self.table.wildcard):
            return False, "no routes yet"
        return True, "ready"


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    import uvloop

    gateway = Gateway(settings, reload)
    return uvloop.run(gateway.run())
