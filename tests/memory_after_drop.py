"""Where a gateway's memory goes when thousands of connections close: a measurement.

    python -m tests.memory_after_drop --connections 9000 --rounds 3 [--trim] [--malloc]

Starts one ``meshgw run`` child (one worker, no access log) with a probe thread inside it, and a
backend that holds every connection until its client closes. Each round opens the connections
(each sends a hello and stays idle), then closes them all; at every stage it prints the child's
RSS, glibc malloc's heap (mallinfo2), pymalloc's arenas (sys._debugmallocstats), the data
plane's table sizes, and after each round what a full ``gc.collect()`` gives back and which
object types outlive the round. ``--trim`` ends with ``malloc_trim(0)`` and its cost;
``--malloc`` runs the child with PYTHONMALLOC=malloc. Figures: docs/operations.md#memory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import json
import os
import re
import resource
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshgw.bench.harness import Child
from meshgw.bench.hellos import python_hello

REPO = Path(__file__).resolve().parent.parent
WAIT = 60.0  # seconds for any one stage
LISTENING = re.compile(r"meshgw listening listen=\S+:(\d+)")
_MALLINFO = [
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
]


# --- inside the gateway child -------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO]


def _pymalloc() -> dict[str, int]:
    """A few lines of sys._debugmallocstats(), which writes to the C stderr."""
    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    wanted = ("# arenas allocated current", "# bytes in allocated blocks")
    found = {}
    for line in text.splitlines():
        for key in wanted:
            if line.startswith(key) and key not in found:
                found[key] = int(line.rpartition("=")[2].replace(",", ""))
    return {"arenas": found.get(wanted[0], -1), "blocks": found.get(wanted[1], -1)}


def _tables() -> dict[str, Any]:
    from meshgw.dataplane.listener import Listener
    from meshgw.dataplane.tunnel import Tunnel

    for obj in gc.get_objects():
        if isinstance(obj, Listener):
            dp = obj.dp
            for _ in range(100):  # the loop thread may change the set while it is copied
                with contextlib.suppress(RuntimeError):
                    tunnels = sum(isinstance(c, Tunnel) for c in list(dp.connections))
                    break
            return {
                "open": tunnels,
                "connections": len(dp.connections),
                "set_bytes": sys.getsizeof(dp.connections),
                "handlers_bytes": sys.getsizeof(dp.poller.handlers),
            }
    return {}


def _answer(command: str, libc: ctypes.CDLL, kept: dict[str, collections.Counter[str]]) -> Any:
    if command == "stats":
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        info = libc.mallinfo2()
        return {
            "rss": int(status["VmRSS"].split()[0]) * 1024,
            "heap": info.arena,
            "heap_used": info.uordblks,
            "heap_free": info.fordblks,
            "mmapped": info.hblkhd,
            **_pymalloc(),
            **_tables(),
        }
    if command == "collect":
        started = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - started) * 1000
    if command == "trim":
        started = time.perf_counter()
        libc.malloc_trim(0)
        return (time.perf_counter() - started) * 1000
    if command.startswith("types "):  # "types NAME": count objects by type, keep as NAME
        kept[command[6:]] = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        return len(kept[command[6:]])
    if command.startswith("grown "):  # "grown A B": what B has more of than A
        a, b = command[6:].split()
        diff = kept[b] - kept[a]
        return dict(diff.most_common(8))
    raise ValueError(command)


def _serve_probe(path: str) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    kept: dict[str, collections.Counter[str]] = {}
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            for line in stream:
                try:
                    answer = _answer(line.strip(), libc, kept)
                except Exception as error:  # a probe that dies would hang the measuring side
                    answer = {"error": repr(error)}
                stream.write(json.dumps(answer) + "\n")
                stream.flush()


def gateway_with_probe(path: str, argv: list[str]) -> None:
    """The child: meshgw run on the main thread, the probe on another."""
    threading.Thread(target=_serve_probe, args=(path,), daemon=True).start()
    from meshgw.cli import main

    sys.argv = ["meshgw", "run", *argv]
    main()


# --- the measuring side -------------------------------------------------------------------------


def _hold_backend(server: socket.socket) -> None:
    """Accept, read and discard; close a connection when its peer does. Runs in a thread."""
    with selectors.DefaultSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is server:
                    conn, _ = server.accept()
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    sock.close()


class Probe:
    def __init__(self, path: str) -> None:
        deadline = time.monotonic() + WAIT
        self.sock = socket.socket(socket.AF_UNIX)
        while self.sock.connect_ex(path) != 0:
            assert time.monotonic() < deadline, "no probe in the gateway"
            time.sleep(0.05)
        self.stream = self.sock.makefile("rw")

    def ask(self, command: str) -> Any:
        self.stream.write(command + "\n")
        self.stream.flush()
        return json.loads(self.stream.readline())

    def until(self, key: str, value: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.ask("stats").get(key) != value:  # state seen only through the probe: polled
            assert time.monotonic() < deadline, f"{key} never reached {value}"
            time.sleep(0.05)

    def show(self, stage: str) -> None:
        s = self.ask("stats")
        mib = 1 << 20
        pymalloc = "pymalloc off"
        if s["arenas"] >= 0:
            pymalloc = f"pymalloc {s['arenas']:3d} arenas, {s['blocks'] / mib:5.1f} in blocks"
        print(
            f"{stage:<26} RSS {s['rss'] / mib:6.1f} MiB | malloc heap {s['heap'] / mib:5.1f}"
            f" (used {s['heap_used'] / mib:5.1f}, free {s['heap_free'] / mib:5.1f}),"
            f" mmapped {s['mmapped'] / mib:4.1f} | {pymalloc} | conn set"
            f" {s['set_bytes'] // 1024:4d} KiB, handlers {s['handlers_bytes'] // 1024:4d} KiB",
            flush=True,
        )


@contextlib.contextmanager
def gateway(
    folder: Path, backend_port: int, count: int, malloc: bool
) -> Iterator[tuple[int, Probe]]:
    path = str(folder / "probe.sock")
    argv = [sys.executable, "-m", "tests.memory_after_drop", "--gateway-with-probe", path, "--"]
    argv += ["--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    argv += ["--workers", "1", "--no-access-log", "--expose-servers"]
    argv += ["--server", f"n=127.0.0.1:{backend_port}", "--max-connections", str(count + 100)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if malloc:
        env["PYTHONMALLOC"] = "malloc"
    child = Child(argv, cpus=None, log=folder / "gateway.log", env=env)
    try:
        deadline = time.monotonic() + WAIT
        while not (found := LISTENING.search((folder / "gateway.log").read_text())):
            assert child.alive() and time.monotonic() < deadline, child.tail()
            time.sleep(0.05)
        yield int(found.group(1)), Probe(path)
    finally:
        child.stop()


def one_round(port: int, probe: Probe, count: int, hello: bytes, name: str) -> dict[str, int]:
    """Open ``count`` connections, close them all; the object types that outlived them."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        client.sendall(hello)
        clients.append(client)
    probe.until("open", count)
    probe.show(f"{name}: {count} open")
    for client in clients:
        client.close()
    probe.until("connections", 0)
    time.sleep(0.6)  # past the listener's next deadline sweep (every 0.5 s), which compacts
    probe.show(f"{name}: all closed")
    print(f"  gc.collect(): {probe.ask('collect'):.1f} ms")
    probe.show(f"{name}: after gc.collect")
    probe.ask(f"types {name}")
    if name == "warm-up":
        return {}
    grown: dict[str, int] = probe.ask(f"grown baseline {name}")
    print(f"  object types grown since the baseline: {grown}")
    return grown


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--gateway-with-probe"]:
        gateway_with_probe(args[1], args[3:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.memory_after_drop")
    parser.add_argument("--connections", type=int, default=9000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trim", action="store_true", help="end with malloc_trim(0)")
    parser.add_argument("--malloc", action="store_true", help="child with PYTHONMALLOC=malloc")
    options = parser.parse_args(args)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # clients and backend: 2 each
    hello = python_hello("n.server.dc1.consul")
    with socket.socket() as server, tempfile.TemporaryDirectory() as folder:
        server.bind(("127.0.0.1", 0))
        server.listen(4096)
        threading.Thread(target=_hold_backend, args=(server,), daemon=True).start()
        count = options.connections
        with gateway(Path(folder), server.getsockname()[1], count, options.malloc) as (port, probe):
            one_round(port, probe, 200, hello, "warm-up")  # first-use imports and caches
            probe.ask("types baseline")
            probe.show("baseline")
            for i in range(options.rounds):
                one_round(port, probe, count, hello, f"round-{i + 1}")
            if options.trim:
                print(f"  malloc_trim(0): {probe.ask('trim'):.2f} ms")
                probe.show("after malloc_trim(0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
