"""Kernel tunnels inside the data plane: auto's promotion, sockmap's refusals and retries.

The data-plane suite (test_dataplane.py) runs every pump mode, sockmap included; here is what
only kernel tunnels do. Promotion thresholds are shortened so that tests take a second.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import hashlib
import socket
import struct
import sys
import threading
import time

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.dataplane import kernelplane, sockmap
from meshgw.dataplane.kernelplane import Promotion
from meshgw.dataplane.kerneltunnel import KernelTunnel
from meshgw.dataplane.sockmap import TunnelRefused
from meshgw.dataplane.tunnel_program import NEXT_SEQ
from tests.conftest import (
    SOCKMAP_UNAVAILABLE,
    WAIT,
    GatewayThread,
    closed_by_peer,
    connect,
    echo,
    eventually,
    recv_all,
    recv_exactly,
    stream,
)
from tests.test_dataplane import metric, wait_for_tunnels

pytestmark = pytest.mark.skipif(
    SOCKMAP_UNAVAILABLE is not None, reason=f"kernel tunnels: {SOCKMAP_UNAVAILABLE}"
)

HELLO = python_hello("n.server.dc1.consul")
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def quick_policies(monkeypatch):
    """Promotion after 0.2 s and 16 wake-ups (auto), retries after 0.2 s (sockmap)."""
    monkeypatch.setattr(
        kernelplane,
        "POLICIES",
        {
            "auto": Promotion(at_start=False, after=0.2, wakeups=16, bulk=False),
            "sockmap": Promotion(at_start=True, after=0.2, wakeups=0, bulk=True),
        },
    )


def kernel_tunnels(gw: GatewayThread) -> list[KernelTunnel]:
    def find() -> list[KernelTunnel]:
        dp = gw.gateway.listener.dp  # type: ignore[union-attr]
        return [conn for conn in dp.connections if isinstance(conn, KernelTunnel)]

    return gw.call(find)


def deadlines(gw: GatewayThread) -> list[float]:
    """When each tunnel waiting for promotion is considered next (call on the loop)."""
    dp = gw.gateway.listener.dp  # type: ignore[union-attr]
    waiting = dp.kernel.waiting
    return [waiting.deadline(conn) for conn in dp.connections if waiting.deadline(conn)]


def joins(gw: GatewayThread, trigger: str) -> float:
    return metric(gw.admin_port, "meshgw_kernel_tunnel_joins_total", trigger=trigger)


def exchange(client: socket.socket, message: bytes) -> None:
    client.sendall(message)
    assert recv_exactly(client, len(message)) == message


# --- auto: promotion ----------------------------------------------------------------------------


def test_auto_promotes_a_busy_long_lived_connection_but_not_a_short_one(
    quick_policies, gateway_factory, backend_factory
):
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    # Short: a few exchanges and gone, well before the age a promotion needs.
    with connect(gw.port) as client:
        exchange(client, HELLO)
        for index in range(3):
            exchange(client, b"short %d" % index)
    gw.wait_idle()
    assert joins(gw, "promotion") == 0
    # Long-lived and busy: promoted once old enough and past the wake-ups, then served by
    # the kernel with the same bytes.
    with connect(gw.port) as client:
        exchange(client, HELLO)
        deadline = time.monotonic() + WAIT
        count = 0
        while not kernel_tunnels(gw):
            assert time.monotonic() < deadline, "never promoted"
            exchange(client, b"before %d" % count)
            count += 1
        assert count >= 8  # 16 wake-ups: two per exchange
        for index in range(200):
            exchange(client, b"after %d" % index)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    gw.wait_idle()
    assert joins(gw, "promotion") == 1
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="closed") == 2  # fmt: skip


def test_an_idle_connection_is_not_promoted(quick_policies, gateway_factory, backend_factory):
    """Old enough but quiet: the join would cost more than it saves."""
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    with connect(gw.port) as client:
        exchange(client, HELLO)
        first = gw.call(lambda: deadlines(gw))
        assert len(first) == 1
        # A round found it of age, judged it and put it back to wait: not promoted.
        eventually(lambda: gw.call(lambda: deadlines(gw)) > first, what="never considered")
        assert kernel_tunnels(gw) == []
        exchange(client, b"still userspace")
    gw.wait_idle()
    assert joins(gw, "promotion") == 0


def test_auto_leaves_a_bulk_connection_to_splice(quick_policies, gateway_factory, backend_factory):
    """A direction that moved bulk splices for good; a kernel tunnel would move it at more
    cost. The round drops such a connection for good instead of promoting it."""
    received: list[bytes] = []

    def sink(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := conn.recv(1 << 20):
            digest.update(data)
        received.append(digest.digest())

    server = backend_factory(sink)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")

    def bulk_flags() -> list[bool]:
        dp = gw.gateway.listener.dp
        return [conn.bulk for conn in dp.connections if not isinstance(conn, KernelTunnel)]

    sent = hashlib.sha256(HELLO)
    with connect(gw.port) as client:
        client.sendall(HELLO)
        for block in stream(b"bulk", 8 * MiB, block=1 * MiB):
            client.sendall(block)
            sent.update(block)
        eventually(lambda: gw.call(bulk_flags) == [True], what="never spliced")
        # Of age and busy (8 MiB cost far more than 16 wake-ups), yet left waiting no more.
        eventually(lambda: gw.call(lambda: deadlines(gw)) == [], what="never considered")
        for block in stream(b"more", 4 * MiB, block=1 * MiB):
            client.sendall(block)
            sent.update(block)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    server.close()
    assert received == [sent.digest()]
    gw.wait_idle()
    assert joins(gw, "promotion") == 0


def paced(seed: bytes, total: int, chunk: int, pause: float, sent: list[int]):
    """`total` bytes in `chunk`s with a pause between them: a stream with quiet moments."""
    for block in stream(seed, total, block=chunk):
        yield block
        sent[0] += len(block)
        time.sleep(pause)


def test_auto_promotes_mid_stream_byte_exact_both_ways(
    quick_policies, monkeypatch, gateway_factory, backend_factory
):
    """Streams both ways at once; the promotion lands in the middle of them. Every byte
    arrives once, in order: those moved before (Flows), during (the join's own catch-up) and
    after (the kernel)."""
    # The streams are paced in small blocks, but a read that finds 64 KiB waiting turns its
    # direction to splice, which auto leaves alone: promote it all the same, as sockmap would.
    auto = kernelplane.POLICIES["auto"]
    monkeypatch.setitem(kernelplane.POLICIES, "auto", dataclasses.replace(auto, bulk=True))
    size = 24 * MiB
    got: dict[str, bytes] = {}
    server_sent = [0]

    def server_side(conn: socket.socket) -> None:
        digest = hashlib.sha256(recv_exactly(conn, len(HELLO)))

        def send() -> None:
            sent = hashlib.sha256()
            for block in paced(b"down", size, 16 * KiB, 0.0005, server_sent):
                conn.sendall(block)
                sent.update(block)
            conn.shutdown(socket.SHUT_WR)
            got["down_sent"] = sent.digest()

        sender = threading.Thread(target=send)
        sender.start()
        while data := conn.recv(1 << 20):
            digest.update(data)
        got["up_received"] = digest.digest()
        sender.join(WAIT * 3)

    server = backend_factory(server_side)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    client_sent = [0]
    promoted: list[KernelTunnel] = []
    with connect(gw.port) as client:
        client.settimeout(WAIT * 3)

        def send() -> None:
            sent = hashlib.sha256(HELLO)
            client.sendall(HELLO)
            for block in paced(b"up", size, 16 * KiB, 0.0005, client_sent):
                client.sendall(block)
                sent.update(block)
            client.shutdown(socket.SHUT_WR)
            got["up_sent"] = sent.digest()

        def watch() -> None:
            deadline = time.monotonic() + WAIT * 3
            while not promoted and time.monotonic() < deadline:
                promoted.extend(kernel_tunnels(gw))
                time.sleep(0.01)

        threads = [threading.Thread(target=send), threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        digest = hashlib.sha256()
        received = 0
        while data := client.recv(1 << 20):
            digest.update(data)
            received += len(data)
        for thread in threads:
            thread.join(WAIT * 3)
    server.close()
    assert received == size
    assert got["up_sent"] == got["up_received"]
    assert got["down_sent"] == digest.digest()
    gw.wait_idle()
    assert joins(gw, "promotion") == 1 and len(promoted) == 1
    up_before, down_before = promoted[0].before
    assert len(HELLO) < up_before < len(HELLO) + size  # promoted mid-stream, both ways
    assert 0 < down_before < size
    for direction, total in (("upstream", len(HELLO) + size), ("downstream", size)):
        assert metric(gw.admin_port, "meshgw_bytes_total", route_kind="local_server",
                      datacenter="dc1", direction=direction) == total  # fmt: skip


# --- sockmap: refusals and retries --------------------------------------------------------------


def test_a_full_map_refuses_then_the_connection_is_joined_when_a_slot_frees(
    quick_policies, monkeypatch, gateway_factory, backend_factory
):
    monkeypatch.setattr(kernelplane, "MAX_KERNEL_TUNNELS", 1)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    first = connect(gw.port)
    exchange(first, HELLO)
    with connect(gw.port) as second:
        exchange(second, HELLO)
        assert metric(gw.admin_port, "meshgw_kernel_tunnel_refusals_total", reason="full") >= 1
        exchange(second, b"through userspace")
        first.close()  # its slot frees; the second is joined at a later round
        eventually(lambda: joins(gw, "promotion") == 1, what="the retry never joined")
        for index in range(20):
            exchange(second, b"through the kernel %d" % index)
        second.shutdown(socket.SHUT_WR)
        assert recv_all(second) == b""
    gw.wait_idle()
    assert joins(gw, "start") == 1


def test_a_failed_join_resets_both_sides(monkeypatch, gateway_factory, backend_factory):
    """ "error": the kernel tunnel failed half-way; neither side can be trusted to go on."""

    def fail(tunnels, a, b):
        raise TunnelRefused("error", "injected")

    monkeypatch.setattr(sockmap.KernelTunnels, "join", fail)
    ended = threading.Event()

    def wait_for_the_end(conn: socket.socket) -> None:
        try:
            recv_all(conn)
        except ConnectionResetError:
            ended.set()

    server = backend_factory(wait_for_the_end)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    with connect(gw.port) as client:
        client.sendall(HELLO)
        assert closed_by_peer(client)
    assert ended.wait(WAIT)
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="join_failed") == 1  # fmt: skip


# --- bugs stay with their connection ----------------------------------------------------------


def test_a_promotion_that_raises_closes_that_connection_only(
    quick_policies, monkeypatch, gateway_factory, backend_factory
):
    from meshgw.dataplane.tunnel import Tunnel

    real = Tunnel.promote
    broken: list[Tunnel] = []

    def promote_or_fail(tunnel: Tunnel, trigger: str) -> str:
        if not broken:
            broken.append(tunnel)
            raise RuntimeError("a bug")
        return real(tunnel, trigger)

    monkeypatch.setattr(Tunnel, "promote", promote_or_fail)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    with connect(gw.port) as first:
        exchange(first, HELLO)
        for index in range(20):
            exchange(first, b"busy %d" % index)
        eventually(lambda: bool(broken), what="never considered")
        assert closed_by_peer(first)
    # The rounds go on: the next busy connection is promoted.
    with connect(gw.port) as second:
        exchange(second, HELLO)
        for index in range(20):
            exchange(second, b"busy %d" % index)
        eventually(lambda: joins(gw, "promotion") == 1, what="the rounds stopped")
        exchange(second, b"in the kernel")
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="internal_error") == 1  # fmt: skip


def test_a_flush_check_that_raises_closes_that_connection_only(
    monkeypatch, gateway_factory, backend_factory
):
    calls = [0]

    def not_yet_then_fail(tunnels, tunnel, src):
        calls[0] += 1
        if calls[0] == 1:
            return False  # retried on a timer...
        raise RuntimeError("a bug")  # ...where it fails

    monkeypatch.setattr(sockmap.KernelTunnels, "flushed", not_yet_then_fail)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    with connect(gw.port) as client:
        exchange(client, HELLO)
        wait_for_tunnels(gw, 1)  # an EOF before the join would have it refused
        client.shutdown(socket.SHUT_WR)
        assert closed_by_peer(client)
    gw.wait_idle()
    assert joins(gw, "start") == 1
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1


def test_maps_the_kernel_refuses_leave_the_gateway_in_userspace(
    monkeypatch, caplog, gateway_factory, backend_factory
):
    import errno

    def no_memory(capacity: int, credit: int) -> sockmap.KernelTunnels:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(kernelplane, "KernelTunnels", no_memory)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    assert gw.gateway.listener.pump_mode == "auto"
    assert "kernel tunnels off in this process: BPF maps for" in caplog.text
    assert "Cannot allocate memory" in caplog.text
    with connect(gw.port) as client:
        exchange(client, HELLO)
    assert metric(gw.admin_port, "meshgw_kernel_tunnel_capacity") == 0


# --- sockmap: a client that streams at once -----------------------------------------------------

PATTERN_SIZE = 256 * MiB  # cached once: the largest stream a test sends
WORD = 8  # the pattern's unit: each aligned word of the stream holds its own index


@functools.cache
def stream_of_words(size: int) -> bytes:
    """`size` bytes in which each aligned word holds its own index: a byte out of place names
    where it came from."""
    words = array.array("Q", range(-(-size // WORD)))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()[:size]


def pattern(offset: int, size: int) -> bytes:
    """Stream bytes [offset, offset + size)."""
    return stream_of_words(PATTERN_SIZE)[offset : offset + size]


def origin(data: bytes, at: int) -> int | None:
    """The stream offset `data[at]` came from, if two whole words follow it in `data`."""
    for shift in range(WORD):
        index = at + shift
        if index + 2 * WORD > len(data):
            return None
        word = int.from_bytes(data[index : index + WORD], "little")
        if int.from_bytes(data[index + WORD : index + 2 * WORD], "little") == word + 1:
            return word * WORD - shift
    return None


def first_difference(data: bytes, expected: bytes) -> int:
    step = 4096
    at = 0
    while data[at : at + step] == expected[at : at + step]:
        at += step
    while data[at] == expected[at]:
        at += 1
    return at


class StreamCheck:
    """A backend's view of the stream after the hello, checked against `pattern` as it comes:
    where bytes out of place start, and where they came from (at most `MAX_JUMPS`)."""

    MAX_JUMPS = 8

    def __init__(self) -> None:
        self.received = 0
        self.source: int | None = 0  # the stream offset of the next byte, as received so far
        self.jumps: list[tuple[int, int, int | None]] = []  # (at, expected, came from)
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.digest.update(data)
        at = 0
        while self.source is not None:
            expected = pattern(self.source, len(data) - at)
            if data[at:] == expected:
                self.source += len(data) - at
                break
            bad = at + first_difference(data[at:], expected)
            came_from = origin(data, bad)
            self.jumps.append((self.received + bad, self.source + bad - at, came_from))
            at, self.source = bad, came_from
            if len(self.jumps) >= self.MAX_JUMPS:
                self.source = None
        self.received += len(data)

    def describe(self, size: int) -> str:
        lines = [f"{self.received} of {size} bytes, sha256 {self.digest.hexdigest()[:16]}"]
        for at, expected, came_from in self.jumps:
            if came_from is None:
                lines.append(f"  at {at}: expected offset {expected}, got unrecognised bytes")
            else:
                lines.append(
                    f"  at {at}: expected offset {expected}, got offset {came_from} "
                    f"({came_from - expected:+d})"
                )
        return "\n".join(lines)


def checking_backend(results: list[StreamCheck]):
    """Reads the hello (it must be verbatim), greets like the bench's sink, then checks
    every byte until EOF."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        assert recv_exactly(conn, len(HELLO)) == HELLO
        conn.sendall(pattern(0, 128))
        check = StreamCheck()
        results.append(check)
        buffer = bytearray(1 << 20)
        while n := conn.recv_into(buffer):
            check.feed(bytes(buffer[:n]))

    return handle


def stream_at_once(port: int, size: int, chunk: int, errors: list[BaseException]) -> None:
    """Hello, then `size` pattern bytes in `chunk`-sized writes, without waiting for anything."""
    try:
        with connect(port) as client:
            client.sendall(HELLO)
            assert recv_exactly(client, 128) == pattern(0, 128)
            data = memoryview(stream_of_words(PATTERN_SIZE))
            for offset in range(0, size, chunk):
                client.sendall(data[offset : min(offset + chunk, size)])
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
    except BaseException as error:  # surfaced by the test
        errors.append(error)


@pytest.mark.parametrize(
    ("connections", "size", "chunk"),
    [(1, 256 * MiB, 64 * KiB), (1, 256 * MiB, 1 * MiB), (4, 64 * MiB, 64 * KiB)],
)
def test_a_client_streaming_from_its_first_byte_is_byte_exact(
    quick_policies, gateway_factory, backend_factory, connections, size, chunk
):
    results: list[StreamCheck] = []
    server = backend_factory(checking_backend(results))
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    errors: list[BaseException] = []
    clients = [
        threading.Thread(target=stream_at_once, args=(gw.port, size, chunk, errors))
        for _ in range(connections)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(WAIT * 3)
    server.close()
    assert not server.errors and not errors, (server.errors, errors)
    assert len(results) == connections
    for check in results:
        assert check.received == size and not check.jumps, check.describe(size)
    gw.wait_idle()
    assert joins(gw, "start") + joins(gw, "promotion") == connections


# --- sockmap: a retransmission overlapping bytes already delivered -----------------------------

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
RECV_QUEUE, SEND_QUEUE = 1, 2


def sequence(sock: socket.socket, queue: int) -> int:
    """A socket's write_seq (SEND_QUEUE) or rcv_nxt (RECV_QUEUE), read in TCP repair mode."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, -1)  # off, without a window probe


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: tuple, dst: tuple, seq: int, ack: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying one TCP segment (ACK|PSH, no options) from src to dst."""
    addresses = socket.inet_aton(src[0]) + socket.inet_aton(dst[0])
    header = struct.pack("!HHIIHHHH", src[1], dst[1], seq, ack, (5 << 12) | 0x18, 65535, 0, 0)
    pseudo = addresses + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
    checksum = internet_checksum(pseudo + header + payload)
    header = header[:16] + struct.pack("!H", checksum) + header[18:]
    total = 20 + len(header) + len(payload)
    ip = struct.pack("!BBHHHBBH", 0x45, 0, total, 0, 0x4000, 64, socket.IPPROTO_TCP, 0)
    return ip + addresses + header + payload


def retransmit(client: socket.socket, old: int, data: bytes) -> None:
    """What the client's TCP sends when it retransmits cut differently: one segment that
    starts `old` bytes before what the other side has received and goes on with `data`."""
    start = sequence(client, SEND_QUEUE)  # everything sent was received: their rcv_nxt
    ack = sequence(client, RECV_QUEUE)
    packet = tcp_segment(
        client.getsockname(), client.getpeername(), (start - old) & 0xFFFFFFFF, ack, data
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(packet, (client.getpeername()[0], 0))


@pytest.mark.parametrize("path", ["redirected", "passed"])
def test_a_retransmission_overlapping_delivered_bytes_is_delivered_once(
    monkeypatch, gateway_factory, backend_factory, path
):
    """TCP queues such a segment whole and leaves the old part for its reader to skip; the
    kernel hands the tunnel program whole buffers, so the program must cut it off itself,
    whether it redirects them or (no allowance: credit 0) passes them to userspace."""
    if path == "passed":
        monkeypatch.setattr(kernelplane, "KERNEL_CREDIT", 0)
    results: list[StreamCheck] = []
    server = backend_factory(checking_backend(results))
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    size = 64 * KiB
    with connect(gw.port) as client:
        client.sendall(HELLO)
        assert recv_exactly(client, 128) == pattern(0, 128)
        eventually(lambda: kernel_tunnels(gw), what="never joined")
        client.sendall(pattern(0, 1000))
        eventually(lambda: results and results[0].received >= 1000, what="bytes never came")
        retransmit(client, 400, pattern(600, 1000))  # 400 bytes again, then 600 new ones
        eventually(lambda: results[0].received >= 1600, what="the retransmission never came")
        client.sendall(pattern(1000, 600))  # the client's own copy of those: TCP drops it
        client.sendall(pattern(1600, size - 1600))
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    server.close()
    assert not server.errors
    assert results[0].received == size and not results[0].jumps, results[0].describe(size)
    gw.wait_idle()
    assert joins(gw, "start") == 1
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="closed") == 1  # fmt: skip


def test_a_buffer_that_cannot_be_made_exact_resets_the_connection(
    caplog, gateway_factory, backend_factory
):
    """The program faults the direction (here: the stream is made to look ahead of where the
    program stands): it drops the bytes and the connection is reset on both sides, with
    nothing after the fault delivered."""
    got = bytearray()
    reset = threading.Event()

    def backend(conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        assert recv_exactly(conn, len(HELLO)) == HELLO
        try:
            while data := conn.recv(65536):
                got.extend(data)
        except ConnectionResetError:
            reset.set()

    server = backend_factory(backend)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    with connect(gw.port) as client:
        client.sendall(HELLO)
        eventually(lambda: kernel_tunnels(gw), what="never joined")
        client.sendall(pattern(0, 1000))
        eventually(lambda: len(got) >= 1000, what="bytes never came")
        (joined,) = kernel_tunnels(gw)

        def behind() -> None:
            state = joined.kernel.tunnels.maps.state
            assert state is not None
            slot = joined.handle.forward.slot
            state.set(slot, NEXT_SEQ, (state.get(slot, NEXT_SEQ) - 10) & 0xFFFFFFFF)

        gw.call(behind)
        client.sendall(pattern(1000, 500))
        assert closed_by_peer(client)
    assert reset.wait(WAIT)
    assert bytes(got) == pattern(0, 1000)
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="tunnel_fault") == 1  # fmt: skip
    assert "a received buffer could not be made exact" in caplog.text
