"""The local agent: the services and checks registered with it, synced into the local catalog.

Anti-entropy is synchronous: every change of a registration or of one of its checks is in the
catalog (and so in health answers) when the call returns. New checks start `critical`, as in
Consul, unless the registration gives a Status. With a `check_interval`, the agent probes TCP
checks itself and their status follows the target. Proxies and gateways are kept with the
central config merged in (proxy-defaults, their service-defaults), re-merged when it changes.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshgw.simconsul.catalog import Catalog
from meshgw.simconsul.config_entries import ConfigEntries, merge_central_config
from meshgw.simconsul.shapes import Json, check_json, default_tagged_addresses, service_json


@dataclass(slots=True)
class AgentService:
    service: dict[str, Json]  # NodeService form
    checks: list[dict[str, Json]]  # HealthCheck form
    check_defs: list[dict[str, Any]]  # decoded CheckType, for the TCP prober


def _content_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Agent:
    def __init__(
        self,
        catalog: Catalog,
        config: ConfigEntries,
        *,
        node_name: str,
        node_address: str,
        initial_check_status: str = "critical",
        bind_addr: str = "0.0.0.0",
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.raft = catalog.raft
        self.datacenter = catalog.local_dc
        self.node_name = node_name
        self.node_address = node_address
        self.initial_check_status = initial_check_status
        # Config.BindAddr of /v1/agent/self; an IPv6 address makes `consul connect envoy`
        # treat the agent as dual-stack (its TCP check fallback becomes ::1).
        self.bind_addr = bind_addr
        self.services: dict[str, AgentService] = {}
        catalog.ensure_node(catalog.local_dc, node_name, node_address)
        config.listeners.append(self._resync)

    # --- registration -----------------------------------------------------------------------

    def register(self, args: Mapping[str, Any], *, replace_checks: bool) -> None:
        """Store a decoded, validated registration (PascalCase keys) and sync it."""
        name = str(args["Name"])
        sid = str(args.get("ID") or name)
        address = str(args.get("Address") or "")
        port = int(args.get("Port") or 0)
        kind = str(args.get("Kind") or "")
        tagged = dict(args.get("TaggedAddresses") or {})
        if address:
            tagged = default_tagged_addresses(address, port, tagged)
        service = service_json(
            name,
            port,
            service_id=sid,
            kind=kind,
            address=address,
            tags=args.get("Tags") or (),
            meta=args.get("Meta"),
            tagged_addresses=tagged,
            weights=args.get("Weights"),
            proxy=args.get("Proxy"),
            connect={k: v for k, v in (args.get("Connect") or {}).items() if k == "Native"},
            enable_tag_override=bool(args.get("EnableTagOverride")),
        )
        defs = [*([args["Check"]] if args.get("Check") else []), *(args.get("Checks") or [])]
        with self.raft.lock:
            existing = self.services.get(sid)
            checks = self._checks_for(sid, name, service["Tags"], defs, existing, replace_checks)
            self.services[sid] = AgentService(service, checks, defs)
            self.raft.commit(("agent",))
            self.sync(sid)

    def _checks_for(
        self,
        sid: str,
        name: str,
        tags: list[str],
        defs: list[dict[str, Any]],
        existing: AgentService | None,
        replace: bool,
    ) -> list[dict[str, Json]]:
        old = {c["CheckID"]: c for c in existing.checks} if existing else {}
        checks: dict[str, dict[str, Json]] = {}
        for n, definition in enumerate(defs, start=1):
            cid = definition.get("CheckID") or (
                f"service:{sid}" if len(defs) == 1 else f"service:{sid}:{n}"
            )
            check_type = next(
                (
                    t.lower()
                    for t in ("TCP", "HTTP", "GRPC", "H2PING", "UDP", "TTL")
                    if definition.get(t)
                ),
                "script" if definition.get("ScriptArgs") else "",
            )
            # A re-registered check keeps its status (inference: the agent restores it).
            status = (
                old[cid]["Status"]
                if cid in old
                else definition.get("Status") or self.initial_check_status
            )
            checks[cid] = check_json(
                self.node_name,
                cid,
                definition.get("Name") or f"Service '{name}' check",
                status,
                service_id=sid,
                service_name=name,
                service_tags=tags,
                type_=check_type,
                notes=definition.get("Notes", ""),
                output=old[cid]["Output"] if cid in old else "",
                interval=definition.get("Interval", "") or "",
                timeout=definition.get("Timeout", "") or "",
            )
        if not replace:  # without ?replace-existing-checks, checks not in the request are kept
            for cid, check in old.items():
                checks.setdefault(cid, check)
        return list(checks.values())

    def deregister(self, sid: str) -> bool:
        with self.raft.lock:
            if self.services.pop(sid, None) is None:
                return False
            self.raft.commit(("agent",))
            self.sync(sid)
            return True

    def sync(self, sid: str) -> None:
        """Anti-entropy of one agent service into the local catalog."""
        with self.raft.lock:
            entry = self.services.get(sid)
            if entry is None:
                self.catalog.drop(self.datacenter, self.node_name, sid)
                return
            state = self.catalog.dc()
            csn = {
                "Node": state.nodes[self.node_name].json,
                "Service": merge_central_config(entry.service, self.config),
                "Checks": entry.checks,
            }
            self.catalog.put(self.datacenter, csn)

    def _resync(self) -> None:
        """Central config changed: the merged services may have too (unchanged ones are no-ops
        in the catalog, and keep their ContentHash)."""
        with self.raft.lock:
            for sid in list(self.services):
                self.sync(sid)

    # --- views ------------------------------------------------------------------------------

    def render(self, sid: str, *, with_hash: bool = False) -> dict[str, Json] | None:
        """The AgentService JSON of /v1/agent/services and /v1/agent/service/<id>."""
        with self.raft.lock:
            entry = self.services.get(sid)
            if entry is None:
                return None
            svc = merge_central_config(entry.service, self.config)
            out: dict[str, Json] = {}
            if svc.get("Kind"):
                out["Kind"] = svc["Kind"]
            out |= {
                "ID": svc["ID"],
                "Service": svc["Service"],
                "Tags": svc["Tags"],
                "Meta": svc["Meta"],
                "Port": svc["Port"],
                "Address": svc["Address"],
            }
            if svc.get("TaggedAddresses"):
                out["TaggedAddresses"] = svc["TaggedAddresses"]
            out |= {"Weights": svc["Weights"], "EnableTagOverride": svc["EnableTagOverride"]}
            if svc.get("Kind"):  # buildAgentService sets Proxy for proxies and gateways
                out["Proxy"] = svc["Proxy"]
            if svc.get("Connect"):
                out["Connect"] = svc["Connect"]
            out["Datacenter"] = self.datacenter
            out = copy.deepcopy(out)
            if with_hash:
                out["ContentHash"] = _content_hash(out)
            return out

    def service(self, sid: str) -> dict[str, Json] | None:
        """What the agent holds for a registered service (NodeService form, central config
        merged), for assertions."""
        with self.raft.lock:
            entry = self.services.get(sid)
            return merge_central_config(entry.service, self.config) if entry else None

    def checks(self, sid: str) -> list[dict[str, Json]]:
        with self.raft.lock:
            entry = self.services.get(sid)
            return copy.deepcopy(entry.checks) if entry else []

    def set_check_status(self, sid: str, status: str, *, output: str = "") -> None:
        """Every check of a registered service goes to status (as a probe or a TTL would)."""
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status {status!r}: want passing, warning or critical")
        with self.raft.lock:
            for check in self.services[sid].checks:
                check["Status"], check["Output"] = status, output
            self.sync(sid)

    # --- TCP checks -------------------------------------------------------------------------

    async def probe_tcp_checks(self, interval: float) -> None:
        """Probe registered TCP checks every `interval` seconds, like the agent does."""
        while True:
            with self.raft.lock:
                probes = [
                    (sid, d["TCP"])
                    for sid, entry in self.services.items()
                    for d in entry.check_defs
                    if d.get("TCP")
                ]
            for sid, target in probes:
                status, output = await _dial(target)
                with self.raft.lock:
                    entry = self.services.get(sid)
                    if entry is not None and any(c["Status"] != status for c in entry.checks):
                        self.set_check_status(sid, status, output=output)
            await asyncio.sleep(interval)


async def _dial(target: str) -> tuple[str, str]:
    host, _, port = target.rpartition(":")
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.close()
        return "passing", f"TCP connect {target}: Success"
    except (OSError, TimeoutError, ValueError) as exc:
        return "critical", f"dial tcp {target}: {exc}"
