"""The kernel half of kernel tunnels: four BPF maps and the verdict program that uses them.

Maps (one set per process, `capacity` tunnels, two slots each):
- `sockets`  SOCKMAP  slot → socket. The verdict program is attached to it: every socket in it
  has each received buffer (skb) handed to the program instead of its receive queue.
- `names`    HASH     socket cookie → slot. How the program learns which slot it runs for.
- `state`    ARRAY    slot → `SlotState`, mapped into this process (no syscall to read or
  write). Some fields are written only by this process, the others only by the program.
- `events`   RINGBUF  slots that need this process's attention; its descriptor is readable.

The program, per skb received on the socket in slot S (peer P):
1. empty (the buffer that carries a FIN): drop it. Redirected, it would make the peer's
   sender fail with EPIPE; the end of stream itself is already known to TCP and to epoll.
2. resequence: cut off the bytes at the head of the skb that TCP had delivered before. TCP
   queues a segment that overlaps what it already received (a retransmission that was cut
   into segments differently, e.g. after reordering made the sender retransmit spuriously)
   whole and leaves its reader to skip the old part (tcp_recvmsg does, by sequence number).
   The kernel hands an sk_skb program whole skbs and skips nothing, so without this step
   those bytes would reach P twice (and the socket's copied_seq would run ahead, stalling
   the next bytes). The skb's TCP sequence number is in its control block (cb[0]); the
   slot's `next_seq` is where the stream stands. A buffer that cannot be made exact (it
   starts past `next_seq`, or trimming fails) faults the slot: it and every later one are
   dropped and userspace resets the connection. Wrong bytes are never passed on.
3. if earlier bytes of S were passed to userspace and userspace has not forwarded them all yet
   (passed > forwarded), pass this one too: order is kept by never overtaking them.
4. if redirecting would go past the allowance userspace gave (the bound on bytes the kernel
   holds for P that P's peer has not taken yet), pass instead: this is the backpressure.
5. redirect to P's egress. If P's slot is empty (P not joined yet, or gone), pass instead.
6. count what was redirected or passed; post S to `events` when the redirected count crosses
   `notify_at` (userspace then renews the allowance), when a pass starts an episode, and on
   a fault.

"Pass" (SK_PASS) puts the bytes on S's own queue for userspace to read, charged to S's
receive buffer: when nobody reads, TCP's window closes and the sender waits. Steps 1-6 run
under S's socket lock, one skb at a time, so the program's counters need no atomic operations.
"""

from __future__ import annotations

import errno
import socket
import struct

from meshgw.dataplane import bpf
from meshgw.dataplane.bpf import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10, Asm

# SlotState: byte offsets of u64 fields in each `state` entry.
PEER = 0  # u32 slot of the other socket                               (userspace)
ALLOWANCE = 8  # the program may redirect while redirected <= allowance (userspace)
FORWARDED = 16  # passed bytes userspace has written to the peer        (userspace)
NOTIFY_AT = 24  # post an event when redirected reaches this            (userspace)
REDIRECTED = 32  # bytes redirected to the peer's egress                (program)
PASSED = 40  # bytes passed to userspace                                (program)
NOTIFIED = 48  # the notify_at value already posted                     (program)
NEXT_SEQ = 56  # u32 TCP sequence number of the next new byte (userspace before the
#                socket is in the map, the program from then on)
TRIMMED = 64  # bytes cut off skbs because TCP had delivered them before  (program)
FAULTED = 72  # nonzero: an skb could not be made exact; drop everything (program)
STATE_SIZE = 80
USERSPACE_FIELDS = (PEER, ALLOWANCE, FORWARDED, NOTIFY_AT)
PROGRAM_FIELDS = (REDIRECTED, PASSED, NOTIFIED, TRIMMED, FAULTED)

# bpf_skb_adjust_room removes at most 4095 bytes per call from an sk_skb; the program makes at
# most TRIM_CALLS of them. A retransmission overlapping more than that faults the slot.
TRIM_STEP = 0xFFF
TRIM_CALLS = 64
MAX_TRIM = TRIM_STEP * TRIM_CALLS

EVENT_SIZE = 4  # a record is the u32 slot
EVENT_STRIDE = 16  # header + payload, padded


def verdict_program(names: int, state: int, sockets: int, events: int) -> bytes:
    """Assemble the verdict program for these map descriptors (see the module docstring)."""
    asm = Asm()
    _find_slot(asm, names, state)
    _resequence(asm)
    _redirect(asm, sockets, events)
    _fault(asm, events)
    _pass(asm, events)
    return asm.assemble()


def _find_slot(asm: Asm, names: int, state: int) -> None:
    """r6 = ctx, r7 = skb->len, r8 = &state[slot]; the slot is stored at fp-12."""
    asm.mov(R6, R1)
    asm.load(R7, R6, bpf.SKB_LEN, 4)
    asm.jump_if(R7, "==", 0, "drop")
    asm.call(bpf.FN_GET_SOCKET_COOKIE)  # r1 is still the context
    asm.store(R10, -8, R0, 8)
    asm.load_map(R1, names)
    asm.mov(R2, R10)
    asm.add_imm(R2, -8)
    asm.call(bpf.FN_MAP_LOOKUP_ELEM)
    asm.jump_if(R0, "==", 0, "keep")  # not ours: leave the bytes on the socket
    asm.load(R1, R0, 0, 4)
    asm.store(R10, -12, R1, 4)
    asm.load_map(R1, state)
    asm.mov(R2, R10)
    asm.add_imm(R2, -12)
    asm.call(bpf.FN_MAP_LOOKUP_ELEM)
    asm.jump_if(R0, "==", 0, "keep")
    asm.mov(R8, R0)
    asm.load(R1, R8, FAULTED, 8)
    asm.jump_if(R1, "!=", 0, "drop")  # faulted: nothing more goes anywhere


def _resequence(asm: Asm) -> None:
    """Step 2: trim the bytes TCP had delivered already; r7 becomes the new length."""
    asm.load(R1, R6, bpf.SKB_CB, 4)  # the skb's first sequence number
    asm.load(R9, R8, NEXT_SEQ, 8)
    asm.sub32(R9, R1)  # r9 = bytes of this skb before next_seq (mod 2^32)
    asm.jump_if(R9, "==", 0, "in_sequence")
    asm.jump_if(R9, ">", 0x7FFFFFFF, "fault")  # starts past next_seq: a gap, never expected
    asm.jump_if_reg(R9, "<", R7, "trim")
    asm.jump("fault")  # no new byte in it: TCP never queues those
    asm.label("trim")
    asm.jump_if(R9, ">", MAX_TRIM, "fault")
    asm.load(R1, R8, TRIMMED, 8)
    asm.add(R1, R9)
    asm.store(R8, TRIMMED, R1, 8)
    for call in range(TRIM_CALLS):  # unrolled: no loop for the verifier to bound
        asm.jump_if(R9, "==", 0, "trimmed")
        asm.mov(R3, R9)
        asm.jump_if(R3, "<", TRIM_STEP + 1, f"step{call}")
        asm.mov_imm(R3, TRIM_STEP)
        asm.label(f"step{call}")
        asm.sub(R9, R3)
        asm.mov_imm(R2, 0)
        asm.sub(R2, R3)  # len_diff = -step: remove from the head
        asm.mov(R1, R6)
        asm.mov_imm(R3, 0)  # mode 0, flags 0: the only ones an sk_skb may use
        asm.mov_imm(R4, 0)
        asm.call(bpf.FN_SKB_ADJUST_ROOM)
        asm.jump_if(R0, "!=", 0, "fault")
    asm.label("trimmed")
    asm.load(R7, R6, bpf.SKB_LEN, 4)
    asm.label("in_sequence")
    asm.load(R1, R8, NEXT_SEQ, 8)
    asm.add32(R1, R7)
    asm.store(R8, NEXT_SEQ, R1, 8)


def _redirect(asm: Asm, sockets: int, events: int) -> None:
    asm.load(R1, R8, PASSED, 8)
    asm.load(R2, R8, FORWARDED, 8)
    asm.jump_if_reg(R1, ">", R2, "pass")  # userspace still owes earlier bytes
    asm.load(R1, R8, REDIRECTED, 8)
    asm.add(R1, R7)
    asm.load(R2, R8, ALLOWANCE, 8)
    asm.jump_if_reg(R1, ">", R2, "pass")  # the peer's backlog is full
    asm.mov(R1, R6)
    asm.load_map(R2, sockets)
    asm.load(R3, R8, PEER, 4)
    asm.mov_imm(R4, 0)  # flags 0: the peer's egress, not its receive queue
    asm.call(bpf.FN_SK_REDIRECT_MAP)
    asm.jump_if(R0, "!=", bpf.SK_PASS, "pass")  # empty slot: no peer to send to
    asm.load(R1, R8, REDIRECTED, 8)
    asm.add(R1, R7)
    asm.store(R8, REDIRECTED, R1, 8)
    asm.load(R9, R8, NOTIFY_AT, 8)
    asm.jump_if_reg(R1, "<", R9, "redirected")
    asm.load(R2, R8, NOTIFIED, 8)
    asm.jump_if_reg(R2, "==", R9, "redirected")  # posted already
    _post(asm, events)
    asm.jump_if(R0, "!=", 0, "redirected")  # ring full: the periodic scan catches up
    asm.store(R8, NOTIFIED, R9, 8)
    asm.label("redirected")
    asm.mov_imm(R0, bpf.SK_PASS)  # with the redirect set above: SK_PASS means "redirect"
    asm.exit()


def _pass(asm: Asm, events: int) -> None:
    asm.label("pass")
    asm.load(R1, R8, PASSED, 8)
    asm.load(R2, R8, FORWARDED, 8)
    asm.mov(R3, R1)
    asm.add(R3, R7)
    asm.store(R8, PASSED, R3, 8)
    asm.jump_if_reg(R1, ">", R2, "keep")  # an episode is under way: userspace knows
    _post(asm, events)
    asm.label("keep")
    asm.mov_imm(R0, bpf.SK_PASS)
    asm.exit()
    asm.label("drop")
    asm.mov_imm(R0, bpf.SK_DROP)
    asm.exit()


def _fault(asm: Asm, events: int) -> None:
    asm.label("fault")
    asm.mov_imm(R1, 1)
    asm.store(R8, FAULTED, R1, 8)
    _post(asm, events)
    asm.jump("drop")


def _post(asm: Asm, events: int) -> None:
    """r0 = bpf_ringbuf_output(events, &slot, 4, 0)."""
    asm.load_map(R1, events)
    asm.mov(R2, R10)
    asm.add_imm(R2, -12)
    asm.mov_imm(R3, EVENT_SIZE)
    asm.mov_imm(R4, 0)
    asm.call(bpf.FN_RINGBUF_OUTPUT)


def ring_size(slots: int) -> int:
    """Room for four outstanding events per slot (a slot has at most one per renewal and one
    per pass episode, and both wait for userspace), as a power-of-two number of pages."""
    need = max(slots * 4 * EVENT_STRIDE, 16 * 4096)
    return 1 << (need - 1).bit_length()


SO_COOKIE = getattr(socket, "SO_COOKIE", 57)


def cookie(sock: socket.socket) -> int:
    """The kernel's unique, never reused id of a socket (what bpf_get_socket_cookie returns)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


class TunnelMaps:
    """Creates the maps and the program, and names sockets to the program; nothing more.

    Closing it closes every descriptor: the kernel then detaches the program and takes every
    socket out of the socket map (each socket goes back to plain TCP).
    """

    def __init__(self, capacity: int) -> None:
        self.slots = 2 * capacity
        self._fds: list[int] = []
        self.state: bpf.SharedArray | None = None
        self.ring: bpf.RingReader | None = None
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        slots, fds = self.slots, self._fds
        self.sockets = bpf.map_create(bpf.MAP_SOCKMAP, 4, 8, slots, "meshgw_sockets")
        fds.append(self.sockets)
        self.names = bpf.map_create(bpf.MAP_HASH, 8, 4, slots, "meshgw_names")
        fds.append(self.names)
        state = bpf.map_create(
            bpf.MAP_ARRAY, 4, STATE_SIZE, slots, "meshgw_state", flags=bpf.MMAPABLE
        )
        fds.append(state)
        self.state = bpf.SharedArray(state, slots, STATE_SIZE)
        size = ring_size(slots)
        events = bpf.map_create(bpf.MAP_RINGBUF, 0, 0, size, "meshgw_events")
        fds.append(events)
        self.ring = bpf.RingReader(events, size)
        code = verdict_program(self.names, state, self.sockets, events)
        program = bpf.prog_load(
            bpf.PROG_SK_SKB, code, "meshgw_tunnel", bpf.ATTACH_SK_SKB_STREAM_VERDICT
        )
        fds.append(program)
        bpf.prog_attach(program, self.sockets, bpf.ATTACH_SK_SKB_STREAM_VERDICT)

    def prepare(self, slot: int, peer: int, allowance: int, notify_at: int, next_seq: int) -> None:
        """Reset a slot's state before its socket is named (the program cannot run for it).
        `next_seq`: the TCP sequence number of the first byte the program is to move."""
        state = self.state
        assert state is not None
        for field in PROGRAM_FIELDS:
            state.set(slot, field, 0)
        state.set(slot, FORWARDED, 0)
        state.set(slot, PEER, peer)
        state.set(slot, ALLOWANCE, allowance)
        state.set(slot, NOTIFY_AT, notify_at)
        state.set(slot, NEXT_SEQ, next_seq)

    def name(self, sock_cookie: int, slot: int) -> None:
        bpf.map_update(self.names, struct.pack("<Q", sock_cookie), struct.pack("<I", slot))

    def unname(self, sock_cookie: int) -> None:
        bpf.map_delete(self.names, struct.pack("<Q", sock_cookie))

    def insert(self, slot: int, sock: socket.socket) -> None:
        """From now on the program sees every skb `sock` receives."""
        value = struct.pack("<Q", sock.fileno())
        bpf.map_update(self.sockets, struct.pack("<I", slot), value, bpf.NOEXIST)

    def remove(self, slot: int) -> None:
        """Take the slot's socket out (already gone when the socket was closed: fine)."""
        try:
            bpf.map_delete(self.sockets, struct.pack("<I", slot))
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.EINVAL):
                raise

    def occupied(self, slot: int) -> bool:
        """Whether a socket sits in `slot` (the kernel answers with its cookie)."""
        return bpf.map_lookup(self.sockets, struct.pack("<I", slot), 8) is not None

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        fds, self._fds = self._fds, []
        bpf.close_all(fds)
