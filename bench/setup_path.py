"""The Python work of one connection before any byte goes upstream: read the hello, route it.

    .venv/bin/python bench/setup_path.py [--seconds 0.2] [--repeat 5]

Times, in whichever build of meshgw this interpreter imports (printed first: compiled with mypyc
or pure Python), the calls the data plane makes per connection: the ClientHello read in one
piece (a CPython client's hello, and a Chrome-sized one with an ML-KEM key share, two records),
the host-name check inside it, and the route lookup (an exact name, a wildcard, a refused name)
with the round-robin attempt order. CPU time of this thread, best of `repeat` rounds of about
`seconds` each: time spent waiting for a CPU another process holds is not counted, so a busy
machine disturbs the figures less. Run it once per build to compare them (docs/build.md).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

from meshgw.bench.hellos import mlkem_hello, python_hello
from meshgw.buildinfo import build
from meshgw.routing import RouteTable
from meshgw.topology import Endpoint, GatewayKey, Topology
from meshgw.wire.clienthello import ClientHelloReader, Hello
from meshgw.wire.names import normalize_host_name

EXACT = "node1.server.dc1.consul"
WILDCARD = "node7.server.dc2.consul"  # *.server.dc2.consul: a remote datacenter's gateways
REFUSED = "node1.server.dc9.consul"


def table() -> RouteTable:
    servers = {f"node{i}": Endpoint(f"10.0.1.{i}", 8300) for i in range(1, 4)}
    gateways = {
        GatewayKey(dc, "default"): (Endpoint(f"10.0.{n}.1", 8443), Endpoint(f"10.0.{n}.2", 8443))
        for n, dc in enumerate(["dc2", "dc3", "dc4"], start=2)
    }
    topology = Topology(
        datacenter="dc1",
        trust_domain="7f42f496-fbc7-8692-05ed-334aa5340c1e.consul",
        expose_servers=True,
        servers=servers,
        gateways=gateways,
    )
    return RouteTable.build(topology)


def per_call(work: Callable[[], object], seconds: float, repeat: int) -> float:
    """CPU nanoseconds per call: the best of `repeat` rounds of about `seconds` each."""
    calls = 1
    while True:  # calls per round: enough to last the round
        started = time.thread_time()
        for _ in range(calls):
            work()
        elapsed = time.thread_time() - started
        if elapsed >= seconds / 4:
            break
        calls *= 4
    calls = max(1, int(calls * seconds / elapsed))
    best = float("inf")
    for _ in range(repeat):
        started = time.thread_time()
        for _ in range(calls):
            work()
        best = min(best, (time.thread_time() - started) / calls)
    return best * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="length of one round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per figure; the best wins")
    args = parser.parse_args()
    routes = table()
    classic, mlkem = python_hello(EXACT), mlkem_hello(EXACT)
    for hello in (classic, mlkem):
        assert isinstance(ClientHelloReader().feed(hello), Hello)
    assert routes.resolve(WILDCARD) is not None and routes.resolve(REFUSED) is None

    def connection() -> None:  # what Opening does with a hello that arrived whole
        found = ClientHelloReader().feed(classic)
        assert isinstance(found, Hello)
        route = routes.resolve(found.sni)
        assert route is not None
        route.cluster.attempt_order()

    cases: list[tuple[str, Callable[[], object]]] = [
        (f"read a {len(classic)}-byte hello", lambda: ClientHelloReader().feed(classic)),
        (f"read a {len(mlkem)}-byte hello (2 records)", lambda: ClientHelloReader().feed(mlkem)),
        ("normalize_host_name", lambda: normalize_host_name(EXACT)),
        ("resolve: exact name", lambda: routes.resolve(EXACT)),
        ("resolve: wildcard", lambda: routes.resolve(WILDCARD)),
        ("resolve: refused", lambda: routes.resolve(REFUSED)),
        ("attempt order (3 endpoints)", routes.exact["server.dc1.consul"].cluster.attempt_order),
        ("hello + resolve + attempt order", connection),
    ]
    print(f"meshgw {build()}, Python {platform.python_version()}")
    for name, work in cases:
        print(f"{name:<36} {per_call(work, args.seconds, args.repeat):9.0f} ns")


if __name__ == "__main__":
    main()
