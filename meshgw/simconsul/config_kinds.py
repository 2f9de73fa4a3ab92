"""Config entry kinds the simulator models: their fields, how Consul decodes and checks a written
entry, and the permission each needs.

Decoding is Consul's DecodeConfigEntry: keys in any case or snake_case, values weakly typed
(mapstructure), unknown keys refused (400 "Request decoding failed: ..."). Validation is the
entry's Validate, which runs in the server RPC (500 "rpc error making call: ...").
Kinds: proxy-defaults, mesh, service-defaults, service-resolver, exported-services; other real
kinds are refused with a message saying the simulator does not model them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshgw.simconsul.bexpr_grammar import GrammarError, Parser
from meshgw.simconsul.golang import format_go_duration, parse_go_duration

PROXY_DEFAULTS = "proxy-defaults"
MESH = "mesh"
SERVICE_DEFAULTS = "service-defaults"
SERVICE_RESOLVER = "service-resolver"
EXPORTED_SERVICES = "exported-services"
KINDS = (PROXY_DEFAULTS, MESH, SERVICE_DEFAULTS, SERVICE_RESOLVER, EXPORTED_SERVICES)
# Real Consul kinds the simulator does not model.
OTHER_KINDS = (
    "service-router",
    "service-splitter",
    "service-intentions",
    "ingress-gateway",
    "terminating-gateway",
    "api-gateway",
    "bound-api-gateway",
    "http-route",
    "tcp-route",
    "inline-certificate",
    "file-system-certificate",
    "sameness-group",
    "jwt-provider",
)


class EntryError(ValueError):
    """A written entry Consul refuses; str() is Consul's text after its prefix."""


# A spec: "string" | "int" | "bool" | "duration" | "any" (kept verbatim) | "strmap" | "strlist"
# | ("list", spec) | ("map", spec) (free keys) | {Field: spec} (a struct).
_MODE = {"Mode": "string"}
_TPROXY = {"OutboundListenerPort": "int", "DialedDirectly": "bool"}
_EXPOSE = {"Checks": "bool", "Paths": "any"}
_LIMITS = {"MaxConnections": "int", "MaxPendingRequests": "int", "MaxConcurrentRequests": "int"}
_UPSTREAM_CONFIG = {
    "Name": "string",
    "EnvoyListenerJSON": "string",
    "EnvoyClusterJSON": "string",
    "Protocol": "string",
    "ConnectTimeoutMs": "int",
    "Limits": _LIMITS,
    "PassiveHealthCheck": "any",
    "MeshGateway": _MODE,
    "BalanceOutboundConnections": "string",
}
_COMMON = {"Kind": "string", "Name": "string", "Meta": "strmap"}
_TARGET = {
    "Service": "string",
    "ServiceSubset": "string",
    "Namespace": "string",
    "Partition": "string",
    "Datacenter": "string",
    "Peer": "string",
}
SPECS: dict[str, dict[str, Any]] = {
    PROXY_DEFAULTS: {
        **_COMMON,
        "Config": "any",
        "Mode": "string",
        "TransparentProxy": _TPROXY,
        "MutualTLSMode": "string",
        "MeshGateway": _MODE,
        "Expose": _EXPOSE,
        "AccessLogs": "any",
        "EnvoyExtensions": "any",
        "FailoverPolicy": "any",
        "PrioritizeByLocality": "any",
    },
    MESH: {
        **_COMMON,
        "TransparentProxy": {"MeshDestinationsOnly": "bool"},
        "AllowEnablingPermissiveMutualTLS": "bool",
        "ValidateClusters": "bool",
        "TLS": "any",
        "HTTP": "any",
        "Peering": {"PeerThroughMeshGateways": "bool"},
    },
    SERVICE_DEFAULTS: {
        **_COMMON,
        "Protocol": "string",
        "Mode": "string",
        "TransparentProxy": _TPROXY,
        "MutualTLSMode": "string",
        "MeshGateway": _MODE,
        "Expose": _EXPOSE,
        "ExternalSNI": "string",
        "UpstreamConfig": {"Overrides": ("list", _UPSTREAM_CONFIG), "Defaults": _UPSTREAM_CONFIG},
        "Destination": "any",
        "MaxInboundConnections": "int",
        "LocalConnectTimeoutMs": "int",
        "LocalRequestTimeoutMs": "int",
        "BalanceInboundConnections": "string",
        "RateLimits": "any",
        "EnvoyExtensions": "any",
    },
    SERVICE_RESOLVER: {
        **_COMMON,
        "DefaultSubset": "string",
        "Subsets": ("map", {"Filter": "string", "OnlyPassing": "bool"}),
        "Redirect": {**_TARGET, "SamenessGroup": "string"},
        "Failover": (
            "map",
            {
                "Service": "string",
                "ServiceSubset": "string",
                "Namespace": "string",
                "Datacenters": "strlist",
                "Targets": ("list", _TARGET),
                "Policy": "any",
                "SamenessGroup": "string",
            },
        ),
        "ConnectTimeout": "duration",
        "RequestTimeout": "duration",
        "LoadBalancer": "any",
        "PrioritizeByLocality": "any",
    },
    EXPORTED_SERVICES: {
        **_COMMON,
        "Services": (
            "list",
            {
                "Name": "string",
                "Namespace": "string",
                "Consumers": (
                    "list",
                    {"Partition": "string", "Peer": "string", "SamenessGroup": "string"},
                ),
            },
        ),
    },
}
_ALIASES = {"peername": "Peer"}  # ServiceConsumer.Peer's alias:"peer_name"


# --- decoding ---------------------------------------------------------------------------------


def decode_entry(raw: Any) -> dict[str, Any]:
    """A written body → the entry with canonical keys; EntryError with Consul's text."""
    if not isinstance(raw, dict):
        raise EntryError("Payload does not contain a kind/Kind key at the top level")
    kind = next((v for k, v in raw.items() if k.lower() == "kind"), None)
    if not isinstance(kind, str) or not kind:
        raise EntryError("Payload does not contain a kind/Kind key at the top level")
    if kind in OTHER_KINDS:
        raise EntryError(f"config entry kind {kind!r} is not simulated")
    if kind not in SPECS:
        raise EntryError(f"invalid config entry kind: {kind}")
    errors: list[str] = []
    entry = _struct(raw, SPECS[kind], "", errors)
    if errors:
        points = "\n".join(f"* {e}" for e in errors)
        raise EntryError(f"{len(errors)} error(s) decoding:\n\n{points}")
    entry["Kind"] = kind
    return entry


def _struct(value: Any, spec: Mapping[str, Any], where: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        errors.append(f"'{where}' expected a map, got '{_go_kind(value)}'")
        return {}
    fields = {name.lower(): name for name in spec}
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, item in value.items():
        folded = key.replace("_", "").replace("-", "").lower()
        name = fields.get(folded) or _ALIASES.get(folded)
        if name is None:
            unknown.append(key)
            continue
        if item is not None:
            out[name] = _value(item, spec[name], f"{where}.{name}" if where else name, errors)
    if unknown:
        errors.append(f"'{where}' has invalid keys: {', '.join(sorted(unknown))}")
    return out


def _value(value: Any, spec: Any, where: str, errors: list[str]) -> Any:
    if isinstance(spec, dict):
        return _struct(value, spec, where, errors)
    if isinstance(spec, tuple):
        container, inner = spec
        if container == "list" and isinstance(value, list):
            return [_value(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        if container == "map" and isinstance(value, dict):
            return {k: _value(v, inner, f"{where}[{k}]", errors) for k, v in value.items()}
        errors.append(
            f"'{where}': source data must be an {'array' if container == 'list' else 'map'}"
        )
        return None
    try:
        return _scalar(value, spec)
    except (TypeError, ValueError):
        errors.append(
            f"'{where}' expected type '{_GO_TYPES.get(spec, spec)}', got unconvertible type "
            f"'{_go_kind(value)}', value: '{value}'"
        )
        return None


_GO_TYPES = {
    "string": "string",
    "int": "int",
    "bool": "bool",
    "duration": "time.Duration",
    "strmap": "map[string]string",
    "strlist": "[]string",
}


def _scalar(value: Any, spec: str) -> Any:
    """mapstructure's weakly typed conversions."""
    if spec == "any":
        return value
    if spec == "string":
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int | float | str):
            return str(value)
    elif spec == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        if isinstance(value, str):
            return int(value, 0) if value else 0
    elif spec == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value != 0
        if isinstance(value, str):
            return {"1": True, "true": True, "0": False, "false": False, "": False}[value.lower()]
    elif spec == "duration":
        if isinstance(value, str):
            return parse_go_duration(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value / 1e9  # a number is nanoseconds
    elif spec == "strmap" and isinstance(value, dict):
        return {str(k): _scalar(v, "string") for k, v in value.items()}
    elif spec == "strlist" and isinstance(value, list):
        return [_scalar(v, "string") for v in value]
    raise TypeError(value)


def _go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


# --- validation (the entry's Normalize and Validate, in the server) ------------------------

_FIXED_NAMES = {PROXY_DEFAULTS: "global", MESH: "mesh"}
_SUBSET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_entry(entry: dict[str, Any]) -> None:
    """Normalize in place and check; EntryError with Consul's text."""
    kind, name = entry["Kind"], entry.get("Name", "")
    fixed = _FIXED_NAMES.get(kind)
    if fixed is not None and name != fixed:
        raise EntryError(f"invalid name ({_go_quote(name)}), only {_go_quote(fixed)} is supported")
    if kind == SERVICE_DEFAULTS and "Protocol" in entry:
        entry["Protocol"] = entry["Protocol"].lower()
    if kind == SERVICE_RESOLVER:
        _validate_resolver(entry)
    if kind == EXPORTED_SERVICES:
        _validate_exports(entry)


def _validate_resolver(entry: Mapping[str, Any]) -> None:
    subsets: Mapping[str, Any] = entry.get("Subsets") or {}
    for name, subset in subsets.items():
        if not name:
            raise EntryError("Subset defined with empty name")
        if not _SUBSET_NAME.match(name):
            raise EntryError(
                f"Subset {_go_quote(name)} is invalid: must be 63 characters or less, begin or "
                "end with lower case alphanumeric characters, and contain lower case "
                "alphanumeric characters or '-' in between"
            )
        try:  # the grammar only: Consul checks subset filters without a type
            if subset.get("Filter"):
                Parser(subset["Filter"]).parse()
        except GrammarError as exc:
            raise EntryError(
                f"Filter for subset {_go_quote(name)} is not a valid expression: {exc}"
            ) from None
    default = entry.get("DefaultSubset") or ""
    if default and default not in subsets:
        raise EntryError(f"DefaultSubset {_go_quote(default)} is not a valid subset")
    failover: Mapping[str, Any] = entry.get("Failover") or {}
    if entry.get("Redirect") is not None:
        redirect = entry["Redirect"]
        if failover:
            raise EntryError("Redirect and Failover cannot both be set")
        if not any(redirect.values()):
            raise EntryError("Redirect is empty")
        if redirect.get("ServiceSubset") and not redirect.get("Service"):
            raise EntryError("Redirect.ServiceSubset defined without Redirect.Service")
    for subset, target in failover.items():
        if subset != "*" and subset not in subsets:
            raise EntryError(f"Bad Failover[{_go_quote(subset)}]: not a valid subset")
        if not any(target.values()):
            raise EntryError(
                f"Bad Failover[{_go_quote(subset)}] one of Service, ServiceSubset, Namespace, "
                "Targets, SamenessGroup, or Datacenters is required"
            )
        if any(not dc for dc in target.get("Datacenters") or ()):
            raise EntryError(
                f"Bad Failover[{_go_quote(subset)}].Datacenters: found empty datacenter"
            )
    timeout = entry.get("ConnectTimeout") or 0
    if timeout < 0:
        raise EntryError(f"Bad ConnectTimeout '{format_go_duration(timeout)}', must be >= 0")


def _validate_exports(entry: Mapping[str, Any]) -> None:
    if entry.get("Name") != "default":
        raise EntryError('exported-services Name must be "default"')
    for i, service in enumerate(entry.get("Services") or ()):
        if not service.get("Name"):
            raise EntryError(f"Services[{i}]: service name cannot be empty")
        consumers = service.get("Consumers") or ()
        if not consumers:
            raise EntryError(f"Services[{i}]: must have at least one consumer")
        for j, consumer in enumerate(consumers):
            where = f"Services[{i}].Consumers[{j}]"
            if sum(1 for k in ("Peer", "Partition", "SamenessGroup") if consumer.get(k)) > 1:
                raise EntryError(
                    f"{where}: must define at most one of Peer, Partition, or SamenessGroup"
                )
            if consumer.get("Partition") == "*":
                raise EntryError(
                    f"{where}: exporting to all partitions (wildcard) is not supported"
                )
            if consumer.get("Peer") == "*":
                raise EntryError(f"{where}: exporting to all peers (wildcard) is not supported")


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- permissions and rendering ----------------------------------------------------------------


def read_permission(kind: str, name: str) -> tuple[str, str] | None:
    """(resource, name) reading an entry needs; None: no ACL (proxy-defaults, mesh)."""
    if kind in (SERVICE_DEFAULTS, SERVICE_RESOLVER):
        return "service", name
    if kind == EXPORTED_SERVICES:
        return "mesh", ""
    return None


def write_permission(kind: str, name: str) -> tuple[str, str]:
    if kind in (SERVICE_DEFAULTS, SERVICE_RESOLVER):
        return "service", name
    return "mesh", ""  # mesh:write, or operator:write without a mesh rule


# Struct fields Go always encodes (omitempty does not drop a struct).
_ALWAYS = {
    PROXY_DEFAULTS: ("TransparentProxy", "MeshGateway", "Expose"),
    SERVICE_DEFAULTS: ("TransparentProxy", "MeshGateway", "Expose"),
}


def render_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's JSON, fields in Consul's order, durations as Go prints them."""
    kind = entry["Kind"]
    out: dict[str, Any] = {"Kind": kind, "Name": entry.get("Name", "")}
    for field in SPECS[kind]:
        if field in ("Kind", "Name", "Meta"):
            continue
        value = entry.get(field)
        if field in _ALWAYS.get(kind, ()):
            out[field] = value or {}
        elif value not in (None, "", 0, {}, [], False):
            out[field] = format_go_duration(value) if SPECS[kind][field] == "duration" else value
    if entry.get("Meta"):
        out["Meta"] = entry["Meta"]
    out["CreateIndex"] = entry["CreateIndex"]
    out["ModifyIndex"] = entry["ModifyIndex"]
    return out
