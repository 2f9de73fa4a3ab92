"""Every Prometheus metric meshgw exports, in one place.

One `Metrics` per gateway, each with its own registry, so that several gateways in one process
(tests, the demo) count apart. The data plane never formats label values per connection: the
labelled children are fetched once per label set and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

# ALPN protocols Consul offers across gateways (CONSUL.md §5); anything else is counted as "other".
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


@dataclass(frozen=True, slots=True)
class RouteStats:
    """Labelled children for one route kind and datacenter."""

    kind: str
    datacenter: str
    bytes_up: Counter
    bytes_down: Counter
    connect_seconds: Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        ProcessCollector(registry=registry)
        self.connections = Counter(
            "meshgw_connections",
            "Connections routed to an upstream, by route kind, datacenter and how they ended.",
            ["route_kind", "datacenter", "outcome"],
            registry=registry,
        )
        self.active = Gauge(
            "meshgw_active_connections",
            "Client connections open now, in every phase.",
            registry=registry,
        )
        self.rejections = Counter(
            "meshgw_rejections",
            "Client connections closed before routing, by reason (bad hello, unknown name, "
            "limits, every upstream down).",
            ["reason"],
            registry=registry,
        )
        self.bytes = Counter(
            "meshgw_bytes",
            "Bytes forwarded; direction upstream is client to upstream.",
            ["route_kind", "datacenter", "direction"],
            registry=registry,
        )
        self.upstream_failures = Counter(
            "meshgw_upstream_connect_failures",
            "Failed upstream connection attempts (each fails over to the next endpoint).",
            ["route_kind", "datacenter", "reason"],
            registry=registry,
        )
        self.accept_errors = Counter(
            "meshgw_accept_errors",
            "accept() failures by errno name; EMFILE/ENFILE pause accepting for a moment.",
            ["error"],
            registry=registry,
        )
        self.hello_bytes = Histogram(
            "meshgw_client_hello_bytes",
            "Size of the ClientHello on the wire, record headers included.",
            buckets=(256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 65536),
            registry=registry,
        )
        self.hello_seconds = Histogram(
            "meshgw_client_hello_seconds",
            "Time from accept to a complete ClientHello.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connect_seconds = Histogram(
            "meshgw_upstream_connect_seconds",
            "Time from accept until the upstream took the hello, failovers included.",
            ["route_kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.alpn = Counter(
            "meshgw_alpn_offered",
            "ALPN protocols offered in ClientHellos (Consul's names; others 'other', none 'none').",
            ["protocol"],
            registry=registry,
        )
        self.routes = Gauge(
            "meshgw_routes",
            "Routes in the current route table, by kind.",
            ["route_kind"],
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
        self._route_stats: dict[tuple[str, str], RouteStats] = {}
        self._outcomes: dict[tuple[str, str, str], Counter] = {}
        self._rejections: dict[str, Counter] = {}
        self._alpn: dict[str, Counter] = {}

    def route_stats(self, kind: str, datacenter: str) -> RouteStats:
        stats = self._route_stats.get((kind, datacenter))
        if stats is None:
            stats = self._route_stats[(kind, datacenter)] = RouteStats(
                kind=kind,
                datacenter=datacenter,
                bytes_up=self.bytes.labels(kind, datacenter, "upstream"),
                bytes_down=self.bytes.labels(kind, datacenter, "downstream"),
                connect_seconds=self.connect_seconds.labels(kind),
            )
        return stats

    def outcome(self, kind: str, datacenter: str, outcome: str) -> Counter:
        key = (kind, datacenter, outcome)
        counter = self._outcomes.get(key)
        if counter is None:
            counter = self._outcomes[key] = self.connections.labels(*key)
        return counter

    def rejection(self, reason: str) -> Counter:
        counter = self._rejections.get(reason)
        if counter is None:
            counter = self._rejections[reason] = self.rejections.labels(reason)
        return counter

    def alpn_offered(self, protocol: str) -> Counter:
        # Keyed by label, not by what the client sent: the cache must not grow with input.
        label = protocol if protocol in CONSUL_ALPN or protocol == "none" else "other"
        counter = self._alpn.get(label)
        if counter is None:
            counter = self._alpn[label] = self.alpn.labels(label)
        return counter
