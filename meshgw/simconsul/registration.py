"""Agent service registration bodies: Go's case-insensitive JSON decoding (PascalCase,
camelCase and snake_case land on the same field) and the agent's validation, with its texts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshgw.control.catalog import WAN_FEDERATION_META
from meshgw.simconsul.golang import parse_go_duration


class DecodeError(Exception):
    """A body Go's decoder would refuse; the text is what Consul prints."""


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
            raise DecodeError(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
                f"of type {_GO_TYPES[spec]}"
            )
        return int(value) if spec is int else value
    if spec == "duration":
        if isinstance(value, str):
            try:
                parse_go_duration(value)
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
            return value
        if type(value) in (int, float):
            return f"{value / 1e9:g}s"  # Go accepts nanoseconds as a number
        raise DecodeError(
            f"json: cannot unmarshal {_json_kind(value)} into {where} of type Duration"
        )
    if spec == "strmap":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DecodeError(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
                "of type map[string]string"
            )
        return dict(value)
    if spec == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DecodeError(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
                "of type []string"
            )
        return list(value)
    if isinstance(spec, tuple):
        kind, inner = spec
        if kind == "map":
            if not isinstance(value, dict):
                raise DecodeError(
                    f"json: cannot unmarshal {_json_kind(value)} into {where} of type map"
                )
            return {k: _decode(v, inner, f"{where}[{k}]") for k, v in value.items()}
        if not isinstance(value, list):
            raise DecodeError(
                f"json: cannot unmarshal {_json_kind(value)} into {where} of type slice"
            )
        return [_decode(v, inner, where) for v in value]
    if not isinstance(value, dict):
        raise DecodeError(
            f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where}"
        )
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
        raise DecodeError("json: cannot unmarshal into ServiceDefinition")
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
        elif key.startswith("consul-") and not (
            kind == "mesh-gateway" and key == WAN_FEDERATION_META
        ):
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


def multierror(errors: list[str]) -> str:
    # hashicorp/go-multierror's format, which Consul prints verbatim.
    count = "1 error occurred" if len(errors) == 1 else f"{len(errors)} errors occurred"
    return f"{count}:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


def validate_check(check: Mapping[str, Any]) -> str | None:
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
