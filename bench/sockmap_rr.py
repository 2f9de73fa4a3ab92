"""Request/response through one proxied connection: kernel tunnel vs the userspace/splice Flow.

    sudo .venv/bin/python bench/sockmap_rr.py [--seconds 3] [--size 64] [--repeat 3]
        [--modes sockmap,userspace,splice]

Three processes on loopback: an echo server, the proxy (meshgw's own Flow class from
dataplane/pump.py, or a kernel tunnel from dataplane/sockmap.py), and this client, which sends
`size` bytes, waits for them back, and repeats for `seconds`. Reported per mode: round-trip
latency percentiles, the proxy process's CPU per request, and the whole machine's CPU per
request (/proc/stat: with a kernel tunnel the forwarding work runs in softirq and kworker
context, charged to no proxy process, so only the machine-wide figure compares fairly; it also
counts the Python client and server, and anything else the machine runs meanwhile). On a
shared machine, "own CPU" is the fairer figure: client, server and proxy processes plus the
kernel's worker threads (kworker, ksoftirqd), where a kernel tunnel's forwarding is charged
(softirq time goes to whichever task it interrupted: without IRQ time accounting, these).
Then the cost of the KernelTunnels calls a data plane makes per connection.
The proxy is pinned to the last CPU, client and server to the first, when there are two.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import socket
import statistics
import time
from multiprocessing.connection import Connection

from meshgw.dataplane.pump import Flow
from meshgw.dataplane.sockmap import JOINED_EVENTS, KernelTunnels, sockmap_unavailable
from meshgw.dataplane.splice import PipePool

TICKS = os.sysconf("SC_CLK_TCK")


def echo_server(listener: socket.socket, size: int) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(size):
        conn.sendall(data)
    conn.close()


class Pair:
    """The owner two Flows report to, as a Connection would."""

    def __init__(self, client: socket.socket, upstream: socket.socket, mode: str) -> None:
        view = memoryview(bytearray(65536))
        pool = PipePool() if mode == "splice" else None
        self.up = Flow(self, client, upstream, view, pool, mode)
        self.down = Flow(self, upstream, client, view, pool, mode)
        self.open = True

    def flow_finished(self, flow: Flow) -> None:
        if self.up.done and self.down.done:
            self.open = False
        else:
            flow.dst.shutdown(socket.SHUT_WR)

    def abort(self, dead: socket.socket, error: OSError) -> None:
        self.open = False


def proxy(front: socket.socket, upstream_address: tuple, mode: str, ready: Connection) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    client, _ = front.accept()
    upstream = socket.create_connection(upstream_address)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    epoll = select.epoll()
    if mode == "sockmap":
        run_tunnel(epoll, client, upstream, ready)
    else:
        run_flows(epoll, client, upstream, mode, ready)


def run_flows(
    epoll: select.epoll,
    client: socket.socket,
    upstream: socket.socket,
    mode: str,
    ready: Connection,
) -> None:
    pair = Pair(client, upstream, mode)
    mask = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
    epoll.register(client.fileno(), mask)
    epoll.register(upstream.fileno(), mask)
    closed = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
    ready.send("ready")
    while pair.open:
        for fd, events in epoll.poll(1.0):
            src, dst = (pair.up, pair.down) if fd == client.fileno() else (pair.down, pair.up)
            if events & select.EPOLLOUT:
                dst.writable()
            if events & (select.EPOLLIN | closed):
                src.readable(bool(events & closed))


def run_tunnel(
    epoll: select.epoll, client: socket.socket, upstream: socket.socket, ready: Connection
) -> None:
    tunnels = KernelTunnels(capacity=4)
    tunnel = tunnels.join(client, upstream)
    epoll.register(client.fileno(), JOINED_EVENTS)
    epoll.register(upstream.fileno(), JOINED_EVENTS)
    epoll.register(tunnels.fileno(), select.EPOLLIN)
    ready.send("ready")
    ended: set[int] = set()  # EOF seen
    shut: set[int] = set()  # ... and passed on
    while len(shut) < 2:
        for fd, _ in epoll.poll(min(tunnels.tick(), 0.01)):
            if fd == tunnels.fileno():
                tunnels.dispatch()
            else:
                ended.add(fd)
        for fd in ended - shut:
            src, dst = (client, upstream) if fd == client.fileno() else (upstream, client)
            if tunnels.flushed(tunnel, src):
                dst.shutdown(socket.SHUT_WR)
                shut.add(fd)
    tunnels.leave(tunnel)
    tunnels.close()


def busy_jiffies() -> int:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal


def process_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def kernel_thread_ticks() -> dict[int, int]:
    """CPU ticks of every kworker and ksoftirqd thread, by pid."""
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name.startswith(("kworker", "ksoftirqd")):
            fields = text.rsplit(")", 1)[1].split()
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
    return ticks


def kernel_thread_delta(before: dict[int, int]) -> int:
    after = kernel_thread_ticks()
    return sum(after[pid] - before.get(pid, 0) for pid in after)


def own_ticks(pids: list[int]) -> int:
    """This process (the client) and `pids`."""
    times = os.times()
    return round((times.user + times.system) * TICKS) + sum(process_ticks(p) for p in pids)


def measure(mode: str, seconds: float, size: int) -> dict[str, float]:
    context = multiprocessing.get_context("fork")
    server_listener = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    server = context.Process(target=echo_server, args=(server_listener, size), daemon=True)
    server.start()
    ready_in, ready_out = context.Pipe(duplex=False)
    args = (front, server_listener.getsockname(), mode, ready_out)
    middle = context.Process(target=proxy, args=args, daemon=True)
    middle.start()
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    client = socket.create_connection(front.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not ready_in.poll(10):
        raise RuntimeError(f"{mode}: the proxy did not start")
    ready_in.recv()
    message = b"x" * size
    for _ in range(200):  # warm-up
        client.sendall(message)
        receive(client, size)
    samples: list[int] = []
    jiffies, ticks = busy_jiffies(), process_ticks(middle.pid or 0)
    pids = [middle.pid or 0, server.pid or 0]
    own, kernel_threads = own_ticks(pids), kernel_thread_ticks()
    started = time.perf_counter()
    end = started + seconds
    while (now := time.perf_counter_ns()) < end * 1e9:
        client.sendall(message)
        receive(client, size)
        samples.append(time.perf_counter_ns() - now)
    elapsed = time.perf_counter() - started
    machine = (busy_jiffies() - jiffies) / TICKS
    proxy_cpu = (process_ticks(middle.pid or 0) - ticks) / TICKS
    own_cpu = (own_ticks(pids) - own + kernel_thread_delta(kernel_threads)) / TICKS
    client.shutdown(socket.SHUT_WR)
    receive_until_eof(client)
    client.close()
    middle.join(10)
    server.join(10)
    samples.sort()
    count = len(samples)
    return {
        "requests/s": count / elapsed,
        "p50 us": samples[count // 2] / 1000,
        "p99 us": samples[int(count * 0.99)] / 1000,
        "mean us": statistics.fmean(samples) / 1000,
        "proxy CPU us/req": proxy_cpu / count * 1e6,
        "machine CPU us/req": machine / count * 1e6,
        "own CPU us/req": own_cpu / count * 1e6,
    }


def receive(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise RuntimeError("EOF in the middle of a response")
        got += len(chunk)


def receive_until_eof(sock: socket.socket) -> None:
    sock.settimeout(10)
    while sock.recv(65536):
        pass


def api_costs(rounds: int = 2000) -> dict[str, float]:
    """Microseconds per call of what a data plane would call per connection."""
    tunnels = KernelTunnels(capacity=4)
    listener = socket.create_server(("127.0.0.1", 0))
    costs: dict[str, float] = {}
    try:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
        started = time.perf_counter()
        for _ in range(rounds):
            tunnels.leave(tunnels.join(a, b))
        costs["join+leave"] = (time.perf_counter() - started) / rounds * 1e6
        tunnel = tunnels.join(a, b)
        for name, call in (
            ("moved", lambda: tunnels.moved(tunnel)),
            ("flushed", lambda: tunnels.flushed(tunnel, a)),
            ("tick", tunnels.tick),
        ):
            started = time.perf_counter()
            for _ in range(rounds):
                call()
            costs[name] = (time.perf_counter() - started) / rounds * 1e6
        tunnels.leave(tunnel)
        a.close()
        b.close()
    finally:
        listener.close()
        tunnels.close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--modes", default="sockmap,userspace,splice")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode, interleaved")
    args = parser.parse_args()
    modes = args.modes.split(",")
    reason = sockmap_unavailable()
    if "sockmap" in modes and reason is not None:
        print(f"sockmap skipped: {reason}")
        modes.remove("sockmap")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):  # interleaved, so a burst of outside load hits every mode
        for mode in modes:
            runs[mode].append(measure(mode, args.seconds, args.size))
    columns = list(runs[modes[0]][0])
    rows = {
        mode: {name: statistics.median(run[name] for run in done) for name in columns}
        for mode, done in runs.items()
    }
    print(
        f"{args.size} B request/response, one connection, median of {args.repeat} runs"
        f" of {args.seconds:g} s per mode"
    )
    print(f"{'mode':<10}" + "".join(f"{name:>20}" for name in columns))
    for mode, row in rows.items():
        print(f"{mode:<10}" + "".join(f"{row[name]:>20.1f}" for name in columns))
    if reason is None:
        costs = api_costs()
        print(
            "KernelTunnels calls, us each: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
        )


if __name__ == "__main__":
    main()
