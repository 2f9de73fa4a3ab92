"""One typed Settings value, and the one place where settings are declared.

Every setting has one name: the field `hello_timeout` is the TOML key `hello_timeout` (or
`hello-timeout`), the variable MESHGW_HELLO_TIMEOUT and the flag --hello-timeout; repeatable
settings are singular (--server, `server`, MESHGW_SERVER). Each field carries its parser,
help, default and whether a reload can change it; the command line is generated from them
(cli.py), so defaults and choices are written here only.

Layers, lowest first: defaults < TOML file (`--config`, MESHGW_CONFIG) < MESHGW_* environment
< flags. Every value is parsed by the same function whatever layer it comes from, and every
error names the setting where it was given (flag, variable or file key) and how to fix it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from meshgw.addresses import Address, is_ip, parse_address
from meshgw.cpus import available_cpus
from meshgw.dataplane import PUMP_MODES
from meshgw.durations import go_duration, parse_duration
from meshgw.topology import (
    DEFAULT_PARTITION,
    ClusterSettings,
    Endpoint,
    GatewayKey,
    Peering,
    PeerRoute,
    ServiceKey,
    Source,
    TopologyPart,
)
from meshgw.wire.clienthello import DEFAULT_MAX_HELLO_BYTES
from meshgw.wire.names import (
    PeeredServiceName,
    PeeringServerName,
    is_valid_datacenter,
    is_valid_label,
    is_valid_node_name,
    normalize_host_name,
    parse_sni,
    peered_service_sni,
)

ENV_PREFIX = "MESHGW_"
# Variables under this prefix belong to meshgw's own plumbing (worker processes, the bench),
# not to settings.
ENV_INTERNAL_PREFIX = "MESHGW_X_"
CONFIG_ENV = "MESHGW_CONFIG"
CONSUL_ADDR_ENV = "CONSUL_HTTP_ADDR"
DEFAULT_GATEWAY_PORT = 8443  # Consul's default for a mesh gateway (`consul connect envoy`)
# The peer label of a --peer-server or --peer-import given without its peering's name.
UNNAMED_PEER = "unnamed"
DEFAULT_CONNECT_TIMEOUT = 5.0  # Consul's, when neither settings nor Proxy.Config say
# A ClientHello with post-quantum key shares takes about 1.8 KB; a cap below this refuses
# real clients. Above the maximum, a hello is an attack, not a client.
MIN_HELLO_BYTES = 2048
MAX_HELLO_BYTES = 1 << 20
MAX_TIMEOUT = 3600.0
MAX_WORKERS = 1024
# Consul's trust domain is always <cluster-id>.consul, the cluster ID a UUID.
_TRUST_DOMAIN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.consul")


class SettingsError(ValueError):
    """A setting a user gave is wrong; the message names it and says how to fix it."""


# --- value parsers: each takes the raw value (str from flags/env, or a TOML value) -------------


def parse_listen(value: Any) -> Address:
    """An address to bind: an IP literal (or localhost); port 0 asks the kernel for one."""
    address = parse_address(str(value), any_port=True)
    if not is_ip(address.host) and address.host != "localhost":
        raise ValueError(f"listen on an IP address, not {address.host!r}")
    return address


def parse_gateway_address(value: Any) -> Address:
    """An address to advertise; without a port, Consul's gateway port 8443."""
    return parse_address(str(value), default_port=DEFAULT_GATEWAY_PORT)


def duration_in(low: float, high: float, *, above_low: bool = False) -> Callable[[Any], float]:
    """A duration from `low` (excluded with `above_low`) to `high` seconds."""
    if above_low:
        bounds = f"more than {go_duration(low) if low else 0} and at most {go_duration(high)}"
    else:
        bounds = f"from {go_duration(low) if low else 0} to {go_duration(high)}"

    def parse(value: Any) -> float:
        seconds = parse_duration(value if isinstance(value, int | float) else str(value))
        if seconds > high or seconds < low or (above_low and seconds == low):
            raise ValueError(f"{value!r} is out of range: give {bounds}")
        return seconds

    return parse


def parse_optional_seconds(value: Any) -> float | None:
    """A duration, or off ("off", "none", 0): no timeout at all."""
    if str(value).strip().lower() in {"", "0", "off", "none"}:
        return None
    return _TIMEOUT(value)


def int_between(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range {low}-{high}")
        return number

    return parse


def auto_or(parse: Callable[[Any], int]) -> Callable[[Any], int | None]:
    """ "auto" (None: decided at start) or a number."""

    def parse_or_auto(value: Any) -> int | None:
        return None if str(value).strip().lower() == "auto" else parse(value)

    return parse_or_auto


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
    name = str(value).strip()
    if not is_valid_datacenter(name):
        raise ValueError(
            f"{value!r} is not a Consul datacenter name: lower-case letters, digits, '-' and "
            "'_' only (no dots)"
        )
    return name


def parse_domain(value: Any) -> str:
    name = normalize_host_name(str(value).strip())
    if name is None:
        raise ValueError(f"{value!r} is not a DNS domain")
    return name


def parse_trust_domain(value: Any) -> str:
    text = str(value).strip().rstrip(".").lower()
    if not _TRUST_DOMAIN.fullmatch(text):
        raise ValueError(
            f"{value!r} is not a Consul trust domain: it is <cluster-id>.consul, as "
            "`curl $CONSUL_HTTP_ADDR/v1/connect/ca/roots` shows in TrustDomain"
        )
    return text


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return text

    parse.choices = allowed  # type: ignore[attr-defined]
    return parse


def _items(value: Any) -> list[str]:
    """A list from a repeated flag, a comma-separated variable or a TOML array."""
    raw = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item).strip() for item in raw if str(item).strip()]


def _pairs(value: Any) -> list[tuple[str, str]]:
    """NAME=HOST:PORT items from a flag list, a comma-separated variable or a TOML table."""
    if isinstance(value, Mapping):
        return [
            (str(key), str(one))
            for key, item in value.items()
            for one in (item if isinstance(item, list) else [item])
        ]
    pairs = []
    for text in _items(value):
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
    """NAME=HOST:PORT, or SUBSET.NAME=HOST:PORT for an instance of a service-resolver subset."""
    services: dict[str, list[Address]] = {}
    for name, address in _pairs(value):
        labels = name.lower().split(".")
        if len(labels) > 2 or not all(is_valid_label(label) for label in labels):
            raise ValueError(f"{name!r} is not a service name (one DNS label) or SUBSET.SERVICE")
        services.setdefault(name.lower(), []).append(parse_address(address))
    return services


def _peer_and_name(key: str, kind: type, grammar: str) -> str:
    """[PEER/]NAME, checked: the peering's name (as `consul peering` calls it) is optional."""
    peer, _, name = key.lower().rpartition("/")
    if peer and not is_valid_label(peer):
        raise ValueError(f"{peer!r} is not a peering name (one DNS label)")
    if not isinstance(parse_sni(name), kind):
        raise ValueError(f"{name!r} is not {grammar}")
    return f"{peer}/{name}" if peer else name


def split_peer(key: str) -> tuple[str, str]:
    """The peering's name (UNNAMED_PEER when not given) and the SNI, of a [PEER/]NAME key."""
    peer, _, name = key.rpartition("/")
    return peer or UNNAMED_PEER, name


def parse_peer_servers(value: Any) -> dict[str, list[Address]]:
    """[PEER/]PEER-SERVER-NAME=HOST:PORT: where a peering's PeerServerName is dialled."""
    found: dict[str, list[Address]] = {}
    for key, address in _pairs(value):
        grammar = "a peering's server name (server.<dc>.peering.<trust-domain>)"
        name = _peer_and_name(key, PeeringServerName, grammar)
        found.setdefault(name, []).append(parse_address(address))
    return found


def parse_peer_exports(value: Any) -> dict[str, list[str]]:
    """SERVICE=PEER[/PROTOCOL]: a local service exported to a peer; http, http2 and grpc ones
    are refused by name (a gateway that never terminates TLS cannot serve them)."""
    found: dict[str, list[str]] = {}
    for service, target in _pairs(value):
        peer, _, protocol = target.partition("/")
        protocol = protocol.lower() or "tcp"
        if not is_valid_label(service.lower()) or not is_valid_label(peer.lower()):
            raise ValueError(f"{service}={target!r} is not SERVICE=PEER[/PROTOCOL]")
        if protocol not in {"tcp", "http", "http2", "grpc"}:
            raise ValueError(f"{protocol!r} is not one of tcp, http, http2, grpc")
        found.setdefault(service.lower(), []).append(f"{peer.lower()}/{protocol}")
    return found


def parse_peer_imports(value: Any) -> dict[str, list[Address]]:
    """[PEER/]SNI=HOST:PORT: an imported service's name (its PeerMeta.SNI) and the exporting
    peer's gateway."""
    found: dict[str, list[Address]] = {}
    for key, address in _pairs(value):
        grammar = "a peered service name (<svc>.<ns>.<ap>.<peer>.external.<td>)"
        name = _peer_and_name(key, PeeredServiceName, grammar)
        found.setdefault(name, []).append(parse_address(address))
    return found


def parse_addresses(value: Any) -> list[Address]:
    return [parse_address(item) for item in _items(value)]


def parse_host_names(value: Any) -> list[str]:
    names = []
    for text in _items(value):
        name = normalize_host_name(text)
        if name is None:
            raise ValueError(f"{text!r} is not a DNS host name")
        names.append(name)
    return names


def parse_networks(value: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for text in _items(value):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an address range such as 10.0.0.0/8") from None
    return networks


def parse_name(value: Any) -> str:
    """A Consul service name or ID: no spaces, no slashes (they end up in URL paths)."""
    text = str(value).strip()
    if not text or any(c.isspace() or c == "/" for c in text):
        raise ValueError(f"{value!r} is not a service name or ID: no spaces or '/'")
    return text


def parse_path(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("an empty path")
    return text


# --- the settings ------------------------------------------------------------------------------


def setting(
    default: Any,
    parse: Callable[[Any], Any],
    help: str,
    *,
    metavar: str | None = None,
    restart: bool = False,
    show: str | None = None,
) -> Any:
    """Declare one setting. `restart`: read once at start, so a reload cannot change it.
    `show`: how the default reads in --help, when str(default) would not say it well."""
    metadata = {"parse": parse, "help": help, "metavar": metavar, "restart": restart}
    metadata["show"] = show if show is not None else _shown(default)
    if isinstance(default, dict | list):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _shown(default: Any) -> str | None:
    if default is None or default == [] or default == {}:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return go_duration(default)
    return str(default)


_TIMEOUT = duration_in(0, MAX_TIMEOUT, above_low=True)
_DELAY = duration_in(0, MAX_TIMEOUT)


@dataclass(frozen=True)
class _Routing:
    """What this gateway routes: its place in the federation, and the routes settings give."""

    dc: str | None = setting(
        None, parse_datacenter, "Local datacenter.", metavar="DC", show="the agent's"
    )
    domain: str = setting("consul", parse_domain, "Consul's DNS domain.", metavar="DOMAIN")
    trust_domain: str | None = setting(
        None,
        parse_trust_domain,
        "Mesh trust domain, <cluster-id>.consul.",
        metavar="TD",
        show="Consul's CA roots",
    )
    primary_dc: str | None = setting(
        None, parse_datacenter, "Primary datacenter.", metavar="DC", restart=True
    )
    expose_servers: bool = setting(False, parse_bool, "Route Consul server names (WAN federation).")
    server: dict[str, Address] = setting(
        {}, parse_servers, "A local Consul server.", metavar="NODE=HOST:PORT"
    )
    gateway: dict[str, list[Address]] = setting(
        {}, parse_gateways, "A remote datacenter's mesh gateway.", metavar="DC[/AP]=HOST:PORT"
    )
    service: dict[str, list[Address]] = setting(
        {}, parse_services, "A local mesh service instance.", metavar="NAME=HOST:PORT"
    )
    peering_server: list[Address] = setting(
        [],
        parse_addresses,
        "A local server's gRPC TLS address peers dial (routes server.<dc>.peering.<td>).",
        metavar="HOST:PORT",
    )
    peer_server: dict[str, list[Address]] = setting(
        {},
        parse_peer_servers,
        "Where a peering's server name is dialled; PEER names the peering in metrics and logs.",
        metavar="[PEER/]NAME=HOST:PORT",
    )
    peer_export: dict[str, list[str]] = setting(
        {},
        parse_peer_exports,
        "A local service exported to a peer (--service gives its instances).",
        metavar="SERVICE=PEER[/PROTOCOL]",
    )
    peer_import: dict[str, list[Address]] = setting(
        {},
        parse_peer_imports,
        "An imported service's name and the exporting peer's gateway; PEER names the peering.",
        metavar="[PEER/]SNI=HOST:PORT",
    )


@dataclass(frozen=True)
class _DataPlane:
    """How connections are served."""

    listen: Address = setting(
        Address("0.0.0.0", DEFAULT_GATEWAY_PORT),
        parse_listen,
        "Address to accept TLS on.",
        metavar="HOST:PORT",
        restart=True,
    )
    hello_timeout: float = setting(
        10.0, _TIMEOUT, "Time to receive the whole ClientHello.", metavar="DURATION", restart=True
    )
    connect_timeout: float | None = setting(
        None,
        _TIMEOUT,
        "Time to connect to one upstream; a service-resolver's ConnectTimeout wins for its "
        "service.",
        metavar="DURATION",
        show="Consul's connect_timeout_ms, else 5s",
    )
    idle_timeout: float | None = setting(
        None,
        parse_optional_seconds,
        "Close connections idle this long.",
        metavar="DURATION",
        restart=True,
        show="off",
    )
    drain_delay: float = setting(
        5.0,
        _DELAY,
        "SIGTERM: keep accepting this long after deregistering, so that sidecars learn of it.",
        metavar="DURATION",
    )
    drain_timeout: float = setting(
        30.0,
        _DELAY,
        "SIGTERM: then let open connections finish this long.",
        metavar="DURATION",
    )
    max_hello_bytes: int = setting(
        DEFAULT_MAX_HELLO_BYTES,
        int_between(MIN_HELLO_BYTES, MAX_HELLO_BYTES),
        "Largest ClientHello accepted.",
        metavar="BYTES",
        restart=True,
    )
    max_connections: int | None = setting(
        None,
        auto_or(int_between(1, 1 << 24)),
        "Open connections per process; auto: what the open-file limit allows.",
        metavar="N|auto",
        restart=True,
        show="auto",
    )
    pump: str = setting(
        "auto",
        choice(*PUMP_MODES),
        "How bytes move: auto (userspace, splice for bulk, kernel tunnels for busy long-lived"
        " connections), splice, userspace, or sockmap (a kernel tunnel for every connection).",
        restart=True,
    )
    workers: int | None = setting(
        None,
        auto_or(int_between(1, MAX_WORKERS)),
        "Processes on the port; auto: one per CPU this process may use.",
        metavar="N|auto",
        restart=True,
        show="auto",
    )
    proxy_protocol: str = setting(
        "off",
        choice("off", "accept"),
        "Read a PROXY protocol v1/v2 header from a load balancer before the ClientHello.",
        restart=True,
    )
    proxy_protocol_from: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = setting(
        [],
        parse_networks,
        "An address range allowed to send a PROXY header (anything else is refused).",
        metavar="CIDR",
        restart=True,
    )


@dataclass(frozen=True)
class _Faces:
    """What operators watch: the admin port and the logs."""

    admin: Address = setting(
        Address("127.0.0.1", 19100),
        parse_listen,
        "Address of /metrics, /healthz, /ready, /v1/routes, /v1/topology.",
        metavar="HOST:PORT",
        restart=True,
    )
    admin_allowed_host: list[str] = setting(
        [],
        parse_host_names,
        "A host name the admin port answers to, besides IP addresses and localhost.",
        metavar="NAME",
        restart=True,
    )
    access_log: bool = setting(True, parse_bool, "One log line per connection.", restart=True)
    log_format: str = setting("text", choice("text", "json"), "Log format.", restart=True)
    log_level: str = setting(
        "info", choice("debug", "info", "warning", "error"), "Log level.", restart=True
    )


@dataclass(frozen=True)
class _ControlPlane:
    """Consul: where the agent is, what to register, how to bootstrap."""

    consul: str | None = setting(
        None,
        str,
        "Consul agent HTTP address; CONSUL_HTTP_ADDR alone turns discovery on too.",
        metavar="URL",
        restart=True,
    )
    token_file: str | None = setting(
        None,
        parse_path,
        "File holding the ACL token (else CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE).",
        metavar="PATH",
        restart=True,
    )
    ca_file: str | None = setting(
        None,
        parse_path,
        "CA of the agent's HTTPS certificate (else CONSUL_CACERT).",
        metavar="PATH",
        restart=True,
    )
    register: bool = setting(False, parse_bool, "Register this gateway in Consul.", restart=True)
    service_name: str = setting(
        "mesh-gateway", parse_name, "Service name to register.", metavar="NAME"
    )
    proxy_id: str | None = setting(
        None, parse_name, "Service ID to register.", metavar="ID", show="the service name"
    )
    address: Address | None = setting(
        None,
        parse_gateway_address,
        "LAN address to advertise.",
        metavar="HOST[:PORT]",
        show="what --listen binds",
    )
    wan_address: Address | None = setting(
        None,
        parse_gateway_address,
        "WAN address other datacenters dial.",
        metavar="HOST[:PORT]",
    )
    deregister_after_critical: float = setting(
        6 * 3600.0,
        duration_in(60, 10**7),  # Consul's minimum is a minute
        "Consul removes the registration after its check fails this long.",
        metavar="DURATION",
    )
    primary_gateway: list[Address] = setting(
        [],
        parse_addresses,
        "A gateway of the primary datacenter, to bootstrap by.",
        metavar="HOST:PORT",
        restart=True,
    )
    primary_gateways_interval: float = setting(
        30.0,
        duration_in(1, MAX_TIMEOUT),  # Consul's minimum too
        "Re-resolve primary gateway names this often.",
        metavar="DURATION",
        restart=True,
    )
    service_watch_limit: int = setting(
        256,
        int_between(1, 100_000),
        "Local services watched at once; a larger catalog is watched on demand.",
        metavar="N",
        restart=True,
    )


@dataclass(frozen=True)
class Settings(_ControlPlane, _Faces, _DataPlane, _Routing):
    """Every setting, grouped by what it is about (the bases); a field is a setting (see
    `setting`), and its declaration order is the order of `meshgw run --help`."""

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        config: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Merge the layers; raises SettingsError naming the bad setting and the fix.

        `environ` is the whole environment (default: none at all); MESHGW_* variables are
        settings, and CONSUL_HTTP_ADDR turns Consul discovery on as it does for Consul's tools.
        """
        env = environ or {}
        values: dict[str, Any] = {}
        config = config if config is not None else env.get(CONFIG_ENV)
        if config:
            values.update(_from_file(Path(config)))
        values.update(_from_environment(env))
        for name, raw in (flags or {}).items():
            if raw is None or raw == () or raw == []:
                continue
            spec = _SPECS.get(name)
            if spec is None:
                raise SettingsError(f"unknown setting {name!r}{_closest(name)}")
            values[name] = _parse(spec, raw, _flag(name))
        if "consul" not in values and env.get(CONSUL_ADDR_ENV):
            values["consul"] = env[CONSUL_ADDR_ENV]
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Rules that span several settings."""
        if self.dc is None and self.consul is None and not self.register:
            raise SettingsError(
                "--dc is required when meshgw does not ask a Consul agent "
                f"(--consul, or {CONSUL_ADDR_ENV})"
            )
        if self.dc is not None and self.dc in self.gateway:
            raise SettingsError(
                f"--gateway {self.dc}=...: {self.dc} is the local datacenter; give gateways of "
                "other datacenters only"
            )
        if self.primary_gateway and self.primary_dc is None:
            raise SettingsError(
                "--primary-gateway needs --primary-dc naming the primary datacenter"
            )
        if (self.peer_export or self.peering_server) and self.trust_domain is None:
            raise SettingsError(
                "--peer-export and --peering-server name this cluster's trust domain: set "
                "--trust-domain too"
            )
        if self.proxy_protocol == "accept" and not self.proxy_protocol_from:
            raise SettingsError(
                "--proxy-protocol accept needs --proxy-protocol-from CIDR: the load balancers' "
                "addresses (a header from anyone else would let them pick their own address)"
            )

    def warnings(self) -> list[str]:
        """Settings that load but leave something unroutable: said at start and in /ready."""
        found = []
        if self.server and not self.expose_servers:
            found.append(
                "--server is given but --expose-servers is off: server names are not routed"
            )
        if self.service and self.trust_domain is None and self.consul is None:
            found.append(
                "--service is given without --trust-domain (or Consul to learn it): "
                "mesh service names are not routed"
            )
        if self.register and self.expose_servers and self.wan_address is None:
            found.append(
                "--expose-servers is registered without --wan-address: other datacenters "
                "will dial this gateway at its LAN address"
            )
        return found

    def needing_restart(self, new: Settings) -> list[str]:
        """The settings `new` changes that only a restart applies."""
        return [
            f.name
            for f in fields(self)
            if f.metadata["restart"] and getattr(self, f.name) != getattr(new, f.name)
        ]

    @property
    def worker_count(self) -> int:
        return self.workers or available_cpus()

    def static_topology(self) -> TopologyPart:
        """What the settings themselves say about the federation and the peerings."""
        services = {
            _service_key(name): _endpoints(addresses) for name, addresses in self.service.items()
        }
        return TopologyPart(
            source=Source.STATIC,
            datacenter=self.dc,
            domain=self.domain,
            trust_domain=self.trust_domain,
            primary_datacenter=self.primary_dc,
            servers={node: _endpoint(a) for node, a in self.server.items()},
            gateways={
                GatewayKey(*key.split("/")): _endpoints(addresses)
                for key, addresses in self.gateway.items()
            },
            services=services,
            # Given here, it wins over Consul's Proxy.Config (this part comes later).
            cluster_defaults=ClusterSettings(connect_timeout=self.connect_timeout),
            peering=self._static_peering(services),
        )

    def _static_peering(self, services: Mapping[ServiceKey, tuple[Endpoint, ...]]) -> Peering:
        exports: dict[str, PeerRoute] = {}
        refused: set[str] = set()
        for service, targets in self.peer_export.items():
            for target in targets:
                peer, _, protocol = target.partition("/")
                assert self.trust_domain is not None  # check() says so
                sni = peered_service_sni(service, "default", "default", peer, self.trust_domain)
                if protocol in {"http", "http2", "grpc"}:
                    refused.add(sni)
                else:
                    exports[sni] = PeerRoute(peer, services.get(ServiceKey(service), ()))
        return Peering(
            local_servers=_endpoints(self.peering_server),
            remote_servers={
                split_peer(key)[1]: PeerRoute(split_peer(key)[0], _endpoints(addresses))
                for key, addresses in self.peer_server.items()
            },
            exports=exports,
            exports_l7=frozenset(refused),
            imports={
                split_peer(key)[1]: PeerRoute(split_peer(key)[0], _endpoints(addresses))
                for key, addresses in self.peer_import.items()
            },
        )


def _endpoint(address: Address) -> Endpoint:
    return Endpoint(address.host, address.port, source=Source.STATIC)


def _endpoints(addresses: list[Address]) -> tuple[Endpoint, ...]:
    return tuple(_endpoint(a) for a in addresses)


def _service_key(name: str) -> ServiceKey:
    subset, _, service = name.rpartition(".")
    return ServiceKey(service, subset=subset or None)


_SPECS = {f.name: f for f in fields(Settings)}
# The settings by what they are about, in the order docs/settings.md gives them.
GROUPS: tuple[tuple[str, type], ...] = (
    ("Routing", _Routing),
    ("Data plane", _DataPlane),
    ("Admin and logs", _Faces),
    ("Consul", _ControlPlane),
)


def specs() -> list[Any]:
    """Every setting's field, in declaration order (the CLI is built from them)."""
    return list(_SPECS.values())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, list(_SPECS), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _parse(spec: Any, raw: Any, where: str) -> Any:
    try:
        return spec.metadata["parse"](raw)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"--config {path}: not valid TOML ({exc})") from None
    values = {}
    for key, raw in document.items():
        name = key.replace("-", "_")
        if name not in _SPECS:
            hint = _closest(name).replace("'", "").replace("did you mean ", "did you mean key ")
            raise SettingsError(f"{path}: {key!r} is not a setting{hint}")
        values[name] = _parse(_SPECS[name], raw, f"{path}: {key}")
    return values


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for variable, raw in env.items():
        if not variable.startswith(ENV_PREFIX) or variable.startswith(ENV_INTERNAL_PREFIX):
            continue
        if variable == CONFIG_ENV:
            continue
        name = variable.removeprefix(ENV_PREFIX).lower()
        if name not in _SPECS:
            match = difflib.get_close_matches(name, list(_SPECS), n=1, cutoff=0.6)
            hint = f"; did you mean {ENV_PREFIX}{match[0].upper()}?" if match else ""
            raise SettingsError(f"{variable} is not a setting{hint}")
        values[name] = _parse(_SPECS[name], raw, variable)
    return values


def process_environment() -> Mapping[str, str]:
    return os.environ
