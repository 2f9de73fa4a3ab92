"""The catalog of every datacenter: nodes, service instances, node and service checks.

The local datacenter is the agent's; others are reached with ``?dc=`` (an unknown one answers
500 "No path to datacenter", as Consul does). Writes that change nothing do not bump the index
(Consul's state store compares before it writes); `listeners` run after every instance change
(the leaders' federation-state anti-entropy follows the catalog).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgw.simconsul.index import RaftIndex
from meshgw.simconsul.shapes import (
    Json,
    node_json,
    same_checks,
    same_except_indexes,
    serf_check,
)

Key = tuple[str, ...]


@dataclass(slots=True)
class Node:
    json: dict[str, Json]
    checks: dict[str, dict[str, Json]]


@dataclass(slots=True)
class Instance:
    node: str
    service: dict[str, Json]
    checks: dict[str, dict[str, Json]]

    @property
    def name(self) -> str:
        return str(self.service["Service"])

    @property
    def kind(self) -> str:
        return str(self.service.get("Kind", ""))

    @property
    def peer(self) -> str:
        return str(self.service.get("PeerName") or "")

    def connect_target(self) -> str | None:
        """The service name this instance is connect-capable for (proxy or native)."""
        if self.kind == "connect-proxy":
            return str((self.service.get("Proxy") or {}).get("DestinationServiceName", "")) or None
        if (self.service.get("Connect") or {}).get("Native"):
            return self.name
        return None


@dataclass(slots=True)
class Datacenter:
    name: str
    nodes: dict[str, Node] = field(default_factory=dict)
    instances: dict[tuple[str, str], Instance] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)  # node names, in join order
    leader: str = ""  # the leader's RPC address, as /v1/status/leader answers
    has_leader: bool = True  # False: non-stale reads answer 500 "No cluster leader"
    fed_auto: bool = True  # leader anti-entropy writes this DC's federation state


class Catalog:
    def __init__(self, raft: RaftIndex, local_dc: str) -> None:
        self.raft = raft
        self.local_dc = local_dc
        self.dcs: dict[str, Datacenter] = {}
        self.order: list[str] = []  # as /v1/catalog/datacenters answers (RTT order)
        self.listeners: list[Callable[[], None]] = []
        self.ensure_dc(local_dc)

    # --- datacenters ------------------------------------------------------------------------

    def ensure_dc(self, dc: str) -> Datacenter:
        with self.raft.lock:
            if dc not in self.dcs:
                self.dcs[dc] = Datacenter(dc)
                self.order.append(dc)
                self.raft.commit(("dcs",))
            return self.dcs[dc]

    def dc(self, dc: str | None = None) -> Datacenter:
        return self.ensure_dc(dc or self.local_dc)

    def find_dc(self, dc: str) -> Datacenter | None:
        with self.raft.lock:
            return self.dcs.get(dc)

    def set_datacenters(self, datacenters: Iterable[str]) -> None:
        """Known datacenters, in the order /v1/catalog/datacenters answers (RTT order)."""
        with self.raft.lock:
            wanted = list(dict.fromkeys([self.local_dc, *datacenters]))
            for dc in wanted:
                if dc not in self.dcs:
                    self.dcs[dc] = Datacenter(dc)
            for dc in list(self.dcs):
                if dc not in wanted:
                    del self.dcs[dc]
            self.order = wanted
            self.raft.commit(("dcs",))

    # --- writes -----------------------------------------------------------------------------

    def ensure_node(
        self,
        dc: str,
        node: str,
        address: str,
        *,
        body: Mapping[str, Any] | None = None,
        checks: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Node:
        """Create or update a node; `body` is a Node JSON to take as is (indexes are restamped)."""
        with self.raft.lock:
            state = self.ensure_dc(dc)
            existing = state.nodes.get(node)
            index = self.raft.index + 1
            new = copy.deepcopy(dict(body)) if body is not None else node_json(node, address, dc)
            if existing is not None:
                if same_except_indexes(existing.json, new):
                    return existing
                new["CreateIndex"] = existing.json["CreateIndex"]
            else:
                new["CreateIndex"] = index
            new["ModifyIndex"] = index
            node_checks = existing.checks if existing else {}
            if not node_checks:
                given = checks or {"serfHealth": serf_check(node)}
                node_checks = {
                    cid: {**copy.deepcopy(dict(c)), "Node": node} for cid, c in given.items()
                }
                for check in node_checks.values():
                    check["CreateIndex"] = check["ModifyIndex"] = index
            state.nodes[node] = Node(new, node_checks)
            self.raft.commit(("catalog", dc), *self._node_service_keys(state, node))
            return state.nodes[node]

    def put(self, dc: str, csn: Mapping[str, Any], *, node_checks: bool = True) -> None:
        """Upsert a CheckServiceNode into dc's catalog (its node too); no-op if unchanged.

        With node_checks, the node checks in `csn` (serfHealth) replace the node's; otherwise the
        node keeps the checks it has (updates of one service must not revive a dead node)."""
        with self.raft.lock:
            state = self.ensure_dc(dc)
            node_body = csn["Node"]
            node = str(node_body["Node"])
            given_node_checks = {c["CheckID"]: c for c in csn["Checks"] if not c.get("ServiceID")}
            self.ensure_node(
                dc, node, str(node_body["Address"]), body=node_body, checks=given_node_checks
            )
            service = copy.deepcopy(dict(csn["Service"]))
            sid = str(service["ID"])
            checks = {c["CheckID"]: copy.deepcopy(c) for c in csn["Checks"] if c.get("ServiceID")}
            old = state.instances.get((node, sid))
            unchanged = (
                old is not None
                and same_except_indexes(old.service, service)
                and same_checks(old.checks, checks)
            )
            if not unchanged:
                self._store(state, node, sid, service, checks, old)
            if node_checks:
                self.update_node_checks(state, node, given_node_checks)
        self.changed()

    def _store(
        self,
        state: Datacenter,
        node: str,
        sid: str,
        service: dict[str, Json],
        checks: dict[str, dict[str, Json]],
        old: Instance | None,
    ) -> None:
        index = self.raft.index + 1
        service["CreateIndex"] = old.service["CreateIndex"] if old else index
        service["ModifyIndex"] = index
        for cid, check in checks.items():
            check["Node"] = node
            previous = old.checks.get(cid) if old else None
            same = previous is not None and same_checks({cid: previous}, {cid: check})
            check["CreateIndex"] = previous["CreateIndex"] if previous else index
            check["ModifyIndex"] = previous["ModifyIndex"] if same and previous else index
        inst = Instance(node, service, checks)
        state.instances[(node, sid)] = inst
        keys = self.instance_keys(state.name, inst)
        if old is not None:
            keys += self.instance_keys(state.name, old)
        self.raft.commit(("catalog", state.name), *keys)

    def update_node_checks(
        self, state: Datacenter, node: str, checks: Mapping[str, Mapping[str, Any]]
    ) -> None:
        with self.raft.lock:
            current = state.nodes[node].checks
            for cid, check in checks.items():
                if cid in current and current[cid]["Status"] == check["Status"]:
                    continue
                index = self.raft.index + 1
                new = copy.deepcopy(dict(check))
                new["Node"] = node
                new["ModifyIndex"] = index
                new["CreateIndex"] = current[cid]["CreateIndex"] if cid in current else index
                current[cid] = new
                self.raft.commit(*self._node_service_keys(state, node))

    def drop(self, dc: str, node: str, service_id: str) -> bool:
        with self.raft.lock:
            state = self.dcs.get(dc)
            inst = state.instances.pop((node, service_id), None) if state else None
            if inst is None:
                return False
            self.raft.commit(("catalog", dc), *self.instance_keys(dc, inst))
        self.changed()
        return True

    def changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    # --- helpers for tests and the demo -------------------------------------------------------

    def add_instance(self, csn: Mapping[str, Any], *, dc: str | None = None) -> None:
        """Put any CheckServiceNode (see shapes.check_service_node) into a datacenter's catalog."""
        self.put(dc or str(csn["Node"].get("Datacenter") or self.local_dc), csn)

    def remove_instance(self, node: str, service_id: str, *, dc: str | None = None) -> None:
        self.drop(dc or self.local_dc, node, service_id)

    def set_check_status(
        self,
        node: str,
        status: str,
        *,
        service_id: str | None = None,
        dc: str | None = None,
        output: str = "",
    ) -> None:
        """Mark a service's checks (or, with no service_id, the node's serfHealth) as status.
        For a service the agent registered, use Agent.set_check_status: the agent owns it."""
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status {status!r}: want passing, warning or critical")
        with self.raft.lock:
            state = self.dc(dc)
            if service_id is None:
                check = dict(state.nodes[node].checks["serfHealth"])
                check["Status"] = status
                check["Output"] = output or serf_check(node, status)["Output"]
                self.update_node_checks(state, node, {"serfHealth": check})
                self.changed()
                return
            inst = state.instances[(node, service_id)]
            csn = {
                "Node": state.nodes[node].json,
                "Service": inst.service,
                "Checks": [
                    {**c, "Status": status, "Output": output or c["Output"]}
                    for c in inst.checks.values()
                ],
            }
            self.put(state.name, csn, node_checks=False)

    # --- keys and rendering -----------------------------------------------------------------

    @staticmethod
    def instance_keys(dc: str, inst: Instance) -> list[Key]:
        peer = inst.peer
        keys: list[Key] = [("service", dc, inst.name, peer)]
        target = inst.connect_target()
        if target:
            keys.append(("connect", dc, target, peer))
        return keys

    def _node_service_keys(self, state: Datacenter, node: str) -> list[Key]:
        keys: list[Key] = []
        for (n, _), inst in state.instances.items():
            if n == node:
                keys += self.instance_keys(state.name, inst)
        return keys

    def service_keys(self, state: Datacenter, kind: str, name: str, peer: str = "") -> list[Key]:
        """The keys a service view depends on; the whole catalog until the service exists."""
        key = (kind, state.name, name, peer)
        return [key] if self.raft.stamped(key) else [("catalog", state.name)]

    def render(self, state: Datacenter, inst: Instance) -> dict[str, Json]:
        node = state.nodes[inst.node]
        return {
            "Node": copy.deepcopy(node.json),
            "Service": copy.deepcopy(inst.service),
            "Checks": copy.deepcopy([*node.checks.values(), *inst.checks.values()]),
        }

    def instances(self, state: Datacenter) -> list[Instance]:
        """Every instance of the datacenter, in (node, service ID) order."""
        return [inst for _, inst in sorted(state.instances.items())]
