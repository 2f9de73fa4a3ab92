"""The socket half of the hello campaign: fuzzed openings sent to a real ``meshgw run`` child.

One gateway (one worker, no access log) routes a few names to loopback backends that keep what
they receive. Clients, a bounded number at a time, send mostly mutated hellos of known and
unknown names, some in several sends, some closing early (FIN or RST) or stalling until the
hello deadline. The oracle for each opening is the sans-I/O reader (which the in-process half
checks against itself) plus the route names below, written out independently of meshgw's
route table. Checked at the end:

* a backend received only the openings of routed names, each byte-exact, on a backend that
  name routes to, and every routed opening arrived (an opening cut by an RST may arrive as a
  prefix, or not at all);
* every client connection ended before its deadline and no client received a byte;
* the gateway counted each rejection under the reason the reader predicts;
* no traceback in the gateway's log, no internal error counted;
* the gateway's descriptors are back to their baseline, give or take the splice pipes it keeps
  for reuse (``meshgw_splice_pipes_open``, two descriptors each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from meshgw.bench import hellos as H
from meshgw.bench.harness import Child
from meshgw.wire.clienthello import DEFAULT_MAX_HELLO_BYTES, Hello, Rejection, parse_client_hello
from tests import fuzz_inputs as F
from tests.fuzz_hellos import Progress, Report

HELLO_TIMEOUT = 1.0  # the gateway's; stalled clients wait this long for it to close
CLIENT_DEADLINE = HELLO_TIMEOUT + 15.0  # a client connection not over by then has hung
BACKEND_DEADLINE = CLIENT_DEADLINE + 5.0
SETTLE_DEADLINE = 15.0  # for the gateway to close everything and give descriptors back
LISTENING = re.compile(r"meshgw listening listen=\S+:(\d+) admin=\S+:(\d+)")
_LINGER_RESET = struct.pack("ii", 1, 0)
_TD = F.TD
_REMOTE_SUFFIXES = ("server.dc2.consul", f"dc2.internal.{_TD}")


def routed_to(sni: str) -> frozenset[str]:
    """The backends a canonical name may reach, as Consul's gateway routes them (exact local
    server names; dc2 by its server and mesh wildcards). Nothing else may reach any."""
    if sni in ("a.server.dc1.consul", "b.server.dc1.consul"):
        return frozenset(sni[0])
    if sni == "server.dc1.consul":
        return frozenset("ab")
    if any(sni == s or sni.endswith("." + s) for s in _REMOTE_SUFFIXES):
        return frozenset(("dc2",))
    return frozenset()


def gateway_argv(ports: dict[str, int]) -> list[str]:
    argv = [sys.executable, "-m", "meshgw", "run", "--dc", "dc1", "--trust-domain", _TD]
    argv += ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "1"]
    argv += ["--no-access-log", "--expose-servers", "--hello-timeout", str(HELLO_TIMEOUT)]
    argv += ["--server", f"a=127.0.0.1:{ports['a']}", "--server", f"b=127.0.0.1:{ports['b']}"]
    argv += ["--gateway", f"dc2=127.0.0.1:{ports['dc2']}", "--drain-timeout", "1"]
    return argv


# --- one client connection ----------------------------------------------------------------------


@dataclass
class Plan:
    """One client connection: what it sends, how it ends, and what must come of it."""

    index: int
    kind: str
    data: bytes  # every byte the client sends
    pieces: list[bytes]  # ``data`` in sends
    pause: bool  # a short pause between sends, so they arrive as separate reads
    ending: str  # eof: shutdown, read to the end; fin/rst: close early; hold: wait, send nothing
    label: str = ""  # the outcome the reader predicts: routed, or the gateway's reason
    expect: frozenset[str] = frozenset()  # backends one of which must receive ``data`` exactly

    @property
    def uncertain(self) -> bool:
        """Whether the gateway may never see the bytes (reset first, or never accepted:
        TCP_DEFER_ACCEPT keeps a connection that sent nothing in the kernel)."""
        return self.ending == "rst" or not self.data


def predict(plan: Plan) -> None:
    result = parse_client_hello(plan.data, DEFAULT_MAX_HELLO_BYTES)
    if isinstance(result, Hello):
        plan.expect = routed_to(result.sni)
        plan.label = "routed" if plan.expect else "unknown_sni"
    elif isinstance(result, Rejection):
        plan.label = result.reason.value
    else:
        plan.label = "hello_timeout" if plan.ending == "hold" else "client_closed"


class PlanMaker:
    """Openings for the sockets: mostly real hellos (stamped unique), often mutated."""

    def __init__(self, rng: Random) -> None:
        self.rng = rng
        self.seeds = F.seed_pool()
        self.hellos = [s for s in self.seeds if s.data[:1] == b"\x16"]
        self.inputs = F.InputMaker(rng, self.seeds)

    def next(self, index: int) -> Plan:
        rng = self.rng
        kind, data, seed = self._content(index)
        roll = rng.random()
        ending = (
            "eof" if roll < 0.88 else "fin" if roll < 0.93 else "rst" if roll < 0.98 else "hold"
        )
        if ending in ("fin", "rst"):
            data = data[: rng.randrange(len(data) + 1)]
        elif ending == "hold":
            data = seed.data[: rng.randrange(1, len(seed.data))]
        if not data and ending in ("eof", "hold"):
            ending = "fin"
        pieces = [data]
        if rng.random() < 0.3 and len(data) > 1:
            cuts = sorted({rng.randrange(1, len(data)) for _ in range(rng.randint(1, 5))})
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        plan = Plan(index, kind, data, pieces, rng.random() < 0.5, ending)
        predict(plan)
        return plan

    def _content(self, index: int) -> tuple[str, bytes, F.Seed]:
        rng = self.rng
        seed = rng.choice(self.hellos)
        stamped = _stamp(seed.data, index)
        roll = rng.random()
        if roll < 0.2:
            return "clean", stamped + F.trailer(rng), seed
        if roll < 0.3:  # the stream goes on after the hello: must arrive intact; past 64 KiB
            # the gateway's auto pump switches to splice
            size = rng.randint(1, 60_000) if rng.random() < 0.8 else rng.randint(60_000, 400_000)
            return "clean+stream", stamped + rng.randbytes(size), seed
        if roll < 0.75:
            return "mutated", F.mutate(rng, stamped, rng.randint(1, 3), seed), seed
        if roll < 0.9:
            data = H.reframe(stamped, F.record_sizes(rng)) + F.trailer(rng)
            if rng.random() < 0.5:
                data = F.mutate(rng, data, rng.randint(1, 2))
            return "reframed", data, seed
        made = self.inputs.random_bytes() if roll < 0.95 else self.inputs.plausible()
        return made.kind, made.data, seed


def _stamp(hello: bytes, index: int) -> bytes:
    """Write the connection's number into the client random, so openings are told apart."""
    tag = index.to_bytes(8, "big")
    return hello[:11] + tag + hello[19:]


async def run_client(plan: Plan, port: int) -> str | None:
    """Carry out one plan; a failure's description, or None."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(CLIENT_DEADLINE):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for i, piece in enumerate(plan.pieces):
                    if i and plan.pause:
                        await asyncio.sleep(0.001)
                    await loop.sock_sendall(sock, piece)
            except OSError as error:  # a rejected opening may be closed while it is sent
                return f"send failed: {error!r}" if plan.expect else None
            if plan.ending == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            if plan.ending in ("rst", "fin"):
                return None
            if plan.ending == "eof":
                with contextlib.suppress(OSError):  # already closed by the gateway
                    sock.shutdown(socket.SHUT_WR)
            got, reset = await _read_to_end(loop, sock)
    except TimeoutError:
        return f"not over after {CLIENT_DEADLINE:g} s (ending {plan.ending}, {plan.label})"
    finally:
        sock.close()
    if got:
        return f"the client received {got} bytes; nothing may answer it"
    if reset and plan.expect:
        return "a routed connection was reset"
    return None


async def _read_to_end(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[int, bool]:
    got = 0
    while True:
        try:
            chunk = await loop.sock_recv(sock, 65536)
        except ConnectionResetError:
            return got, True
        if not chunk:
            return got, False
        got += len(chunk)


# --- backends -----------------------------------------------------------------------------------


@dataclass
class Backends:
    """Loopback servers that read each connection to its end and keep what came."""

    ledger: Ledger
    names: tuple[str, ...] = ("a", "b", "dc2")
    failures: list[str] = field(default_factory=list)
    socks: dict[str, socket.socket] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> dict[str, int]:
        for name in self.names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            sock.setblocking(False)
            self.socks[name] = sock
            self._spawn(self._accept(name, sock))
        return {name: sock.getsockname()[1] for name, sock in self.socks.items()}

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept(self, name: str, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            self._spawn(self._take(name, conn))

    async def _take(self, name: str, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        data = bytearray()
        try:
            async with asyncio.timeout(BACKEND_DEADLINE):
                while chunk := await loop.sock_recv(conn, 65536):
                    data += chunk
        except ConnectionResetError:
            self.ledger.arrived(name, bytes(data), True)
        except TimeoutError:
            self.failures.append(f"backend {name}: a connection not over after {len(data)} bytes")
        else:
            self.ledger.arrived(name, bytes(data), False)
        finally:
            conn.close()

    async def stop(self) -> None:
        """Let connections in flight end (each has its deadline), then close."""
        accepters = [t for t in self.tasks if t.get_coro().__name__ == "_accept"]  # type: ignore[union-attr]
        while len(self.tasks) > len(accepters):
            await asyncio.wait(set(self.tasks) - set(accepters), timeout=BACKEND_DEADLINE)
        for task in accepters:
            task.cancel()
        await asyncio.gather(*accepters, return_exceptions=True)
        for sock in self.socks.values():
            sock.close()


class Ledger:
    """Which openings may reach which backend, matched as deliveries come in (so a long
    campaign holds only what is in flight), and the outcome counts the gateway must show."""

    def __init__(self) -> None:
        self.exact: dict[bytes, list[Plan]] = {}  # must arrive whole, on a backend it names
        self.cut_short: list[Plan] = []  # reset early: may arrive as a prefix, or not at all
        self.sure: Counter[str] = Counter()  # outcomes of the plans the gateway surely saw
        self.slack = 0  # plans the gateway may never have seen
        self.delivered = 0
        self.failures: list[str] = []

    def expect(self, plan: Plan) -> None:
        """Called before the plan's first byte is sent."""
        if plan.uncertain:
            self.slack += 1
        else:
            self.sure[plan.label] += 1
        if plan.expect and plan.ending == "rst":
            self.cut_short.append(plan)
        elif plan.expect:
            self.exact.setdefault(plan.data, []).append(plan)

    def arrived(self, name: str, blob: bytes, reset: bool) -> None:
        self.delivered += 1
        candidates = [p for p in self.exact.get(blob, ()) if name in p.expect]
        if candidates:
            plans = self.exact[blob]
            plans.remove(candidates[0])
            if not plans:
                del self.exact[blob]
            if reset and candidates[0].ending == "eof":
                self.failures.append(f"backend {name}: reset after a whole routed opening")
            if not _names_inside(blob, name):
                self.failures.append(f"backend {name}: a hello without its name: {_hex(blob)}")
            return
        for plan in self.cut_short:
            if name in plan.expect and plan.data.startswith(blob):
                self.cut_short.remove(plan)
                return
        self.failures.append(f"backend {name}: unexpected {len(blob)} bytes: {_hex(blob)}")

    def missing(self) -> list[str]:
        return [
            f"routed #{p.index} ({p.kind}, {p.ending}) never arrived: {_hex(p.data)}"
            for plans in self.exact.values()
            for p in plans
        ]


def _hex(data: bytes, limit: int = 4096) -> str:
    text = data[:limit].hex()
    return text if len(data) <= limit else f"{text}... ({len(data)} bytes)"


def _names_inside(blob: bytes, backend: str) -> bool:
    """An independent look: the reassembled handshake holds a name this backend serves."""
    payload = H.handshake_payload(blob)[1].lower()
    if backend == "dc2":
        return any(s.encode() in payload for s in _REMOTE_SUFFIXES)
    return b"server.dc1.consul" in payload


# --- the gateway ---------------------------------------------------------------------------------


class GatewayUnderTest:
    """The ``meshgw run`` child: its ports, metrics, descriptors and log."""

    def __init__(self, ports: dict[str, int], folder: Path) -> None:
        self.log = folder / "gateway.log"
        self.child = Child(gateway_argv(ports), cpus=None, log=self.log)
        self.port = self.admin_port = 0

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log.read_text(errors="replace"))
            if found:
                self.port, self.admin_port = int(found.group(1)), int(found.group(2))
                return
            if not self.child.alive():
                break
            time.sleep(0.02)
        raise RuntimeError(f"the gateway did not start: {self.child.tail()}")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.child.pid}/fd"))

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, by its line key (name and labels)."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def settled(self, baseline: int) -> tuple[int, int, float]:
        """Wait until no connection is open and descriptors are back to ``baseline`` (less
        the kept pipes); answers (descriptors, pipes open, active) as last seen."""
        deadline = time.monotonic() + SETTLE_DEADLINE
        while True:
            fds = self.fds()
            samples = self.metrics()
            pipes = int(samples.get("meshgw_splice_pipes_open", 0))
            active = samples.get("meshgw_active_connections", -1)
            if (active == 0 and fds - 2 * pipes <= baseline) or time.monotonic() > deadline:
                return fds, pipes, active
            time.sleep(0.05)  # state seen only through /proc and HTTP: polled

    def tracebacks(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if "Traceback" in line]

    def stop(self) -> int | None:
        return self.child.stop()


def check_counters(ledger: Ledger, samples: dict[str, float]) -> list[str]:
    """Each reason the gateway counted, against the reader's prediction: exact for plans the
    gateway surely saw; the uncertain ones (reset, or sent nothing) may land anywhere."""
    sure, slack = ledger.sure, ledger.slack
    counted: Counter[str] = Counter()
    for key, value in samples.items():
        found = re.fullmatch(r'meshgw_rejections_total\{reason="([^"]+)"\}', key)
        if found:
            counted[found.group(1)] = int(value)
        elif key.startswith("meshgw_connections_total{"):
            counted["routed"] += int(value)
    failures = []
    for label in sure.keys() | counted.keys():
        if not sure[label] <= counted[label] <= sure[label] + slack:
            failures.append(f"gateway counted {counted[label]} {label}, predicted {sure[label]}")
    if samples.get("meshgw_internal_errors_total", 0):
        failures.append(f"internal errors: {samples['meshgw_internal_errors_total']:.0f}")
    return failures


# --- the campaign -------------------------------------------------------------------------------


def run_over_sockets(
    count: int,
    seed: int,
    deadline: float,
    concurrency: int = 48,
    out: Callable[[str], None] | None = None,
) -> Report:
    """``count`` connections to one gateway child; stops launching at ``deadline``."""
    report = Report("over sockets", count)
    with tempfile.TemporaryDirectory(prefix="meshgw-fuzz-") as folder:
        asyncio.run(_campaign(report, seed, deadline, concurrency, Path(folder), out))
    return report


async def _campaign(
    report: Report,
    seed: int,
    deadline: float,
    concurrency: int,
    folder: Path,
    out: Callable[[str], None] | None,
) -> None:
    ledger = Ledger()
    backends = Backends(ledger)
    ports = backends.start()
    gateway = GatewayUnderTest(ports, folder)
    try:
        await asyncio.to_thread(gateway.wait_listening)
        baseline = gateway.fds()
        started = time.monotonic()
        await _send_all(report, ledger, seed, deadline, concurrency, gateway.port, out)
        report.seconds = time.monotonic() - started
        await backends.stop()
        fds, pipes, active = await asyncio.to_thread(gateway.settled, baseline)
        samples = await asyncio.to_thread(gateway.metrics)
    finally:
        code = gateway.stop()
        await backends.stop()
    report.failures += backends.failures + ledger.failures + ledger.missing()
    report.failures += check_counters(ledger, samples)
    if active != 0 or fds - 2 * pipes > baseline:
        report.failures.append(
            f"gateway not back to baseline: {fds} descriptors ({pipes} pipes kept), "
            f"baseline {baseline}, {active:.0f} connections open"
        )
    report.failures += [f"gateway log: {line}" for line in gateway.tracebacks()]
    if code != 0:
        report.failures.append(f"gateway exited with status {code}: {gateway.child.tail()}")
    report.notes.append(
        f"gateway descriptors: baseline {baseline}, at the end {fds} with {pipes} pipes kept"
    )
    report.notes.append(f"backends received {ledger.delivered:,} connections")


async def _send_all(
    report: Report,
    ledger: Ledger,
    seed: int,
    deadline: float,
    concurrency: int,
    port: int,
    out: Callable[[str], None] | None,
) -> None:
    maker = PlanMaker(Random(seed))
    progress = Progress(out, report)
    gate = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()

    async def one(plan: Plan) -> None:
        try:
            failure = await run_client(plan, port)
        finally:
            gate.release()
        report.done += 1
        if failure is not None:
            report.failures.append(f"client #{plan.index} ({plan.kind}): {failure}")

    for index in range(report.wanted):
        if time.monotonic() >= deadline:
            report.notes.append("stopped at --max-seconds")
            break
        plan = maker.next(index)
        ledger.expect(plan)
        report.kinds[f"{plan.kind}/{plan.ending}"] += 1
        report.outcomes[plan.label] += 1
        await gate.acquire()
        task = asyncio.create_task(one(plan))
        running.add(task)
        task.add_done_callback(running.discard)
        progress.tick()
    if running:
        await asyncio.wait(running)
