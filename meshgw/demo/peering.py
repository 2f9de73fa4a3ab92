"""`meshgw demo --peering`: two Consul clusters peered through meshgw gateways, on loopback.

Each cluster is one datacenter with its own CA and trust domain, simulated servers (their gRPC
TLS port answers as a peer dials it, with a certificate for `server.<dc>.peering.<td>`), a
simulated agent, and real gateway processes that ask that agent for everything and register with
it. Each agent has the mesh config entry with `PeerThroughMeshGateways`, and a peering to the
other cluster whose `PeerServerName` is the other's peering server name and whose
`PeerServerAddresses` are the other's gateways (docs/consul.md#peering). The first cluster
exports a TCP service, `db`, and an HTTP one, `api`; the second imports both: its agent lists
their instances as the exporter replicates them, at the exporter's gateways, with the name to
dial in `PeerMeta.SNI` (copied here from the exporter's catalog whenever it changes).

A round (peering_round.py) dials, through the gateways: each cluster's leader to the other
cluster's servers (server -> local gateway -> peer's gateway -> peer's server; in Consul only
the cluster that established the peering dials, here both do, so that each gateway shows both
routes); a client of the importing cluster to `db` through both clusters' gateways; and to
`api`, which the exporter's gateway refuses (counted `peered_l7`): an L7 export needs a gateway
that terminates TLS, which meshgw never does.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgw.demo.agents import new_trust_domain, start_agent
from meshgw.demo.federation import Shape, start_gateways, wait_for_routes
from meshgw.demo.gateways import (
    Counters,
    GatewayChild,
    agent_settings,
    read_counters,
    write_config,
)
from meshgw.demo.layout import (
    ADMIN_PORT,
    DOMAIN,
    GATEWAY_PORT,
    GRPC_TLS_PORT,
    GatewaySpec,
    agent_host,
    free_port,
    gateway_host,
    server_host,
    service_host,
    spread_loopback_works,
)
from meshgw.demo.peer_endpoints import ALPN_H2, PeeringServer, ServiceInstance
from meshgw.simconsul import SimConsul
from meshgw.tls.certs import Issued, create_ca, create_cert, write_ca
from meshgw.wire.names import peered_service_sni, peering_server_sni

CLUSTERS = (("cluster-01", "dc1"), ("cluster-02", "dc2"))
TCP_SERVICE, L7_SERVICE = "db", "api"
SERVICE_PORTS = {TCP_SERVICE: 5432, L7_SERVICE: 8080}  # the applications' own ports
SIDECAR_PORT = 21000  # Consul's first sidecar port: where the exporter's gateway connects
CLIENT = "web"  # the importing cluster's application that dials the imported service
DISCOVERY_TIMEOUT = 30.0


@dataclass(slots=True)
class Cluster:
    name: str
    dc: str
    index: int
    trust_domain: str
    ca: Path = Path()
    servers: list[PeeringServer] = field(default_factory=list)
    instances: dict[str, ServiceInstance] = field(default_factory=dict)
    agent: SimConsul | None = None
    gateways: list[GatewayChild] = field(default_factory=list)

    @property
    def peering_name(self) -> str:
        """What peers dial: PeeringServerSAN, `server.<dc>.peering.<td>`."""
        return peering_server_sni(self.dc, self.trust_domain)

    @property
    def url(self) -> str:
        assert self.agent is not None
        return self.agent.url


def write_pair(folder: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    cert, key = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.touch(mode=0o600)  # private from the start
    key.write_bytes(issued.key_pem)
    return cert, key


def service_cert(ca: Issued, service: str, dc: str, trust_domain: str, sni: str) -> Issued:
    """A sidecar's leaf certificate, as the Connect CA issues it: the service's SPIFFE ID, and
    (so that a plain TLS client can check it by name) the name importers dial."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    spiffe = f"spiffe://{trust_domain}/ns/default/dc/{dc}/svc/{service}"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=3))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe), x509.DNSName(sni)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


class PeeringDemo:
    def __init__(self, shape: Shape, root: Path) -> None:
        self.shape = shape
        self.root = root
        self.spread = spread_loopback_works()
        self.clusters = [
            Cluster(name, dc, k, new_trust_domain()) for k, (name, dc) in enumerate(CLUSTERS)
        ]
        self.exporter, self.importer = self.clusters
        self.l7_dials = 0  # refused L7 connections so far: the exporter must count as many
        self._replicated = -1

    def other(self, cluster: Cluster) -> Cluster:
        return self.clusters[1 - cluster.index]

    @property
    def children(self) -> list[GatewayChild]:
        return [child for cluster in self.clusters for child in cluster.gateways]

    def gateway_named(self, address: str) -> str:
        for child in self.children:
            if child.spec.listen == address:
                return child.name
        return address or "?"

    def service_sni(self, service: str) -> str:
        """How the importer names an exported service: the peer name the exporter gave it and
        the exporter's trust domain (PeeredServiceSNI)."""
        exporter_td = self.exporter.trust_domain
        return peered_service_sni(service, "default", "default", self.importer.name, exporter_td)

    # --- start and stop -----------------------------------------------------------------------

    async def start(self, progress: Callable[[str], None]) -> None:
        for cluster in self.clusters:
            await self._start_endpoints(cluster)
        progress(
            "certificates: a CA per cluster, servers' certificates for their peering names, "
            f"in {self.root / 'certs'}"
        )
        for cluster in self.clusters:
            cluster.agent = await self._start_agent(cluster)
            progress(self._describe(cluster))
        await start_gateways(self._build_gateways, progress)
        await self.wait_discovered()

    def _build_gateways(self, well_known_ports: bool) -> list[GatewayChild]:
        """Each cluster's gateways (configs written), and each peering's addresses: the other
        cluster's gateways, as its peering token gave them."""
        specs = {c.name: self._gateway_specs(c, well_known_ports) for c in self.clusters}
        for cluster in self.clusters:
            assert cluster.agent is not None
            other = self.other(cluster)
            addresses = [spec.listen for spec in specs[other.name]]
            cluster.agent.peerings.update(other.name, peer_server_addresses=addresses)
            cluster.gateways = [GatewayChild(spec) for spec in specs[cluster.name]]
            for spec in specs[cluster.name]:
                write_config(spec, agent_settings(spec, cluster.url, expose_servers=False))
        return self.children

    def _describe(self, cluster: Cluster) -> str:
        what = (
            f"exports {TCP_SERVICE} (tcp) and {L7_SERVICE} (http) to {self.importer.name}"
            if cluster is self.exporter
            else f"imports them from {self.exporter.name}"
        )
        return (
            f"{cluster.name} (datacenter {cluster.dc}, trust domain {cluster.trust_domain}): "
            f"{len(cluster.servers)} servers, agent {cluster.url}; peered with "
            f"{self.other(cluster).name} through the gateways; {what}"
        )

    async def _start_endpoints(self, cluster: Cluster) -> None:
        """Its CA, its servers' gRPC TLS ports and (the exporter's) service instances."""
        folder = self.root / "certs" / cluster.name
        ca = create_ca(DOMAIN)
        cluster.ca = write_ca(ca, folder, DOMAIN)[0]
        for i in range(self.shape.servers_per_dc):
            node = f"node-{i}"
            issued = create_cert(
                ca, "server", dc=cluster.dc, node=node, additional_dnsnames=[cluster.peering_name]
            )
            cert, key = write_pair(folder, node, issued)
            host = server_host(cluster.index, i, self.spread)
            server = PeeringServer(node, host, cert, key, [ALPN_H2])
            await server.start(GRPC_TLS_PORT if self.spread else None)
            cluster.servers.append(server)
        if cluster is not self.exporter:
            return
        for i, service in enumerate((TCP_SERVICE, L7_SERVICE)):
            name = f"{service}-0"
            sni = self.service_sni(service)
            issued = service_cert(ca, service, cluster.dc, cluster.trust_domain, sni)
            cert, key = write_pair(folder, name, issued)
            host = service_host(cluster.index, i, self.spread)
            instance = ServiceInstance(name, host, cert, key, [])
            await instance.start(SIDECAR_PORT if self.spread else None)
            cluster.instances[service] = instance

    def _gateway_specs(self, cluster: Cluster, well_known_ports: bool) -> list[GatewaySpec]:
        well_known = well_known_ports and self.spread
        specs = []
        for i in range(self.shape.gateways_per_dc):
            host = gateway_host(cluster.index, i, self.spread)
            stem = f"{cluster.name}-gw-{i}"
            specs.append(
                GatewaySpec(
                    cluster.dc,
                    i,
                    host,
                    free_port(host, GATEWAY_PORT if well_known else None),
                    free_port(host, ADMIN_PORT if well_known else None),
                    self.root / "gateways" / f"{stem}.toml",
                    self.root / "logs" / f"{stem}.log",
                )
            )
        return specs

    async def _start_agent(self, cluster: Cluster) -> SimConsul:
        sim = await start_agent(
            cluster.dc,
            agent_host(cluster.index, self.spread),
            primary=cluster.dc,
            trust_domain=cluster.trust_domain,
            well_known_port=self.spread,
        )
        for server in cluster.servers:
            sim.servers.add(server.name, server.host, grpc_tls_port=server.port)
        sim.config.set_mesh(peer_through_mesh_gateways=True)
        other = self.other(cluster)
        sim.peerings.add(
            other.name, peer_server_name=other.peering_name, remote_datacenter=other.dc
        )  # its addresses come with the other cluster's gateways
        if cluster is self.exporter:
            for service, instance in cluster.instances.items():
                host = instance.host
                port = SERVICE_PORTS[service]
                sim.services.add(service, instance.name, host, port, proxy_port=instance.port)
                sim.config.export(service, peers=[other.name])
            sim.config.set_service_defaults(L7_SERVICE, protocol="http")
            sim.catalog.listeners.append(self._exporter_changed)
        return sim

    def _exporter_changed(self) -> None:
        asyncio.get_running_loop().call_soon(self.replicate)

    def replicate(self) -> None:
        """What the peering stream carries: the exporter's gateways, as the importer's agent
        then lists the imported instances (at those gateways, PeerMeta.SNI set)."""
        source, target = self.exporter.agent, self.importer.agent
        if source is None or target is None:
            return
        stamp = source.raft.stamp(("catalog", self.exporter.dc))
        if stamp == self._replicated:
            return
        self._replicated = stamp
        with source.raft.lock:
            state = source.catalog.dc()
            gateways = [
                source.catalog.render(state, inst)
                for inst in source.catalog.instances(state)
                if inst.kind == "mesh-gateway"
            ]
        for service, protocol in ((TCP_SERVICE, "tcp"), (L7_SERVICE, "http")):
            target.peerings.import_services(
                self.exporter.name,
                [service],
                gateways=gateways,
                trust_domain=self.exporter.trust_domain,
                exporter_peer_name=self.importer.name,
                protocol=protocol,
            )

    def expected_routes(self, cluster: Cluster) -> tuple[dict[str, set[str]], set[str]]:
        """What a gateway of `cluster` must route (match → addresses), and refuse."""
        other = self.other(cluster)
        routes = {
            cluster.peering_name: {s.address for s in cluster.servers},
            other.peering_name: {g.spec.listen for g in other.gateways},
        }
        exporter_gateways = {g.spec.listen for g in self.exporter.gateways}
        db, api = self.service_sni(TCP_SERVICE), self.service_sni(L7_SERVICE)
        if cluster is self.exporter:
            routes[db] = {cluster.instances[TCP_SERVICE].address}
            return routes, {api}
        routes[db] = routes[api] = exporter_gateways
        return routes, set()

    async def wait_discovered(self, timeout: float = DISCOVERY_TIMEOUT) -> None:
        """Until every gateway routes (and refuses) what `expected_routes` says, from Consul."""
        cluster_of = {child.name: c for c in self.clusters for child in c.gateways}
        await wait_for_routes(
            self.children, lambda child: self.expected_routes(cluster_of[child.name]), timeout
        )

    async def close(self) -> None:
        await asyncio.gather(*(child.stop() for child in self.children))
        for cluster in self.clusters:
            for endpoint in [*cluster.servers, *cluster.instances.values()]:
                await endpoint.close()
            if cluster.agent is not None:
                await cluster.agent.stop()

    # --- a round ------------------------------------------------------------------------------

    async def counters(self) -> dict[str, Counters | None]:
        return await read_counters(self.children)

    def peerings(self) -> list[tuple[str, Mapping[str, Any]]]:
        """Each cluster's peerings as its agent answers /v1/peering/<name>."""
        found: list[tuple[str, Mapping[str, Any]]] = []
        for cluster in self.clusters:
            assert cluster.agent is not None
            for name in cluster.agent.peerings.names():
                rendered = cluster.agent.peerings.render(name)
                if rendered is not None:
                    found.append((cluster.name, rendered))
        return found
