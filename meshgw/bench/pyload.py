"""The Python stand-in for loadgen.c, used where no C compiler is found.

Same command line, same output lines ("ports", "start", "end", "held", "result {json}",
"stats {json}"), same byte pattern and checks. uvloop makes it tolerable, but Python cannot drive
a fast proxy to its limit from one core: runs made with it are marked as load-bound-prone.

    python -m meshgw.bench.pyload serve|rate|bulk|rr|idle [options]   (see loadgen.c)
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

PERIOD = 251
CHUNK = 256 * 1024
PATTERN = bytes(((i % PERIOD) * 37 + 11) & 0xFF for i in range(CHUNK + PERIOD))
MAX_HELLO = 65536
MODES = ("reply", "hold", "echo", "sink", "source")


def pat_at(offset: int, n: int) -> bytes:
    start = offset % PERIOD
    return PATTERN[start : start + n]


def hello_length(buf: bytes | bytearray) -> int:
    """Length of the complete handshake message at the start of buf; 0: need more; -1: not TLS."""
    pos = have = need = 0
    head = bytearray()
    while pos + 5 <= len(buf):
        if buf[pos] != 0x16:
            return -1
        length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        avail = min(length, len(buf) - pos - 5)
        head += buf[pos + 5 : pos + 5 + max(0, min(avail, 4 - len(head)))]
        have += avail
        if not need and len(head) == 4:
            need = 4 + int.from_bytes(head[1:4], "big")
        if avail < length:
            return 0
        pos += 5 + length
        if need and have >= need:
            return pos
    return 0


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def options(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """--key value pairs (repeatable --hello collected), and bare words."""
    opts: dict[str, str] = {}
    hellos: list[str] = []
    words: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i].startswith("--") and i + 1 < len(argv):
            if argv[i] == "--hello":
                hellos.append(argv[i + 1])
            else:
                opts[argv[i][2:]] = argv[i + 1]
            i += 2
        else:
            words.append(argv[i])
            i += 1
    return opts, hellos, words


# --- backend ----------------------------------------------------------------------------------


class Backend(asyncio.Protocol):
    def __init__(self, mode: str, stats: dict[str, int], reply: int, hellos: list[bytes]) -> None:
        self.mode, self.stats, self.reply, self.hellos = mode, stats, reply, hellos
        self.transport: asyncio.Transport | None = None
        self.hello = bytearray()
        self.done = False
        self.inbound = 0
        self.outbound = 0
        self.paused = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.stats["accepted"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats["closed"] += 1

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None and self.mode == "echo":
            self.transport.pause_reading()  # backpressure: stop reading what we cannot echo

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and self.mode == "echo":
            self.transport.resume_reading()
        self._source()

    def _source(self) -> None:
        transport = self.transport
        while self.mode == "source" and not self.paused and not self.eof and transport:
            if transport.is_closing():
                return
            transport.write(pat_at(self.outbound, 65536))
            self.outbound += 65536
            self.stats["bytes_out"] += 65536

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not self.done:
            self.hello += data
            length = hello_length(self.hello)
            if length < 0 or (length == 0 and len(self.hello) >= MAX_HELLO):
                self.stats["hello_bad"] += 1
                self.stats["errors"] += 1
                transport.abort()
                return
            if length == 0:
                return
            ok = not self.hellos or bytes(self.hello[:length]) in self.hellos
            self.stats["hello_ok" if ok else "hello_bad"] += 1
            self.done = True
            data = bytes(self.hello[length:])
            self.hello = bytearray()
            if self.mode == "source":
                self._source()
            else:
                transport.write(PATTERN[: self.reply])
                if self.mode == "reply":
                    self.stats["bytes_out"] += self.reply
                    transport.close()
                    return
            if not data:
                return
        if self.mode in ("sink", "echo") and data != pat_at(self.inbound, len(data)):
            self.stats["corrupt"] += 1
        self.inbound += len(data)
        self.stats["bytes_in"] += len(data)
        if self.mode == "echo":
            transport.write(data)
            self.stats["bytes_out"] += len(data)

    def eof_received(self) -> bool:
        self.eof = True
        return False  # close once buffered writes are flushed


async def serve(argv: list[str]) -> None:
    opts, hello_files, modes = options(argv)
    reply = int(opts.get("reply-size", "128"))
    hellos = [open(p, "rb").read() for p in hello_files]  # noqa: SIM115 - start-up, before any load
    loop = asyncio.get_running_loop()
    stats = {
        m: dict.fromkeys(
            (
                "accepted",
                "closed",
                "hello_ok",
                "hello_bad",
                "bytes_in",
                "bytes_out",
                "corrupt",
                "errors",
            ),
            0,
        )
        for m in modes
    }
    servers, ports = [], []
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"pyload serve: unknown mode {mode}")

        def factory(mode: str = mode) -> Backend:
            return Backend(mode, stats[mode], reply, hellos)

        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)
        servers.append(server)
        ports.append(f"{mode}={server.sockets[0].getsockname()[1]}")
    emit("ports " + " ".join(ports))
    cpu0 = time.process_time()
    await loop.run_in_executor(None, sys.stdin.buffer.read)  # until the harness closes stdin
    for server in servers:
        server.close()
    emit("stats " + json.dumps({"cpu_s": time.process_time() - cpu0, **stats}))


# --- clients ----------------------------------------------------------------------------------


class Client:
    def __init__(self, mode: str, opts: dict[str, str], hello: bytes) -> None:
        self.mode = mode
        self.port = int(opts["port"])
        self.conc = int(opts.get("concurrency", opts.get("connections", "64")))
        self.duration = float(opts.get("duration", "0"))
        self.count = int(opts.get("count", "0"))
        self.size = int(opts.get("size", "64"))
        self.reply = int(opts.get("reply-size", "128"))
        direction = opts.get("direction", "up")
        self.up = direction in ("up", "both") or mode == "rr"
        self.down = direction in ("down", "both") or mode == "rr"
        self.hello = hello
        self.window_open = False
        self.window_done = False
        self.t_start = self.t_end = 0.0
        self.cpu_start = self.cpu_end = 0.0
        self.started = self.completed = self.completed_window = self.held = 0
        self.tx_total = self.rx_total = self.tx_window = self.rx_window = 0
        self.errors = self.corrupt = 0
        self.kinds = dict.fromkeys(("connect", "reset", "short", "other"), 0)
        self.first_error = ""
        self.latencies: list[int] = []
        self.greeted = 0
        self.all_greeted = asyncio.Event()

    def window_start(self) -> None:
        self.window_open = True
        self.t_start = time.monotonic()
        self.cpu_start = time.process_time()
        emit("start")

    def window_end(self) -> None:
        if self.window_done:
            return
        self.window_open = False
        self.window_done = True
        self.t_end = time.monotonic()
        self.cpu_end = time.process_time()
        emit("end")

    def error(self, kind: str, error: BaseException | None = None) -> None:
        self.errors += 1
        self.kinds[kind] += 1
        if error is not None and not self.first_error:
            self.first_error = str(error)

    def received(self, data: bytes, offset: int) -> None:
        if data != pat_at(offset, len(data)):
            self.corrupt += 1
        self.rx_total += len(data)
        if self.window_open:
            self.rx_window += len(data)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        self.started += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as error:
            self.error("connect", error)
            return None
        writer.write(self.hello)
        return reader, writer

    async def greeting(self, reader: asyncio.StreamReader) -> bool:
        try:
            data = await reader.readexactly(self.reply)
        except (asyncio.IncompleteReadError, OSError) as error:
            self.error("short", error)
            return False
        if data != PATTERN[: self.reply]:
            self.corrupt += 1
        return True

    # rate: hello, greeting, EOF, close
    async def rate_worker(self) -> None:
        while (self.count == 0 and self.window_open) or (self.count and self.started < self.count):
            t0 = time.monotonic_ns()
            pair = await self.connect()
            if pair is None:
                continue
            reader, writer = pair
            try:
                data = await reader.read()
            except OSError as error:
                self.error("reset", error)
                writer.close()
                continue
            writer.close()
            if len(data) != self.reply:
                self.error("short")
                continue
            if data != PATTERN[: self.reply]:
                self.corrupt += 1
            self.latencies.append(time.monotonic_ns() - t0)
            self.completed += 1
            self.rx_total += len(data)
            if self.window_open:
                self.completed_window += 1

    async def stream_worker(self) -> None:
        pair = await self.connect()
        if pair is None:
            self.all_greeted.set()
            return
        reader, writer = pair
        if not await self.greeting(reader):
            writer.close()
            self.all_greeted.set()
            return
        self.greeted += 1
        if self.greeted == self.conc:
            self.window_start()
            self.all_greeted.set()
        await self.all_greeted.wait()
        rx = self.reply if self.down and not self.up else 0
        try:
            if self.mode == "rr":
                tx = 0
                while self.window_open:
                    t0 = time.monotonic_ns()
                    writer.write(pat_at(tx, self.size))
                    tx += self.size
                    self.tx_total += self.size
                    if self.window_open:
                        self.tx_window += self.size
                    data = await reader.readexactly(self.size)
                    self.received(data, rx)
                    rx += self.size
                    self.latencies.append(time.monotonic_ns() - t0)
                    self.completed += 1
                    if self.window_open:
                        self.completed_window += 1
                writer.write_eof()
            else:
                progress = [0, 0]  # bytes sent, bytes received on this connection
                sender = asyncio.ensure_future(self.send_until_end(writer, progress))
                while data := await reader.read(CHUNK):
                    self.received(data, rx)
                    rx += len(data)
                    progress[1] += len(data)
                await sender
            while data := await reader.read(CHUNK):
                self.received(data, rx)
                rx += len(data)
        except (OSError, asyncio.IncompleteReadError) as error:
            self.error("reset", error)
        writer.close()

    async def send_until_end(self, writer: asyncio.StreamWriter, progress: list[int]) -> None:
        while self.up and self.window_open:
            writer.write(pat_at(progress[0], 65536))
            progress[0] += 65536
            self.tx_total += 65536
            self.tx_window += 65536
            await writer.drain()
        while self.window_open:  # down only: the backend streams until we half-close
            await asyncio.sleep(0.01)
        # Echo: half-close once everything came back, as proxies without half-close drop the rest
        for _ in range(1000):  # bounded: at most 10 s
            if not (self.up and self.down) or progress[1] >= progress[0]:
                break
            await asyncio.sleep(0.01)
        writer.write_eof()

    async def idle_one(self, gate: asyncio.Semaphore, writers: list[asyncio.StreamWriter]) -> None:
        async with gate:
            pair = await self.connect()
            if pair is None:
                return
            reader, writer = pair
            if await self.greeting(reader):
                self.held += 1
                writers.append(writer)
            else:
                writer.close()

    def result(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> int:
            return lat[min(len(lat) - 1, max(0, int(p * len(lat) + 0.999999) - 1))] if lat else 0

        return {
            "mode": self.mode,
            "window_s": self.t_end - self.t_start if self.t_start else 0.0,
            "cpu_s": self.cpu_end - self.cpu_start,
            "connections": self.conc,
            "started": self.started,
            "completed": self.completed,
            "completed_window": self.completed_window,
            "held": self.held,
            "tx_total": self.tx_total,
            "rx_total": self.rx_total,
            "tx_window": self.tx_window,
            "rx_window": self.rx_window,
            "hello_bytes": len(self.hello),
            "greeting_bytes": self.reply,
            "unfinished": 0,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "error_kinds": self.kinds,
            "first_error": self.first_error,
            "lat_ns": {
                "n": len(lat),
                "p50": pct(0.5),
                "p90": pct(0.9),
                "p99": pct(0.99),
                "p999": pct(0.999),
                "max": lat[-1] if lat else 0,
            },
        }


async def client(mode: str, argv: list[str]) -> None:
    opts, hello_files, _ = options(argv)
    with open(hello_files[0], "rb") as f:
        hello = f.read()
    c = Client(mode, opts, hello)
    loop = asyncio.get_running_loop()
    if mode == "rate":
        c.window_start()
        workers = [asyncio.ensure_future(c.rate_worker()) for _ in range(c.conc)]
        if c.count:
            await asyncio.gather(*workers)
        else:
            await asyncio.sleep(c.duration)
            c.window_end()
            await asyncio.gather(*workers)
        c.window_end()
    elif mode in ("bulk", "rr"):
        workers = [asyncio.ensure_future(c.stream_worker()) for _ in range(c.conc)]
        await c.all_greeted.wait()
        if c.window_open:
            await asyncio.sleep(c.duration)
        c.window_end()
        await asyncio.gather(*workers)
    else:  # idle
        c.window_start()
        gate = asyncio.Semaphore(c.conc)
        writers: list[asyncio.StreamWriter] = []
        await asyncio.gather(*(c.idle_one(gate, writers) for _ in range(c.count or 1)))
        c.window_end()
        emit(f"held {c.held}")
        await loop.run_in_executor(None, sys.stdin.buffer.read)
        for writer in writers:
            writer.close()
    emit("result " + json.dumps(c.result()))


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print("usage: pyload serve|rate|bulk|rr|idle [options]", file=sys.stderr)
        return 2
    mode, rest = argv[0], argv[1:]
    opts, _, _ = options(rest)
    if mode != "serve":
        # Bounded like the C tool: the process ends itself past its deadline.
        limit = float(opts.get("timeout", 0)) or float(opts.get("duration", 60)) + 30
        signal.alarm(int(limit) + 1)
    import uvloop

    run: Callable[[], Coroutine[Any, Any, None]]
    if mode == "serve":
        run = lambda: serve(rest)  # noqa: E731
    elif mode in ("rate", "bulk", "rr", "idle"):
        run = lambda: client(mode, rest)  # noqa: E731
    else:
        print(f"pyload: unknown mode {mode}", file=sys.stderr)
        return 2
    uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
