"""What is measured: the scenarios, their variants, and the figures computed from one run.

rate      connect, send a ClientHello, read a short reply, close (64 at a time): conn/s
bulk      stream one way (up: client → backend) or both ways (echo), 1 and 64 connections: Gbit/s
rr        64-byte request/response on 1 and 64 persistent connections: req/s and latency
idle      9,000 connections held after the hello: memory per connection
syscalls  the proxy under `strace -c -f` for a fixed number of rate connections
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    name: str
    scenario: str
    backend: str  # the backend listener (and so the SNI) it uses
    hello: str = "classic"  # classic | mlkem
    connections: int = 64
    direction: str = ""  # bulk: up | down | both
    title: str = ""


VARIANTS: tuple[Variant, ...] = (
    Variant("rate-classic", "rate", "reply", title="rate, ~520 B hello, c=64"),
    Variant("rate-mlkem", "rate", "reply", hello="mlkem", title="rate, ~1.7 KB ML-KEM hello"),
    Variant("bulk-up-1", "bulk", "sink", connections=1, direction="up", title="bulk one way, 1"),
    Variant("bulk-up-64", "bulk", "sink", direction="up", title="bulk one way, 64"),
    Variant("bulk-both-1", "bulk", "echo", connections=1, direction="both", title="bulk both, 1"),
    Variant("bulk-both-64", "bulk", "echo", direction="both", title="bulk both ways, 64"),
    Variant("rr-1", "rr", "echo", connections=1, title="rr 64 B, 1 connection"),
    Variant("rr-64", "rr", "echo", title="rr 64 B, 64 connections"),
    Variant("idle", "idle", "hold", connections=9000, title="idle connections held"),
    Variant("syscalls", "syscalls", "reply", title="syscalls per connection (strace)"),
)
# Selectable by name, not part of `bulk`: the backend streams towards the client.
EXTRA_VARIANTS: tuple[Variant, ...] = (
    Variant("bulk-down-1", "bulk", "source", connections=1, direction="down", title="bulk down"),
)
SCENARIOS = ("rate", "bulk", "rr", "idle", "syscalls")
DEFAULT_SCENARIOS = SCENARIOS


def select(names: list[str], idle_connections: int) -> list[Variant]:
    """Variants for scenario or variant names, in the canonical order."""
    every = (*VARIANTS, *EXTRA_VARIANTS)
    known = {v.name for v in every} | set(SCENARIOS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)} or "
            f"a variant: {', '.join(v.name for v in every)}"
        )
    chosen = [v for v in VARIANTS if v.scenario in names or v.name in names]
    chosen += [v for v in EXTRA_VARIANTS if v.name in names]
    return [
        Variant(v.name, v.scenario, v.backend, v.hello, idle_connections, v.direction, v.title)
        if v.scenario == "idle"
        else v
        for v in chosen
    ]


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    main: bool = False  # drawn by --plot
    digits: int = 1


# Where the CPU went during the window: the proxy's share of its CPUs, the load generator's and
# backend's of theirs, the whole machine's busy share of all its CPUs. (The share of processes
# that are not the bench's, `others_cpu_pct`, is in the JSON; the table marks runs where it
# mattered with ‡ rather than comparing that noise across targets.)
_SHARES = (
    Figure("proxy_cpu_pct", "proxy CPU", "%", False, digits=0),
    Figure("load_cpu_pct", "load CPU", "%", False, digits=0),
    Figure("machine_cpu_pct", "machine CPU", "% of all CPUs", False, digits=0),
)

FIGURES: dict[str, tuple[Figure, ...]] = {
    "rate": (
        Figure("conn_s", "conn/s", "conn/s", True, main=True, digits=0),
        Figure("cpu_us_per_conn", "proxy CPU per conn", "µs", False, main=True),
        Figure("machine_cpu_us_per_conn", "machine CPU per conn", "µs", False, main=True),
        Figure("lat_p50_ms", "latency p50", "ms", False, digits=2),
        Figure("lat_p99_ms", "latency p99", "ms", False, digits=2),
        *_SHARES,
    ),
    "bulk": (
        Figure("gbit_s", "throughput", "Gbit/s", True, main=True, digits=2),
        Figure("cpu_s_per_gb", "proxy CPU per GB", "s/GB", False, main=True, digits=3),
        Figure("machine_cpu_s_per_gb", "machine CPU per GB", "s/GB", False, main=True, digits=3),
        *_SHARES,
    ),
    "rr": (
        Figure("req_s", "req/s", "req/s", True, main=True, digits=0),
        Figure("cpu_us_per_req", "proxy CPU per req", "µs", False),
        Figure("machine_cpu_us_per_req", "machine CPU per req", "µs", False),
        Figure("p50_us", "p50", "µs", False),
        Figure("p90_us", "p90", "µs", False),
        Figure("p99_us", "p99", "µs", False, main=True),
        Figure("p999_us", "p99.9", "µs", False),
        *_SHARES,
    ),
    "idle": (
        Figure("kib_per_conn", "memory per idle conn", "KiB", False, main=True, digits=2),
        Figure("cpu_us_per_conn", "proxy CPU per conn set-up", "µs", False),
        Figure("machine_cpu_us_per_conn", "machine CPU per conn set-up", "µs", False),
        Figure("held", "connections held", "", True, digits=0),
    ),
    "syscalls": (
        Figure("syscalls_per_conn", "syscalls per conn", "", False, main=True),
        Figure("errors_per_conn", "failed syscalls per conn", "", False),
    ),
}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def compute(variant: Variant, run: dict[str, Any]) -> dict[str, float]:
    """The figures of one run from its raw measurements (client, backend, proxy, load)."""
    client = run["client"]
    window = client["window_s"] or 0.0
    proxy_cpu = run["proxy"].get("cpu_s")
    machine = run.get("machine", {})
    machine_cpu = machine.get("cpu_s")
    out: dict[str, float] = {}
    if proxy_cpu is not None and window:
        out["proxy_cpu_pct"] = 100 * proxy_cpu / window / run["proxy"]["cpus"]
    if window:
        out["load_cpu_pct"] = 100 * run["load"]["cpu_s"] / window / run["load"]["cpus"]
    if machine_cpu is not None and machine.get("window_s") and variant.scenario != "syscalls":
        share = 100 / machine["window_s"] / machine["cpus"]  # of all CPUs, over its own window
        out["machine_cpu_pct"] = machine_cpu * share
        out["others_cpu_pct"] = machine["others_cpu_s"] * share
    lat = client.get("lat_ns", {})
    if variant.scenario == "rate":
        done = client["completed_window"]
        if window:
            out["conn_s"] = done / window
        if proxy_cpu is not None and done:
            out["cpu_us_per_conn"] = proxy_cpu * 1e6 / done
        if machine_cpu is not None and done:
            out["machine_cpu_us_per_conn"] = machine_cpu * 1e6 / done
        if lat.get("n"):
            out["lat_p50_ms"] = lat["p50"] / 1e6
            out["lat_p99_ms"] = lat["p99"] / 1e6
    elif variant.scenario == "bulk":
        moved = client["tx_window"] + client["rx_window"]
        if window:
            out["gbit_s"] = moved * 8 / window / 1e9
        if proxy_cpu is not None and moved:
            out["cpu_s_per_gb"] = proxy_cpu / (moved / 1e9)
        if machine_cpu is not None and moved:
            out["machine_cpu_s_per_gb"] = machine_cpu / (moved / 1e9)
    elif variant.scenario == "rr":
        done = client["completed_window"]
        if window:
            out["req_s"] = done / window
        if proxy_cpu is not None and done:
            out["cpu_us_per_req"] = proxy_cpu * 1e6 / done
        if machine_cpu is not None and done:
            out["machine_cpu_us_per_req"] = machine_cpu * 1e6 / done
        if lat.get("n"):
            for key in ("p50", "p90", "p99", "p999"):
                out[f"{key}_us"] = lat[key] / 1e3
    elif variant.scenario == "idle":
        held = client["held"]
        out["held"] = held
        before, during = run["proxy"].get("rss_before"), run["proxy"].get("rss_held")
        if held and before is not None and during is not None:
            out["kib_per_conn"] = (during - before) / held / 1024
        if proxy_cpu is not None and held:
            out["cpu_us_per_conn"] = proxy_cpu * 1e6 / held
        if machine_cpu is not None and held:
            out["machine_cpu_us_per_conn"] = machine_cpu * 1e6 / held
    elif variant.scenario == "syscalls":
        calls = run.get("syscalls", {})
        done = client["completed"]
        if calls and done:
            out["syscalls_per_conn"] = calls["total"]["calls"] / done
            out["errors_per_conn"] = calls["total"]["errors"] / done
    return out


def checks(variant: Variant, run: dict[str, Any]) -> list[str]:
    """What did not add up: bytes in must equal bytes out, every hello must arrive verbatim."""
    client, stats = run["client"], run["backend"]
    problems: list[str] = []
    side = stats.get(variant.backend, {})
    if client["errors"]:
        kinds = {k: v for k, v in client["error_kinds"].items() if v}
        problems.append(f"{client['errors']} client errors {kinds} {client['first_error']}")
    if client["corrupt"] or side.get("corrupt"):
        problems.append(f"corrupt bytes: client {client['corrupt']}, backend {side['corrupt']}")
    if side.get("hello_bad"):
        problems.append(f"{side['hello_bad']} hellos arrived altered at the backend")
    if client.get("unfinished"):
        problems.append(f"{client['unfinished']} connections unfinished at the deadline")
    if variant.scenario in ("rate", "syscalls"):
        if side.get("hello_ok", 0) < client["completed"]:
            problems.append(f"backend saw {side.get('hello_ok')} hellos for {client['completed']}")
        if side.get("bytes_out") != client["rx_total"] + run["warmup"].get("rx_total", 0):
            problems.append(
                f"reply bytes: backend sent {side.get('bytes_out')}, client got "
                f"{client['rx_total']} (+ warm-up)"
            )
    elif variant.direction == "up":
        if side.get("bytes_in") != client["tx_total"]:
            problems.append(f"sink got {side.get('bytes_in')} of {client['tx_total']} bytes")
    elif variant.direction == "down":
        if side.get("bytes_out") != client["rx_total"]:
            problems.append(f"source sent {side.get('bytes_out')}, client got {client['rx_total']}")
    elif variant.scenario in ("rr", "bulk"):
        if not side.get("bytes_in") == side.get("bytes_out") == client["tx_total"]:
            problems.append(
                f"echo: client sent {client['tx_total']}, backend got {side.get('bytes_in')} "
                f"and echoed {side.get('bytes_out')}"
            )
        if client["rx_total"] != client["tx_total"]:
            problems.append(f"client sent {client['tx_total']} but got {client['rx_total']} back")
    elif variant.scenario == "idle":
        if client["held"] != variant.connections:
            problems.append(f"held {client['held']} of {variant.connections} connections")
        if side.get("hello_ok", 0) < client["held"]:
            problems.append(f"backend saw {side.get('hello_ok')} hellos for {client['held']}")
    return problems
