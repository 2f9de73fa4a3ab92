"""The demo's gateways: real `meshgw run` child processes, their configs, logs and counters.

Each gateway gets a TOML file (so `meshgw routes --config` can explain its routes by hand) and a
log file. The demo reads each child's stderr itself, line by line, for as long as the child lives:
the pipe never fills, every line also goes to the log file, the `meshgw listening` line says the
gateway is up, and the access-log lines say which upstream carried each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from meshgw.demo.layout import GatewaySpec
from meshgw.topology import Source

LISTENING = re.compile(r"meshgw listening listen=(\S+) admin=(\S+)")
TABLE_INSTALLED = re.compile(r"\broute table installed\b")
ACCESS = re.compile(r"\bmeshgw\.access connection client=(\S+)")
UPSTREAM = re.compile(r" upstream=(\S+)")
STDERR_LIMIT = 1 << 20  # longest stderr line read whole
KEEP_ACCESS_LINES = 10_000  # client → upstream entries kept for lookups
DRAIN_DELAY = 1.0  # what the demo gateways are configured with
DRAIN_TIMEOUT = 5.0  # stops wait a little longer than both
_PR_SET_PDEATHSIG = 1
CONSUL_SOURCE = Source.CONSUL.value  # /v1/routes names where each endpoint was learned


def _toml(value: object) -> str:
    # Enough TOML for strings, booleans, numbers and lists of strings; JSON strings are TOML too.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[\n" + "".join(f"  {json.dumps(v)},\n" for v in value) + "]"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def write_config(spec: GatewaySpec, settings: Mapping[str, object]) -> Path:
    """The gateway's settings as a TOML file; keys are Settings field names."""
    spec.config.parent.mkdir(parents=True, exist_ok=True)
    title = f"meshgw demo: gateway {spec.index} of {spec.dc}"
    spec.config.write_text(toml_document(title, settings))
    return spec.config


def toml_document(title: str, settings: Mapping[str, object]) -> str:
    lines = [f"# {title}"] + [f"{key} = {_toml(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def agent_settings(
    spec: GatewaySpec,
    consul: str,
    *,
    expose_servers: bool,
    primary: tuple[str, list[str]] | None = None,
    access_log: bool = True,
) -> dict[str, object]:
    """What a demo gateway runs with: it asks its datacenter's agent for the datacenter, the
    servers and the remote gateways, and registers itself there (with its LAN and WAN addresses,
    both its listening address on loopback). A secondary's gateways also know the primary's
    gateways to start from, as Consul's primary_gateways bootstrap wants."""
    settings: dict[str, object] = {
        "consul": consul,
        "register": True,
        "proxy_id": spec.service_id,
        "expose_servers": expose_servers,
        "listen": spec.listen,
        "address": spec.listen,
        "wan_address": spec.listen,
        "admin": spec.admin,
    }
    if primary is not None:
        settings["primary_dc"], settings["primary_gateway"] = primary
    settings |= {
        "connect_timeout": "2s",
        # The agents carry a deregistration to every gateway in milliseconds on loopback.
        "drain_delay": f"{DRAIN_DELAY:g}s",
        "drain_timeout": f"{DRAIN_TIMEOUT:g}s",
        "access_log": access_log,
        "log_format": "text",
        "workers": 1,  # a few gateways on a laptop: one process each is plenty
    }
    return settings


def _find_prctl() -> Callable[..., int] | None:
    # Looked up once, in the parent: the child, between fork and exec, only calls it.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM (and drain) if the demo dies without stopping us."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_environment() -> dict[str, str]:
    # MESHGW_* variables would override the config file (env beats TOML): leave them out, so the
    # demo runs the same whatever the shell has set. CONSUL_* would make a gateway ask an agent.
    return {k: v for k, v in os.environ.items() if not k.startswith(("MESHGW_", "CONSUL_"))}


class GatewayStartError(Exception):
    def __init__(self, spec: GatewaySpec, message: str, output: list[str]) -> None:
        super().__init__(message)
        self.spec = spec
        self.output = output

    @property
    def address_in_use(self) -> bool:
        # meshgw says "address already in use" (bind_error); Python's own text capitalises it.
        return any("address already in use" in line.lower() for line in self.output)


@dataclass(slots=True)
class GatewayChild:
    spec: GatewaySpec
    proc: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    stopped_on_purpose: bool = False
    output: list[str] = field(default_factory=list)  # the last lines, for error messages
    # client ip:port → upstream ip:port ("" for a connection that never reached one)
    _upstreams: OrderedDict[str, str] = field(default_factory=OrderedDict)
    _waiters: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    _listening: asyncio.Future[None] | None = None
    # Set (and replaced) each time the gateway logs a new route table, and when it exits.
    _table_event: asyncio.Event = field(default_factory=asyncio.Event)
    last_routes: dict[str, Any] | None = None  # the last /v1/routes read by wait_routes
    _reader: asyncio.Task[None] | None = None
    _log: IO[str] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "meshgw", "run", "--config", str(self.spec.config)]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._listening = loop.create_future()
        self._table_event = asyncio.Event()
        self.spec.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.spec.log, "a", buffering=1)  # noqa: SIM115 - closed by _read_stderr
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=child_environment(),
            limit=STDERR_LIMIT,
            # Its own session: a Ctrl-C in the terminal reaches the demo only, which then stops
            # every gateway itself, by PID, in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        self._reader = asyncio.create_task(self._read_stderr())

    async def wait_listening(self, timeout: float) -> None:
        assert self._listening is not None
        try:
            async with asyncio.timeout(timeout):
                await self._listening
        except TimeoutError:
            raise GatewayStartError(
                self.spec, f"{self.name} did not start within {timeout:g} s", self.output
            ) from None

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None and self._log is not None
        try:
            while True:
                try:
                    raw = await self.proc.stderr.readline()
                except ValueError:  # a line over STDERR_LIMIT: skip it, keep reading
                    continue
                if not raw:
                    break
                line = raw.decode(errors="replace")
                self._log.write(line)
                self._take(line.rstrip("\n"))
        finally:
            self._log.close()
            code = await self.proc.wait()
            self.exit_code = code
            self._table_changed()
            if self._listening is not None and not self._listening.done():
                self._listening.set_exception(
                    GatewayStartError(
                        self.spec, f"{self.name} exited with status {code}", self.output
                    )
                )

    def _take(self, line: str) -> None:
        self.output.append(line)
        del self.output[:-20]
        access = ACCESS.search(line)
        if access:
            client = access.group(1)
            found = UPSTREAM.search(line)
            upstream = found.group(1) if found else ""
            waiter = self._waiters.pop(client, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(upstream)
                return
            self._upstreams[client] = upstream
            while len(self._upstreams) > KEEP_ACCESS_LINES:
                self._upstreams.popitem(last=False)
            return
        if TABLE_INSTALLED.search(line):
            self._table_changed()
        elif LISTENING.search(line) and self._listening is not None and not self._listening.done():
            self._listening.set_result(None)

    def _table_changed(self) -> None:
        event, self._table_event = self._table_event, asyncio.Event()
        event.set()

    async def wait_routes(
        self, ready: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Its route table (/v1/routes) once `ready` says it is complete: read now, then again
        each time the gateway logs a new table. TimeoutError when none was ready in time
        (`last_routes` is the last one read); GatewayStartError when the gateway exits."""
        async with asyncio.timeout(timeout):
            while True:
                event = self._table_event  # taken first: a table installed meanwhile wakes us
                if not self.running:
                    raise GatewayStartError(
                        self.spec, f"{self.name} exited with status {self.exit_code}", self.output
                    )
                self.last_routes = json.loads(await fetch_admin(self.spec.admin, "/v1/routes"))
                if ready(self.last_routes):
                    return self.last_routes
                await event.wait()

    async def upstream_of(self, client: str, timeout: float) -> str | None:
        """The upstream this gateway chose for the connection from `client` (ip:port), as its
        access log says once the connection is closed; None if no line came in time."""
        if client in self._upstreams:
            return self._upstreams.pop(client) or None
        waiter = self._waiters.setdefault(client, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(timeout):
                return await waiter or None
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(client, None)

    async def stop(self, timeout: float = DRAIN_DELAY + DRAIN_TIMEOUT + 5) -> int | None:
        """SIGTERM (the gateway drains), wait, SIGKILL if it outlives the timeout."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            self.stopped_on_purpose = True
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        return proc.returncode


# --- counters from /metrics --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counters:
    """What the demo shows of one gateway's /metrics."""

    to_local: int = 0  # connections routed within the gateway's datacenter
    to_remote: int = 0  # connections routed to another datacenter's or cluster's gateways
    aborted: int = 0  # routed connections that did not end cleanly (resets, drain timeouts)
    bytes: int = 0
    failovers: int = 0  # upstream connection attempts that failed and moved on
    rejections: tuple[tuple[str, int], ...] = ()


# Route kinds whose upstream is in the gateway's own datacenter (the rest cross to another one).
LOCAL_KINDS = (
    "local_server",
    "any_local_server",
    "local_service",
    "local_peering_server",
    "peered_export",
)
CLEAN_OUTCOMES = ("closed",)


def parse_counters(text: str) -> Counters:
    to_local = to_remote = aborted = total_bytes = failovers = 0
    rejections: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            value = int(sample.value)
            labels = sample.labels
            if sample.name == "meshgw_connections_total":
                if labels.get("route_kind") in LOCAL_KINDS:
                    to_local += value
                else:
                    to_remote += value
                if labels.get("outcome") not in CLEAN_OUTCOMES:
                    aborted += value
            elif sample.name == "meshgw_bytes_total":
                total_bytes += value
            elif sample.name == "meshgw_upstream_connect_failures_total":
                failovers += value
            elif sample.name == "meshgw_rejections_total":
                reason = labels.get("reason", "")
                rejections[reason] = rejections.get(reason, 0) + value
    return Counters(
        to_local, to_remote, aborted, total_bytes, failovers, tuple(sorted(rejections.items()))
    )


async def read_counters(children: Iterable[GatewayChild]) -> dict[str, Counters | None]:
    """Each running gateway's counters, from its /metrics (None where they cannot be read)."""

    async def read(child: GatewayChild) -> Counters | None:
        if not child.running:
            return None
        try:
            return parse_counters(await fetch_metrics(child.spec.admin))
        except (OSError, TimeoutError, ValueError):
            return None

    children = list(children)
    values = await asyncio.gather(*(read(child) for child in children))
    return {child.name: value for child, value in zip(children, values, strict=True)}


async def fetch_metrics(admin: str, timeout: float = 5.0) -> str:
    return await fetch_admin(admin, "/metrics", timeout)


async def fetch_admin(admin: str, path: str, timeout: float = 5.0) -> str:
    """GET http://<admin><path> with nothing but asyncio (one tiny request)."""
    host, _, port = admin.rpartition(":")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                f"GET {path} HTTP/1.0\r\nHost: {admin}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if status.split()[1:2] != ["200"]:
        raise OSError(f"GET http://{admin}{path} answered {status!r}")
    return body.decode()


# --- what a route table holds ------------------------------------------------------------------


def missing_routes(
    document: Mapping[str, Any], expected: Mapping[str, set[str]], refused: Iterable[str] = ()
) -> list[str]:
    """What a /v1/routes document lacks of `expected` (match → the addresses of its endpoints,
    every one healthy and learned from Consul) and of the names it should refuse; [] when it
    holds it all."""
    routes = {r.get("match"): r for r in document.get("routes", ()) if isinstance(r, Mapping)}
    missing = [f"{name} not refused" for name in refused if name not in document.get("refused", {})]
    for match, addresses in expected.items():
        route = routes.get(match)
        if route is None:
            if addresses:
                missing.append(f"no route for {match}")
            continue
        endpoints = route.get("endpoints", [])
        got = {e.get("address") for e in endpoints}
        if got != addresses:
            shown = ", ".join(sorted(map(str, got))) or "nothing"
            missing.append(f"{match} -> {shown}, not {', '.join(sorted(addresses)) or 'nothing'}")
        elif not all(e.get("healthy") and e.get("source") == CONSUL_SOURCE for e in endpoints):
            missing.append(f"{match}: an endpoint is unhealthy or not from Consul")
    return missing
