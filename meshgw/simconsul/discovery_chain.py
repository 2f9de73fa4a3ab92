"""The compiled discovery chain of a service (/v1/discovery-chain/<svc>), for chains made of
service-resolvers: no routers or splitters, which a mesh gateway does not evaluate.

What it honours: the protocol (service-defaults, else proxy-defaults Config["protocol"], else
tcp); resolver redirects (followed, so StartNode is the final resolver) and DefaultSubset; each
target's Subset (Filter, OnlyPassing), ConnectTimeout (the resolver's, else 5s), SNI and Name;
Failover (by subset, else "*": Datacenters, Targets or Service/ServiceSubset), each failover
target itself redirected and default-subsetted, listed in the resolver node and in Targets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from meshgw.simconsul.config_entries import ConfigEntries
from meshgw.simconsul.config_kinds import PROXY_DEFAULTS, SERVICE_DEFAULTS, SERVICE_RESOLVER
from meshgw.simconsul.golang import format_go_duration

DEFAULT_CONNECT_TIMEOUT = 5.0
_MAX_REDIRECTS = 16


class ChainError(ValueError):
    """A chain Consul cannot compile; str() is its text."""


def target_id(opts: Mapping[str, str]) -> str:
    """chainID: `[subset.]service.namespace.partition.datacenter`, or the peer form."""
    if opts.get("Peer"):
        return f"{opts['Service']}.{opts['Namespace']}.default.external.{opts['Peer']}"
    base = f"{opts['Service']}.{opts['Namespace']}.{opts['Partition']}.{opts['Datacenter']}"
    return f"{opts['ServiceSubset']}.{base}" if opts.get("ServiceSubset") else base


def service_sni(opts: Mapping[str, str], trust_domain: str) -> str:
    """connect.ServiceSNI: `[subset.]service.ns.dc.internal.<td>` (internal-v1 with a
    partition other than default)."""
    service, namespace, dc = opts["Service"], opts["Namespace"], opts["Datacenter"]
    subset = f"{opts['ServiceSubset']}." if opts.get("ServiceSubset") else ""
    if opts["Partition"] == "default":
        return f"{subset}{service}.{namespace}.{dc}.internal.{trust_domain}"
    return f"{subset}{service}.{namespace}.{opts['Partition']}.{dc}.internal-v1.{trust_domain}"


class _Compiler:
    def __init__(self, config: ConfigEntries, datacenter: str, trust_domain: str) -> None:
        self.config = config
        self.datacenter = datacenter
        self.trust_domain = trust_domain
        self.targets: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.used_resolver = False
        self.connect_timeout_override: float | None = None

    def resolver(self, service: str) -> dict[str, Any] | None:
        entry = self.config.raw(SERVICE_RESOLVER, service)
        self.used_resolver |= entry is not None
        return entry

    def rewrite(self, opts: dict[str, str]) -> dict[str, str]:
        """Follow redirects, then apply the DefaultSubset, as Consul's rewriteTarget."""
        for _ in range(_MAX_REDIRECTS):
            resolver = self.resolver(opts["Service"]) or {}
            redirect = resolver.get("Redirect")
            if redirect and not _redirects_to_itself(redirect, opts):
                opts = dict(opts)
                if redirect.get("Service"):
                    opts["Service"], opts["ServiceSubset"] = redirect["Service"], ""
                for field in ("ServiceSubset", "Namespace", "Partition", "Datacenter", "Peer"):
                    if redirect.get(field):
                        opts[field] = redirect[field]
                continue
            if not opts.get("ServiceSubset") and resolver.get("DefaultSubset"):
                opts = {**opts, "ServiceSubset": resolver["DefaultSubset"]}
            return opts
        raise ChainError(f"detected circular resolver redirect for service {opts['Service']!r}")

    def add_target(self, opts: Mapping[str, str]) -> str:
        resolver = self.resolver(opts["Service"]) or {}
        subset = (resolver.get("Subsets") or {}).get(opts.get("ServiceSubset", "")) or {}
        timeout = self.connect_timeout_override or resolver.get("ConnectTimeout") or 0
        tid = target_id(opts)
        target: dict[str, Any] = {"ID": tid, "Service": opts["Service"]}
        for field in ("ServiceSubset", "Namespace", "Partition", "Datacenter", "Peer"):
            if opts.get(field):
                target[field] = opts[field]
        target |= {
            "MeshGateway": {},
            "Subset": {k: subset[k] for k in ("Filter", "OnlyPassing") if subset.get(k)},
            "TransparentProxy": {},
            "ConnectTimeout": format_go_duration(timeout or DEFAULT_CONNECT_TIMEOUT),
        }
        if not opts.get("Peer"):  # peer targets take their SNI from the imported instances
            target["SNI"] = target["Name"] = service_sni(opts, self.trust_domain)
        self.targets[tid] = target
        return tid

    def resolver_node(self, opts: dict[str, str]) -> str:
        tid = self.add_target(opts)
        entry = self.resolver(opts["Service"])
        resolver: dict[str, Any] = {}
        if entry is None:
            resolver["Default"] = True
        timeout = self.connect_timeout_override or (entry or {}).get("ConnectTimeout") or 0
        resolver["ConnectTimeout"] = format_go_duration(timeout or DEFAULT_CONNECT_TIMEOUT)
        resolver["Target"] = tid
        failover = self.failover(opts, (entry or {}).get("Failover") or {})
        if failover:
            resolver["Failover"] = {"Targets": failover}
        self.nodes[f"resolver:{tid}"] = {"Type": "resolver", "Name": tid, "Resolver": resolver}
        return f"resolver:{tid}"

    def failover(self, opts: Mapping[str, str], table: Mapping[str, Any]) -> list[str]:
        spec = table.get(opts.get("ServiceSubset", "")) or table.get("*")
        if not spec:
            return []
        if spec.get("Targets"):
            wanted = [{**opts, **{k: v for k, v in t.items() if v}} for t in spec["Targets"]]
        elif spec.get("Datacenters"):
            wanted = [{**opts, "Datacenter": dc} for dc in spec["Datacenters"]]
        else:
            wanted = [
                {
                    **opts,
                    "Service": spec.get("Service") or opts["Service"],
                    "ServiceSubset": spec.get("ServiceSubset", ""),
                    "Namespace": spec.get("Namespace") or opts["Namespace"],
                }
            ]
        ids: list[str] = []
        for one in wanted:
            tid = self.add_target(self.rewrite(dict(one)))
            if tid != target_id(opts) and tid not in ids:
                ids.append(tid)
        return ids


def _redirects_to_itself(redirect: Mapping[str, str], opts: Mapping[str, str]) -> bool:
    return all(
        not redirect.get(field) or redirect[field] == opts.get(field)
        for field in ("Service", "ServiceSubset", "Namespace", "Partition", "Datacenter", "Peer")
    )


def compile_chain(
    config: ConfigEntries,
    service: str,
    datacenter: str,
    trust_domain: str,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `Chain` object /v1/discovery-chain/<service> answers."""
    overrides = overrides or {}
    compiler = _Compiler(config, datacenter, trust_domain)
    compiler.connect_timeout_override = overrides.get("OverrideConnectTimeout")
    start = compiler.rewrite(
        {
            "Service": service,
            "ServiceSubset": "",
            "Namespace": "default",
            "Partition": "default",
            "Datacenter": datacenter,
            "Peer": "",
        }
    )
    start_node = compiler.resolver_node(start)
    defaults = config.raw(SERVICE_DEFAULTS, service) or {}
    proxy = (config.raw(PROXY_DEFAULTS, "global") or {}).get("Config") or {}
    protocol = str(
        overrides.get("OverrideProtocol")
        or defaults.get("Protocol")
        or proxy.get("protocol")
        or "tcp"
    ).lower()
    chain: dict[str, Any] = {
        "ServiceName": service,
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": datacenter,
    }
    if overrides:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()
        chain["CustomizationHash"] = digest[:8]
    if not compiler.used_resolver:
        chain["Default"] = True
    chain["Protocol"] = protocol
    if defaults.get("Meta"):
        chain["ServiceMeta"] = defaults["Meta"]
    chain |= {"StartNode": start_node, "Nodes": compiler.nodes, "Targets": compiler.targets}
    return chain
