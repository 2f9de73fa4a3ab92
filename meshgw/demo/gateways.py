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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from meshgw.demo.layout import PRIMARY_DC, GatewaySpec

LISTENING = re.compile(r"meshgw listening listen=(\S+) admin=(\S+)")
ACCESS = re.compile(r"\bmeshgw\.access connection client=(\S+)")
UPSTREAM = re.compile(r" upstream=(\S+)")
STDERR_LIMIT = 1 << 20  # longest stderr line read whole
KEEP_ACCESS_LINES = 10_000  # client → upstream entries kept for lookups
DRAIN_TIMEOUT = 5.0  # what the demo gateways are configured with; stops wait a little longer
_PR_SET_PDEATHSIG = 1


def _toml(value: object) -> str:
    # Enough TOML for strings, booleans, numbers and lists of strings; JSON strings are TOML too.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[\n" + "".join(f"  {json.dumps(v)},\n" for v in value) + "]"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def write_config(
    spec: GatewaySpec, servers: list[str], gateways: list[str], access_log: bool = True
) -> Path:
    """The gateway's settings as a TOML file; keys are Settings field names."""
    settings: dict[str, object] = {
        "dc": spec.dc,
        "primary_dc": PRIMARY_DC,
        "listen": spec.listen,
        "admin": spec.admin,
        "expose_servers": True,
        "server": servers,
        "gateway": gateways,
        "connect_timeout": "2s",
        "drain_timeout": f"{DRAIN_TIMEOUT:g}s",
        "access_log": access_log,
        "log_format": "text",
        "workers": 1,  # six gateways on a laptop: one process each is plenty
    }
    lines = [f"# meshgw demo: gateway {spec.index} of {spec.dc}"]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    spec.config.parent.mkdir(parents=True, exist_ok=True)
    spec.config.write_text("\n".join(lines) + "\n")
    return spec.config


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
        if LISTENING.search(line) and self._listening is not None and not self._listening.done():
            self._listening.set_result(None)

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

    async def stop(self, timeout: float = DRAIN_TIMEOUT + 5) -> int | None:
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

    to_local: int = 0  # connections routed to a local server
    to_remote: int = 0  # connections routed to another datacenter's gateways
    aborted: int = 0  # routed connections that did not end cleanly (resets, drain timeouts)
    bytes: int = 0
    failovers: int = 0  # upstream connection attempts that failed and moved on
    rejections: tuple[tuple[str, int], ...] = ()


LOCAL_KINDS = ("local_server", "any_local_server")
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


async def fetch_metrics(admin: str, timeout: float = 5.0) -> str:
    """GET http://<admin>/metrics with nothing but asyncio (one tiny request)."""
    host, _, port = admin.rpartition(":")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                f"GET /metrics HTTP/1.0\r\nHost: {admin}\r\nConnection: close\r\n\r\n".encode()
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
        raise OSError(f"GET http://{admin}/metrics answered {status!r}")
    return body.decode()
