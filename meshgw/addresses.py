"""HOST:PORT, the one grammar for addresses: IPv6 literals in brackets, host names canonical."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from meshgw.wire.names import normalize_host_name

_HOST_PORT = re.compile(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?")


def hostport(host: str, port: int) -> str:
    """`host:port`, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # an IP literal (canonical) or a canonical DNS name
    port: int

    def __str__(self) -> str:
        return hostport(self.host, self.port)


def parse_address(text: str, *, default_port: int | None = None, any_port: bool = False) -> Address:
    """HOST:PORT (IPv6 as [::1]:PORT); HOST alone when `default_port` is given. Port 0 only
    with `any_port` (the kernel picks one). ValueError says what is wrong."""
    text = text.strip()
    match = _HOST_PORT.fullmatch(text)
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
    if is_ip(host):
        return Address(str(ipaddress.ip_address(host)), port)
    name = normalize_host_name(host)
    if name is None:
        raise ValueError(f"{host!r} in {text!r} is neither an IP address nor a host name")
    return Address(name, port)
