"""One typed Settings value, and the one place where defaults live.

Layers, lowest first: defaults < TOML file (`--config`) < `MESHGW_*` environment < command-line
flags. Every value is parsed by the same function whatever layer it comes from, and every error
names the setting where it was given (flag, variable or file key) and how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from meshgw.cpus import available_cpus
from meshgw.topology import (
    DEFAULT_PARTITION,
    Endpoint,
    GatewayKey,
    ServiceKey,
    Source,
    TopologyPart,
)
from meshgw.wire.clienthello import DEFAULT_MAX_HELLO_BYTES
from meshgw.wire.names import is_valid_datacenter, is_valid_node_name, normalize_host_name

ENV_PREFIX = "MESHGW_"


class SettingsError(ValueError):
    """A setting a user gave is wrong; the message names it and says how to fix it."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- value parsers: each takes the raw value (str from flags/env, or a TOML value) -------------


def parse_address(
    value: Any, *, default_port: int | None = None, any_port: bool = False
) -> Address:
    text = str(value).strip()
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port: write HOST:PORT")
        port = default_port
    else:
        port = int(port_text)
    if not (0 if any_port else 1) <= port < 65536:
        raise ValueError(f"port {port} in {text!r} is out of range 1-65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        name = normalize_host_name(host)
        if name is None:
            raise ValueError(
                f"{host!r} in {text!r} is neither an IP address nor a host name"
            ) from None
        host = name
    return Address(host, port)


def parse_listen(value: Any) -> Address:
    """An address to bind; port 0 asks the kernel for any free port."""
    address = parse_address(value, any_port=True)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        if address.host != "localhost":
            raise ValueError(f"listen on an IP address, not {address.host!r}") from None
    return address


def parse_seconds(value: Any) -> float:
    """Seconds as a number, or a duration like 500ms, 10s, 5m, 1h."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration: write 10, 10s, 500ms, 5m or 1h")
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
        seconds = float(match.group(1)) * unit
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_optional_seconds(value: Any) -> float | None:
    """Like parse_seconds, where 0, "off" or "none" mean no timeout at all."""
    if str(value).strip().lower() in {"", "0", "off", "none"}:
        return None
    return parse_seconds(value) or None


def parse_positive_int(value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise ValueError(f"{number} must be at least 1")
    return number


def parse_max_connections(value: Any) -> int | None:
    """A number, or "auto" (None): as many as the open-file limit allows."""
    if str(value).strip().lower() == "auto":
        return None
    return parse_positive_int(value)


def parse_workers(value: Any) -> int:
    """A number of processes, or "auto" (0): one per CPU this process may use (affinity and
    container CPU quota)."""
    if str(value).strip().lower() in {"auto", "0"}:
        return 0
    return parse_positive_int(value)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{value!r} is not true or false")


def parse_datacenter(value: Any) -> str:
    name = str(value).strip().lower()
    if not is_valid_datacenter(name):
        raise ValueError(
            f"{value!r} is not a datacenter name: use one DNS label (letters, digits, '-'), no dots"
        )
    return name


def parse_domain(value: Any) -> str:
    name = normalize_host_name(str(value).strip())
    if name is None:
        raise ValueError(f"{value!r} is not a DNS domain")
    return name


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return text

    return parse


def _pairs(value: Any) -> list[tuple[str, str]]:
    """NAME=HOST:PORT items from a flag list, a comma-separated env value or a TOML table."""
    if isinstance(value, Mapping):
        items: list[tuple[str, str]] = []
        for key, item in value.items():
            for one in item if isinstance(item, list) else [item]:
                items.append((str(key), str(one)))
        return items
    raw = value if isinstance(value, list | tuple) else str(value).split(",")
    pairs = []
    for item in raw:
        text = str(item).strip()
        if not text:
            continue
        name, sep, address = text.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise ValueError(f"{text!r} is not NAME=HOST:PORT")
        pairs.append((name.strip(), address.strip()))
    return pairs


def parse_servers(value: Any) -> dict[str, Address]:
    servers = {}
    for node, address in _pairs(value):
        if not is_valid_node_name(node):
            raise ValueError(
                f"{node!r} is not a Consul node name: no dots or '/' (Consul's WAN federation "
                "names members <node>.<dc>)"
            )
        servers[node] = parse_address(address)
    return servers


def parse_gateways(value: Any) -> dict[str, list[Address]]:
    """DC=HOST:PORT, or DC/PARTITION=HOST:PORT for a non-default admin partition."""
    gateways: dict[str, list[Address]] = {}
    for key, address in _pairs(value):
        dc, _, partition = key.partition("/")
        name = parse_datacenter(dc)
        if partition and partition != DEFAULT_PARTITION:
            if normalize_host_name(partition) is None or "." in partition:
                raise ValueError(f"{partition!r} in {key!r} is not a partition name (one label)")
            name = f"{name}/{partition.lower()}"
        gateways.setdefault(name, []).append(parse_address(address))
    return gateways


def parse_services(value: Any) -> dict[str, list[Address]]:
    services: dict[str, list[Address]] = {}
    for name, address in _pairs(value):
        if normalize_host_name(name) is None or "." in name:
            raise ValueError(f"{name!r} is not a service name: one DNS label")
        services.setdefault(name.lower(), []).append(parse_address(address))
    return services


def parse_host_names(value: Any) -> list[str]:
    raw = value if isinstance(value, list | tuple) else str(value).split(",")
    names = []
    for item in raw:
        text = str(item).strip()
        if not text:
            continue
        name = normalize_host_name(text)
        if name is None:
            raise ValueError(f"{text!r} is not a DNS host name")
        names.append(name)
    return names


def parse_address_list(value: Any) -> list[Address]:
    raw = value if isinstance(value, list | tuple) else str(value).split(",")
    return [parse_address(item) for item in raw if str(item).strip()]


# --- the settings ------------------------------------------------------------------------------


def _opt(default: Any, parse: Callable[[Any], Any], help: str) -> Any:
    metadata = {"parse": parse, "help": help}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # identity
    dc: str | None = _opt(None, parse_datacenter, "local datacenter (default: the agent's)")
    domain: str = _opt("consul", parse_domain, "Consul DNS domain")
    trust_domain: str | None = _opt(None, parse_domain, "mesh trust domain, <cluster-id>.consul")
    primary_dc: str | None = _opt(None, parse_datacenter, "primary datacenter")
    # data plane
    listen: Address = _opt(Address("0.0.0.0", 8443), parse_listen, "address to accept TLS on")
    expose_servers: bool = _opt(False, parse_bool, "route Consul server names (WAN federation)")
    servers: dict[str, Address] = _opt({}, parse_servers, "local servers, NODE=HOST:PORT")
    gateways: dict[str, list[Address]] = _opt(
        {}, parse_gateways, "remote gateways, DC[/PARTITION]=HOST:PORT"
    )
    services: dict[str, list[Address]] = _opt({}, parse_services, "local services, NAME=HOST:PORT")
    hello_timeout: float = _opt(10.0, parse_seconds, "seconds to receive the ClientHello")
    connect_timeout: float = _opt(5.0, parse_seconds, "seconds to connect to an upstream")
    idle_timeout: float | None = _opt(None, parse_optional_seconds, "idle seconds (off)")
    drain_timeout: float = _opt(30.0, parse_seconds, "seconds to drain on SIGTERM")
    max_hello_bytes: int = _opt(DEFAULT_MAX_HELLO_BYTES, parse_positive_int, "ClientHello cap")
    max_connections: int | None = _opt(
        None,
        parse_max_connections,
        "open connections per process (auto: what the open-file limit allows)",
    )
    pump: str = _opt("auto", choice("auto", "splice", "userspace"), "how bytes are moved")
    workers: int = _opt(0, parse_workers, "worker processes on the port (auto: one per usable CPU)")
    # faces
    admin: Address = _opt(Address("127.0.0.1", 19100), parse_listen, "admin/metrics address")
    admin_allowed_host: list[str] = _opt(
        [],
        parse_host_names,
        "a host name the admin port answers to, besides IP addresses and localhost",
    )
    access_log: bool = _opt(True, parse_bool, "one log line per connection")
    log_format: str = _opt("text", choice("text", "json"), "log format")
    log_level: str = _opt("info", choice("debug", "info", "warning", "error"), "log level")
    # control plane
    consul: str | None = _opt(None, str, "Consul agent HTTP address (CONSUL_HTTP_ADDR)")
    token_file: str | None = _opt(None, str, "file holding the ACL token")
    register: bool = _opt(False, parse_bool, "register this gateway in Consul")
    service_name: str = _opt("mesh-gateway", str, "service name to register")
    proxy_id: str | None = _opt(None, str, "service ID to register (default: the name)")
    address: Address | None = _opt(
        None, lambda v: parse_address(v, default_port=8443), "LAN address to advertise"
    )
    wan_address: Address | None = _opt(
        None, lambda v: parse_address(v, default_port=8443), "WAN address to advertise"
    )
    deregister_after_critical: str = _opt("6h", str, "DeregisterCriticalServiceAfter")
    primary_gateways: list[Address] = _opt([], parse_address_list, "primary DC gateways")
    primary_gateways_interval: float = _opt(30.0, parse_seconds, "re-resolve interval")

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        config: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Merge the layers; raises SettingsError naming the bad setting and the fix."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}

        if config is not None:
            path = Path(config)
            try:
                document = tomllib.loads(path.read_text())
            except OSError as exc:
                raise SettingsError(f"--config {path}: cannot read it ({exc.strerror})") from None
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"--config {path}: not valid TOML ({exc})") from None
            for key, raw in document.items():
                name = key.replace("-", "_")
                if name not in known:
                    raise SettingsError(
                        f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
                    )
                values[name] = _parse(known[name], raw, f"{path}: {key}")

        for name, spec in known.items():
            env_name = ENV_PREFIX + name.upper()
            if environ and env_name in environ:
                values[name] = _parse(spec, environ[env_name], env_name)

        for name, raw in (flags or {}).items():
            if raw is None or raw == () or raw == []:
                continue
            if name not in known:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _parse(known[name], raw, "--" + name.replace("_", "-"))

        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Rules that span several settings."""
        if self.dc is None and self.consul is None and self.register is False:
            raise SettingsError("--dc is required when meshgw does not ask a Consul agent")
        if self.dc is not None and self.dc in self.gateways:
            raise SettingsError(
                f"--gateway {self.dc}=...: {self.dc} is the local datacenter; give gateways of "
                "other datacenters only"
            )
        if self.primary_gateways and self.primary_dc is None:
            raise SettingsError(
                "--primary-gateway needs --primary-dc naming the primary datacenter"
            )

    @property
    def worker_count(self) -> int:
        return self.workers or available_cpus()

    def static_topology(self) -> TopologyPart:
        """What the settings themselves say about the federation."""

        def endpoint(address: Address) -> Endpoint:
            return Endpoint(address.host, address.port, source=Source.STATIC)

        return TopologyPart(
            source=Source.STATIC,
            datacenter=self.dc,
            domain=self.domain,
            trust_domain=self.trust_domain,
            primary_datacenter=self.primary_dc,
            servers={node: endpoint(a) for node, a in self.servers.items()},
            gateways={
                GatewayKey(*key.split("/")): tuple(endpoint(a) for a in addresses)
                for key, addresses in self.gateways.items()
            },
            services={
                ServiceKey(name): tuple(endpoint(a) for a in addresses)
                for name, addresses in self.services.items()
            },
        )

    @staticmethod
    def help_for(name: str) -> str:
        spec = {f.name: f for f in fields(Settings)}[name]
        return str(spec.metadata["help"])


def _parse(spec: Any, raw: Any, where: str) -> Any:
    try:
        return spec.metadata["parse"](raw)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def environ_settings() -> Mapping[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
