"""A test double of Consul's HTTP API: the endpoints meshgw uses, with Consul's JSON shapes.

The shapes, status codes and error texts follow /work/shared/CONSUL.md (§1 registration, §4
federation states, §7 HTTP API) and the Consul source it cites. What the double models:

- one datacenter whose *agent* you talk to (``datacenter``), plus any number of other datacenters
  reached with ``?dc=`` (unknown ones answer 500 "No path to datacenter", as Consul does);
- a catalog per datacenter (nodes, service instances, node and service checks), the agent's own
  registrations synced into the local catalog (anti-entropy: synchronous, or after
  ``anti_entropy_delay`` seconds), and the federation states every leader keeps from its
  datacenter's mesh gateways (one replicated store, as every DC eventually holds all of them);
- a raft-style index: every mutation bumps one global counter, each view reports the highest index
  of what it depends on, and blocking queries (``?index=&wait=``) wait for that to pass ``index``;
- ACLs (optional): tokens with Consul-like rules, 403 "ACL not found" / "Permission denied: ...";
  list endpoints are filtered instead, like Consul;
- faults per path: fail, hang, drop, garbage, an index going backwards, the listener going away.

Use it in async tests as ``async with ConsulDouble() as consul: ...``; from synchronous tests or a
child process via ``ConsulDoubleThread`` (own thread and loop); by hand with
``python -m tests.consul_double --port 8500``. Every request is recorded in ``double.requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import enum
import fnmatch
import hashlib
import ipaddress
import json
import random
import re
import ssl
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "ANONYMOUS_ACCESSOR_ID",
    "AclToken",
    "ConsulDouble",
    "ConsulDoubleThread",
    "RecordedRequest",
    "check_json",
    "check_service_node",
    "node_json",
    "parse_go_duration",
    "service_json",
]

CONSUL_VERSION = "1.17.0"
ANONYMOUS_ACCESSOR_ID = "00000000-0000-0000-0000-000000000002"
WAN_FED_META_KEY = "consul-wan-federation"
# Consul's defaults: default_query_time 300s, max_query_time 600s, jitter up to wait/16.
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
JITTER_FRACTION = 16

Json = Any


# --- Go durations -------------------------------------------------------------------------------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}
_DURATION_UNITS |= {"m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


# The registration `consul connect envoy -gateway=mesh -register -expose-servers` sends
# (CONSUL.md §1, single-line illustration).
GATEWAY_BODY: dict[str, Any] = {
    "Kind": "mesh-gateway",
    "ID": "mesh-gateway",
    "Name": "mesh-gateway",
    "Address": "10.0.0.5",
    "Port": 8443,
    "TaggedAddresses": {
        "lan": {"Address": "10.0.0.5", "Port": 8443},
        "wan": {"Address": "203.0.113.5", "Port": 443},
    },
    "Meta": {"consul-wan-federation": "1"},
    "Check": {
        "Name": "mesh-gateway listening",
        "TCP": "10.0.0.5:8443",
        "Interval": "10s",
        "DeregisterCriticalServiceAfter": "6h",
    },
}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration ("10s", "5m", "1m30s", "500ms"); ValueError if malformed."""
    body = text.strip()
    sign = 1.0
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"time: invalid duration {text!r}")
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body):
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


# --- JSON builders with Consul's shapes ---------------------------------------------------------


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _ip_version(address: str) -> int | None:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


def default_tagged_addresses(
    address: str, port: int, tagged: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """The agent's "Set default tagged addresses" (CONSUL.md §1): lan_ipv4/wan_ipv4 (or _ipv6)
    from the service Address and Port, only for keys not given; wan_* holds the LAN value."""
    out = {
        k: {"Address": v.get("Address", ""), "Port": v.get("Port", 0)}
        for k, v in (tagged or {}).items()
    }
    version = _ip_version(address)
    if version is not None:
        for key in (f"lan_ipv{version}", f"wan_ipv{version}"):
            out.setdefault(key, {"Address": address, "Port": port})
    return out


def node_json(
    node: str,
    address: str,
    dc: str,
    *,
    node_id: str | None = None,
    wan_address: str | None = None,
    meta: Mapping[str, str] | None = None,
    index: int = 1,
) -> dict[str, Json]:
    """A catalog Node: ID, Node, Address, Datacenter, TaggedAddresses{lan,wan,...}, Meta."""
    wan = wan_address or address
    tagged = {"lan": address, "wan": wan}
    version = _ip_version(address)
    if version is not None:
        tagged[f"lan_ipv{version}"] = address
    if _ip_version(wan) is not None:
        tagged[f"wan_ipv{_ip_version(wan)}"] = wan
    return {
        "ID": node_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.{dc}")),
        "Node": node,
        "Address": address,
        "Datacenter": dc,
        "TaggedAddresses": tagged,
        # Consul always puts its own segment key in node meta: a reserved consul- key readers see.
        "Meta": {"consul-network-segment": "", **(meta or {})},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _proxy_json(kind: str, proxy: Mapping[str, Any] | None) -> dict[str, Json]:
    out: dict[str, Json] = {"Mode": "", "MeshGateway": {}, "Expose": {}}
    for key, value in (proxy or {}).items():
        out[key] = copy.deepcopy(value)
    if kind == "connect-proxy":
        out.setdefault("DestinationServiceName", "")
    return out


def service_json(
    service: str,
    port: int,
    *,
    service_id: str | None = None,
    kind: str = "",
    address: str = "",
    tags: Iterable[str] = (),
    meta: Mapping[str, str] | None = None,
    tagged_addresses: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, int] | None = None,
    proxy: Mapping[str, Any] | None = None,
    connect: Mapping[str, Any] | None = None,
    enable_tag_override: bool = False,
    index: int = 1,
) -> dict[str, Json]:
    """A NodeService as health endpoints and federation states show it."""
    out: dict[str, Json] = {}
    if kind:  # NodeService.Kind is omitempty
        out["Kind"] = kind
    out |= {
        "ID": service_id or service,
        "Service": service,
        "Tags": list(tags),
        "Address": address,
    }
    if tagged_addresses:  # omitempty
        out["TaggedAddresses"] = {
            k: {"Address": v["Address"], "Port": v["Port"]} for k, v in tagged_addresses.items()
        }
    out |= {
        "Meta": dict(meta or {}),
        "Port": port,
        "Weights": dict(weights or {"Passing": 1, "Warning": 1}),
        "EnableTagOverride": enable_tag_override,
        "Proxy": _proxy_json(kind, proxy),
        "Connect": dict(connect or {}),
        "PeerName": "",
        "CreateIndex": index,
        "ModifyIndex": index,
    }
    return out


def check_json(
    node: str,
    check_id: str,
    name: str,
    status: str,
    *,
    service_id: str = "",
    service_name: str = "",
    service_tags: Iterable[str] = (),
    type_: str = "",
    output: str = "",
    notes: str = "",
    interval: str = "",
    timeout: str = "",
    index: int = 1,
) -> dict[str, Json]:
    """A HealthCheck."""
    return {
        "Node": node,
        "CheckID": check_id,
        "Name": name,
        "Status": status,
        "Notes": notes,
        "Output": output,
        "ServiceID": service_id,
        "ServiceName": service_name,
        "ServiceTags": list(service_tags),
        "Type": type_,
        "Interval": interval,
        "Timeout": timeout,
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def serf_check(node: str, status: str = "passing", index: int = 1) -> dict[str, Json]:
    output = "Agent alive and reachable" if status == "passing" else "Agent not live or unreachable"
    return check_json(node, "serfHealth", "Serf Health Status", status, output=output, index=index)


def check_service_node(
    node: str,
    address: str,
    service: str,
    port: int,
    *,
    kind: str = "",
    service_id: str | None = None,
    service_address: str | None = None,
    meta: Mapping[str, str] | None = None,
    tags: Iterable[str] = (),
    tagged_addresses: Mapping[str, Mapping[str, Any]] | None = None,
    wan: tuple[str, int] | None = None,
    weights: Mapping[str, int] | None = None,
    proxy: Mapping[str, Any] | None = None,
    connect: Mapping[str, Any] | None = None,
    status: str | None = "passing",
    node_status: str = "passing",
    checks: list[dict[str, Json]] | None = None,
    node_meta: Mapping[str, str] | None = None,
    node_wan_address: str | None = None,
    dc: str = "dc1",
    index: int = 1,
) -> dict[str, Json]:
    """One CheckServiceNode ``{"Node", "Service", "Checks"}`` as health endpoints return it.

    ``service_address`` defaults to the node ``address``; pass ``""`` for services registered
    without an Address (the ``consul`` service). ``wan=(host, port)`` adds the ``wan`` tagged
    address (``-wan-address``); ``lan``/``*_ipv4`` defaults are added as the agent does.
    ``status`` is the service check's status (None: no service check, like ``consul``);
    ``checks`` replaces the generated checks entirely.
    """
    sid = service_id or service
    svc_addr = address if service_address is None else service_address
    tagged: dict[str, Mapping[str, Any]] = dict(tagged_addresses or {})
    if wan is not None:
        tagged["wan"] = {"Address": wan[0], "Port": wan[1]}
    if svc_addr and kind:
        tagged.setdefault("lan", {"Address": svc_addr, "Port": port})
    if svc_addr:
        tagged = dict(default_tagged_addresses(svc_addr, port, tagged))
    svc = service_json(
        service,
        port,
        service_id=sid,
        kind=kind,
        address=svc_addr,
        tags=tags,
        meta=meta,
        tagged_addresses=tagged,
        weights=weights,
        proxy=proxy,
        connect=connect,
        index=index,
    )
    if checks is None:
        checks = [serf_check(node, node_status, index)]
        if status is not None:
            target = f"{svc_addr or address}:{port}"
            output = f"TCP connect {target}: Success" if status == "passing" else ""
            checks.append(
                check_json(
                    node,
                    f"service:{sid}",
                    f"{kind or service} listening" if kind else f"Service '{service}' check",
                    status,
                    service_id=sid,
                    service_name=service,
                    service_tags=tags,
                    type_="tcp",
                    output=output,
                    interval="10s",
                    index=index,
                )
            )
    return {
        "Node": node_json(
            node, address, dc, meta=node_meta, wan_address=node_wan_address, index=index
        ),
        "Service": svc,
        "Checks": checks,
    }


def mesh_gateway_node(
    node: str,
    address: str,
    port: int = 8443,
    *,
    dc: str,
    wan: tuple[str, int] | None = None,
    service_id: str = "mesh-gateway",
    name: str = "mesh-gateway",
    wanfed: bool = True,
    status: str = "passing",
    meta: Mapping[str, str] | None = None,
    weights: Mapping[str, int] | None = None,
    index: int = 1,
) -> dict[str, Json]:
    """A mesh gateway as `consul connect envoy -gateway=mesh -register -expose-servers` makes."""
    full_meta = {WAN_FED_META_KEY: "1"} if wanfed else {}
    full_meta |= dict(meta or {})
    return check_service_node(
        node,
        address,
        name,
        port,
        kind="mesh-gateway",
        service_id=service_id,
        meta=full_meta,
        wan=wan,
        weights=weights,
        status=status,
        dc=dc,
        index=index,
    )


# --- registration body decoding (Go's case-insensitive JSON plus Consul's snake_case aliases) ---


class _Decode(Exception):
    pass


# A spec is: a Python type for a scalar leaf, "any" (kept as is), "duration", "strmap", "strlist",
# ("map", spec) for a map with decoded values, ("list", spec), or a dict schema for a struct.
_TAGGED_SPEC: dict[str, tuple[str, Any]] = {
    "address": ("Address", str),
    "port": ("Port", int),
}
_CHECK_SPEC: dict[str, tuple[str, Any]] = {
    "checkid": ("CheckID", str),
    "id": ("CheckID", str),
    "name": ("Name", str),
    "notes": ("Notes", str),
    "status": ("Status", str),
    "tcp": ("TCP", str),
    "udp": ("UDP", str),
    "http": ("HTTP", str),
    "method": ("Method", str),
    "header": ("Header", "any"),
    "body": ("Body", str),
    "grpc": ("GRPC", str),
    "grpcusetls": ("GRPCUseTLS", bool),
    "h2ping": ("H2PING", str),
    "ttl": ("TTL", "duration"),
    "interval": ("Interval", "duration"),
    "timeout": ("Timeout", "duration"),
    "deregistercriticalserviceafter": ("DeregisterCriticalServiceAfter", "duration"),
    "args": ("ScriptArgs", "strlist"),
    "scriptargs": ("ScriptArgs", "strlist"),
    "tlsservername": ("TLSServerName", str),
    "tlsskipverify": ("TLSSkipVerify", bool),
    "aliasnode": ("AliasNode", str),
    "aliasservice": ("AliasService", str),
    "successbeforepassing": ("SuccessBeforePassing", int),
    "failuresbeforecritical": ("FailuresBeforeCritical", int),
    "failuresbeforewarning": ("FailuresBeforeWarning", int),
    "outputmaxsize": ("OutputMaxSize", int),
}
_PROXY_SPEC: dict[str, tuple[str, Any]] = {
    "config": ("Config", "any"),  # map[string]interface{}: keys are kept verbatim
    "destinationservicename": ("DestinationServiceName", str),
    "destinationserviceid": ("DestinationServiceID", str),
    "localserviceaddress": ("LocalServiceAddress", str),
    "localserviceport": ("LocalServicePort", int),
    "localservicesocketpath": ("LocalServiceSocketPath", str),
    "mode": ("Mode", str),
    "upstreams": ("Upstreams", "any"),
    "meshgateway": ("MeshGateway", {"mode": ("Mode", str)}),
    "expose": ("Expose", "any"),
    "transparentproxy": ("TransparentProxy", "any"),
}
_SERVICE_SPEC: dict[str, tuple[str, Any]] = {
    "kind": ("Kind", str),
    "id": ("ID", str),
    "name": ("Name", str),
    "tags": ("Tags", "strlist"),
    "address": ("Address", str),
    "taggedaddresses": ("TaggedAddresses", ("map", _TAGGED_SPEC)),
    "meta": ("Meta", "strmap"),
    "port": ("Port", int),
    "socketpath": ("SocketPath", str),
    "enabletagoverride": ("EnableTagOverride", bool),
    "weights": ("Weights", {"passing": ("Passing", int), "warning": ("Warning", int)}),
    "proxy": ("Proxy", _PROXY_SPEC),
    "connect": (
        "Connect",
        {"native": ("Native", bool), "sidecarservice": ("SidecarService", "any")},
    ),
    "check": ("Check", _CHECK_SPEC),
    "checks": ("Checks", ("list", _CHECK_SPEC)),
    "locality": ("Locality", "any"),
    "namespace": ("Namespace", str),
    "partition": ("Partition", str),
}
_GO_TYPES = {int: "int", str: "string", bool: "bool"}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _decode(value: Any, spec: Any, where: str) -> Any:
    if value is None:
        return None  # JSON null leaves the Go zero value
    if spec == "any":
        return value
    if isinstance(spec, type):
        ok = type(value) is spec or (spec is int and type(value) is float and value.is_integer())
        if not ok:
            raise _Decode(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
                f"of type {_GO_TYPES[spec]}"
            )
        return int(value) if spec is int else value
    if spec == "duration":
        if isinstance(value, str):
            try:
                parse_go_duration(value)
            except ValueError as exc:
                raise _Decode(str(exc)) from None
            return value
        if type(value) in (int, float):
            return f"{value / 1e9:g}s"  # Go accepts nanoseconds as a number
        raise _Decode(f"json: cannot unmarshal {_json_kind(value)} into {where} of type Duration")
    if spec == "strmap":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _Decode(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
                "of type map[string]string"
            )
        return dict(value)
    if spec == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Decode(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
                "of type []string"
            )
        return list(value)
    if isinstance(spec, tuple):
        kind, inner = spec
        if kind == "map":
            if not isinstance(value, dict):
                raise _Decode(
                    f"json: cannot unmarshal {_json_kind(value)} into {where} of type map"
                )
            return {k: _decode(v, inner, f"{where}[{k}]") for k, v in value.items()}
        if not isinstance(value, list):
            raise _Decode(f"json: cannot unmarshal {_json_kind(value)} into {where} of type slice")
        return [_decode(v, inner, where) for v in value]
    if not isinstance(value, dict):
        raise _Decode(f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        entry = spec.get(key.replace("_", "").replace("-", "").lower())
        if entry is None:
            continue  # Go's decoder ignores unknown fields
        canonical, sub = entry
        out[canonical] = _decode(item, sub, f"{where}.{canonical}")
    return out


def decode_registration(body: Any) -> dict[str, Any]:
    """A registration body in any key case (PascalCase, camelCase, snake_case) → PascalCase keys."""
    result = _decode(body, _SERVICE_SPEC, "ServiceDefinition")
    if not isinstance(result, dict):
        raise _Decode("json: cannot unmarshal into ServiceDefinition")
    return result


_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def validate_service_meta(kind: str, meta: Mapping[str, str]) -> str | None:
    """structs.ValidateServiceMetadata: the error text, or None."""
    if len(meta) > 64:
        return "Node metadata cannot contain more than 64 key/value pairs"
    for key, value in meta.items():
        reason = None
        if key == "":
            reason = "Key cannot be blank"
        elif not _META_KEY.match(key):
            reason = "Key contains invalid characters"
        elif len(key) > 128:
            reason = "Key is too long (limit: 128 characters)"
        elif key.startswith("consul-") and not (kind == "mesh-gateway" and key == WAN_FED_META_KEY):
            reason = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            reason = "Value is too long (limit: 512 characters)"
        if reason:
            return f"Couldn't load metadata pair ('{key}', '{value}'): {reason}"
    return None


_GATEWAY_KINDS = {"mesh-gateway", "terminating-gateway", "ingress-gateway", "api-gateway"}


def validate_node_service(svc: Mapping[str, Any]) -> list[str]:
    """NodeService.Validate, the parts that concern gateways and proxies."""
    errors: list[str] = []
    kind = svc.get("Kind", "")
    proxy = svc.get("Proxy") or {}
    connect = svc.get("Connect") or {}
    if kind == "connect-proxy" and not proxy.get("DestinationServiceName"):
        errors.append("Proxy.DestinationServiceName must be non-empty for Connect proxy services")
    if kind in _GATEWAY_KINDS:
        if not svc.get("Port") and kind not in ("ingress-gateway", "api-gateway"):
            errors.append(f"Port must be non-zero for a {kind}")
        if connect.get("SidecarService") is not None:
            errors.append(f"A {kind} cannot have a sidecar service defined")
        for name in (
            "DestinationServiceName",
            "DestinationServiceID",
            "LocalServiceAddress",
            "LocalServicePort",
        ):
            if proxy.get(name):
                errors.append(f"The Proxy.{name} configuration is invalid for a {kind}")
    return errors


def _multierror(errors: list[str]) -> str:
    # hashicorp/go-multierror's format, which Consul prints verbatim.
    count = "1 error occurred" if len(errors) == 1 else f"{len(errors)} errors occurred"
    return f"{count}:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


# --- ACLs ---------------------------------------------------------------------------------------


class Access(enum.IntEnum):
    DENY = 0
    READ = 1
    WRITE = 2


@dataclass(frozen=True, slots=True)
class AclToken:
    """A token and its rules.

    A rule is ``"resource:access"`` (every name) or ``"resource:access:prefix"`` (names starting
    with prefix, longest prefix wins as in Consul's ``*_prefix`` rules); access is ``read``,
    ``write`` (implies read) or ``deny``. Unnamed resources: ``"operator:read"``.
    Example: ``AclToken("s3cr3t", ("service:write:mesh-gateway", "service:read", "node:read"))``.
    """

    secret_id: str
    rules: tuple[str, ...] = ()
    accessor_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    management: bool = False

    def access(self, resource: str, name: str = "") -> Access:
        if self.management:
            return Access.WRITE
        best: tuple[int, Access] | None = None
        for rule in self.rules:
            parts = rule.split(":", 2)
            if len(parts) < 2 or parts[0] != resource:
                continue
            prefix = parts[2] if len(parts) == 3 else ""
            if not name.startswith(prefix):
                continue
            level = Access[parts[1].upper()]
            if best is None or len(prefix) >= best[0]:
                best = (len(prefix), level)
        return best[1] if best else Access.DENY

    def allows(self, resource: str, access: Access, name: str = "") -> bool:
        return self.access(resource, name) >= access


class _Denied(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# --- recorded requests and faults ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query: CIMultiDictProxy[str] | Mapping[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def token(self) -> str | None:
        return self.headers.get("X-Consul-Token")


class FaultKind(enum.Enum):
    FAIL = "fail"
    HANG = "hang"
    DROP = "drop"
    GARBAGE = "garbage"


@dataclass(slots=True)
class _Fault:
    kind: FaultKind
    pattern: str
    status: int = 500
    body: str = ""
    times: int | None = None
    method: str | None = None
    released: bool = False  # a HANG fault lets its parked requests go

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if any(c in self.pattern for c in "*?["):
            return fnmatch.fnmatchcase(path, self.pattern)
        return path.startswith(self.pattern)


# --- state --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    json: dict[str, Json]
    checks: dict[str, dict[str, Json]]


@dataclass(slots=True)
class _Instance:
    node: str
    service: dict[str, Json]
    checks: dict[str, dict[str, Json]]

    @property
    def name(self) -> str:
        return str(self.service["Service"])

    @property
    def kind(self) -> str:
        return str(self.service.get("Kind", ""))

    def connect_target(self) -> str | None:
        """The service name this instance is connect-capable for (proxy or native)."""
        if self.kind == "connect-proxy":
            return str((self.service.get("Proxy") or {}).get("DestinationServiceName", "")) or None
        if (self.service.get("Connect") or {}).get("Native"):
            return self.name
        return None


@dataclass(slots=True)
class _Datacenter:
    name: str
    nodes: dict[str, _Node] = field(default_factory=dict)
    instances: dict[tuple[str, str], _Instance] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)  # node names, in join order
    leader: str = ""  # the leader's RPC address, as /v1/status/leader answers
    has_leader: bool = True  # False: non-stale reads answer 500 "No cluster leader"
    fed_auto: bool = True  # leader anti-entropy writes this DC's federation state


@dataclass(slots=True)
class _AgentService:
    service: dict[str, Json]  # NodeService form
    checks: list[dict[str, Json]]  # HealthCheck form
    check_defs: list[dict[str, Any]]  # decoded CheckType, for the TCP prober


def _content_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _make_ca_root(trust_domain: str, index: int) -> dict[str, Json]:
    # A real self-signed P-256 CA so consumers that parse RootCert get a certificate.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pri-{serial % 10**7}.consul.ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()
    return {
        "ID": ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)),
        "Name": "Consul CA Primary Cert",
        "SerialNumber": serial % 2**63,
        "SigningKeyID": ":".join(ski[i : i + 2] for i in range(0, len(ski), 2)),
        "ExternalTrustDomain": trust_domain.split(".")[0],
        "NotBefore": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "NotAfter": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "RootCert": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "IntermediateCerts": None,
        "Active": True,
        "PrivateKeyType": "ec",
        "PrivateKeyBits": 256,
        "CreateIndex": index,
        "ModifyIndex": index,
    }


class _HTTPAnswer(Exception):
    """Raised inside handlers to answer with Consul's plain-text error format."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class ConsulDouble:
    """The double. All mutators are synchronous and thread-safe; each bumps the index and wakes
    blocked queries. ``down()``/``up()``/``start()``/``stop()`` are coroutines on the server's loop
    (``ConsulDoubleThread`` offers synchronous versions).

    Knobs: ``servers`` Consul servers in the local DC (``consul-server-N`` at 10.0.0.1N:8300, the
    first is the leader; ``set_leader(None)`` loses the leader); ``acl_tokens`` turns
    ACLs on (default deny; ``anonymous_rules`` for the anonymous token); ``anti_entropy_delay``
    seconds before federation states follow the catalog; ``jitter`` adds Consul's up-to-wait/16
    to blocking waits; ``initial_check_status`` of newly registered checks (Consul: critical);
    ``deregister_unknown_404`` answers deregistration of an unknown ID with 404, as newer Consul
    versions do (CONSUL.md documents a no-op); ``check_interval`` probes registered TCP checks.
    """

    def __init__(
        self,
        datacenter: str = "dc1",
        *,
        node_name: str = "consul-client-0",
        node_address: str = "127.0.0.1",
        domain: str = "consul.",
        primary_datacenter: str | None = None,
        servers: int = 1,
        trust_domain: str | None = None,
        acl_tokens: Iterable[AclToken] | None = None,
        anonymous_rules: tuple[str, ...] = (),
        anti_entropy_delay: float = 0.0,
        jitter: bool = True,
        initial_check_status: str = "critical",
        deregister_unknown_404: bool = False,
        check_interval: float | None = None,
    ) -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_address = node_address
        self.domain = domain
        self.primary_datacenter = primary_datacenter or datacenter
        self.anti_entropy_delay = anti_entropy_delay
        self.jitter = jitter
        self.initial_check_status = initial_check_status
        self.deregister_unknown_404 = deregister_unknown_404
        self.check_interval = check_interval
        self.acl_enabled = acl_tokens is not None
        self.tokens: dict[str, AclToken] = {t.secret_id: t for t in acl_tokens or ()}
        self.anonymous = AclToken("anonymous", anonymous_rules, accessor_id=ANONYMOUS_ACCESSOR_ID)
        self.requests: list[RecordedRequest] = []

        self._lock = threading.RLock()
        self._index = 0
        self._key_index: dict[tuple[str, ...], int] = {}
        self._dcs: dict[str, _Datacenter] = {}
        self._dc_order: list[str] = []
        self._agent: dict[str, _AgentService] = {}
        self._fed: dict[str, dict[str, Json]] = {}
        self._faults: list[_Fault] = []
        self._spent: list[_Fault] = []
        self._trust_domain = trust_domain or f"{uuid.uuid4()}.consul"
        self._ca_roots: list[dict[str, Json]] | None = None  # built lazily (key generation)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._blocked_event: asyncio.Event | None = None
        self._stopping = False
        self._blocked = 0
        self._blocked_cond = threading.Condition(self._lock)
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._bind: tuple[str, int] | None = None
        self._unix_path: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self._checker: asyncio.Task[None] | None = None

        with self._lock:
            self._ensure_dc(datacenter)
            self._ensure_node(datacenter, node_name, node_address)
            for i in range(servers):
                self.add_server(f"consul-server-{i}", f"10.0.0.{10 + i}")

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ConsulDouble:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._blocked_event = asyncio.Event()
        self._stopping = False
        app = web.Application(middlewares=[self._middleware])
        self._routes(app)
        # handler_cancellation: a client that goes away frees its blocked query, as in Consul.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        self._ssl = ssl_context
        self._unix_path = unix_path
        self._bind = (host, port)
        await self._open_site()
        if self.check_interval is not None:
            self._checker = asyncio.create_task(self._run_checks())
        return self

    async def _open_site(self) -> None:
        assert self._runner is not None
        site: web.BaseSite
        if self._unix_path is not None:
            site = web.UnixSite(self._runner, self._unix_path, ssl_context=self._ssl)
        else:
            assert self._bind is not None
            site = web.TCPSite(self._runner, self._bind[0], self._bind[1], ssl_context=self._ssl)
        await site.start()
        self._site = site
        if self._unix_path is None and self._bind is not None and self._bind[1] == 0:
            bound = self._runner.addresses[0]
            self._bind = (self._bind[0], int(bound[1]))

    async def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> ConsulDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def host(self) -> str:
        assert self._bind is not None, "start() the double first"
        return self._bind[0]

    @property
    def port(self) -> int:
        assert self._bind is not None, "start() the double first"
        return self._bind[1]

    @property
    def url(self) -> str:
        if self._unix_path is not None:
            return f"unix://{self._unix_path}"
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """HOST:PORT, as CONSUL_HTTP_ADDR takes it."""
        return f"{self.host}:{self.port}"

    async def down(self) -> None:
        """The agent goes away: close the listening socket and every open connection."""
        assert self._runner is not None
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server
        if server is not None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    async def up(self) -> None:
        """Listen again on the same address."""
        if self._site is None:
            await self._open_site()

    # --- change notification --------------------------------------------------------------------

    def _wake(self) -> None:
        # Runs on the loop: release everyone waiting on the current generation.
        if self._changed is not None:
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    def _notify(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _commit(self, *keys: tuple[str, ...]) -> int:
        """One raft write: bump the index, stamp the keys, wake blocked queries."""
        self._index += 1
        for key in keys:
            self._key_index[key] = self._index
        self._notify()
        return self._index

    def _view_index(self, *keys: tuple[str, ...]) -> int:
        # Consul never answers a blocking query with index 0.
        return max([1, *(self._key_index.get(k, 0) for k in keys)])

    def wait_blocked(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block the calling thread until `count` queries are parked in a blocking wait."""
        with self._blocked_cond:
            if not self._blocked_cond.wait_for(lambda: self._blocked >= count, timeout):
                raise TimeoutError(f"{self._blocked} blocked queries, wanted {count}")

    async def wait_blocked_async(self, count: int = 1, timeout: float = 10.0) -> None:
        """As wait_blocked, for a coroutine on the double's own loop."""
        async with asyncio.timeout(timeout):
            while True:
                event = self._blocked_event
                with self._lock:
                    if self._blocked >= count:
                        return
                assert event is not None
                await event.wait()

    def _signal(self, delta: int) -> None:
        """Count blocked queries (delta) and wake wait_blocked*/wait_for_request* callers."""
        with self._blocked_cond:
            self._blocked += delta
            self._blocked_cond.notify_all()
        if self._blocked_event is not None:
            event, self._blocked_event = self._blocked_event, asyncio.Event()
            event.set()

    def wait_for_request(
        self, path: str, *, count: int = 1, method: str | None = None, timeout: float = 10.0
    ) -> RecordedRequest:
        """Block the calling thread until `count` requests matching path have arrived."""
        with self._blocked_cond:
            if not self._blocked_cond.wait_for(
                lambda: len(self.find_requests(path, method)) >= count, timeout
            ):
                raise TimeoutError(f"no {count} requests for {path} within {timeout}s")
            return self.find_requests(path, method)[count - 1]

    async def wait_for_request_async(
        self, path: str, *, count: int = 1, method: str | None = None, timeout: float = 10.0
    ) -> RecordedRequest:
        """As wait_for_request, for a coroutine on the double's own loop."""
        async with asyncio.timeout(timeout):
            while True:
                event = self._blocked_event
                found = self.find_requests(path, method)
                if len(found) >= count:
                    return found[count - 1]
                assert event is not None
                await event.wait()

    @property
    def index(self) -> int:
        return self._index

    # --- state helpers (caller holds the lock) --------------------------------------------------

    def _ensure_dc(self, dc: str) -> _Datacenter:
        if dc not in self._dcs:
            self._dcs[dc] = _Datacenter(dc)
            self._dc_order.append(dc)
            self._commit(("dcs",))
        return self._dcs[dc]

    def _dc(self, dc: str | None) -> _Datacenter:
        return self._ensure_dc(dc or self.datacenter)

    def _ensure_node(
        self,
        dc: str,
        node: str,
        address: str,
        *,
        body: Mapping[str, Any] | None = None,
        checks: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> _Node:
        """Create or update a node; `body` is a Node JSON to take as is (indexes are restamped)."""
        state = self._ensure_dc(dc)
        existing = state.nodes.get(node)
        index = self._index + 1
        new = copy.deepcopy(dict(body)) if body is not None else node_json(node, address, dc)
        if existing is not None:
            if _same_service(existing.json, new):
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
        state.nodes[node] = _Node(new, node_checks)
        self._commit(("catalog", dc), *self._node_service_keys(state, node))
        return state.nodes[node]

    def _instance_keys(self, dc: str, inst: _Instance) -> list[tuple[str, ...]]:
        keys: list[tuple[str, ...]] = [("service", dc, inst.name)]
        target = inst.connect_target()
        if target:
            keys.append(("connect", dc, target))
        return keys

    def _node_service_keys(self, state: _Datacenter, node: str) -> list[tuple[str, ...]]:
        keys: list[tuple[str, ...]] = []
        for (n, _), inst in state.instances.items():
            if n == node:
                keys += self._instance_keys(state.name, inst)
        return keys

    def _put_instance(self, dc: str, csn: Mapping[str, Any], *, node_checks: bool = True) -> None:
        """Upsert a CheckServiceNode into dc's catalog (its node too); no-op if unchanged.

        With node_checks, the node checks in `csn` (serfHealth) replace the node's; otherwise the
        node keeps the checks it has (updates of one service must not revive a dead node)."""
        state = self._ensure_dc(dc)
        node_body = csn["Node"]
        node = str(node_body["Node"])
        given_node_checks = {c["CheckID"]: c for c in csn["Checks"] if not c.get("ServiceID")}
        self._ensure_node(
            dc, node, str(node_body["Address"]), body=node_body, checks=given_node_checks
        )
        service = copy.deepcopy(dict(csn["Service"]))
        sid = str(service["ID"])
        checks = {c["CheckID"]: copy.deepcopy(c) for c in csn["Checks"] if c.get("ServiceID")}
        old = state.instances.get((node, sid))
        unchanged = (
            old is not None
            and _same_service(old.service, service)
            and _same_checks(old.checks, checks)
        )
        if not unchanged:
            index = self._index + 1
            service["CreateIndex"] = old.service["CreateIndex"] if old else index
            service["ModifyIndex"] = index
            for cid, check in checks.items():
                check["Node"] = node
                previous = old.checks.get(cid) if old else None
                same = previous is not None and _same_checks({cid: previous}, {cid: check})
                check["CreateIndex"] = previous["CreateIndex"] if previous else index
                check["ModifyIndex"] = previous["ModifyIndex"] if same and previous else index
            inst = _Instance(node, service, checks)
            state.instances[(node, sid)] = inst
            keys = self._instance_keys(dc, inst) + (self._instance_keys(dc, old) if old else [])
            self._commit(("catalog", dc), *keys)
        if node_checks:
            self._update_node_checks(state, node, given_node_checks)
        self._federation_anti_entropy()

    def _update_node_checks(
        self, state: _Datacenter, node: str, checks: Mapping[str, Mapping[str, Any]]
    ) -> None:
        current = state.nodes[node].checks
        for cid, check in checks.items():
            if cid in current and current[cid]["Status"] == check["Status"]:
                continue
            index = self._index + 1
            new = copy.deepcopy(dict(check))
            new["Node"] = node
            new["ModifyIndex"] = index
            new["CreateIndex"] = current[cid]["CreateIndex"] if cid in current else index
            current[cid] = new
            self._commit(*self._node_service_keys(state, node))

    def _drop_instance(self, dc: str, node: str, service_id: str) -> bool:
        state = self._dcs.get(dc)
        if state is None:
            return False
        inst = state.instances.pop((node, service_id), None)
        if inst is None:
            return False
        self._commit(("catalog", dc), *self._instance_keys(dc, inst))
        self._federation_anti_entropy()
        return True

    # --- federation states (leader anti-entropy, CONSUL.md §4) ----------------------------------

    def _federation_anti_entropy(self) -> None:
        if self.anti_entropy_delay > 0 and self._loop is not None:
            loop = self._loop
            delay = self.anti_entropy_delay
            loop.call_soon_threadsafe(lambda: loop.call_later(delay, self._sync_federation))
        else:
            self._sync_federation()

    def _sync_federation(self) -> None:
        with self._lock:
            for dc, state in self._dcs.items():
                if not state.fed_auto:
                    continue
                gateways = [
                    self._render_csn(state, inst)
                    for _, inst in sorted(state.instances.items())
                    if inst.kind == "mesh-gateway"
                ]
                current = self._fed.get(dc)
                if current is None and not gateways:
                    continue
                if current is not None and current.get("MeshGateways", []) == gateways:
                    continue  # IsSame: ignores UpdatedAt
                self._write_fed_state(dc, gateways)

    def _write_fed_state(self, dc: str, gateways: list[dict[str, Json]]) -> None:
        index = self._index + 1
        current = self._fed.get(dc)
        state: dict[str, Json] = {"Datacenter": dc}
        if gateways:  # MeshGateways is omitempty
            state["MeshGateways"] = gateways
        state |= {
            "UpdatedAt": _now_rfc3339(),
            "PrimaryModifyIndex": index,
            "CreateIndex": current["CreateIndex"] if current else index,
            "ModifyIndex": index,
        }
        self._fed[dc] = state
        self._commit(("fed",))

    # --- public mutators ------------------------------------------------------------------------

    def set_datacenters(self, datacenters: Iterable[str]) -> None:
        """Known datacenters, in the order /v1/catalog/datacenters answers (RTT order)."""
        with self._lock:
            wanted = list(dict.fromkeys([self.datacenter, *datacenters]))
            for dc in wanted:
                if dc not in self._dcs:
                    self._dcs[dc] = _Datacenter(dc)
            for dc in list(self._dcs):
                if dc not in wanted:
                    del self._dcs[dc]
            self._dc_order = wanted
            self._commit(("dcs",))

    def add_server(
        self,
        node: str,
        address: str,
        *,
        port: int = 8300,
        dc: str | None = None,
        status: str = "passing",
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """A Consul server: node + the `consul` service the leader registers (CONSUL.md §3)."""
        with self._lock:
            dc = dc or self.datacenter
            server_meta = {
                "non_voter": "false",
                "raft_version": "3",
                "read_replica": "false",
                "serf_protocol_current": "2",
                "serf_protocol_max": "5",
                "serf_protocol_min": "1",
                "version": CONSUL_VERSION,
                "grpc_port": "8502",
                "grpc_tls_port": "8503",
                **(meta or {}),
            }
            csn = check_service_node(
                node,
                address,
                "consul",
                port,
                service_address="",
                meta=server_meta,
                status=None,
                node_status=status,
                dc=dc,
            )
            state = self._ensure_dc(dc)
            self._put_instance(dc, csn)
            if node not in state.servers:
                state.servers.append(node)
            if not state.leader:  # the first server elects itself
                state.leader = f"{address}:{port}"
                state.has_leader = True
                self._commit(("leader", dc))

    def remove_server(self, node: str, *, dc: str | None = None) -> None:
        with self._lock:
            dc = dc or self.datacenter
            state = self._dc(dc)
            inst = state.instances.get((node, "consul"))
            address = state.nodes[node].json["Address"] if node in state.nodes else ""
            self._drop_instance(dc, node, "consul")
            state.nodes.pop(node, None)
            if node in state.servers:
                state.servers.remove(node)
            if inst is not None and state.leader == f"{address}:{inst.service['Port']}":
                state.leader = self._first_server_addr(state)
                state.has_leader = bool(state.leader)
                self._commit(("leader", dc))

    def _server_addr(self, state: _Datacenter, node: str, inst: _Instance) -> str:
        address = state.nodes[node].json["Address"] if node in state.nodes else ""
        return f"{address}:{inst.service['Port']}"

    def _first_server_addr(self, state: _Datacenter) -> str:
        for node in state.servers:
            inst = state.instances.get((node, "consul"))
            if inst is not None:
                return self._server_addr(state, node, inst)
        return ""

    def set_leader(self, address: str | None, *, dc: str | None = None) -> None:
        """Leader RPC address; None = the leader is lost (non-stale reads answer 500
        "No cluster leader", ?stale reads answer with X-Consul-KnownLeader: false)."""
        with self._lock:
            state = self._dc(dc)
            state.leader = address or ""
            state.has_leader = address is not None
            self._commit(("leader", state.name))

    def add_instance(self, csn: Mapping[str, Any], *, dc: str | None = None) -> None:
        """Put any CheckServiceNode (see check_service_node) into a datacenter's catalog."""
        with self._lock:
            self._put_instance(dc or str(csn["Node"].get("Datacenter") or self.datacenter), csn)

    def remove_instance(self, node: str, service_id: str, *, dc: str | None = None) -> None:
        with self._lock:
            self._drop_instance(dc or self.datacenter, node, service_id)

    def add_gateway(
        self,
        dc: str,
        node: str,
        address: str,
        port: int = 8443,
        *,
        wan: tuple[str, int] | None = None,
        service_id: str = "mesh-gateway",
        name: str = "mesh-gateway",
        wanfed: bool = True,
        status: str = "passing",
        meta: Mapping[str, str] | None = None,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        """A mesh gateway in `dc` (catalog + that DC's federation state, via anti-entropy)."""
        csn = mesh_gateway_node(
            node,
            address,
            port,
            dc=dc,
            wan=wan,
            service_id=service_id,
            name=name,
            wanfed=wanfed,
            status=status,
            meta=meta,
            weights=weights,
        )
        with self._lock:
            self._put_instance(dc, csn)

    def update_gateway(
        self,
        dc: str,
        node: str,
        *,
        service_id: str = "mesh-gateway",
        address: str | None = None,
        port: int | None = None,
        wan: tuple[str, int] | None = None,
        status: str | None = None,
        wanfed: bool | None = None,
    ) -> None:
        """Change a gateway: new address/port/WAN address, health, or wanfed meta."""
        with self._lock:
            state = self._dc(dc)
            inst = state.instances.get((node, service_id))
            if inst is None:
                raise KeyError(f"no gateway {service_id!r} on {node!r} in {dc}")
            svc = inst.service
            old_meta = dict(svc.get("Meta") or {})
            old_wan = (svc.get("TaggedAddresses") or {}).get("wan")
            check = inst.checks.get(f"service:{service_id}")
            csn = mesh_gateway_node(
                node,
                address or str(svc["Address"]),
                port or int(svc["Port"]),
                dc=dc,
                wan=wan or ((old_wan["Address"], old_wan["Port"]) if old_wan else None),
                service_id=service_id,
                name=inst.name,
                wanfed=(old_meta.get(WAN_FED_META_KEY) == "1") if wanfed is None else wanfed,
                status=status or (str(check["Status"]) if check else "passing"),
                meta={k: v for k, v in old_meta.items() if k != WAN_FED_META_KEY},
                weights=svc.get("Weights"),
            )
            self._put_instance(dc, csn, node_checks=False)

    def remove_gateway(self, dc: str, node: str, service_id: str = "mesh-gateway") -> None:
        with self._lock:
            self._drop_instance(dc, node, service_id)

    def add_connect_service(
        self,
        name: str,
        node: str,
        address: str,
        port: int,
        *,
        proxy_port: int | None = 21000,
        native: bool = False,
        dc: str | None = None,
        status: str = "passing",
    ) -> None:
        """A local mesh service: the app instance and, unless native, its sidecar proxy."""
        dc = dc or self.datacenter
        with self._lock:
            self._put_instance(
                dc,
                check_service_node(
                    node,
                    address,
                    name,
                    port,
                    connect={"Native": True} if native else None,
                    status=status,
                    dc=dc,
                ),
            )
            if not native and proxy_port is not None:
                self._put_instance(
                    dc,
                    check_service_node(
                        node,
                        address,
                        f"{name}-sidecar-proxy",
                        proxy_port,
                        kind="connect-proxy",
                        proxy={
                            "DestinationServiceName": name,
                            "DestinationServiceID": name,
                            "LocalServiceAddress": "127.0.0.1",
                            "LocalServicePort": port,
                        },
                        status=status,
                        dc=dc,
                    ),
                )

    def set_check_status(
        self,
        node: str,
        status: str,
        *,
        service_id: str | None = None,
        dc: str | None = None,
        output: str = "",
    ) -> None:
        """Mark a service's checks (or, with no service_id, the node's serfHealth) as status."""
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status {status!r}: want passing, warning or critical")
        with self._lock:
            dc = dc or self.datacenter
            state = self._dc(dc)
            if service_id is None:
                check = dict(state.nodes[node].checks["serfHealth"])
                check["Status"] = status
                check["Output"] = output or serf_check(node, status)["Output"]
                self._update_node_checks(state, node, {"serfHealth": check})
                self._federation_anti_entropy()
                return
            if dc == self.datacenter and node == self.node_name and service_id in self._agent:
                for check in self._agent[service_id].checks:
                    check["Status"] = status
                    check["Output"] = output
                self._sync_agent_service(service_id)
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
            self._put_instance(dc, csn, node_checks=False)

    def set_ca(self, *, trust_domain: str | None = None, rotate: bool = False) -> None:
        """Change the trust domain and/or rotate to a new active root (old roots stay, inactive)."""
        with self._lock:
            if trust_domain is not None:
                self._trust_domain = trust_domain
            if self._ca_roots is None:
                self._ca_roots_locked()
                return
            index = self._commit(("ca",))
            if rotate or trust_domain is not None:
                for root in self._ca_roots:
                    root["Active"] = False
                self._ca_roots.append(_make_ca_root(self._trust_domain, index))

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def set_federation_state(
        self, dc: str, gateways: list[dict[str, Json]] | None, *, freeze: bool = True
    ) -> None:
        """Write dc's federation state directly (e.g. a stale replicated copy); with freeze, the
        leader anti-entropy stops rewriting it from dc's catalog. None deletes the state."""
        with self._lock:
            self._ensure_dc(dc).fed_auto = not freeze
            if gateways is None:
                self._fed.pop(dc, None)
                self._commit(("fed",))
            else:
                self._write_fed_state(dc, copy.deepcopy(gateways))

    def agent_service(self, service_id: str) -> dict[str, Json] | None:
        """What the agent holds for a registered service (NodeService form), for assertions."""
        with self._lock:
            entry = self._agent.get(service_id)
            return copy.deepcopy(entry.service) if entry else None

    def agent_checks(self, service_id: str) -> list[dict[str, Json]]:
        with self._lock:
            entry = self._agent.get(service_id)
            return copy.deepcopy(entry.checks) if entry else []

    def federation_state(self, dc: str) -> dict[str, Json] | None:
        with self._lock:
            return copy.deepcopy(self._fed.get(dc))

    # --- fault injection ------------------------------------------------------------------------

    def fail(
        self,
        path: str,
        status: int = 500,
        body: str = "rpc error: internal failure",
        *,
        times: int | None = None,
        method: str | None = None,
    ) -> None:
        """Answer requests under `path` (prefix, or glob with *?[) with status and body."""
        self._add_fault(_Fault(FaultKind.FAIL, path, status, body, times, method))

    def hang(self, path: str, *, times: int | None = None, method: str | None = None) -> None:
        """Never answer (until clear() or stop())."""
        self._add_fault(_Fault(FaultKind.HANG, path, times=times, method=method))

    def drop(self, path: str, *, times: int | None = None, method: str | None = None) -> None:
        """Close the connection without a response."""
        self._add_fault(_Fault(FaultKind.DROP, path, times=times, method=method))

    def garbage(self, path: str, *, times: int | None = None, method: str | None = None) -> None:
        """200 with a body that is not JSON (and a valid X-Consul-Index)."""
        self._add_fault(_Fault(FaultKind.GARBAGE, path, times=times, method=method))

    def clear(self, path: str | None = None) -> None:
        """Remove faults (all, or those added for `path`); hung requests then proceed."""
        with self._lock:
            keep = [f for f in self._faults if path is not None and f.pattern != path]
            for fault in self._faults + self._spent:
                if fault not in keep:
                    fault.released = True
            self._faults, self._spent = keep, []
            self._notify()

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                            self._spent.append(fault)  # its hung requests wait for clear()
                    return fault
        return None

    def reset_index(self, to: int = 1) -> None:
        """The raft index goes backwards (snapshot restore, new cluster): every view drops to
        at most `to`; later mutations count up from there."""
        with self._lock:
            self._index = to
            self._key_index = {k: min(v, to) for k, v in self._key_index.items()}
            self._notify()

    def find_requests(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose path matches (prefix, or glob with *?[)."""
        probe = _Fault(FaultKind.FAIL, path, method=method)
        return [r for r in list(self.requests) if probe.matches(r.method, r.path)]

    # --- HTTP -----------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        get, put = app.router.add_get, app.router.add_put
        get("/v1/agent/self", self._agent_self)
        put("/v1/agent/service/register", self._agent_register)
        put("/v1/agent/service/deregister/{id}", self._agent_deregister)
        get("/v1/agent/services", self._agent_services)
        get("/v1/agent/service/{id}", self._agent_service)
        get("/v1/catalog/datacenters", self._catalog_datacenters)
        get("/v1/catalog/services", self._catalog_services)
        get("/v1/catalog/service/{name}", self._catalog_service)
        get("/v1/health/service/{name}", self._health_service)
        get("/v1/health/connect/{name}", self._health_connect)
        get("/v1/internal/federation-states", self._fed_list)
        get("/v1/internal/federation-states/mesh-gateways", self._fed_mesh_gateways)
        get("/v1/internal/federation-state/{dc}", self._fed_get)
        get("/v1/connect/ca/roots", self._ca_roots_handler)
        get("/v1/status/leader", self._status_leader)
        get("/v1/status/peers", self._status_peers)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        body = await request.read()
        with self._blocked_cond:
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    request.query,
                    CIMultiDictProxy(CIMultiDict(request.headers)),
                    body,
                )
            )
        self._signal(0)  # wake wait_for_request callers
        fault = self._take_fault(request.method, request.path)
        if fault is not None:
            answer = await self._apply_fault(request, fault)
            if answer is not None:
                return answer
        try:
            response: web.StreamResponse = await handler(request)
        except _HTTPAnswer as exc:
            return web.Response(status=exc.status, text=exc.text, content_type="text/plain")
        except _Denied as exc:
            return web.Response(status=403, text=exc.text, content_type="text/plain")
        return response

    async def _apply_fault(self, request: web.Request, fault: _Fault) -> web.StreamResponse | None:
        if fault.kind is FaultKind.FAIL:
            return web.Response(status=fault.status, text=fault.body, content_type="text/plain")
        if fault.kind is FaultKind.GARBAGE:
            headers = {"X-Consul-Index": str(max(self._index, 1)), "X-Consul-KnownLeader": "true"}
            return web.Response(
                status=200,
                text='{"Datacenter": "dc1", <html>',
                headers=headers,
                content_type="application/json",
            )
        if fault.kind is FaultKind.DROP:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=200)  # never reaches the client
        # HANG: wait for the fault to be cleared or the double to stop, then proceed normally.
        while not self._stopping:
            event = self._changed
            with self._lock:
                if fault.released:
                    return None
            assert event is not None
            await event.wait()
        raise _HTTPAnswer(503, "shutting down")

    # --- request helpers ------------------------------------------------------------------------

    def _token(self, request: web.Request) -> AclToken | None:
        """Resolve the request's token (X-Consul-Token, Bearer, ?token=); None without ACLs."""
        if not self.acl_enabled:
            return None
        secret = request.headers.get("X-Consul-Token", "")
        auth = request.headers.get("Authorization", "")
        if not secret and auth.lower().startswith("bearer "):
            secret = auth[7:].strip()
        secret = secret or request.query.get("token", "")
        if not secret:
            return self.anonymous
        token = self.tokens.get(secret)
        if token is None:
            raise _Denied("ACL not found")
        return token

    @staticmethod
    def _require(token: AclToken | None, resource: str, access: Access, name: str = "") -> None:
        if token is None or token.allows(resource, access, name):
            return
        who = (
            "anonymous token"
            if token.accessor_id == ANONYMOUS_ACCESSOR_ID
            else f"token with AccessorID '{token.accessor_id}'"
        )
        text = f"Permission denied: {who} lacks permission '{resource}:{access.name.lower()}'"
        if name:
            text += f' on "{name}"'
        if token.accessor_id == ANONYMOUS_ACCESSOR_ID:
            text += (
                ". The anonymous token is used implicitly when a request does not specify a token."
            )
        raise _Denied(text)

    def _target_dc(self, request: web.Request) -> _Datacenter:
        dc = request.query.get("dc") or self.datacenter
        with self._lock:
            state = self._dcs.get(dc)
        if state is None:
            raise _HTTPAnswer(500, "No path to datacenter")
        return state

    @staticmethod
    def _flag(request: web.Request, name: str) -> bool:
        if name not in request.query:
            return False
        value = request.query.get(name, "")
        if value == "":
            return True
        try:
            return _parse_go_bool(value)
        except ValueError:
            raise _HTTPAnswer(400, f"Invalid value for ?{name}") from None

    def _query_meta_headers(
        self, state: _Datacenter, request: web.Request, index: int
    ) -> dict[str, str]:
        known = state.has_leader
        stale = "stale" in request.query
        if not known and not stale:
            raise _HTTPAnswer(500, "No cluster leader")
        headers = {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true" if known else "false",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": "stale" if stale else "leader",
        }
        if self.acl_enabled:
            headers["X-Consul-Default-ACL-Policy"] = "deny"
        return headers

    async def _blocking(
        self,
        request: web.Request,
        view: Callable[[], tuple[int, Any, bool]],
        state: _Datacenter | None = None,
        *,
        status: int = 200,
    ) -> web.Response:
        """Answer `view` (→ index, body, filtered-by-ACLs) as a blocking query: with ?index=N,
        wait until the view's index passes N or `wait` (+ up to wait/16 jitter) runs out."""
        query = request.query
        min_index = 0
        if "index" in query:
            try:
                min_index = int(query["index"])
                if min_index < 0:
                    raise ValueError
            except ValueError:
                raise _HTTPAnswer(400, "Invalid index") from None
        wait = DEFAULT_WAIT
        if "wait" in query:
            try:
                wait = parse_go_duration(query["wait"])
            except ValueError:
                raise _HTTPAnswer(400, "Invalid wait time") from None
        wait = min(max(wait, 0.0), MAX_WAIT) or DEFAULT_WAIT
        if self.jitter:
            wait += random.uniform(0, wait / JITTER_FRACTION)
        assert self._loop is not None
        deadline = self._loop.time() + wait
        while True:
            event = self._changed
            with self._lock:
                index, body, filtered = view()
                text = json.dumps(body)
            remaining = deadline - self._loop.time()
            if min_index == 0 or index > min_index or remaining <= 0 or self._stopping:
                break
            assert event is not None
            self._signal(+1)
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass
            finally:
                self._signal(-1)
        headers = self._query_meta_headers(state or self._dcs[self.datacenter], request, index)
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return web.Response(
            status=status, text=text, headers=headers, content_type="application/json"
        )

    # --- rendering ------------------------------------------------------------------------------

    def _render_csn(self, state: _Datacenter, inst: _Instance) -> dict[str, Json]:
        node = state.nodes[inst.node]
        return {
            "Node": copy.deepcopy(node.json),
            "Service": copy.deepcopy(inst.service),
            "Checks": copy.deepcopy([*node.checks.values(), *inst.checks.values()]),
        }

    @staticmethod
    def _flat(csn: Mapping[str, Any]) -> dict[str, Json]:
        node, svc = csn["Node"], csn["Service"]
        out: dict[str, Json] = {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": node["Datacenter"],
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": svc.get("Kind", ""),
            "ServiceID": svc["ID"],
            "ServiceName": svc["Service"],
            "ServiceTags": svc["Tags"],
            "ServiceAddress": svc["Address"],
        }
        if svc.get("TaggedAddresses"):
            out["ServiceTaggedAddresses"] = svc["TaggedAddresses"]
        out |= {
            "ServiceWeights": svc["Weights"],
            "ServiceMeta": svc["Meta"],
            "ServicePort": svc["Port"],
            "ServiceEnableTagOverride": svc["EnableTagOverride"],
            "ServiceProxy": svc["Proxy"],
            "ServiceConnect": svc["Connect"],
            "ServicePeerName": "",
            "CreateIndex": svc["CreateIndex"],
            "ModifyIndex": svc["ModifyIndex"],
        }
        return out

    def _visible(self, token: AclToken | None, csn: Mapping[str, Any]) -> bool:
        if token is None:
            return True
        return token.allows("service", Access.READ, csn["Service"]["Service"]) and token.allows(
            "node", Access.READ, csn["Node"]["Node"]
        )

    def _service_entries(
        self,
        request: web.Request,
        state: _Datacenter,
        token: AclToken | None,
        select: Callable[[_Instance], bool],
        keys: list[tuple[str, ...]],
        *,
        apply_filter: bool = True,
    ) -> Callable[[], tuple[int, Any, bool]]:
        passing = self._flag(request, "passing")
        tags = request.query.getall("tag", [])
        expr = _Filter.parse(request.query.get("filter", "")) if apply_filter else None

        def view() -> tuple[int, Any, bool]:
            entries = [
                self._render_csn(state, inst)
                for _, inst in sorted(state.instances.items())
                if select(inst)
            ]
            visible = [e for e in entries if self._visible(token, e)]
            filtered = len(visible) != len(entries)
            if tags:
                visible = [e for e in visible if all(t in e["Service"]["Tags"] for t in tags)]
            if passing:
                visible = [e for e in visible if all(c["Status"] == "passing" for c in e["Checks"])]
            return self._view_index(*keys), visible, filtered

        if expr is None:
            return view

        def filtered_view() -> tuple[int, Any, bool]:
            index, entries, acl_filtered = view()
            return index, [e for e in entries if expr.matches(e)], acl_filtered

        return filtered_view

    def _service_keys(self, state: _Datacenter, kind: str, name: str) -> list[tuple[str, ...]]:
        key = (kind, state.name, name)
        return [key] if key in self._key_index else [("catalog", state.name)]

    # --- handlers: agent ------------------------------------------------------------------------

    async def _agent_self(self, request: web.Request) -> web.Response:
        token = self._token(request)
        self._require(token, "agent", Access.READ, self.node_name)
        with self._lock:
            state = self._dcs[self.datacenter]
            node = state.nodes[self.node_name]
            is_server = self.node_name in state.servers
            body = {
                "Config": {
                    "Datacenter": self.datacenter,
                    "PrimaryDatacenter": self.primary_datacenter,
                    "NodeName": self.node_name,
                    "NodeID": node.json["ID"],
                    "Revision": "2a5b8b9e",
                    "Server": is_server,
                    "Version": CONSUL_VERSION,
                    "BuildDate": "2023-11-03T00:00:00Z",
                },
                "DebugConfig": {
                    "Datacenter": self.datacenter,
                    "PrimaryDatacenter": self.primary_datacenter,
                    "NodeName": self.node_name,
                    "DNSDomain": self.domain,
                    "DNSAltDomain": "",
                    "ServerMode": is_server,
                    "ACLsEnabled": self.acl_enabled,
                    "ConnectEnabled": True,
                    "ConnectMeshGatewayWANFederationEnabled": True,
                    "PrimaryGateways": [],
                    "PrimaryGatewaysInterval": "30s",
                    "HTTPPort": self._bind[1] if self._bind else 8500,
                    "GRPCPort": 8502,
                },
                "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
                "Member": {
                    "Name": self.node_name,
                    "Addr": self.node_address,
                    "Port": 8301,
                    "Tags": {
                        "build": f"{CONSUL_VERSION}:2a5b8b9e",
                        "dc": self.datacenter,
                        "id": node.json["ID"],
                        "role": "consul" if is_server else "node",
                        "segment": "",
                        "vsn": "2",
                        "vsn_max": "3",
                        "vsn_min": "2",
                    },
                    "Status": 1,
                    "ProtocolMin": 1,
                    "ProtocolMax": 5,
                    "ProtocolCur": 2,
                    "DelegateMin": 2,
                    "DelegateMax": 5,
                    "DelegateCur": 4,
                },
                "Stats": {"consul": {"server": str(is_server).lower(), "version": CONSUL_VERSION}},
                "Meta": node.json["Meta"],
                "xDS": {
                    "SupportedProxies": {"envoy": ["1.27.2"]},
                    "Port": 8502,
                    "Ports": {"Plaintext": 8502, "TLS": -1},
                },
            }
        return web.json_response(body)

    def _agent_json(self, entry: _AgentService, *, with_hash: bool = False) -> dict[str, Json]:
        svc = entry.service
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
        if with_hash:
            out["ContentHash"] = _content_hash(out)
        return copy.deepcopy(out)

    async def _agent_register(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
            args = decode_registration(body)
        except (ValueError, _Decode) as exc:
            raise _HTTPAnswer(400, f"Request decode failed: {exc}") from None
        name = args.get("Name") or ""
        if not name:
            raise _HTTPAnswer(400, "Missing service name")
        address = args.get("Address") or ""
        if address in ("0.0.0.0", "::", "[::]"):
            raise _HTTPAnswer(400, "Invalid service address")
        token = self._token(request)
        weights = args.get("Weights")
        if weights is not None:
            if weights.get("Passing", 0) < 1:
                raise _HTTPAnswer(400, "Invalid Weights: Passing must be greater than 0")
            if weights.get("Warning", 0) < 0:
                raise _HTTPAnswer(400, "Invalid Weights: Warning must be greater or equal than 0")
        kind = args.get("Kind") or ""
        meta_error = validate_service_meta(kind, args.get("Meta") or {})
        if meta_error:
            raise _HTTPAnswer(400, f"Invalid Service Meta: {meta_error}")
        errors = validate_node_service(args)
        if errors:
            raise _HTTPAnswer(400, f"Validation failed: {_multierror(errors)}")
        check_defs = [*([args["Check"]] if args.get("Check") else []), *(args.get("Checks") or [])]
        for check in check_defs:
            problem = _validate_check(check)
            if problem:
                raise _HTTPAnswer(400, f"Invalid check: {problem}")
            if check.get("Status") and check["Status"] not in ("passing", "warning", "critical"):
                raise _HTTPAnswer(400, "Status for checks must 'passing', 'warning', 'critical'")
        self._require(token, "service", Access.WRITE, name)
        sid = args.get("ID") or name
        with self._lock:
            existing = self._agent.get(sid)
            if existing is not None:
                self._require(token, "service", Access.WRITE, existing.service["Service"])
            if kind == "connect-proxy":
                self._require(
                    token, "service", Access.WRITE, args["Proxy"]["DestinationServiceName"]
                )
            port = int(args.get("Port") or 0)
            tagged = {k: v for k, v in (args.get("TaggedAddresses") or {}).items()}
            tagged = default_tagged_addresses(address, port, tagged) if address else tagged
            service = service_json(
                name,
                port,
                service_id=sid,
                kind=kind,
                address=address,
                tags=args.get("Tags") or (),
                meta=args.get("Meta"),
                tagged_addresses=tagged,
                weights=weights,
                proxy=args.get("Proxy"),
                connect={k: v for k, v in (args.get("Connect") or {}).items() if k == "Native"},
                enable_tag_override=bool(args.get("EnableTagOverride")),
            )
            replace = request.query.get("replace-existing-checks", None)
            replace_checks = replace is not None and replace in ("", "true")
            checks = self._agent_checks_for(
                sid, name, service["Tags"], check_defs, existing, replace_checks
            )
            self._agent[sid] = _AgentService(service, checks, check_defs)
            self._commit(("agent",))
            self._sync_agent_service(sid)
        return web.Response(status=200)

    def _agent_checks_for(
        self,
        sid: str,
        name: str,
        tags: list[str],
        defs: list[dict[str, Any]],
        existing: _AgentService | None,
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

    def _sync_agent_service(self, sid: str) -> None:
        """Anti-entropy of one agent service into the local catalog (caller holds the lock)."""
        entry = self._agent.get(sid)
        if entry is None:
            self._drop_instance(self.datacenter, self.node_name, sid)
            return
        state = self._dcs[self.datacenter]
        csn = {
            "Node": state.nodes[self.node_name].json,
            "Service": entry.service,
            "Checks": entry.checks,
        }
        self._put_instance(self.datacenter, csn)

    async def _agent_deregister(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        token = self._token(request)
        with self._lock:
            entry = self._agent.get(sid)
            if entry is None:
                if self.deregister_unknown_404:
                    raise _HTTPAnswer(
                        404,
                        f'Unknown service ID "{sid}". Ensure that the service ID is passed, '
                        "not the service name.",
                    )
                return web.Response(status=200)
            self._require(token, "service", Access.WRITE, entry.service["Service"])
            del self._agent[sid]
            self._commit(("agent",))
            self._sync_agent_service(sid)
        return web.Response(status=200)

    async def _agent_services(self, request: web.Request) -> web.Response:
        token = self._token(request)
        expr = _Filter.parse(request.query.get("filter", ""))
        with self._lock:
            out = {
                sid: self._agent_json(entry)
                for sid, entry in sorted(self._agent.items())
                if token is None or token.allows("service", Access.READ, entry.service["Service"])
            }
        if expr is not None:
            out = {k: v for k, v in out.items() if expr.matches(v)}
        return web.json_response(out)

    async def _agent_service(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        token = self._token(request)
        wanted_hash = request.query.get("hash", "")
        wait = DEFAULT_WAIT
        if "wait" in request.query:
            try:
                wait = min(parse_go_duration(request.query["wait"]), MAX_WAIT)
            except ValueError:
                raise _HTTPAnswer(400, "Invalid wait time") from None
        assert self._loop is not None
        deadline = self._loop.time() + wait
        while True:
            event = self._changed
            with self._lock:
                entry = self._agent.get(sid)
                if entry is None:
                    raise _HTTPAnswer(404, f"unknown service ID: {sid}")
                self._require(token, "service", Access.READ, entry.service["Service"])
                body = self._agent_json(entry, with_hash=True)
            remaining = deadline - self._loop.time()
            if not wanted_hash or body["ContentHash"] != wanted_hash or remaining <= 0:
                break
            assert event is not None
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass
        return web.json_response(body, headers={"X-Consul-ContentHash": body["ContentHash"]})

    # --- handlers: catalog and health -----------------------------------------------------------

    async def _catalog_datacenters(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(list(self._dc_order))

    async def _catalog_services(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        token = self._token(request)

        def view() -> tuple[int, Any, bool]:
            services: dict[str, list[str]] = {}
            filtered = False
            for _, inst in sorted(state.instances.items()):
                if token is not None and not token.allows("service", Access.READ, inst.name):
                    filtered = True
                    continue
                tags = services.setdefault(inst.name, [])
                tags += [t for t in inst.service["Tags"] if t not in tags]
            return self._view_index(("catalog", state.name)), services, filtered

        return await self._blocking(request, view, state)

    async def _catalog_service(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        token = self._token(request)
        name = request.match_info["name"]
        with self._lock:
            keys = self._service_keys(state, "service", name)
        entries = self._service_entries(
            request, state, token, lambda i: i.name == name, keys, apply_filter=False
        )
        expr = _Filter.parse(request.query.get("filter", ""))

        def view() -> tuple[int, Any, bool]:
            # This endpoint's bexpr filter applies to the flat shape.
            index, csns, filtered = entries()
            flat = [self._flat(c) for c in csns]
            return index, [f for f in flat if expr is None or expr.matches(f)], filtered

        return await self._blocking(request, view, state)

    async def _health_service(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        token = self._token(request)
        name = request.match_info["name"]
        with self._lock:
            keys = self._service_keys(state, "service", name)
        view = self._service_entries(request, state, token, lambda i: i.name == name, keys)
        return await self._blocking(request, view, state)

    async def _health_connect(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        token = self._token(request)
        name = request.match_info["name"]
        with self._lock:
            keys = self._service_keys(state, "connect", name)
        view = self._service_entries(
            request, state, token, lambda i: i.connect_target() == name, keys
        )
        return await self._blocking(request, view, state)

    # --- handlers: federation states ------------------------------------------------------------

    async def _fed_list(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        self._require(self._token(request), "operator", Access.READ)

        def view() -> tuple[int, Any, bool]:
            return self._view_index(("fed",)), [self._fed[dc] for dc in sorted(self._fed)], False

        return await self._blocking(request, view, state)

    async def _fed_get(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        self._require(self._token(request), "operator", Access.READ)
        dc = request.match_info["dc"]
        answer = await self._blocking(
            request, lambda: (self._view_index(("fed",)), self._fed.get(dc), False), state
        )
        headers = {k: v for k, v in answer.headers.items() if k.startswith("X-Consul-")}
        fed = json.loads(answer.text or "null")
        if fed is None:
            return web.Response(status=404, headers=headers)  # empty body, as Consul
        # QueryMeta is embedded without json tags, so its fields sit beside State.
        body = {
            "Index": int(headers["X-Consul-Index"]),
            "LastContact": 0,
            "KnownLeader": headers["X-Consul-KnownLeader"] == "true",
            "ConsistencyLevel": headers["X-Consul-Effective-Consistency"],
            "NotModified": False,
            "Backend": 0,
            "ResultsFilteredByACLs": False,
            "State": fed,
        }
        return web.json_response(body, headers=headers)

    async def _fed_mesh_gateways(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        token = self._token(request)

        def view() -> tuple[int, Any, bool]:
            out: dict[str, list[dict[str, Json]]] = {}
            filtered = False
            for dc in sorted(self._fed):
                gateways = self._fed[dc].get("MeshGateways") or []
                visible = [g for g in gateways if self._visible(token, g)]
                filtered |= len(visible) != len(gateways)
                if visible:
                    out[dc] = visible
            return self._view_index(("fed",)), out, filtered

        return await self._blocking(request, view, state)

    # --- handlers: CA and status ----------------------------------------------------------------

    def _ca_roots_locked(self) -> list[dict[str, Json]]:
        if self._ca_roots is None:
            index = self._key_index.get(("ca",)) or self._commit(("ca",))
            self._ca_roots = [_make_ca_root(self._trust_domain, index)]
        return self._ca_roots

    async def _ca_roots_handler(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        self._token(request)  # no ACL needed, but an unknown token is still refused

        def view() -> tuple[int, Any, bool]:
            roots = self._ca_roots_locked()
            active = next((r["ID"] for r in roots if r["Active"]), "")
            body = {"ActiveRootID": active, "TrustDomain": self._trust_domain, "Roots": roots}
            return self._view_index(("ca",)), body, False

        return await self._blocking(request, view, state)

    async def _status_leader(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        with self._lock:
            return web.json_response(state.leader if state.has_leader else "")

    async def _status_peers(self, request: web.Request) -> web.Response:
        state = self._target_dc(request)
        with self._lock:
            peers = [
                self._server_addr(state, node, state.instances[(node, "consul")])
                for node in state.servers
                if (node, "consul") in state.instances
            ]
        return web.json_response(peers)

    # --- optional TCP health checks -------------------------------------------------------------

    async def _run_checks(self) -> None:
        """Probe agent-registered TCP checks every check_interval seconds, like the agent does."""
        assert self.check_interval is not None
        while True:
            with self._lock:
                probes = [
                    (sid, d["TCP"])
                    for sid, entry in self._agent.items()
                    for d in entry.check_defs
                    if d.get("TCP")
                ]
            for sid, target in probes:
                host, _, port = target.rpartition(":")
                try:
                    async with asyncio.timeout(1.0):
                        _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
                    writer.close()
                    status, output = "passing", f"TCP connect {target}: Success"
                except (OSError, TimeoutError, ValueError) as exc:
                    status, output = "critical", f"dial tcp {target}: {exc}"
                with self._lock:
                    entry = self._agent.get(sid)
                    if entry is None:
                        continue
                    if any(c["Status"] != status for c in entry.checks):
                        for check in entry.checks:
                            check["Status"], check["Output"] = status, output
                        self._sync_agent_service(sid)
            await asyncio.sleep(self.check_interval)


# --- small helpers ------------------------------------------------------------------------------


def _parse_go_bool(value: str) -> bool:
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(value)


def _same_service(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    skip = ("CreateIndex", "ModifyIndex")
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


def _same_checks(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]]) -> bool:
    def strip(checks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        skip = ("CreateIndex", "ModifyIndex", "Node")
        return {cid: {k: v for k, v in c.items() if k not in skip} for cid, c in checks.items()}

    return strip(a) == strip(b)


def _validate_check(check: Mapping[str, Any]) -> str | None:
    """CheckType.Validate, the common cases."""
    kinds = [k for k in ("TCP", "HTTP", "GRPC", "H2PING", "UDP", "ScriptArgs") if check.get(k)]
    if check.get("TTL"):
        return None if not kinds else "TTL must not be combined with another check type"
    if not kinds and not check.get("AliasService") and not check.get("AliasNode"):
        return (
            "Must provide TTL or Script/DockerContainerID/HTTP/TCP/GRPC/H2PING/UDP "
            "or AliasNode/AliasService"
        )
    if kinds:
        interval = check.get("Interval") or ""
        if not interval or parse_go_duration(interval) <= 0:
            return "Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks"
    return None


class _Filter:
    """A small subset of go-bexpr: clauses joined by `and`, each `Selector == "v"`,
    `Selector != "v"`, `"v" in Selector` or `Selector is empty`/`is not empty`.
    Selectors are dotted paths with optional ["key"] indexes, e.g.
    `Service.Meta["consul-wan-federation"]`."""

    _CLAUSE = re.compile(
        r'^\s*(?:(?P<sel>[A-Za-z][\w.]*(?:\["[^"]*"\]|\.[\w-]+)*)\s*(?P<op>==|!=)\s*'
        r'(?:"(?P<val>[^"]*)"|(?P<bare>[\w.-]+))'
        r'|"(?P<inval>[^"]*)"\s+(?P<neg>not\s+)?in\s+(?P<insel>[A-Za-z][\w.]*(?:\["[^"]*"\])*)'
        r"|(?P<esel>[A-Za-z][\w.]*(?:\[\"[^\"]*\"\])*)\s+is\s+(?P<enot>not\s+)?empty)\s*$"
    )

    def __init__(self, clauses: list[Callable[[Any], bool]]) -> None:
        self._clauses = clauses

    @classmethod
    def parse(cls, text: str) -> _Filter | None:
        if not text.strip():
            return None
        clauses: list[Callable[[Any], bool]] = []
        for part in re.split(r"\s+and\s+", text.strip()):
            match = cls._CLAUSE.match(part)
            if not match:
                raise _HTTPAnswer(
                    400,
                    "Failed to create boolean expression evaluator: "
                    f"unsupported by the double: {part!r}",
                )
            clauses.append(cls._clause(match))
        return cls(clauses)

    @staticmethod
    def _select(obj: Any, selector: str) -> Any:
        for name, key in re.findall(r'([\w-]+)|\["([^"]*)"\]', selector):
            step = name or key
            if isinstance(obj, dict):
                obj = obj.get(step)
            else:
                return None
        return obj

    @classmethod
    def _clause(cls, match: re.Match[str]) -> Callable[[Any], bool]:
        if match.group("sel"):
            sel, op = match.group("sel"), match.group("op")
            val = match.group("val") if match.group("val") is not None else match.group("bare")

            def equal(o: Any) -> bool:
                found = cls._select(o, sel)
                if isinstance(found, bool):  # bexpr coerces the literal to the field's type
                    return str(found).lower() == val.lower()
                return found == val or (isinstance(found, int | float) and str(found) == val)

            if op == "==":
                return equal
            return lambda o: not equal(o)
        if match.group("insel"):
            sel, val, neg = match.group("insel"), match.group("inval"), bool(match.group("neg"))
            return lambda o: (val in (cls._select(o, sel) or ())) != neg
        sel, negate = match.group("esel"), bool(match.group("enot"))
        return lambda o: (not cls._select(o, sel)) != negate

    def matches(self, obj: Any) -> bool:
        return all(clause(obj) for clause in self._clauses)


# --- a double in its own thread -----------------------------------------------------------------


class ConsulDoubleThread:
    """Run a ConsulDouble on its own loop in a background thread (for synchronous tests and
    child processes). Mutators are reached through the attribute `double` (or directly: unknown
    attributes are forwarded); down()/up() are synchronous here."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        self._start_args: dict[str, Any] = {
            "host": host,
            "port": port,
            "unix_path": unix_path,
            "ssl_context": ssl_context,
        }
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.double: ConsulDouble | None = None

    def start(self) -> ConsulDoubleThread:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="consul-double", daemon=True)
        self._thread.start()
        ready.wait()

        async def make() -> ConsulDouble:
            double = ConsulDouble(**self._kwargs)
            return await double.start(**self._start_args)

        self.double = self._call(make())
        return self

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self.double is not None:
            self._call(self.double.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def down(self) -> None:
        assert self.double is not None
        self._call(self.double.down())

    def up(self) -> None:
        assert self.double is not None
        self._call(self.double.up())

    @property
    def url(self) -> str:
        assert self.double is not None
        return self.double.url

    def __getattr__(self, name: str) -> Any:
        double = self.__dict__.get("double")
        if double is None:
            raise AttributeError(name)
        return getattr(double, name)

    def __enter__(self) -> ConsulDoubleThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def consul_double_thread(**kwargs: Any) -> Iterator[ConsulDoubleThread]:
    runner = ConsulDoubleThread(**kwargs).start()
    try:
        yield runner
    finally:
        runner.stop()


# --- manual use: python -m tests.consul_double ----------------------------------------------


def load_state(double: ConsulDouble, state: Mapping[str, Any]) -> None:
    """Apply a JSON state: {"datacenters": [...], "servers": [{"node","address","port"?}],
    "gateways": {"dc2": [{"node","address","port"?,"wan"?: "host:port","status"?}]},
    "services": [{"name","node","address","port"}], "trust_domain": "..."}."""
    if "datacenters" in state:
        double.set_datacenters(state["datacenters"])
    for server in state.get("servers", []):
        double.add_server(server["node"], server["address"], port=server.get("port", 8300))
    for dc, gateways in state.get("gateways", {}).items():
        for gw in gateways:
            wan = None
            if gw.get("wan"):
                host, _, port = gw["wan"].rpartition(":")
                wan = (host, int(port))
            double.add_gateway(
                dc,
                gw["node"],
                gw["address"],
                gw.get("port", 8443),
                wan=wan,
                status=gw.get("status", "passing"),
            )
    for svc in state.get("services", []):
        double.add_connect_service(svc["name"], svc["node"], svc["address"], svc["port"])
    if state.get("trust_domain"):
        double.set_ca(trust_domain=state["trust_domain"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Consul API double")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--dc", default="dc1")
    parser.add_argument("--state", help="JSON file with the initial state (see load_state)")
    parser.add_argument(
        "--checks-passing", action="store_true", help="registered checks start passing"
    )
    args = parser.parse_args(argv)

    async def serve() -> None:
        double = ConsulDouble(
            args.dc, initial_check_status="passing" if args.checks_passing else "critical"
        )
        if args.state:
            with open(args.state, encoding="utf-8") as handle:
                load_state(double, json.load(handle))
        async with double:
            print(f"consul double for {args.dc} at {double.url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
