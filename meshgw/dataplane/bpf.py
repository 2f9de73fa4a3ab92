"""The few pieces of eBPF that kernel tunnels need, with no compiler: bpf(2) and an assembler.

Nothing here knows about tunnels. It offers:
- `bpf(cmd, attr)`: the system call through ctypes (there is no libc wrapper), raising OSError;
- an assembler for the handful of instructions a socket-redirect program uses (`Asm`), with
  labels resolved to jump offsets, encoded as the kernel's `struct bpf_insn`;
- map and program calls: `map_create`, `map_update`, `map_lookup`, `map_delete`, `prog_load`
  (the verifier's log is put into the error), `prog_attach`;
- `SharedArray`: an array map mapped into this process (BPF_F_MMAPABLE), read and written as plain
  memory: no system call per access;
- `RingReader`: the consumer side of a BPF ring buffer (records a program posts to wake us).

Why no library: on PyPI the BPF packages either need clang/LLVM or libbpf at run time (bcc,
libbpf wrappers), assemble classic BPF only (seccomp/socket filters), or are unmaintained or
specific to one product. The program meshgw loads is ten instructions; encoding them is a table.

Encoding (include/uapi/linux/bpf.h): an instruction is 8 bytes, little-endian on the machines
meshgw runs on: opcode (u8), dst register (low nibble) and src register (high nibble), a signed
16-bit offset and a signed 32-bit immediate. Loading a 64-bit immediate (`ld_imm64`, also how a
map's file descriptor is named) takes two slots: the second holds the upper 32 bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# --- the system call ----------------------------------------------------------------------------

# __NR_bpf: x86_64 has its own table; arm64, riscv64 and loongarch64 share the generic one.
SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "loongarch64": 280}
BPF_SYSCALL: int | None = SYSCALL_NUMBERS.get(platform.machine())

# Commands (enum bpf_cmd).
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
PROG_LOAD = 5
PROG_ATTACH = 8

# Map types (enum bpf_map_type).
MAP_HASH = 1
MAP_ARRAY = 2
MAP_SOCKMAP = 15
MAP_RINGBUF = 27

MMAPABLE = 1 << 10  # map flag: the array can be mmap()ed

# Update flags.
ANY = 0
NOEXIST = 1

# Program and attach types.
PROG_SK_SKB = 14
ATTACH_SK_SKB_STREAM_PARSER = 4
ATTACH_SK_SKB_STREAM_VERDICT = 5

# Helper functions (enum bpf_func_id), called with `call`.
FN_MAP_LOOKUP_ELEM = 1
FN_GET_SOCKET_COOKIE = 46
FN_SKB_ADJUST_ROOM = 50
FN_SK_REDIRECT_MAP = 52
FN_RINGBUF_OUTPUT = 130

# Verdicts of an sk_skb program.
SK_DROP = 0
SK_PASS = 1

# Offsets in struct __sk_buff (the context an sk_skb program reads).
SKB_LEN = 0
# cb[0], cb[1]: for an sk_skb program the kernel maps them onto the start of the buffer's
# skb->cb, where TCP keeps the buffer's sequence numbers (struct tcp_skb_cb: seq, end_seq).
SKB_CB = 48

ATTR_SIZE = 128  # larger than every bpf_attr variant used here; the tail must stay zero
LOG_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


def bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(cmd, &attr, sizeof attr); the result, or OSError with the kernel's errno."""
    if BPF_SYSCALL is None:
        raise OSError(errno.ENOSYS, f"bpf(): unknown system call number on {platform.machine()}")
    result = _syscall(BPF_SYSCALL, cmd, ctypes.addressof(attr), len(attr))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result)


def _attr(layout: str, *values: int | bytes) -> ctypes.Array:
    buffer = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(layout, buffer, 0, *values)
    return buffer


# --- the assembler -------------------------------------------------------------------------------

# Instruction classes, sizes, modes and operations (the opcode is their bitwise or).
LD, LDX, ST, STX, ALU, JMP, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
K, X = 0x00, 0x08
ADD, SUB, MOV = 0x00, 0x10, 0xB0
JA, JEQ, JGT, JNE, CALL, EXIT, JLT = 0x00, 0x10, 0x20, 0x50, 0x80, 0x90, 0xA0
PSEUDO_MAP_FD = 1  # src register of ld_imm64: the immediate is a map's file descriptor

SIZES = {1: B, 2: H, 4: W, 8: DW}
JUMPS = {"==": JEQ, "!=": JNE, ">": JGT, "<": JLT}  # unsigned comparisons

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)  # R10: read-only frame pointer


@dataclass(frozen=True, slots=True)
class Insn:
    """One `struct bpf_insn`; `label` names a jump target still to be resolved."""

    op: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    label: str | None = None

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.op, (self.src << 4) | self.dst, self.off, self.imm)


class Asm:
    """Builds a program one instruction at a time; `assemble()` resolves labels to offsets.

    Only what meshgw's programs use is here; each method is one instruction (ld_imm64: two).
    A jump's offset counts instructions from the one after the jump, as the kernel does.
    """

    def __init__(self) -> None:
        self.insns: list[Insn] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = len(self.insns)

    def mov(self, dst: int, src: int) -> None:
        """dst = src (64-bit registers)."""
        self.insns.append(Insn(ALU64 | MOV | X, dst, src))

    def mov_imm(self, dst: int, imm: int) -> None:
        """dst = imm (sign-extended 32-bit)."""
        self.insns.append(Insn(ALU64 | MOV | K, dst, imm=imm))

    def add_imm(self, dst: int, imm: int) -> None:
        """dst += imm."""
        self.insns.append(Insn(ALU64 | ADD | K, dst, imm=imm))

    def add(self, dst: int, src: int) -> None:
        """dst += src."""
        self.insns.append(Insn(ALU64 | ADD | X, dst, src))

    def sub(self, dst: int, src: int) -> None:
        """dst -= src."""
        self.insns.append(Insn(ALU64 | SUB | X, dst, src))

    def add32(self, dst: int, src: int) -> None:
        """dst = (u32)(dst + src): 32-bit arithmetic, the upper half cleared."""
        self.insns.append(Insn(ALU | ADD | X, dst, src))

    def sub32(self, dst: int, src: int) -> None:
        """dst = (u32)(dst - src)."""
        self.insns.append(Insn(ALU | SUB | X, dst, src))

    def load_map(self, dst: int, map_fd: int) -> None:
        """dst = the map whose descriptor is `map_fd` (ld_imm64 with PSEUDO_MAP_FD)."""
        self.insns.append(Insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, imm=map_fd))
        self.insns.append(Insn(0))

    def load(self, dst: int, src: int, off: int, size: int) -> None:
        """dst = *(size *)(src + off)."""
        self.insns.append(Insn(LDX | MEM | SIZES[size], dst, src, off))

    def store(self, dst: int, off: int, src: int, size: int) -> None:
        """*(size *)(dst + off) = src."""
        self.insns.append(Insn(STX | MEM | SIZES[size], dst, src, off))

    def atomic_add(self, dst: int, off: int, src: int, size: int = 8) -> None:
        """*(size *)(dst + off) += src, atomically (lock xadd)."""
        self.insns.append(Insn(STX | ATOMIC | SIZES[size], dst, src, off, ADD))

    def jump_if(self, reg: int, cmp: str, imm: int, label: str) -> None:
        """if reg <cmp> imm goto label; cmp is one of == != > < (unsigned, 64-bit)."""
        self.insns.append(Insn(JMP | JUMPS[cmp] | K, reg, imm=imm, label=label))

    def jump_if_reg(self, reg: int, cmp: str, other: int, label: str) -> None:
        """if reg <cmp> other goto label (registers; unsigned, 64-bit)."""
        self.insns.append(Insn(JMP | JUMPS[cmp] | X, reg, other, label=label))

    def jump(self, label: str) -> None:
        self.insns.append(Insn(JMP | JA, label=label))

    def call(self, helper: int) -> None:
        """r0 = helper(r1..r5); r1-r5 are clobbered, r6-r9 kept."""
        self.insns.append(Insn(JMP | CALL, imm=helper))

    def exit(self) -> None:
        """Return r0."""
        self.insns.append(Insn(JMP | EXIT))

    def assemble(self) -> bytes:
        out = bytearray()
        for index, insn in enumerate(self.insns):
            if insn.label is not None:
                if insn.label not in self.labels:
                    raise ValueError(f"jump to undefined label {insn.label!r}")
                insn = Insn(
                    insn.op, insn.dst, insn.src, self.labels[insn.label] - index - 1, insn.imm
                )
            out += insn.encode()
        return bytes(out)


# --- maps and programs ----------------------------------------------------------------------------


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0
) -> int:
    """A new map; returns its file descriptor (close it with os.close)."""
    attr = _attr("<IIIIIII", map_type, key_size, value_size, max_entries, flags, 0, 0)
    struct.pack_into("16s", attr, 28, name.encode()[:15])
    return bpf(MAP_CREATE, attr)


def _elem(map_fd: int, key: ctypes.Array, value: ctypes.Array | None, flags: int) -> ctypes.Array:
    value_address = ctypes.addressof(value) if value is not None else 0
    return _attr("<IIQQQ", map_fd, 0, ctypes.addressof(key), value_address, flags)


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _elem(map_fd, key_buffer, value_buffer, flags))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under `key`, or None when there is none."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value_size)
    try:
        bpf(MAP_LOOKUP_ELEM, _elem(map_fd, key_buffer, value_buffer, 0))
    except FileNotFoundError:
        return None
    return value_buffer.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    """Remove `key`; False when it was not there."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, _elem(map_fd, key_buffer, None, 0))
    except FileNotFoundError:
        return False
    return True


class VerifierError(OSError):
    """The verifier refused a program; the message ends with its log (why)."""


def prog_load(prog_type: int, code: bytes, name: str, attach_type: int = 0) -> int:
    """Load a program through the verifier; returns its descriptor.

    On refusal (EACCES, EINVAL) raises VerifierError with the verifier's log in the message.
    """
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")  # sockmap helpers are GPL-only
    log = ctypes.create_string_buffer(LOG_SIZE)

    def attempt(log_level: int) -> int:
        attr = _attr(
            "<IIQQIIQII16sII",
            prog_type,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license_),
            log_level,
            LOG_SIZE if log_level else 0,
            ctypes.addressof(log) if log_level else 0,
            0,
            0,
            name.encode()[:15],
            0,
            attach_type,
        )
        return bpf(PROG_LOAD, attr)

    try:
        return attempt(0)
    except OSError as error:
        if error.errno != errno.EACCES and error.errno != errno.EINVAL:
            raise
        with contextlib.suppress(OSError):  # refused: load again, with the log, to say why
            attempt(1)
        text = log.value.decode(errors="replace").strip()
        if not text:  # no log: refused before the verifier (permissions, unknown type)
            raise
        raise VerifierError(error.errno, f"{error.strerror}: {text[-2000:]}") from None


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Attach a program to a map (sk_skb programs attach to a sockmap, not to a socket)."""
    bpf(PROG_ATTACH, _attr("<IIII", target_fd, prog_fd, attach_type, 0))


class SharedArray:
    """An array map (BPF_F_MMAPABLE) mapped into this process: u64 fields by slot, no syscalls.

    Aligned 8-byte loads and stores are single instructions on x86-64 and arm64, so a program
    and this process can each own some fields of an entry and read the other's without tearing.
    """

    __slots__ = ("entries", "fd", "memory", "stride", "view")

    def __init__(self, fd: int, entries: int, value_size: int) -> None:
        self.fd = fd
        self.entries = entries
        self.stride = (value_size + 7) // 8 * 8  # the kernel rounds each value to 8 bytes
        size = max(mmap.PAGESIZE, -(-entries * self.stride // mmap.PAGESIZE) * mmap.PAGESIZE)
        self.memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.memory).cast("Q")  # u64 words

    def get(self, slot: int, offset: int) -> int:
        return self.view[(slot * self.stride + offset) // 8]

    def set(self, slot: int, offset: int, value: int) -> None:
        self.view[(slot * self.stride + offset) // 8] = value

    def close(self) -> None:
        self.view.release()
        self.memory.close()


RINGBUF_BUSY = 1 << 31  # header bit: the record is still being written
RINGBUF_DISCARD = 1 << 30  # header bit: the producer dropped the record
RINGBUF_HEADER = 8


class RingReader:
    """The consumer side of a BPF ring buffer (include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c).

    Layout: page 0 holds the consumer position (ours to write); from page 1, read-only, the
    producer position, then the data area mapped twice in a row so that a record that wraps
    around reads as one piece. Each record: u32 length (with BUSY and DISCARD bits), u32
    reserved, payload, padded to 8 bytes. The descriptor is readable (epoll) while records wait.
    """

    __slots__ = ("consumer", "data", "fd", "mask", "producer")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.mask = size - 1
        page = mmap.PAGESIZE
        self.consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.data = page  # offset of the data area in `producer`

    def records(self) -> Iterator[bytes]:
        """Every complete record posted since the last call, oldest first."""
        consumer, producer = self.consumer, self.producer
        position = struct.unpack_from("<Q", consumer, 0)[0]
        end = struct.unpack_from("<Q", producer, 0)[0]
        while position < end:
            start = self.data + (position & self.mask)
            header = struct.unpack_from("<I", producer, start)[0]
            if header & RINGBUF_BUSY:
                break  # being written: the rest waits for the next call
            length = header & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
            if not header & RINGBUF_DISCARD:
                yield producer[start + RINGBUF_HEADER : start + RINGBUF_HEADER + length]
            position += (length + RINGBUF_HEADER + 7) // 8 * 8
            struct.pack_into("<Q", consumer, 0, position)

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
