"""Consul servers: their nodes, the `consul` service the leader registers for each, and the leader.

The `consul` service has no Address (readers use the node's) and carries the server's Meta:
``version``, ``raft_version``, ``read_replica``, ``non_voter``, ``grpc_port`` and
``grpc_tls_port`` (the port peering dials; absent when the server has no TLS gRPC port).
"""

from __future__ import annotations

from collections.abc import Mapping

from meshgw.simconsul.catalog import Catalog, Datacenter
from meshgw.simconsul.shapes import CONSUL_VERSION, check_service_node


class Servers:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def add(
        self,
        node: str,
        address: str,
        *,
        port: int = 8300,
        dc: str | None = None,
        status: str = "passing",
        read_replica: bool = False,
        grpc_tls_port: int | None = 8503,
        version: str = CONSUL_VERSION,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """A server joins `dc` (default: the agent's); the first one becomes the leader.
        `status` is its serfHealth; `meta` adds to (or overrides) the Meta described above."""
        server_meta = {
            "non_voter": "false",
            "raft_version": "3",
            "read_replica": "true" if read_replica else "false",
            "serf_protocol_current": "2",
            "serf_protocol_max": "5",
            "serf_protocol_min": "1",
            "version": version,
            "grpc_port": "8502",
        }
        if grpc_tls_port is not None:
            server_meta["grpc_tls_port"] = str(grpc_tls_port)
        server_meta |= dict(meta or {})
        with self.catalog.raft.lock:
            state = self.catalog.dc(dc)
            csn = check_service_node(
                node,
                address,
                "consul",
                port,
                service_address="",
                meta=server_meta,
                status=None,
                node_status=status,
                dc=state.name,
            )
            self.catalog.put(state.name, csn)
            if node not in state.servers:
                state.servers.append(node)
            if not state.leader:  # the first server elects itself
                state.leader = f"{address}:{port}"
                state.has_leader = True
                self.catalog.raft.commit(("leader", state.name))

    def remove(self, node: str, *, dc: str | None = None) -> None:
        """A server leaves; if it led, the next server in join order takes over."""
        with self.catalog.raft.lock:
            state = self.catalog.dc(dc)
            was = self.rpc_address(state, node)
            self.catalog.drop(state.name, node, "consul")
            state.nodes.pop(node, None)
            if node in state.servers:
                state.servers.remove(node)
            if was and state.leader == was:
                state.leader = next(filter(None, self.addresses(state)), "")
                state.has_leader = bool(state.leader)
                self.catalog.raft.commit(("leader", state.name))

    def set_leader(self, address: str | None, *, dc: str | None = None) -> None:
        """Leader RPC address; None = the leader is lost (non-stale reads answer 500
        "No cluster leader", ?stale reads answer with X-Consul-KnownLeader: false)."""
        with self.catalog.raft.lock:
            state = self.catalog.dc(dc)
            state.leader = address or ""
            state.has_leader = address is not None
            self.catalog.raft.commit(("leader", state.name))

    @staticmethod
    def rpc_address(state: Datacenter, node: str) -> str:
        """HOST:PORT of a server's RPC (node address, `consul` service port); "" if unknown."""
        inst = state.instances.get((node, "consul"))
        if inst is None or node not in state.nodes:
            return ""
        return f"{state.nodes[node].json['Address']}:{inst.service['Port']}"

    def addresses(self, state: Datacenter) -> list[str]:
        """Every server's RPC address in join order, as /v1/status/peers lists them."""
        with self.catalog.raft.lock:
            return [a for a in (self.rpc_address(state, n) for n in state.servers) if a]
