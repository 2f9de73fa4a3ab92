"""Kernel tunnels: after the hello, the kernel moves a connection's bytes; userspace only watches.

Mechanism. Both TCP sockets of a connection (a: accepted from the client, b: connected
upstream) go into a BPF socket map whose `sk_skb` verdict program (tunnel_program.py) sees
every buffer either socket receives and redirects it to the other socket's egress: the bytes
never reach this process and no request wakes it. What stays in userspace: half-close (EOF on
one side becomes shutdown(SHUT_WR) on the other once everything before it has left), RST
propagation, the idle timeout, drain, byte accounting, and backpressure's slow path.

Four sharp edges of the kernel's sockmap, and how each is solved:

(a) Bytes read twice. With a verdict program, the kernel hands the program whole skbs from the
    receive queue (tcp_read_skb) and ignores how much of the first one userspace has already
    read: those bytes are redirected a second time, and the socket's copied_seq overshoots so
    later bytes stall. A stream parser (strparser) honours the offset but then waits forever
    for a "message" as long as the whole skb. Solution: `join` first brings each socket's
    receive queue to empty by itself: it peeks what is queued, sends it to the other socket,
    then consumes exactly what the other socket took, until a peek finds nothing. An empty
    queue holds no partly read skb, and what arrives afterwards is in fresh skbs. If the other
    socket cannot take everything now (or more than CATCH_UP_LIMIT keeps coming), `join` is
    refused ("busy") and nothing is held anywhere: the caller goes on in userspace.
(b) Bytes queued before the join wait for the next arrival: the program runs from the
    socket's data-ready callback, which only new data calls. A TLS client is silent after its
    hello until the server answers, so a server answer queued before the join would wait
    forever. Solution: after both sockets are in the map, setsockopt(SO_RCVLOWAT, 1) on each:
    tcp_set_rcvlowat calls the data-ready callback when bytes are queued, which runs the
    program over them.
(c) Bytes still in the kernel's redirect path when userspace sees EOF: they sit in the source's
    receive queue or in the peer's psock queue (a kernel worker sends them). Shutting the peer
    at once loses them, and taking the sockets out of the map drops the psock queue too.
    Solution: `flushed(tunnel, src)` says whether every byte src received has been written into
    the peer's send queue, from counters that need no cooperation from the worker: the
    program's redirected count, userspace's forwarded count, and the peer's
    tcpi_bytes_acked + SIOCOUTQ measured from a baseline taken at join. Reading src's TCP_INFO
    first also waits out any buffer the kernel is still handing to the program.
(d) Bytes TCP delivered before, handed over again. TCP queues a segment that overlaps what it
    has received already (a retransmission cut into segments differently from the first
    transmission, common after reordering made the sender retransmit needlessly) whole, and
    leaves it to its reader to skip the old head by sequence number; tcp_recvmsg does,
    tcp_read_skb (how the kernel feeds the program) does not. Unhandled, those bytes reach
    the other socket twice (seen in a fast bulk upload: one 64 KiB segment repeated),
    and copied_seq runs ahead of rcv_nxt, so the next bytes wait for more to arrive.
    Solution: the program resequences (tunnel_program.py, step 2). It reads each buffer's
    TCP sequence number from the buffer's control block and cuts off what lies before
    `next_seq`, the sequence number of the next new byte; `join` sets `next_seq` from
    repair mode (`next_sequence`) while nobody reads the socket. A buffer that cannot be
    made exact faults the direction: the program drops it and all that follows, and the
    connection is reset (`Tunnel.on_fault`); a wrong byte is never passed on. The probe
    (`sockmap_unavailable`) checks on a real connection that the kernel lets the program
    follow sequence numbers, and offers no kernel tunnels where it does not.

A fifth edge, found while testing: egress redirect has no backpressure. The redirected skbs
stop counting against the source's receive buffer, so TCP keeps its window open and a client
could park gigabytes in the kernel while the upstream reads slowly. Solution: an allowance.
The program redirects only while the peer's backlog (redirected but not yet written into the
peer) stays under `credit` bytes; past it, it passes the bytes to the source's own queue,
where they do count against its receive buffer (TCP's window closes). Userspace is told
through a ring buffer (`fileno`/`dispatch`), renews the allowance as the peer drains, and while
bytes are passed it forwards them itself (`tick`); the program redirects again once userspace
has forwarded every passed byte, so order is kept both ways.

End-of-stream protocol for the caller (what epoll reports for a joined socket):
- After `join`, change both sockets' epoll registration to JOINED_EVENTS (EPOLLRDHUP|EPOLLET).
  The kernel calls the socket's readable wake-up after every redirected buffer, so with
  EPOLLIN (or EPOLLOUT, re-reported on each wake-up) registered, every request would wake the
  process for nothing. With EPOLLRDHUP alone, nothing is reported until the end.
- EPOLLRDHUP without EPOLLERR: the peer sent FIN. Never recv() a joined socket. Poll
  `flushed(tunnel, src)`; when True, dst.shutdown(SHUT_WR). Until then retry after a short,
  growing delay (the bytes move at the pace of dst's reader; the idle timeout bounds it).
- EPOLLERR (with EPOLLHUP): reset or failure; SO_ERROR says which. Propagate as today
  (SO_LINGER 0 on the other socket), then `leave` and close both.
- EPOLLHUP without EPOLLERR: this socket got its peer's FIN and is shut for writing too; an
  EOF like EPOLLRDHUP if not handled yet.
- Always `leave(tunnel)` before closing the sockets; it frees the slots. Leaving drops bytes
  the kernel still holds for these sockets, and racing with arriving data may drop one
  buffer (the kernel clears the program before the callback): leave only when both directions
  are done (flushed and shut) or when the connection is being aborted anyway.
- `join` raises TunnelRefused: "full", "busy", "eof" leave everything as it was (the caller
  carries on with its own flows; read both sockets until EAGAIN, no edge announces bytes
  queued before); "error" means the connection must be aborted. A socket whose peer closes
  between the catch-up and the insertion cannot be inserted (the map takes established
  sockets only): "eof", unless its partner, inserted first, received bytes meanwhile; those
  were passed to the partner's own queue, which taking it out again drops: "error".

Capabilities: loading the program and creating socket maps needs CAP_BPF and CAP_NET_ADMIN (or
CAP_SYS_ADMIN) in the initial user namespace (repair mode, edge d, needs CAP_NET_ADMIN too);
`sockmap_unavailable()` says when they are missing.
In a container: add both capabilities (`--cap-add BPF --cap-add NET_ADMIN`) and a seccomp
profile that allows bpf(2) (Docker's default allows it only with CAP_SYS_ADMIN or, in recent
versions, CAP_BPF). Kernel 5.8 or later (ring buffer), with CONFIG_BPF_SYSCALL,
CONFIG_NET_SOCK_MSG and CONFIG_BPF_STREAM_PARSER; developed and tested on 6.18, whose sockmap
code the edges above describe. Memory is charged to the memory cgroup (5.11+), not to
RLIMIT_MEMLOCK.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import select
import socket
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshgw.dataplane import bpf
from meshgw.dataplane import tunnel_program as kernel
from meshgw.dataplane.tunnel_program import (
    ALLOWANCE,
    FAULTED,
    FORWARDED,
    NEXT_SEQ,
    NOTIFIED,
    NOTIFY_AT,
    PASSED,
    REDIRECTED,
    TRIMMED,
    TunnelMaps,
)

CREDIT = 4 << 20  # most bytes the kernel holds for one direction beyond the socket buffers
CATCH_UP_LIMIT = 1 << 20  # most bytes `join` forwards itself before it gives up ("busy")
BUFFER_SIZE = 256 * 1024
RETRY_MIN, RETRY_MAX = 0.001, 0.064  # forwarding passed bytes: retry delays while dst is full
SCAN_PERIOD = 5.0  # a look at every tunnel for an event a full ring buffer could not take
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
SIOCOUTQ = termios.TIOCOUTQ
SIOCINQ = termios.FIONREAD
# TCP repair mode (linux/tcp.h): the one way to read a socket's receive sequence number.
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
TCP_RECV_QUEUE = 1
REPAIR_ON, REPAIR_OFF_NO_WINDOW_PROBE = 1, -1
SEQ_MASK = 0xFFFFFFFF
TCP_INFO_SIZE = 128
BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)

if sys.platform == "linux":
    JOINED_EVENTS = select.EPOLLRDHUP | select.EPOLLET
else:  # pragma: no cover
    JOINED_EVENTS = 0


class TunnelRefused(Exception):
    """`join` did not happen. `reason`: full | busy | eof (fall back) or error (abort).

    `caught_up`: bytes `join` forwarded itself before it gave up, (a → b, b → a): they left
    userspace's hands all the same and belong in the connection's byte counts. `failed`: for
    an error met reading or writing one of the sockets (a reset), that socket.
    """

    def __init__(self, reason: str, detail: str = "", failed: socket.socket | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.caught_up = (0, 0)
        self.failed = failed


@functools.cache
def sockmap_unavailable() -> str | None:
    """None when kernel tunnels work here, else a one-line reason. Cached; never raises."""
    if sys.platform != "linux":
        return "kernel tunnels need Linux"
    try:
        maps = TunnelMaps(1)
    except OSError as error:
        return _reason(error)
    except Exception as error:  # a probe must answer, whatever went wrong
        return f"BPF setup failed: {error}"
    try:
        return _try_tunnel(maps)
    finally:
        maps.close()


def _reason(error: OSError) -> str:
    if isinstance(error, bpf.VerifierError):
        return f"the verifier refused the tunnel program: {str(error).splitlines()[-1]}"
    name = errno.errorcode.get(error.errno or 0, "")
    if error.errno in (errno.EPERM, errno.EACCES):
        return f"bpf() refused: {name} (needs CAP_BPF and CAP_NET_ADMIN)"
    if error.errno == errno.ENOSYS:
        return "bpf() not available: ENOSYS (no CONFIG_BPF_SYSCALL, or blocked by seccomp)"
    return f"BPF socket maps not usable: {name or error}: {error.strerror or ''}".rstrip(": ")


def _try_tunnel(maps: TunnelMaps) -> str | None:
    """Put the accepted end of a real loopback connection into the map and send it bytes
    twice: the program must find each buffer where the stream stands (edge d), which needs
    repair mode and TCP's sequence numbers in the buffer's control block (cb[0]). Its peer's
    slot stays empty, so the program passes the bytes back to the socket."""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=2) as client:
            accepted, _ = listener.accept()
            with accepted:
                return _try_sequence(maps, client, accepted)
    except OSError as error:
        return _reason(error)
    except TunnelRefused as refused:
        return f"the tunnel program could not be tried: {refused}"
    finally:
        listener.close()


def _try_sequence(maps: TunnelMaps, client: socket.socket, sock: socket.socket) -> str | None:
    state = maps.state
    assert state is not None
    start = next_sequence(sock)
    maps.prepare(0, 1, 1 << 20, 1 << 19, start)
    maps.name(kernel.cookie(sock), 0)
    maps.insert(0, sock)
    try:
        for total in (1000, 1500):
            client.sendall(b"\x16" * (total - state.get(0, PASSED)))
            deadline = time.monotonic() + 1.0
            while state.get(0, PASSED) < total and time.monotonic() < deadline:
                time.sleep(0.001)
        seen = (state.get(0, PASSED), state.get(0, NEXT_SEQ), state.get(0, FAULTED))
    finally:
        maps.remove(0)
        maps.unname(kernel.cookie(sock))
    if seen != (1500, (start + 1500) & SEQ_MASK, 0):
        return "the tunnel program cannot follow TCP sequence numbers on this kernel"
    return None


# --- TCP counters -------------------------------------------------------------------------------


def acked_bytes(sock: socket.socket) -> int:
    """tcpi_bytes_acked: bytes the peer has acknowledged (+1 for a connecting socket's SYN)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    return int(struct.unpack_from("<Q", info, BYTES_ACKED)[0])


def unacked_bytes(sock: socket.socket) -> int:
    """SIOCOUTQ: bytes in the send queue, sent but not acknowledged or not sent yet."""
    return int(struct.unpack("<i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0])


def sent_bytes(sock: socket.socket) -> int:
    """Bytes written into `sock` so far, plus a constant (the SYN of a connecting socket).

    Acknowledged first, then queued: an ACK landing between the two reads makes the sum low,
    never higher than the truth, so "everything has left" is never said too early.
    """
    acked = acked_bytes(sock)
    return acked + unacked_bytes(sock)


def exact_sent_bytes(sock: socket.socket) -> int:
    """`sent_bytes` while nothing writes into `sock`: exact once no ACK landed in between."""
    for _ in range(16):
        acked = acked_bytes(sock)
        queued = unacked_bytes(sock)
        if acked_bytes(sock) == acked:
            return acked + queued
    raise TunnelRefused("busy", "could not read a stable send count")


def queued_bytes(sock: socket.socket) -> int:
    """SIOCINQ: bytes received and not read yet."""
    return int(struct.unpack("<i", fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0\0\0\0"))[0])


def next_sequence(sock: socket.socket) -> int:
    """The TCP sequence number of the first byte `sock` received that nobody has read: where
    the program takes the stream over (edge d). rcv_nxt comes from repair mode (it needs
    CAP_NET_ADMIN, as kernel tunnels do), left at once and without a window probe; the bytes
    still queued are taken off. Read again until no byte arrived in between."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, REPAIR_ON)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        for _ in range(16):
            received = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
            queued = queued_bytes(sock)
            if sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) == received:
                return (received - queued) & SEQ_MASK
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF_NO_WINDOW_PROBE)
    raise TunnelRefused("busy", "could not read a stable receive sequence number")


def kick(sock: socket.socket) -> None:
    """Run the program over bytes queued before the join (tcp_set_rcvlowat calls data-ready)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


# --- tunnels ----------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Direction:
    """src → dst of one tunnel. `base`: sent_bytes(dst) at the join."""

    src: socket.socket
    dst: socket.socket
    slot: int
    base: int
    retry_at: float = 0.0
    delay: float = RETRY_MIN
    broken: bool = False  # userspace forwarding failed: the caller sees the socket's error


@dataclass(eq=False, slots=True)
class Tunnel:
    """A joined pair; the handle `KernelTunnels` methods take."""

    a: socket.socket
    b: socket.socket
    forward: Direction  # a → b
    backward: Direction  # b → a
    cookies: tuple[int, int]
    pair: int
    caught_up: tuple[int, int] = (0, 0)  # bytes `join` forwarded itself, (a → b, b → a)
    joined: bool = True
    # Called once if the program faults a direction (edge d): the connection must be reset.
    on_fault: Callable[[], None] | None = None
    faulted: bool = False

    def direction(self, src: socket.socket) -> Direction:
        if src is self.a:
            return self.forward
        if src is self.b:
            return self.backward
        raise ValueError("not a socket of this tunnel")


@dataclass(eq=False)
class Forwarder:
    """Userspace's share of backpressure: renew allowances, forward passed bytes in order."""

    maps: TunnelMaps
    credit: int
    buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(BUFFER_SIZE)))

    def counters(self, d: Direction) -> tuple[int, int, int]:
        """(redirected, passed, forwarded) for one direction."""
        state = self.maps.state
        assert state is not None
        return (
            state.get(d.slot, REDIRECTED),
            state.get(d.slot, PASSED),
            state.get(d.slot, FORWARDED),
        )

    def faulted(self, d: Direction) -> bool:
        """The program met a buffer it could not make exact and drops everything (edge d)."""
        state = self.maps.state
        assert state is not None
        return state.get(d.slot, FAULTED) != 0

    def trimmed(self, d: Direction) -> int:
        """Bytes the program cut off buffers because TCP had delivered them already."""
        state = self.maps.state
        assert state is not None
        return state.get(d.slot, TRIMMED)

    def backlog(self, d: Direction) -> int:
        """Bytes the kernel holds for dst (redirected or forwarded, not yet in dst's queue)."""
        redirected, _, forwarded = self.counters(d)
        return redirected + forwarded - (sent_bytes(d.dst) - d.base)

    def renew(self, d: Direction) -> None:
        """Let the program redirect up to `credit` bytes beyond what dst has taken."""
        state = self.maps.state
        assert state is not None
        redirected = state.get(d.slot, REDIRECTED)
        room = max(0, self.credit - self.backlog(d))
        state.set(d.slot, ALLOWANCE, redirected + room)
        state.set(d.slot, NOTIFY_AT, redirected + max(room // 2, 1))

    def passing(self, d: Direction) -> bool:
        _, passed, forwarded = self.counters(d)
        return passed > forwarded

    def pump(self, d: Direction) -> bool | None:
        """Forward passed bytes. True: caught up; False: dst is full or its kernel backlog is
        not drained yet (retry later); None: no progress was possible at all."""
        if d.broken or self.faulted(d):
            return True  # the connection is being reset: nothing more to forward
        if self.backlog(d) > 0:
            return None  # redirected bytes go first
        state = self.maps.state
        assert state is not None
        buffer, moved = self.buffer, 0
        while True:
            try:
                n = d.src.recv_into(buffer, 0, PEEK)
            except BlockingIOError:
                break
            except OSError:
                d.broken = True
                return True
            if n == 0:
                break  # EOF: nothing more can be passed
            try:
                sent = d.dst.send(buffer[:n], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                d.broken = True
                return True
            if sent:
                d.src.recv_into(buffer, sent, socket.MSG_DONTWAIT)  # consume what dst took
                moved += sent
                state.set(d.slot, FORWARDED, state.get(d.slot, FORWARDED) + sent)
            if sent < n:
                return False if moved else None
        self.renew(d)  # dst took everything: its backlog is empty, the full credit is back
        return not self.passing(d)


class KernelTunnels:
    """Every kernel tunnel of this process: slots, join/leave, and the end-of-stream queries.

    Integration: `join` after the hello is replayed; loop.add_reader(fileno(), dispatch);
    call `tick()` when the delay it returned has passed; `flushed`, `moved`, `leave` as the
    module docstring says.
    """

    def __init__(self, capacity: int = 4096, credit: int = CREDIT) -> None:
        self.capacity = capacity
        self.maps = TunnelMaps(capacity)
        self.forwarder = Forwarder(self.maps, credit)
        self._free: deque[int] = deque(range(capacity))  # pairs; freed ones go to the back
        self._by_slot: dict[int, tuple[Tunnel, Direction]] = {}
        self._cookies: set[int] = set()
        self._passing: set[Direction] = set()
        self._next_scan = 0.0
        self.refusals: dict[str, int] = {}  # join refusals by reason, for metrics
        self.events = 0  # records the program posted, for metrics
        self.faults = 0  # directions the program faulted (edge d): their connection is reset

    def __len__(self) -> int:
        return len(self._by_slot) // 2

    # --- joining -------------------------------------------------------------------------------

    def join(self, a: socket.socket, b: socket.socket) -> Tunnel:
        """Hand a ↔ b to the kernel. Precondition: userspace holds no byte for either direction
        (everything it read from one socket it has written to the other). Raises TunnelRefused."""
        try:
            return self._join(a, b)
        except TunnelRefused as refused:
            self.refusals[refused.reason] = self.refusals.get(refused.reason, 0) + 1
            raise

    def _join(self, a: socket.socket, b: socket.socket) -> Tunnel:
        if not self._free:
            raise TunnelRefused("full", f"{self.capacity} tunnels")
        try:
            cookies = (kernel.cookie(a), kernel.cookie(b))
        except OSError as error:
            raise TunnelRefused("error", str(error)) from None
        if cookies[0] in self._cookies or cookies[1] in self._cookies:
            raise TunnelRefused("error", "socket already joined")
        caught_up = _catch_up_both(a, b, self.forwarder.buffer)  # edge (a)
        try:
            return self._insert(a, b, cookies, caught_up)
        except TunnelRefused as refused:
            refused.caught_up = caught_up
            raise

    def _insert(
        self,
        a: socket.socket,
        b: socket.socket,
        cookies: tuple[int, int],
        caught_up: tuple[int, int],
    ) -> Tunnel:
        try:
            base_a, base_b = exact_sent_bytes(a), exact_sent_bytes(b)
            sequences = (next_sequence(a), next_sequence(b))
        except OSError as error:
            raise TunnelRefused("error", str(error)) from None
        pair = self._free.popleft()
        slot_a, slot_b = 2 * pair, 2 * pair + 1
        tunnel = Tunnel(
            a,
            b,
            Direction(a, b, slot_a, base_b),
            Direction(b, a, slot_b, base_a),
            cookies,
            pair,
            caught_up,
        )
        try:
            self._enter(tunnel, sequences)
        except OSError as error:
            self._exit(tunnel)
            raise self._entry_refused(tunnel, error) from None
        for direction in (tunnel.forward, tunnel.backward):
            self._by_slot[direction.slot] = (tunnel, direction)
        self._cookies.update(cookies)
        return tunnel

    def _enter(self, tunnel: Tunnel, sequences: tuple[int, int]) -> None:
        maps, credit = self.maps, self.forwarder.credit
        slot_a, slot_b = tunnel.forward.slot, tunnel.backward.slot
        maps.prepare(slot_a, slot_b, credit, credit // 2, sequences[0])
        maps.prepare(slot_b, slot_a, credit, credit // 2, sequences[1])
        maps.name(tunnel.cookies[0], slot_a)
        maps.name(tunnel.cookies[1], slot_b)
        # A buffer b receives before a is in is passed (its peer's slot is empty), not lost.
        maps.insert(slot_b, tunnel.b)
        maps.insert(slot_a, tunnel.a)
        kick(tunnel.a)  # edge (b)
        kick(tunnel.b)

    def _entry_refused(self, tunnel: Tunnel, error: OSError) -> TunnelRefused:
        """Why a socket could not go into the map. EOPNOTSUPP: it is no longer established
        (its peer's FIN or RST came after the catch-up). The connection can go on in userspace
        unless the socket that was in the map for that moment passed bytes to its own queue
        (its peer's slot was empty), which taking it out dropped."""
        if error.errno != errno.EOPNOTSUPP:
            return TunnelRefused("error", str(error))
        state = self.maps.state
        assert state is not None
        for d in (tunnel.forward, tunnel.backward):
            # TCP_INFO takes the socket lock: a program run still going has finished after it.
            d.src.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
            if state.get(d.slot, PASSED):
                return TunnelRefused("error", "bytes arrived while a join failed: dropped")
        return TunnelRefused("eof", "a socket was closed by its peer during the join")

    def _exit(self, tunnel: Tunnel) -> None:
        maps = self.maps
        for slot in (tunnel.forward.slot, tunnel.backward.slot):
            maps.remove(slot)
        for sock_cookie in tunnel.cookies:
            maps.unname(sock_cookie)
        self._free.append(tunnel.pair)  # to the back: the slot rests before it is reused

    def leave(self, tunnel: Tunnel) -> None:
        """Take both sockets out (see the module docstring for when). Idempotent."""
        if not tunnel.joined:
            return
        tunnel.joined = False
        for direction in (tunnel.forward, tunnel.backward):
            self._by_slot.pop(direction.slot, None)
            self._passing.discard(direction)
        self._cookies.difference_update(tunnel.cookies)
        self._exit(tunnel)

    # --- queries -------------------------------------------------------------------------------

    def flushed(self, tunnel: Tunnel, src: socket.socket) -> bool:
        """Whether every byte `src` received so far has been written into the other socket, so
        that shutting that socket for writing loses nothing (edge c). Call it after EPOLLRDHUP
        on `src`; False: retry later."""
        d = tunnel.direction(src)
        # TCP_INFO takes src's socket lock: any buffer the kernel was handing to the program
        # for src has been counted once this returns.
        src.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        if self.forwarder.faulted(d):
            self._fault(tunnel)
            return False  # bytes were dropped: the connection is reset, never shut cleanly
        if self.forwarder.passing(d):
            self._passing.add(d)
            return False
        return self.forwarder.backlog(d) <= 0

    def moved(self, tunnel: Tunnel) -> tuple[int, int]:
        """Bytes moved since the join, (a → b, b → a): counters in shared memory, no syscall.
        Bytes still in the kernel's path are counted; add what userspace moved before."""
        up = self.forwarder.counters(tunnel.forward)
        down = self.forwarder.counters(tunnel.backward)
        return up[0] + up[2], down[0] + down[2]

    # --- events and timers ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The ring buffer's descriptor: readable when the program asks for attention."""
        ring = self.maps.ring
        assert ring is not None
        return ring.fd

    def dispatch(self) -> None:
        """Handle the program's events (call when `fileno()` is readable)."""
        ring = self.maps.ring
        assert ring is not None
        now = time.monotonic()
        for record in ring.records():
            self.events += 1
            entry = self._by_slot.get(int.from_bytes(record[:4], "little"))
            if entry is not None:
                self._attend(entry[0], entry[1], now)

    def _attend(self, tunnel: Tunnel, d: Direction, now: float) -> None:
        forwarder = self.forwarder
        if forwarder.faulted(d):
            self._fault(tunnel)
        elif forwarder.passing(d):
            self._passing.add(d)
            d.retry_at, d.delay = now, RETRY_MIN
            self._pump(d, now)
        else:
            forwarder.renew(d)

    def _fault(self, tunnel: Tunnel) -> None:
        """Tell the connection once that it must be reset (edge d)."""
        if tunnel.faulted:
            return
        tunnel.faulted = True
        self.faults += 1
        if tunnel.on_fault is not None:
            tunnel.on_fault()

    def _pump(self, d: Direction, now: float) -> None:
        done = self.forwarder.pump(d)
        if done:
            self._passing.discard(d)
            return
        d.delay = RETRY_MIN if done is False else min(d.delay * 2, RETRY_MAX)
        d.retry_at = now + d.delay

    def tick(self) -> float:
        """Forward passed bytes that are due, look for lost events now and then; returns the
        delay after which `tick` should run again."""
        now = time.monotonic()
        for d in list(self._passing):
            if d.retry_at <= now:
                self._pump(d, now)
        if now >= self._next_scan:
            self._next_scan = now + SCAN_PERIOD
            self._scan(now)
        due = [d.retry_at for d in self._passing]
        return max(0.0, min([*due, self._next_scan]) - now)

    def _scan(self, now: float) -> None:
        state = self.maps.state
        assert state is not None
        for tunnel, d in list(self._by_slot.values()):
            if d in self._passing or not tunnel.joined:
                continue
            slot = d.slot
            notify_at = state.get(slot, NOTIFY_AT)
            late = state.get(slot, REDIRECTED) >= notify_at != state.get(slot, NOTIFIED)
            if late or self.forwarder.passing(d) or self.forwarder.faulted(d):
                self._attend(tunnel, d, now)

    def close(self) -> None:
        """Leave every tunnel and free the kernel objects."""
        for tunnel, _ in list(self._by_slot.values()):
            self.leave(tunnel)
        self.maps.close()


def _catch_up_both(a: socket.socket, b: socket.socket, buffer: memoryview) -> tuple[int, int]:
    """Empty both receive queues into the other socket; bytes forwarded (a → b, b → a). A
    refusal carries what was forwarded before it."""
    moved = [0, 0]
    try:
        _catch_up(a, b, buffer, moved, 0)
        _catch_up(b, a, buffer, moved, 1)
    except TunnelRefused as refused:
        refused.caught_up = (moved[0], moved[1])
        raise
    return moved[0], moved[1]


def _catch_up(
    src: socket.socket, dst: socket.socket, buffer: memoryview, moved: list[int], index: int
) -> None:
    """Forward what is queued on `src` until a peek finds nothing (edge a). Only what `dst`
    accepted is consumed, so a refusal leaves no byte held anywhere. Counts into
    `moved[index]`."""
    while True:
        try:
            n = src.recv_into(buffer, 0, PEEK)
        except BlockingIOError:
            return
        except OSError as error:
            raise TunnelRefused("error", str(error), src) from None
        if n == 0:
            raise TunnelRefused("eof")
        try:
            sent = dst.send(buffer[:n], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            raise TunnelRefused("error", str(error), dst) from None
        if sent:
            src.recv_into(buffer, sent, socket.MSG_DONTWAIT)
            moved[index] += sent
        if sent < n or moved[index] >= CATCH_UP_LIMIT:
            raise TunnelRefused("busy", f"{moved[index]} bytes forwarded, more queued")
