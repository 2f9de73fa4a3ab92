"""Shared fixtures: a gateway in a thread or a child process, and loopback backends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

import meshgw
from meshgw.app import Gateway
from meshgw.bench.hellos import python_hello
from meshgw.buildinfo import build
from meshgw.dataplane import PUMP_MODES
from meshgw.dataplane.sockmap import sockmap_unavailable
from meshgw.settings import Settings
from meshgw.simconsul import SimConsulThread
from tests.hellos import TRUST_DOMAIN

REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds any single wait in a test may take before it fails
# Set by CI to the build (meshgw.buildinfo.build()) a run must test: a run that imports another
# one (say the source tree, when the installed compiled package was meant) stops at once.
EXPECT_BUILD_ENV = "MESHGW_X_EXPECT_BUILD"


def pytest_report_header() -> str:
    return f"meshgw: {build()}, from {Path(meshgw.__file__).parent}"


def pytest_sessionstart(session: pytest.Session) -> None:
    expected = os.environ.get(EXPECT_BUILD_ENV)
    if expected and expected != build():
        raise pytest.UsageError(
            f"{EXPECT_BUILD_ENV}={expected!r}, but these tests import meshgw {build()!r} "
            f"from {Path(meshgw.__file__).parent}"
        )


# --- pump modes ---------------------------------------------------------------------------------

SOCKMAP_UNAVAILABLE = sockmap_unavailable()


def pump_param(mode: str, *values: Any) -> Any:
    """A test parameter for one pump mode: sockmap is skipped, with the kernel's reason, where
    kernel tunnels are unavailable (meshgw would fall back; the test would prove nothing)."""
    marks = []
    if mode == "sockmap" and SOCKMAP_UNAVAILABLE is not None:
        marks.append(pytest.mark.skip(reason=f"kernel tunnels: {SOCKMAP_UNAVAILABLE}"))
    return pytest.param(mode, *values, marks=marks)


@pytest.fixture(params=[pump_param(mode) for mode in PUMP_MODES])
def pump(request: pytest.FixtureRequest) -> str:
    """Every pump mode in turn."""
    return str(request.param)


# --- a gateway running in this process, on its own loop in a thread --------------------------


class GatewayThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gateway: Gateway | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        import uvloop

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.gateway = Gateway(self.settings)
            try:
                await self.gateway.start()
            except BaseException as error:
                self._error = error
                self._ready.set()
                return
            self._ready.set()
            await self.gateway.stopping.wait()
            await self.gateway.shutdown()

        uvloop.run(main())

    def start(self) -> GatewayThread:
        self._thread.start()
        assert self._ready.wait(WAIT), "gateway did not start"
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        assert self.gateway and self.gateway.listener
        return self.gateway.listener.port

    @property
    def admin_port(self) -> int:
        assert self.gateway and self.gateway.admin
        return self.gateway.admin.port

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the gateway's loop and return its result."""
        assert self.loop is not None
        done: dict[str, Any] = {}
        event = threading.Event()

        def run() -> None:
            try:
                done["value"] = fn()
            except BaseException as error:  # pragma: no cover - surfaced below
                done["error"] = error
            event.set()

        self.loop.call_soon_threadsafe(run)
        assert event.wait(WAIT)
        if "error" in done:
            raise done["error"]
        return done["value"]

    def active(self) -> int:
        return self.call(lambda: len(self.gateway.listener.dp.connections))  # type: ignore[union-attr]

    def wait_idle(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self.active():
            assert time.monotonic() < deadline, f"{self.active()} connections still open"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.loop is not None and self.gateway is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.gateway.stopping.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "gateway thread did not stop"


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayThread]]:
    started: list[GatewayThread] = []

    def make(**values: Any) -> GatewayThread:
        values.setdefault("dc", "dc1")
        values.setdefault("listen", "127.0.0.1:0")
        values.setdefault("admin", "127.0.0.1:0")
        values.setdefault("access_log", False)
        values.setdefault("drain_timeout", 2)
        values.setdefault("workers", 1)  # in this process, so tests can look inside
        values.setdefault("drain_delay", 0)  # tests of the drain window set it
        settings = Settings.load(values)
        gw = GatewayThread(settings).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


# --- a gateway as a child process (signals, CLI) -----------------------------------------------


class GatewayProcess:
    LISTENING = re.compile(r"meshgw listening listen=(\S+):(\d+) admin=(\S+):(\d+)")

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        if "--workers" not in args:
            args = [*args, "--workers", "1"]  # one process: its descriptors are the gateway's
        if "--drain-delay" not in args:
            args = [*args, "--drain-delay", "0"]  # tests of the drain window set it
        self.args = args
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "meshgw", "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._partial = b""
        self.port = 0
        self.admin_port = 0

    def wait_listening(self, timeout: float = WAIT) -> GatewayProcess:
        match = self.wait_for(self.LISTENING, timeout)
        self.port, self.admin_port = int(match.group(2)), int(match.group(4))
        return self

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = WAIT) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for line in self.lines:
            found = regex.search(line)
            if found:
                return found
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            # Raw reads, not readline(): a buffered reader would hide complete lines from select.
            sel.register(fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(deadline - time.monotonic()):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._partial += chunk
                *complete, self._partial = self._partial.split(b"\n")
                new = [raw.decode(errors="replace") + "\n" for raw in complete]
                self.lines.extend(new)  # every line, also those after a match
                for line in new:
                    found = regex.search(line)
                    if found:
                        return found
        raise AssertionError(f"{regex.pattern!r} not seen; stderr so far:\n{''.join(self.lines)}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        rest = self._partial + self.proc.stderr.read()
        self._partial = b""
        self.lines.extend(line.decode(errors="replace") + "\n" for line in rest.splitlines())
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(WAIT)
        if self.proc.stderr is not None:
            self.lines.extend(
                line.decode(errors="replace") + "\n"
                for line in (self._partial + self.proc.stderr.read()).splitlines()
            )
            self._partial = b""
            self.proc.stderr.close()

    def tracebacks(self) -> list[str]:
        return [line for line in self.lines if line.startswith("Traceback")]


@pytest.fixture
def gateway_process() -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(
        *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> GatewayProcess:
        """`prefix`: a command that runs the gateway (setpriv, to take capabilities away)."""
        proc = GatewayProcess(list(args), env, prefix)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
    # Whatever a test did to it, a gateway never answers with a traceback.
    for proc in started:
        assert proc.tracebacks() == [], "".join(proc.lines)


# --- loopback backends -------------------------------------------------------------------------


@dataclass
class Backend:
    """A TCP server in a thread; `handler(conn)` runs per connection in its own thread."""

    handler: Callable[[socket.socket], None]
    host: str = "127.0.0.1"
    sock: socket.socket = field(init=False)
    accepted: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT * 3)
        try:
            self.handler(conn)
        except BaseException as error:  # surfaced by close()
            self.errors.append(error)
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._accepter.join(WAIT)
        for thread in self.threads:
            thread.join(WAIT * 3)


@pytest.fixture
def backend_factory() -> Iterator[Callable[..., Backend]]:
    made: list[Backend] = []

    def make(handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> Backend:
        backend = Backend(handler, host)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo(conn: socket.socket) -> None:
    """A backend handler that sends back everything it receives, until EOF."""
    while data := conn.recv(65536):
        conn.sendall(data)


def marker(backend_factory: Callable[..., Backend], name: bytes) -> Backend:
    """A backend that answers every connection with its name: which endpoint a route chose."""

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(name)

    return backend_factory(handle)


def ask(port: int, sni: str) -> bytes:
    """What the endpoint the gateway routes `sni` to answers (a marker's name)."""
    with connect(port) as client:
        client.sendall(python_hello(sni))
        return recv_all(client)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer closed (EOF or reset) within WAIT seconds; data before it is drained."""
    sock.settimeout(WAIT)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def stream(seed: bytes, total: int, block: int = 1 << 20) -> Iterator[bytes]:
    """Deterministic pseudo-random blocks: cheap to make, impossible to pass by accident."""
    base = hashlib.shake_256(seed).digest(block)
    sent = 0
    index = 0
    while sent < total:
        size = min(block, total - sent)
        chunk = index.to_bytes(8, "big") + base[8:size] if size > 8 else base[:size]
        yield chunk
        sent += size
        index += 1


def eventually(
    check: Callable[[], Any], timeout: float = WAIT, what: str = "condition not met in time"
) -> Any:
    """Poll a condition that no event announces (state seen through HTTP or /proc)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Stop a child meshgw as its service manager would: SIGTERM, then SIGKILL if it has not
    exited within `timeout`; close the stderr pipe it was read through."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc.stderr is not None:
        proc.stderr.close()


def lines_until(stream: IO[Any], done: Callable[[str], bool], timeout: float) -> list[str]:
    """Lines of `stream` up to the first that is `done`, or up to EOF or the deadline.

    Reads the descriptor itself: a text stream's own buffer would hide lines from select().
    """
    fd = stream.fileno()
    seen: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                seen.append(raw.decode(errors="replace") + "\n")
                if done(seen[-1]):
                    return seen
    return seen


# --- a simulated Consul agent per test ----------------------------------------------------------


@pytest.fixture
def consul() -> Iterator[Callable[..., SimConsulThread]]:
    """Start simulated Consul agents (no servers, a fixed trust domain unless told); stopped
    after the test."""
    made: list[SimConsulThread] = []

    def make(**options: Any) -> SimConsulThread:
        options.setdefault("servers", 0)
        options.setdefault("trust_domain", TRUST_DOMAIN)
        sim = SimConsulThread(**options).start()
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.stop()
