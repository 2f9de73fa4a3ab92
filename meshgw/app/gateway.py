"""The gateway's life: start the data plane, the admin face and the control plane, install
route tables as sources publish, reload on SIGHUP, drain on SIGTERM.

Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads settings in place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from meshgw.addresses import Address, hostport
from meshgw.admin import AdminServer, AdminViews
from meshgw.app.controlplane import ControlPlane
from meshgw.dataplane.budget import DescriptorBudget
from meshgw.dataplane.context import DataPlaneConfig
from meshgw.dataplane.listener import Listener
from meshgw.dataplane.service import DataPlaneService
from meshgw.dataplane.workers import WorkerPool, WorkerStartError
from meshgw.metrics import Metrics, merge_metrics
from meshgw.routing import RouteKind, RouteTable
from meshgw.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GATEWAY_PORT,
    Settings,
    SettingsError,
)
from meshgw.topology import Source, Sources, Topology, TopologyPart, host_names

log = logging.getLogger("meshgw")


def dataplane_config(settings: Settings, budget: DescriptorBudget) -> DataPlaneConfig:
    return DataPlaneConfig(
        hello_timeout=settings.hello_timeout,
        connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        idle_timeout=settings.idle_timeout,
        max_hello_bytes=settings.max_hello_bytes,
        max_connections=budget.connections,
        max_pipes=budget.pipes,
        pump=settings.pump,
        access_log=settings.access_log,
        proxy_protocol_from=(
            tuple(settings.proxy_protocol_from) if settings.proxy_protocol == "accept" else None
        ),
    )


class StartupError(Exception):
    """The gateway cannot start for a reason that is not a setting (one line, exit 1)."""


def bind_error(flag: str, address: Address, error: OSError) -> str:
    """Why an address cannot be bound, and what to do about it."""
    where = f"{flag} {address}"
    if error.errno == errno.EACCES and 0 < address.port < 1024:
        return (
            f"{where}: permission denied: ports below 1024 need root or the "
            "CAP_NET_BIND_SERVICE capability (AmbientCapabilities= in a systemd unit); or "
            f"listen on {DEFAULT_GATEWAY_PORT} and let the load balancer or firewall map "
            f"{address.port} to it"
        )
    if error.errno == errno.EADDRINUSE:
        return (
            f"{where}: address already in use: another process listens there "
            f"(`ss -ltnp 'sport = :{address.port}'` names it), or another meshgw still drains"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface of this host has address {address.host}"
    return f"{where}: {error.strerror or error}"


class Gateway:
    """One running gateway: its topology sources, route table, listener and admin face."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload = reload
        self.sources = Sources(
            datacenter=settings.dc, domain=settings.domain, expose_servers=settings.expose_servers
        )
        self.metrics = Metrics()
        # Until the local datacenter is known (from --dc or the Consul agent) nothing routes.
        self.topology: Topology | None = None
        self.table = RouteTable.empty()
        self.listener: DataPlaneService | None = None
        self.admin: AdminServer | None = None
        self.budget = DescriptorBudget(0, 0)  # per process; settled at start
        self.control = ControlPlane(settings, self.update_part, self.metrics)
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()  # a second SIGTERM: skip the drain delay
        self.draining = False
        self._build_error: str | None = None
        self._skip_reasons: set[str] = set()
        self.update_part(settings.static_topology())

    # --- topology -----------------------------------------------------------------------------

    def update_part(self, part: TopologyPart) -> None:
        """A source learned something: merge, rebuild the table and swap it atomically."""
        topology = self.sources.update(part)
        if topology is None or topology == self.topology:
            return  # the local datacenter is not known yet, or nothing changed
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
        self.control.resolver.follow(host_names(topology))
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
        for warning in settings.warnings():
            log.warning(warning)
        self.budget = DescriptorBudget.for_limit(settings.max_connections)
        try:
            self.listener = await self._start_dataplane()
        except OSError as error:
            raise SettingsError(bind_error("--listen", settings.listen, error)) from None
        except WorkerStartError as error:
            raise StartupError(str(error)) from None
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
            raise SettingsError(bind_error("--admin", settings.admin, error)) from None
        self.admin = admin
        listener.set_demand(self.control.demand)
        # Registration waits for the listener: Consul's TCP check must find it up.
        await self.control.start(listener.port)
        log.info(
            "meshgw listening",
            extra={
                "fields": {
                    "listen": hostport(listener.host, listener.port),
                    "admin": hostport(admin.host, admin.port),
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
            except (OSError, WorkerStartError):
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
            loop.add_signal_handler(signum, self._stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.serve()
        return 0

    async def serve(self) -> None:
        """Start, run until `stopping` is set, then drain (for embedding, without signals)."""
        await self.start()
        await self.stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        # Deregister first, so that Consul stops sending traffic before the drain begins. Then
        # keep accepting for the drain delay: sidecars in remote mode ignore a gateway's health
        # and stop using it only once its deregistration has reached them.
        self.draining = True
        self.metrics.draining.set(1)
        await self.control.deregister()
        listener = self.listener
        delay = self.settings.drain_delay
        if listener is not None and delay > 0:
            log.info("deregistered; still accepting", extra={"fields": {"for_s": delay}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hurry.wait(), delay)
        if listener is not None:
            listener.stop_accepting()
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

    def _stop_signal(self) -> None:
        if self.stopping.is_set():
            self.hurry.set()
        self.stopping.set()

    def reload(self) -> None:
        """SIGHUP: re-read settings; routes change in place, connections stay."""
        if self._reload is None:
            return
        try:
            new = self._reload()
        except SettingsError as error:
            log.error("reload refused, keeping the running settings: %s", error)
            return
        changed = self.settings.needing_restart(new)
        if changed:
            log.warning("reload: %s take effect only after a restart", ", ".join(changed))
        self.settings = new
        self.sources.configure(
            datacenter=new.dc, domain=new.domain, expose_servers=new.expose_servers
        )
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

    async def table_json(self) -> dict[str, Any]:
        down = await self.listener.down_endpoints() if self.listener is not None else {}
        return self.table.to_json(down=lambda target: target.address in down)

    def topology_json(self) -> dict[str, Any]:
        sources: dict[str, dict[str, Any]] = {
            source: {"age_s": age} for source, age in self.sources.ages().items()
        }
        if Source.CONSUL.value in sources:
            sources[Source.CONSUL.value]["watches"] = self.control.watch_status()
        topology = self.topology.to_json() if self.topology else {"datacenter": None}
        return {**topology, "sources": sources}

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: deregistered, finishing open connections"
        if self.listener is None or not self.listener.listening:
            return False, "not listening"
        if self.topology is None:
            return False, "the local datacenter is not known yet (waiting for the Consul agent)"
        notes = "".join(f"\nnote: {text}" for text in self.settings.warnings())
        if not (self.table.exact or self.table.wildcard):
            return False, "no routes yet" + notes
        return True, "ready" + notes


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    import uvloop

    gateway = Gateway(settings, reload)
    return uvloop.run(gateway.run())
