"""Where a demo federation lives: names, loopback addresses, ports, files and certificates.

Each datacenter gets its own 127.0.<k>.0/24 (Linux routes all of 127/8 to loopback), so that the
tables read like a real federation: dc2's gateways are 127.0.2.1, .2, ..., its servers
127.0.2.10, .11, ..., its agent 127.0.2.100. Servers, agents and gateways take Consul's
well-known ports (8300, 8500, 8443, admin 19100) when they are free; otherwise the kernel
picks. Where only 127.0.0.1 exists (other systems), every port is picked by the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from meshgw.tls.certs import create_ca, create_cert, write_ca, write_cert
from meshgw.wire.names import server_sni

DOMAIN = "consul"
PRIMARY_DC = "dc1"
SERVER_PORT = 8300  # Consul's server RPC port, the one gateways route server names to
GRPC_TLS_PORT = 8503  # Consul's gRPC TLS port, the one peers dial
AGENT_PORT = 8500  # Consul's HTTP API
GATEWAY_PORT = 8443
ADMIN_PORT = 19100
_GATEWAY_OFFSET = 1  # gw-i at 127.0.<k>.(1 + i)
_SERVER_OFFSET = 10  # node-i at 127.0.<k>.(10 + i)
_AGENT_OFFSET = 100  # the datacenter's agent at 127.0.<k>.100
_SERVICE_OFFSET = 200  # service instances (the peering demo's) at 127.0.<k>.(200 + i)
MAX_GATEWAYS_PER_DC = _SERVER_OFFSET - _GATEWAY_OFFSET
MAX_SERVERS_PER_DC = 50
MAX_DATACENTERS = 50


def datacenter_names(count: int) -> tuple[str, ...]:
    return tuple(f"dc{k}" for k in range(1, count + 1))


def spread_loopback_works() -> bool:
    """Whether addresses of 127/8 beyond 127.0.0.1 can be bound (true on Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.1.1", 0))
        except OSError:
            return False
    return True


def host_of(dc_index: int, offset: int, spread: bool) -> str:
    return f"127.0.{dc_index + 1}.{offset}" if spread else "127.0.0.1"


def gateway_host(dc_index: int, gateway_index: int, spread: bool) -> str:
    return host_of(dc_index, _GATEWAY_OFFSET + gateway_index, spread)


def server_host(dc_index: int, server_index: int, spread: bool) -> str:
    return host_of(dc_index, _SERVER_OFFSET + server_index, spread)


def agent_host(dc_index: int, spread: bool) -> str:
    return host_of(dc_index, _AGENT_OFFSET, spread)


def service_host(dc_index: int, instance_index: int, spread: bool) -> str:
    return host_of(dc_index, _SERVICE_OFFSET + instance_index, spread)


def free_port(host: str, preferred: int | None) -> int:
    """`preferred` if it can be bound on `host` now, else a port the kernel picks.

    The port is released again before the caller binds it: a small race a demo can live with (a
    gateway that then fails to bind is restarted on new ports).
    """
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # The same option the gateway's listener uses, so both see the same ports as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as error:
                if error.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return int(sock.getsockname()[1])
    raise OSError(errno.EADDRINUSE, f"no free port on {host}")


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One simulated Consul server: its identity, its address and its agent certificate."""

    node: str
    dc: str
    host: str
    cert: Path
    key: Path

    @property
    def member(self) -> str:
        """The WAN member name, `<node>.<dc>` (wanfed.SplitNodeName)."""
        return f"{self.node}.{self.dc}"

    @property
    def sni(self) -> str:
        return server_sni(self.dc, DOMAIN, self.node)


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    dc: str
    index: int
    host: str
    port: int
    admin_port: int
    config: Path
    log: Path

    @property
    def name(self) -> str:
        return f"{self.dc}/gw-{self.index}"

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def admin(self) -> str:
        return f"{self.host}:{self.admin_port}"

    @property
    def service_id(self) -> str:
        """Its ID in the agent: the gateways of a datacenter share one agent, so each needs its
        own (`consul connect envoy -proxy-id`)."""
        return f"mesh-gateway-{self.index}"


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    # Any server's certificate serves as a client certificate for the commands to try by hand.
    servers: dict[tuple[str, str], tuple[Path, Path]]


def make_pki(folder: Path, nodes: list[tuple[str, str]]) -> Pki:
    """A CA and one server certificate per (dc, node), written like `consul tls` writes them."""
    ca = create_ca(DOMAIN)
    ca_cert, _ = write_ca(ca, folder, DOMAIN)
    servers: dict[tuple[str, str], tuple[Path, Path]] = {}
    for dc, node in nodes:
        issued = create_cert(ca, "server", dc=dc, domain=DOMAIN, node=node)
        servers[(dc, node)] = write_cert(issued, folder, "server", dc, DOMAIN)
    return Pki(ca_cert, servers)


def check_dir(folder: Path) -> None:
    """The demo writes into an empty (or new) folder only: it never overwrites a user's files."""
    with contextlib.suppress(FileNotFoundError):
        if any(folder.iterdir()):
            raise ValueError(f"--dir {folder} is not empty: name a new or empty folder")
