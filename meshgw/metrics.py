"""Every Prometheus metric meshgw exports, in one place.

One `Metrics` per gateway, each with its own registry, so that several gateways in one process
(tests, the demo) count apart. The data plane counts in plain integers (`DataPlaneStats`); a
collector turns them into Prometheus families when /metrics is read.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# ALPN protocols Consul offers across gateways (docs/consul.md#alpn-names); anything else is
# counted as "other".
CONSUL_ALPN = frozenset(
    {
        "consul/rpc-single",
        "consul/raft",
        "consul/rpc-multi",
        "consul/rpc-snapshot",
        "consul/rpc-gossip",
        "consul/rpc-grpc",
        "consul/raft-forwarding",
        "consul/wan-gossip/packet",
        "consul/wan-gossip/stream",
    }
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 10)
HELLO_SIZE_BUCKETS = (256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 65536)


class Histogram:
    """Bucket counts and a sum, kept in plain integers: observing takes no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(
        self, family: HistogramMetricFamily, values: Sequence[str] = ()
    ) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(list(values), buckets, self.sum)
        return family


class DataPlaneStats:
    """What the data plane counts, per process, as plain integers updated on the hot path.

    A connection costs a few dictionary increments instead of a dozen lock round trips; the
    Prometheus families are built from these only when /metrics is scraped.
    """

    __slots__ = (
        "accept_errors",
        "active",
        "alpn",
        "bytes",
        "connect_seconds",
        "connections",
        "down",
        "hello_bytes",
        "hello_seconds",
        "internal_errors",
        "kernel_capacity",
        "kernel_joins",
        "kernel_open",
        "kernel_refusals",
        "pipe_shortages",
        "pipes_open",
        "rejections",
        "upstream_failures",
    )

    def __init__(self) -> None:
        self.connections: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.rejections: defaultdict[str, int] = defaultdict(int)
        self.bytes: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.upstream_failures: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.accept_errors: defaultdict[str, int] = defaultdict(int)
        self.alpn: defaultdict[str, int] = defaultdict(int)
        self.internal_errors = 0
        self.hello_bytes = Histogram(HELLO_SIZE_BUCKETS)
        self.hello_seconds = Histogram(LATENCY_BUCKETS)
        self.connect_seconds: dict[str, Histogram] = {}
        self.active: Callable[[], int] = lambda: 0  # the listener says how many are open
        self.pipe_shortages: Callable[[], int] = lambda: 0  # and how often no pipe was had
        self.pipes_open: Callable[[], int] = lambda: 0
        self.down: Callable[[], dict[str, str]] = dict  # upstream addresses seen failing
        # Kernel tunnels (BPF sockmap): joins by trigger; the rest the data plane answers.
        self.kernel_joins: defaultdict[str, int] = defaultdict(int)
        self.kernel_capacity = 0
        self.kernel_open: Callable[[], int] = lambda: 0
        self.kernel_refusals: Callable[[], dict[str, int]] = dict

    def offered(self, protocol: str) -> None:
        # Counted by label, not by what the client sent: the table must not grow with input.
        self.alpn[protocol if protocol in CONSUL_ALPN or protocol == "none" else "other"] += 1

    def connected(self, kind: str, seconds: float) -> None:
        histogram = self.connect_seconds.get(kind)
        if histogram is None:
            histogram = self.connect_seconds[kind] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)


def _counter(name: str, doc: str, labels: Sequence[str], values: dict) -> Metric:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class _DataPlaneCollector(Collector):
    def __init__(self, stats: DataPlaneStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self.stats
        counter = _counter
        yield counter(
            "meshgw_connections",
            "Connections routed to an upstream, by route kind, datacenter and how they ended.",
            ["route_kind", "datacenter", "outcome"],
            stats.connections,
        )
        yield GaugeMetricFamily(
            "meshgw_active_connections",
            "Client connections open now, in every phase.",
            value=stats.active(),
        )
        yield counter(
            "meshgw_rejections",
            "Client connections closed before routing, by reason (bad hello, unknown name, "
            "limits, every upstream down).",
            ["reason"],
            stats.rejections,
        )
        yield counter(
            "meshgw_bytes",
            "Bytes forwarded; direction upstream is client to upstream.",
            ["route_kind", "datacenter", "direction"],
            stats.bytes,
        )
        yield counter(
            "meshgw_upstream_connect_failures",
            "Failed upstream connection attempts (each fails over to the next endpoint).",
            ["route_kind", "datacenter", "reason"],
            stats.upstream_failures,
        )
        yield CounterMetricFamily(
            "meshgw_internal_errors",
            "Connection handlers that raised (a bug, logged once per kind); each closed only "
            "its own connection.",
            value=stats.internal_errors,
        )
        yield CounterMetricFamily(
            "meshgw_splice_pipe_shortages",
            "Bursts moved through userspace because no splice pipe could be had (the pipe "
            "budget is spent or the open-file limit reached).",
            value=stats.pipe_shortages(),
        )
        down = GaugeMetricFamily(
            "meshgw_upstream_down",
            "1 for each upstream address tried last for now after failing (passive health), "
            "with its last error.",
            labels=["address", "reason"],
        )
        for address, reason in sorted(stats.down().items()):
            down.add_metric([address, reason], 1)
        yield down
        yield GaugeMetricFamily(
            "meshgw_splice_pipes_open",
            "Splice pipes open now, moving bytes or kept for reuse (two descriptors each).",
            value=stats.pipes_open(),
        )
        yield from _kernel_tunnel_families(stats)
        yield counter(
            "meshgw_accept_errors",
            "accept() failures by errno name; EMFILE/ENFILE pause accepting for a moment.",
            ["error"],
            stats.accept_errors,
        )
        yield counter(
            "meshgw_alpn_offered",
            "ALPN protocols offered in ClientHellos (Consul's names; others 'other', none 'none').",
            ["protocol"],
            stats.alpn,
        )
        yield stats.hello_bytes.add_to(
            HistogramMetricFamily(
                "meshgw_client_hello_bytes",
                "Size of the ClientHello on the wire, record headers included.",
            )
        )
        yield stats.hello_seconds.add_to(
            HistogramMetricFamily(
                "meshgw_client_hello_seconds", "Time from accept to a complete ClientHello."
            )
        )
        connect = HistogramMetricFamily(
            "meshgw_upstream_connect_seconds",
            "Time from accept until the upstream took the hello, failovers included.",
            labels=["route_kind"],
        )
        for kind, histogram in sorted(stats.connect_seconds.items()):
            histogram.add_to(connect, [kind])
        yield connect


def _kernel_tunnel_families(stats: DataPlaneStats) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        "meshgw_kernel_tunnels",
        "Connections whose bytes the kernel moves now (BPF sockmap): --pump sockmap joins "
        "each one, auto promotes the long-lived ones.",
        value=stats.kernel_open(),
    )
    yield GaugeMetricFamily(
        "meshgw_kernel_tunnel_capacity",
        "Kernel tunnels the data plane can hold; 0 when the pump mode uses none or the "
        "kernel refuses them (the start-up log says why).",
        value=stats.kernel_capacity,
    )
    yield _counter(
        "meshgw_kernel_tunnel_joins",
        "Connections handed to a kernel tunnel: at the start (sockmap) or promoted (auto).",
        ["trigger"],
        stats.kernel_joins,
    )
    yield _counter(
        "meshgw_kernel_tunnel_refusals",
        "Joins the kernel tunnel refused, by reason: full (no free slot), busy (bytes kept "
        "coming), eof (half-closed): the connection goes on in splice/userspace; error: it "
        "was reset.",
        ["reason"],
        stats.kernel_refusals(),
    )


class AdminStats:
    """What the admin port counts, as plain integers like the data plane's."""

    __slots__ = ("refused", "requests")

    def __init__(self) -> None:
        self.requests: defaultdict[str, int] = defaultdict(int)  # by status code
        self.refused: defaultdict[str, int] = defaultdict(int)  # by reason

    def answered(self, status: int) -> None:
        self.requests[str(status)] += 1

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1


class _AdminCollector(Collector):
    def __init__(self, stats: AdminStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        answered = CounterMetricFamily(
            "meshgw_admin_requests", "Admin requests answered, by status code.", labels=["code"]
        )
        for code, count in sorted(self.stats.requests.items()):
            answered.add_metric([code], count)
        yield answered
        refused = CounterMetricFamily(
            "meshgw_admin_refused",
            "Admin connections or requests refused or cut: evicted (closed to make room for a "
            "newer one), connection_limit, request_timeout, idle_timeout, malformed, host (a "
            "Host header that is not allowed).",
            labels=["reason"],
        )
        for reason, count in sorted(self.stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused


class Metrics:
    """A gateway's registry: the data plane's counters and the control plane's gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        ProcessCollector(registry=registry)
        self.dataplane = DataPlaneStats()
        registry.register(_DataPlaneCollector(self.dataplane))
        self.admin = AdminStats()
        registry.register(_AdminCollector(self.admin))
        self.routes = Gauge(
            "meshgw_routes",
            "Routes in the current route table, by kind.",
            ["route_kind"],
            registry=registry,
        )
        self.routes_skipped = Gauge(
            "meshgw_routes_skipped",
            "Routes the topology implies but Consul's SNI grammar cannot spell (e.g. a server "
            "node name with a dot), by reason; each is logged once.",
            ["reason"],
            registry=registry,
        )
        self.route_table_failures = Counter(
            "meshgw_route_table_failures",
            "Route tables that could not be built; the last good one stays in use.",
            registry=registry,
        )
        self.route_table_updates = Counter(
            "meshgw_route_table_updates",
            "Route tables installed since start.",
            registry=registry,
        )
        self.consul_up = Gauge(
            "meshgw_consul_up",
            "1 while the last request to the Consul agent for this source succeeded.",
            ["source"],
            registry=registry,
        )
        self.draining = Gauge(
            "meshgw_draining",
            "1 while the gateway drains after SIGTERM.",
            registry=registry,
        )
        self.worker_restarts = Counter(
            "meshgw_worker_restarts",
            "Worker processes that died and were started again.",
            registry=registry,
        )


def merge_metrics(texts: Iterable[bytes], per_process_prefix: str = "process_") -> bytes:
    """Sum the samples of several registries; per-process families get a `worker` label."""
    Key = tuple[str, tuple[tuple[str, str], ...]]
    families: dict[str, tuple[str, str, dict[Key, float]]] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text.decode()):
            _, _, values = families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                labels = dict(sample.labels)
                if family.name.startswith(per_process_prefix):
                    labels["worker"] = str(index)
                key = (sample.name, tuple(sorted(labels.items())))
                if sample.name.endswith("_created"):  # the earliest creation time
                    values[key] = min(values.get(key, sample.value), sample.value)
                else:
                    values[key] = values.get(key, 0.0) + sample.value
    lines: list[str] = []
    for name, (kind, documentation, values) in families.items():
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, label_items), value in values.items():
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in label_items)
            lines.append(
                f"{sample_name}{{{rendered}}} {value!r}" if rendered else f"{sample_name} {value!r}"
            )
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
