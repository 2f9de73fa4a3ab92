"""Kernel tunnels (BPF sockmap) over real loopback sockets, and the BPF assembler's encoding.

`Proxy` plays meshgw's part: client ↔ [accepted, upstream] ↔ server, joined in the kernel,
with the end-of-stream protocol of meshgw.dataplane.sockmap run on one epoll in the test's
thread; clients and servers run in threads of their own.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from meshgw.dataplane import bpf, sockmap
from meshgw.dataplane.sockmap import (
    JOINED_EVENTS,
    KernelTunnels,
    Tunnel,
    TunnelRefused,
    sockmap_unavailable,
)
from meshgw.dataplane.tunnel_program import verdict_program
from tests.conftest import WAIT, eventually, open_fds, stream

UNAVAILABLE = sockmap_unavailable()
needs_bpf = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
LINGER_RESET = struct.pack("ii", 1, 0)
MiB = 1 << 20


# --- the assembler (no kernel needed) ---------------------------------------------------------


def test_encodings_match_the_kernel_macros():
    # Expected bytes: include/linux/filter.h macros, little-endian struct bpf_insn.
    asm = bpf.Asm()
    asm.mov(bpf.R6, bpf.R1)  # BPF_MOV64_REG(R6, R1)
    asm.mov_imm(bpf.R0, 1)  # BPF_MOV64_IMM(R0, 1)
    asm.add_imm(bpf.R2, -8)  # BPF_ALU64_IMM(BPF_ADD, R2, -8)
    asm.add(bpf.R1, bpf.R7)  # BPF_ALU64_REG(BPF_ADD, R1, R7)
    asm.load(bpf.R7, bpf.R6, 0, 4)  # BPF_LDX_MEM(BPF_W, R7, R6, 0)
    asm.store(bpf.R10, -8, bpf.R0, 8)  # BPF_STX_MEM(BPF_DW, R10, R0, -8)
    asm.atomic_add(bpf.R0, 8, bpf.R7)  # BPF_ATOMIC_OP(BPF_DW, BPF_ADD, R0, R7, 8)
    asm.call(bpf.FN_SK_REDIRECT_MAP)  # BPF_EMIT_CALL(52)
    asm.exit()  # BPF_EXIT_INSN()
    assert asm.assemble() == bytes.fromhex(
        "bf16000000000000"
        "b700000001000000"
        "07020000f8ffffff"
        "0f71000000000000"
        "6167000000000000"
        "7b0af8ff00000000"
        "db70080000000000"
        "8500000034000000"
        "9500000000000000"
    )


def test_map_descriptor_takes_two_slots():
    asm = bpf.Asm()
    asm.load_map(bpf.R1, 7)  # BPF_LD_MAP_FD(R1, 7): src register 1 = BPF_PSEUDO_MAP_FD
    assert asm.assemble() == bytes.fromhex("18110000070000000000000000000000")


def test_jumps_count_from_the_next_instruction():
    asm = bpf.Asm()
    asm.label("top")
    asm.jump_if(bpf.R0, "==", 0, "end")  # skips 2: offset 2
    asm.jump_if_reg(bpf.R1, ">", bpf.R2, "end")  # skips 1
    asm.mov_imm(bpf.R0, 0)
    asm.label("end")
    asm.jump("top")  # backwards to the first instruction: offset -4
    asm.exit()
    code = asm.assemble()
    assert code[0:8] == bytes.fromhex("1500020000000000")  # BPF_JMP_IMM(BPF_JEQ, R0, 0, 2)
    assert code[8:16] == bytes.fromhex("2d21010000000000")  # BPF_JMP_REG(BPF_JGT, R1, R2, 1)
    assert code[24:32] == bytes.fromhex("0500fcff00000000")  # BPF_JMP_A(-4)


def test_label_mistakes_are_refused():
    asm = bpf.Asm()
    asm.jump("nowhere")
    with pytest.raises(ValueError, match="undefined label"):
        asm.assemble()
    asm.label("here")
    with pytest.raises(ValueError, match="defined twice"):
        asm.label("here")


def test_the_tunnel_program_assembles_to_whole_instructions():
    code = verdict_program(3, 4, 5, 6)
    assert len(code) % 8 == 0
    assert code[-8:] == bytes.fromhex("9500000000000000")  # ends with exit


# --- the probe --------------------------------------------------------------------------------


def test_probe_is_cached_and_cheap():
    first = sockmap_unavailable()
    started = time.perf_counter()
    for _ in range(1000):
        assert sockmap_unavailable() == first
    assert time.perf_counter() - started < 0.05


DROP_CAPABILITIES = [
    "setpriv",
    "--bounding-set",
    "-bpf,-net_admin,-sys_admin",
    "--inh-caps",
    "-all",
]


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv"
)
def test_probe_says_why_without_capabilities():
    """Root without CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN: a reason, no exception."""
    code = "from meshgw.dataplane.sockmap import sockmap_unavailable as p; print(p())"
    result = subprocess.run(
        [*DROP_CAPABILITIES, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    assert result.stdout.strip() == "bpf() refused: EPERM (needs CAP_BPF and CAP_NET_ADMIN)"


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv"
)
@pytest.mark.parametrize(
    ("capabilities", "answer"),
    [
        # A non-root user holding them as ambient capabilities (systemd's AmbientCapabilities=).
        (
            ["--reuid", "10001", "--regid", "10001", "--clear-groups",
             "--inh-caps", "+bpf,+net_admin", "--ambient-caps", "+bpf,+net_admin"],
            "None",
        ),
        # Root holding these two and nothing else (a container run as user 0, --cap-drop ALL).
        (["--bounding-set", "-all,+bpf,+net_admin", "--inh-caps", "-all"], "None"),
        # A non-root user with the capabilities in its bounding set only: a container's user.
        (
            ["--reuid", "10001", "--regid", "10001", "--clear-groups", "--inh-caps", "-all"],
            "bpf() refused: EPERM (needs CAP_BPF and CAP_NET_ADMIN)",
        ),
    ],
)  # fmt: skip
def test_which_holders_of_the_capabilities_get_kernel_tunnels(capabilities, answer):
    code = "from meshgw.dataplane.sockmap import sockmap_unavailable as p; print(p())"
    result = subprocess.run(
        ["setpriv", *capabilities, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
        cwd="/",
    )
    assert result.stdout.strip() == answer


# --- the harness ----------------------------------------------------------------------------


@dataclass(eq=False)
class Leg:
    """One proxied connection: what the proxy holds in the middle and both ends."""

    client: socket.socket
    accepted: socket.socket
    upstream: socket.socket
    server: socket.socket

    def close(self) -> None:
        for sock in (self.client, self.accepted, self.upstream, self.server):
            sock.close()


@dataclass(eq=False)
class Proxy:
    """meshgw's part in these tests: joins legs, then follows the end-of-stream protocol."""

    tunnels: KernelTunnels
    front: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    back: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    epoll: select.epoll = field(default_factory=select.epoll)
    routes: dict[int, tuple[Tunnel, socket.socket]] = field(default_factory=dict)
    eofs: list[tuple[Tunnel, socket.socket]] = field(default_factory=list)
    shut: dict[Tunnel, int] = field(default_factory=dict)
    outcomes: list[str] = field(default_factory=list)
    moved: dict[Tunnel, tuple[int, int]] = field(default_factory=dict)  # at the close
    not_yet_flushed: int = 0

    def __post_init__(self) -> None:
        self.epoll.register(self.tunnels.fileno(), select.EPOLLIN)

    def leg(self) -> Leg:
        client = socket.create_connection(self.front.getsockname(), timeout=WAIT)
        accepted, _ = self.front.accept()
        upstream = socket.create_connection(self.back.getsockname(), timeout=WAIT)
        server, _ = self.back.accept()
        server.settimeout(WAIT)
        accepted.setblocking(False)
        upstream.setblocking(False)
        return Leg(client, accepted, upstream, server)

    def join(self, leg: Leg) -> Tunnel:
        tunnel = self.tunnels.join(leg.accepted, leg.upstream)
        for sock in (leg.accepted, leg.upstream):
            self.routes[sock.fileno()] = (tunnel, sock)
            self.epoll.register(sock.fileno(), JOINED_EVENTS)
        self.shut[tunnel] = 0
        return tunnel

    def run(self, until: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the proxy did not get there in time"
            delay = min(self.tunnels.tick(), 0.002 if self.eofs else 0.05)
            for fd, events in self.epoll.poll(delay):
                if fd == self.tunnels.fileno():
                    self.tunnels.dispatch()
                elif fd in self.routes:
                    self._on_event(fd, events)
            self._finish_eofs()

    def _on_event(self, fd: int, events: int) -> None:
        tunnel, sock = self.routes[fd]
        if events & select.EPOLLERR:
            self._abort(tunnel, sock)
        elif (
            events & (select.EPOLLRDHUP | select.EPOLLHUP)
            and (tunnel, sock) not in self.eofs
            and tunnel in self.shut
        ):
            self.eofs.append((tunnel, sock))

    def _finish_eofs(self) -> None:
        for tunnel, src in list(self.eofs):
            if tunnel not in self.shut:
                self.eofs.remove((tunnel, src))
            elif self.tunnels.flushed(tunnel, src):
                self.eofs.remove((tunnel, src))
                dst = tunnel.b if src is tunnel.a else tunnel.a
                dst.shutdown(socket.SHUT_WR)
                self.shut[tunnel] += 1
                if self.shut[tunnel] == 2:
                    self.close_tunnel(tunnel, "closed")
            else:
                self.not_yet_flushed += 1

    def _abort(self, tunnel: Tunnel, dead: socket.socket) -> None:
        other = tunnel.b if dead is tunnel.a else tunnel.a
        other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close_tunnel(tunnel, "reset")

    def close_tunnel(self, tunnel: Tunnel, outcome: str) -> None:
        self.moved[tunnel] = self.tunnels.moved(tunnel)  # counters of a slot left are stale
        self.tunnels.leave(tunnel)
        for sock in (tunnel.a, tunnel.b):
            self.routes.pop(sock.fileno(), None)
            sock.close()  # also takes it out of the epoll set
        del self.shut[tunnel]
        self.outcomes.append(outcome)

    def close(self) -> None:
        for tunnel in list(self.shut):
            self.close_tunnel(tunnel, "shutdown")
        self.epoll.close()
        self.front.close()
        self.back.close()


@pytest.fixture
def proxy():
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    tunnels = KernelTunnels(capacity=600)
    made = Proxy(tunnels)
    yield made
    made.close()
    tunnels.close()


class Endpoint:
    """One end of a connection: sends `chunks` then shuts its side, and hashes what it reads
    until EOF; in two threads, so neither direction waits for the other."""

    def __init__(self, sock: socket.socket, chunks: Iterable[bytes]) -> None:
        self.sock = sock
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.received_bytes = 0
        self.error: BaseException | None = None
        sock.settimeout(WAIT)
        self._threads = [
            threading.Thread(target=self._guard, args=(self._send, chunks), daemon=True),
            threading.Thread(target=self._guard, args=(self._receive,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _guard(self, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except BaseException as error:
            self.error = error

    def _send(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.sent.update(chunk)
            self.sock.sendall(chunk)
        self.sock.shutdown(socket.SHUT_WR)

    def _receive(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            self.received.update(chunk)
            self.received_bytes += len(chunk)

    @property
    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def finish(self) -> None:
        for thread in self._threads:
            thread.join(WAIT)
        assert self.done
        if self.error is not None:
            raise self.error


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


# --- bytes ------------------------------------------------------------------------------------


@needs_bpf
def test_64_mib_each_way_at_once_byte_exact(proxy):
    leg = proxy.leg()
    tunnel = proxy.join(leg)
    client = Endpoint(leg.client, stream(b"up", 64 * MiB))
    server = Endpoint(leg.server, stream(b"down", 80 * MiB))
    proxy.run(lambda: client.done and server.done and not proxy.shut, timeout=60)
    client.finish()
    server.finish()
    assert server.received.digest() == client.sent.digest()
    assert client.received.digest() == server.sent.digest()
    assert server.received_bytes == 64 * MiB and client.received_bytes == 80 * MiB
    assert proxy.outcomes == ["closed"]
    assert not tunnel.joined and len(proxy.tunnels) == 0


@needs_bpf
@pytest.mark.parametrize("hello", [1, 517, 1460, 16 * 1024, 200 * 1024])
def test_replayed_hello_is_neither_duplicated_nor_lost(proxy, hello):
    """Edge (a): the hello and the bytes after it share a buffer; userspace reads only the
    hello, replays it upstream, joins while the client keeps sending."""
    leg = proxy.leg()
    first = b"".join(stream(b"first", hello + 3000))
    leg.client.sendall(first)  # one write: hello and what follows share skbs
    leg.accepted.setblocking(True)
    hello_bytes = recv_exactly(leg.accepted, hello)  # the hello only: a partly read skb stays
    leg.accepted.setblocking(False)
    leg.upstream.sendall(hello_bytes)
    tunnel = proxy.join(leg)
    rest = list(stream(b"rest", 4 * MiB, block=64 * 1024))
    client = Endpoint(leg.client, rest)
    server = Endpoint(leg.server, [])
    proxy.run(lambda: client.done and server.done and not proxy.shut)
    client.finish()
    server.finish()
    assert server.received.digest() == hashlib.sha256(first + b"".join(rest)).digest()
    # What join forwarded itself plus what the kernel moved: every byte after the hello.
    assert tunnel.caught_up[0] > 0 and tunnel.caught_up[1] == 0
    assert tunnel.caught_up[0] + proxy.moved[tunnel][0] == 3000 + 4 * MiB


@needs_bpf
def test_answer_queued_before_the_join_reaches_a_silent_client(proxy):
    """Edge (b): the server answered before the join; the client says nothing more."""
    leg = proxy.leg()
    leg.client.sendall(b"hello")
    leg.upstream.sendall(recv_exactly_nonblocking(leg.accepted, 5))
    assert recv_exactly(leg.server, 5) == b"hello"
    answer = b"".join(stream(b"answer", 300 * 1024))
    leg.server.sendall(answer[:4000])  # queued on the upstream socket, unread
    eventually(lambda: queued(leg.upstream) == 4000)
    proxy.join(leg)
    leg.client.settimeout(WAIT)
    assert recv_exactly(leg.client, 4000) == answer[:4000]
    leg.server.sendall(answer[4000:])
    assert recv_exactly(leg.client, len(answer) - 4000) == answer[4000:]


@needs_bpf
def test_bytes_arriving_during_the_join_reach_a_silent_client(proxy, monkeypatch):
    """Edge (b) proper: the answer lands after join's catch-up found nothing queued and
    before the socket is in the map; only the SO_RCVLOWAT kick gets it moving."""
    leg = proxy.leg()
    answer = b"".join(stream(b"late answer", 3000))
    real = sockmap.exact_sent_bytes

    def answer_now(sock: socket.socket) -> int:
        if sock is leg.upstream and not queued(leg.upstream):
            leg.server.sendall(answer)
            eventually(lambda: queued(leg.upstream) == len(answer))
        return real(sock)

    monkeypatch.setattr(sockmap, "exact_sent_bytes", answer_now)
    proxy.join(leg)
    leg.client.settimeout(WAIT)
    assert recv_exactly(leg.client, len(answer)) == answer


def recv_exactly_nonblocking(sock: socket.socket, n: int) -> bytes:
    sock.setblocking(True)
    sock.settimeout(WAIT)
    try:
        return recv_exactly(sock, n)
    finally:
        sock.setblocking(False)


def queued(sock: socket.socket) -> int:
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


# --- the end of a stream --------------------------------------------------------------------


@needs_bpf
def test_half_close_waits_until_bytes_in_flight_have_left(proxy):
    """Edge (c): the client's FIN arrives while megabytes still wait in the kernel for a
    server that is not reading; the proxy must not shut upstream before they left."""
    leg = proxy.leg()
    # Small buffers past the proxy: most of the payload has to wait in the redirect queue.
    leg.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    leg.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    tunnel = proxy.join(leg)
    payload = b"".join(stream(b"inflight", 2 * MiB))  # within the credit: all of it gets in
    sender = Endpoint(leg.client, [payload])
    proxy.run(lambda: bool(proxy.eofs) and proxy.not_yet_flushed > 0)  # FIN seen, not flushed
    assert proxy.shut[tunnel] == 0
    receiver = Endpoint(leg.server, [b"reply after the request"])
    proxy.run(lambda: sender.done and receiver.done and not proxy.shut)
    sender.finish()
    receiver.finish()
    assert receiver.received.digest() == hashlib.sha256(payload).digest()
    assert sender.received.digest() == hashlib.sha256(b"reply after the request").digest()


@pytest.mark.slow
@needs_bpf
def test_half_close_both_ways_many_times(proxy):
    """Edge (c), racing: FINs arrive right behind the data, in both orders, 150 times."""
    for index in range(150):
        leg = proxy.leg()
        proxy.join(leg)
        up = b"".join(stream(b"u%d" % index, (index * 7919) % (300 * 1024) + 1))
        down = b"".join(stream(b"d%d" % index, (index * 104729) % (200 * 1024)))
        client = Endpoint(leg.client, [up])
        server = Endpoint(leg.server, [down] if down else [])
        proxy.run(lambda c=client, s=server: c.done and s.done and not proxy.shut)
        client.finish()
        server.finish()
        assert server.received.digest() == hashlib.sha256(up).digest(), index
        assert client.received.digest() == hashlib.sha256(down).digest(), index
        leg.client.close()
        leg.server.close()
    assert proxy.outcomes == ["closed"] * 150


@needs_bpf
@pytest.mark.parametrize("resetting", ["server", "client"])
def test_reset_is_propagated(proxy, resetting):
    leg = proxy.leg()
    proxy.join(leg)
    leg.client.sendall(b"ping")
    assert recv_exactly(leg.server, 4) == b"ping"
    dead, survivor = (leg.server, leg.client) if resetting == "server" else (leg.client, leg.server)
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    dead.close()
    proxy.run(lambda: proxy.outcomes == ["reset"])
    survivor.settimeout(WAIT)
    with pytest.raises(ConnectionResetError):
        while survivor.recv(65536):
            pass
    assert len(proxy.tunnels) == 0


# --- many, churn, capacity ------------------------------------------------------------------


@needs_bpf
def test_500_tunnels_at_once(proxy):
    legs = [proxy.leg() for _ in range(500)]
    for leg in legs:
        proxy.join(leg)
    assert len(proxy.tunnels) == 500
    for index, leg in enumerate(legs):
        leg.client.sendall(b"request %d" % index)
    for index, leg in enumerate(legs):
        want = b"request %d" % index
        assert recv_exactly(leg.server, len(want)) == want
        leg.server.sendall(b"answer %d" % index)
    for index, leg in enumerate(legs):
        want = b"answer %d" % index
        leg.client.settimeout(WAIT)
        assert recv_exactly(leg.client, len(want)) == want
        leg.client.shutdown(socket.SHUT_WR)
        leg.server.shutdown(socket.SHUT_WR)
    proxy.run(lambda: len(proxy.outcomes) == 500)
    assert proxy.outcomes == ["closed"] * 500 and len(proxy.tunnels) == 0
    for leg in legs:
        leg.client.close()
        leg.server.close()


@needs_bpf
def test_join_leave_churn_leaks_no_descriptor_and_no_slot():
    tunnels = KernelTunnels(capacity=4)
    proxy = Proxy(tunnels)
    try:
        for _ in range(20):  # warm up whatever the runtime caches
            leg = proxy.leg()
            proxy.close_tunnel(proxy.join(leg), "churn")
            leg.client.close()
            leg.server.close()
        fds = open_fds()
        for index in range(1000):
            leg = proxy.leg()
            tunnel = proxy.join(leg)
            if index % 10 == 0:  # now and then with bytes moving through
                leg.client.sendall(b"x" * 100)
                assert recv_exactly(leg.server, 100) == b"x" * 100
            proxy.close_tunnel(tunnel, "churn")
            leg.client.close()
            leg.server.close()
        assert open_fds() == fds
        assert len(tunnels) == 0 and len(tunnels._free) == 4
        assert not any(tunnels.maps.occupied(slot) for slot in range(tunnels.maps.slots))
    finally:
        proxy.close()
        tunnels.close()


@needs_bpf
def test_a_full_map_refuses_and_the_connection_works_in_userspace():
    tunnels = KernelTunnels(capacity=2)
    proxy = Proxy(tunnels)
    try:
        legs = [proxy.leg() for _ in range(3)]
        proxy.join(legs[0])
        proxy.join(legs[1])
        extra = legs[2]
        extra.client.sendall(b"early bytes")
        with pytest.raises(TunnelRefused) as refused:
            proxy.join(extra)
        assert refused.value.reason == "full" and tunnels.refusals == {"full": 1}
        # Nothing was consumed: the userspace path starts from the first byte.
        extra.accepted.setblocking(True)
        extra.accepted.settimeout(WAIT)
        assert recv_exactly(extra.accepted, 11) == b"early bytes"
        for leg in legs:
            leg.close()
    finally:
        proxy.close()
        tunnels.close()


@needs_bpf
def test_catch_up_refuses_when_upstream_cannot_take_the_backlog(proxy):
    """More queued than the upstream takes at once: "busy", and not one byte is held."""
    leg = proxy.leg()
    leg.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    early = b"".join(stream(b"early", 2 * MiB))
    client = Endpoint(leg.client, [early])
    eventually(lambda: queued(leg.accepted) > 32 * 1024)
    with pytest.raises(TunnelRefused) as refused:
        proxy.join(leg)
    assert refused.value.reason == "busy"
    forwarded = refused.value.caught_up[0]  # it left userspace's hands: counted
    assert forwarded > 0 and refused.value.caught_up[1] == 0
    # Userspace takes over: the server must get the client's stream, whole and in order.
    for sock in (leg.accepted, leg.upstream):
        sock.setblocking(True)
        sock.settimeout(WAIT)
    copied = 0

    def copy() -> None:
        nonlocal copied
        while chunk := leg.accepted.recv(65536):
            leg.upstream.sendall(chunk)
            copied += len(chunk)
        leg.upstream.shutdown(socket.SHUT_WR)

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    server = Endpoint(leg.server, [])
    eventually(lambda: server.done)
    server.finish()
    copier.join(WAIT)
    assert server.received.digest() == hashlib.sha256(early).digest()
    assert forwarded + copied == len(early)
    leg.accepted.shutdown(socket.SHUT_WR)  # nothing comes back: let the client see EOF
    client.finish()
    leg.close()


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


TCP_CLOSE_WAIT = 8


@needs_bpf
@pytest.mark.parametrize("meanwhile", ["nothing", "bytes"])
def test_a_peer_closing_during_the_join(proxy, monkeypatch, meanwhile):
    """The client's FIN lands after the catch-up, before its socket goes into the map (the
    map takes established sockets only). The upstream socket was in the map for that moment:
    with nothing received then, "eof" (go on in userspace, nothing lost); bytes it received
    then were passed to a queue that taking it out dropped: "error" (abort)."""
    leg = proxy.leg()
    real = sockmap.TunnelMaps.insert
    calls: list[socket.socket] = []

    def close_then_insert(maps: sockmap.TunnelMaps, slot: int, sock: socket.socket) -> None:
        calls.append(sock)
        if sock is leg.accepted:  # the second insertion: upstream is in the map already
            if meanwhile == "bytes":
                leg.server.sendall(b"answer")
                state = maps.state
                assert state is not None
                eventually(lambda: state.get(slot + 1, sockmap.PASSED) == 6)
            leg.client.shutdown(socket.SHUT_WR)
            eventually(lambda: tcp_state(leg.accepted) == TCP_CLOSE_WAIT)
        real(maps, slot, sock)

    monkeypatch.setattr(sockmap.TunnelMaps, "insert", close_then_insert)
    with pytest.raises(TunnelRefused) as refused:
        proxy.join(leg)
    assert calls == [leg.upstream, leg.accepted]
    assert not any(proxy.tunnels.maps.occupied(slot) for slot in range(proxy.tunnels.maps.slots))
    if meanwhile == "bytes":
        assert refused.value.reason == "error"
        return
    assert refused.value.reason == "eof"
    # Both sockets are plain TCP again, their bytes where userspace finds them.
    leg.server.sendall(b"late answer")
    assert recv_exactly_nonblocking(leg.upstream, 11) == b"late answer"
    leg.accepted.settimeout(WAIT)
    assert leg.accepted.recv(1) == b""  # the client's EOF
    leg.close()


# --- backpressure -----------------------------------------------------------------------------


@needs_bpf
def test_a_slow_reader_bounds_what_the_kernel_holds():
    """The server does not read: the client must be stopped by TCP after roughly the credit
    plus socket buffers, not park its whole stream in the kernel; then every byte arrives."""
    credit = 1 * MiB
    tunnels = KernelTunnels(capacity=4, credit=credit)
    proxy = Proxy(tunnels)
    try:
        leg = proxy.leg()
        tunnel = proxy.join(leg)
        total = 256 * MiB
        client = Endpoint(leg.client, stream(b"flood", total))
        proxy.run(lambda: tunnels.forwarder.counters(tunnel.forward)[1] > 0)  # passing began
        proxy.run(lambda: tunnels.events > 0)  # and the program said so through the ring
        proxy.run(lambda: peer_window(leg.client) == 0)  # TCP stopped the client
        accepted = acked(leg.client)
        assert accepted < credit + 48 * MiB, accepted  # buffers, not the stream
        server = Endpoint(leg.server, [])
        proxy.run(lambda: client.done and server.done and not proxy.shut, timeout=120)
        client.finish()
        server.finish()
        assert server.received_bytes == total
        assert server.received.digest() == client.sent.digest()
    finally:
        proxy.close()
        tunnels.close()


def acked(sock: socket.socket) -> int:
    """tcpi_bytes_acked: how much of what `sock` sent the other side has taken."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("<Q", info, 120)[0]


def peer_window(sock: socket.socket) -> int:
    """tcpi_snd_wnd: the window the peer advertises to `sock` (0: it may send nothing)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("<I", info, 228)[0]
