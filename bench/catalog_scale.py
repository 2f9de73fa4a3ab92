"""How meshgw's control plane scales with the catalog: watches held, memory, time to routable.

    python bench/catalog_scale.py --services 2000 [--limit 256]

Starts a simulated Consul agent holding N Connect services (each an app and its sidecar), then
one `meshgw run --consul` gateway, and reports once discovery has settled:
- the blocking queries the gateway holds open at the agent (each is an HTTP connection);
- the gateway's RSS;
- how long a new service takes to become routable: in a catalog within the watch limit, from its
  registration to its route; beyond it (services on demand), from a first connection to its answer.
Bounded: every wait has a deadline; the gateway and the agent are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from meshgw.bench.hellos import python_hello
from meshgw.simconsul import SimConsulThread

TD = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
DEADLINE = 120.0


def admin(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def until(condition, what: str, deadline: float = DEADLINE) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline:
            raise SystemExit(f"{what}: not within {deadline:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - started


def echo_server() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def ask(port: int, sni: str, backend: socket.socket) -> float:
    """Seconds from a ClientHello to the backend accepting it through the gateway."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(python_hello(sni))
        backend.settimeout(10)
        conn, _ = backend.accept()
        conn.close()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=256, help="--service-watch-limit")
    options = parser.parse_args()
    backend = echo_server()
    port = backend.getsockname()[1]
    sim = SimConsulThread().start()
    gateway = None
    try:
        sim.ca.set(trust_domain=TD)
        for i in range(options.services):
            sim.services.add(f"svc-{i}", f"node-{i % 50}", "127.0.0.1", 80, proxy_port=port)
        argv = [sys.executable, "-m", "meshgw", "run", "--consul", sim.url,
                "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "1",
                "--no-access-log", "--drain-delay", "0",
                "--service-watch-limit", str(options.limit)]  # fmt: skip
        gateway = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert gateway.stderr is not None
        line = ""
        while "meshgw listening" not in line:
            line = gateway.stderr.readline()
            if not line:
                raise SystemExit("the gateway did not start")
        listen, admin_port = (int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)[:2])
        on_demand = options.services > options.limit
        settle = until(
            lambda: admin(admin_port, "/v1/topology")["sources"].get("consul", {})
            .get("watches", {}).get("services", {}).get("in_catalog") == options.services,
            "the catalog was not read",
        )  # fmt: skip
        if not on_demand:
            until(
                lambda: len(admin(admin_port, "/v1/routes")["routes"]) >= options.services,
                "every service was not routed",
            )
        time.sleep(1.0)  # let every watch park at the agent
        held = sim.raft.blocked
        rss = rss_mib(gateway.pid)
        if on_demand:
            first = ask(listen, f"svc-7.default.dc1.internal.{TD}", backend)
            again = ask(listen, f"svc-7.default.dc1.internal.{TD}", backend)
            timing = (
                f"first connection (watch on demand) {first * 1000:.1f} ms,"
                f" then {again * 1000:.1f} ms"
            )
        else:
            registered = time.monotonic()
            sim.services.add("newcomer", "node-new", "127.0.0.1", 80, proxy_port=port)
            until(
                lambda: any(
                    "newcomer" in r["match"] for r in admin(admin_port, "/v1/routes")["routes"]
                ),
                "the new service was not routed",
            )
            delay = 1000 * (time.monotonic() - registered)
            timing = f"new service routable {delay:.0f} ms after its registration"
        watched = admin(admin_port, "/v1/topology")["sources"]["consul"]["watches"]["services"]
        print(f"services in the catalog: {options.services}, watch limit: {options.limit}")
        print(f"services watched: {watched['watched']} (on demand: {watched['on_demand']})")
        print(f"blocking queries held at the agent: {held}")
        print(f"gateway RSS: {rss:.1f} MiB; catalog read in {settle:.2f} s")
        print(timing)
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        sim.stop()
        backend.close()


if __name__ == "__main__":
    main()
