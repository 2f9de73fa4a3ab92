"""Consul's SNI grammar (docs/consul.md#sni-names): parse and format, both ways.

Two families of names cross a mesh gateway:

* server names, built from the agent DNS ``domain`` (``tlsutil.Configurator.ServerSNI``)::

      server.<dc>.<domain>                  any server of <dc>
      <node>.server.<dc>.<domain>           one server

* mesh (Connect) names, built from the CA trust domain ``<cluster-id>.consul``
  (``agent/connect/sni.go``)::

      <dc>.internal.<td>                                    gateway, default partition
      <ap>.<dc>.internal-v1.<td>                            gateway, other partition
      [<subset>.]<svc>.<ns>.<dc>.internal.<td>              service, default partition
      [<subset>.]<svc>.<ns>.<ap>.<dc>.internal-v1.<td>      service, other partition
      <svc>.default.<dc>.query.<td>                         prepared query
      <svc>.<ns>.<ap>.<peer>.external.<td>                  peered service
      server.<dc>.peering.<td>                              peering server

Every name handled here is in canonical form: ASCII, lower-case, no trailing dot. TLS compares
host names case-insensitively (RFC 6066 §3), so meshgw lower-cases once, at the edge
(:func:`normalize_host_name`), and compares exact strings everywhere else.

This module is also the one home of host-name validation; ``clienthello.py`` imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_NAMESPACE",
    "DEFAULT_PARTITION",
    "MAX_HOST_NAME_LENGTH",
    "MAX_LABEL_LENGTH",
    "GatewayName",
    "PeeredServiceName",
    "PeeringServerName",
    "QueryName",
    "ServerName",
    "ServiceName",
    "SniName",
    "gateway_sni",
    "is_valid_datacenter",
    "is_valid_label",
    "is_valid_node_name",
    "normalize_host_name",
    "parse_sni",
    "peered_service_sni",
    "peering_server_sni",
    "query_sni",
    "server_sni",
    "service_sni",
]

DEFAULT_DOMAIN: Final = "consul"
DEFAULT_NAMESPACE: Final = "default"
DEFAULT_PARTITION: Final = "default"
MAX_HOST_NAME_LENGTH: Final = 253  # RFC 1035 §2.3.4, without the trailing dot
MAX_LABEL_LENGTH: Final = 63

# The marker labels of the mesh forms, as spelled by agent/connect/sni.go.
_INTERNAL: Final = "internal"
_INTERNAL_V1: Final = "internal-v1"
_QUERY: Final = "query"
_EXTERNAL: Final = "external"
_PEERING: Final = "peering"
_SERVER: Final = "server"

# Host-name grammar. Letters, digits and hyphen per RFC 1123, plus underscore: Consul accepts
# underscores in datacenter names (`^[a-z0-9_-]+$`, agent/config/builder.go) and in node and
# service names (a DNS warning only), and they all end up in SNI. Hyphen position is not
# policed (RFC 952's "no leading/trailing hyphen"): Consul does not enforce it either, and the
# point of this check is to keep odd bytes out of routing and logs, not to judge style.
# Upper case is absent on purpose: the pattern runs on the lower-cased name.
_LABEL_RE: Final = re.compile(r"[a-z0-9_-]{1,63}")
_HOST_RE: Final = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_DATACENTER_RE: Final = re.compile(r"[a-z0-9_-]{1,63}")
_NODE_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")


def normalize_host_name(name: str) -> str | None:
    """Return ``name`` as a canonical DNS host name, or ``None`` if it is not one.

    Canonical means lower-case with one trailing dot dropped. Refused: empty names, non-ASCII
    (IDNs travel as ``xn--`` A-labels, so a raw U+00E9 is an error; the ASCII test also runs
    before lower-casing because ``str.lower`` maps e.g. KELVIN SIGN to ``k``), labels outside
    1..63 characters of ``[a-z0-9_-]``, names over 253 characters, and IP literals: a name whose
    last label is all digits is an IPv4 address (or a fragment of one), never a host name
    (RFC 1123 §2.1, RFC 3696 §2); IPv6 literals fail on ``:``.
    """
    if not name.isascii():
        return None
    if name.endswith("."):
        name = name[:-1]
    if len(name) > MAX_HOST_NAME_LENGTH:
        return None
    name = name.lower()
    if _HOST_RE.fullmatch(name) is None:
        return None
    if name.rpartition(".")[2].isdigit():
        return None
    return name


def is_valid_label(label: str) -> bool:
    """One canonical DNS label: 1..63 characters of ``[a-z0-9_-]``, no dot."""
    return label.isascii() and _LABEL_RE.fullmatch(label) is not None


def is_valid_datacenter(name: str) -> bool:
    """A Consul datacenter name that can appear in SNI.

    Consul itself requires ``^[a-z0-9_-]+$`` (agent/config/builder.go); the 63-character cap is
    the DNS label limit, since the datacenter is one label of every federation SNI, and wanfed's
    ``SplitNodeName`` needs it dot-free.
    """
    return name.isascii() and _DATACENTER_RE.fullmatch(name) is not None


def is_valid_node_name(name: str) -> bool:
    """A Consul server node name usable across a wanfed gateway.

    One DNS label: wanfed joins member names as ``<node>.<dc>`` and ``SplitNodeName`` needs
    exactly one dot, so no dots (and no ``/``, which the character class already excludes).
    Upper case is accepted because Consul accepts it; the SNI built from it is lower-cased.
    """
    return name.isascii() and _NODE_RE.fullmatch(name) is not None


# --------------------------------------------------------------------------------------------
# Parsed values. Each knows its canonical name (``.sni``, also ``str()``).


@dataclass(frozen=True, slots=True)
class ServerName:
    """``server.<dc>.<domain>`` (node is None: any server) or ``<node>.server.<dc>.<domain>``."""

    node: str | None
    datacenter: str
    domain: str = DEFAULT_DOMAIN

    @property
    def sni(self) -> str:
        if self.node is None:
            return f"{_SERVER}.{self.datacenter}.{self.domain}"
        return f"{self.node}.{_SERVER}.{self.datacenter}.{self.domain}"

    def __str__(self) -> str:
        return self.sni


@dataclass(frozen=True, slots=True)
class ServiceName:
    """A mesh service: ``.internal.`` in the default partition, ``.internal-v1.`` otherwise."""

    service: str
    namespace: str
    partition: str
    datacenter: str
    trust_domain: str
    subset: str | None = None

    @property
    def sni(self) -> str:
        head = f"{self.subset}." if self.subset else ""
        if self.partition == DEFAULT_PARTITION:
            tail = f"{self.datacenter}.{_INTERNAL}.{self.trust_domain}"
        else:
            tail = f"{self.partition}.{self.datacenter}.{_INTERNAL_V1}.{self.trust_domain}"
        return f"{head}{self.service}.{self.namespace}.{tail}"

    def __str__(self) -> str:
        return self.sni


@dataclass(frozen=True, slots=True)
class GatewayName:
    """All of a datacenter (partition): the cluster name a remote gateway answers for."""

    datacenter: str
    partition: str
    trust_domain: str

    @property
    def sni(self) -> str:
        if self.partition == DEFAULT_PARTITION:
            return f"{self.datacenter}.{_INTERNAL}.{self.trust_domain}"
        return f"{self.partition}.{self.datacenter}.{_INTERNAL_V1}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.sni


@dataclass(frozen=True, slots=True)
class QueryName:
    """``<svc>.default.<dc>.query.<td>``: a prepared-query target."""

    service: str
    datacenter: str
    trust_domain: str

    @property
    def sni(self) -> str:
        return f"{self.service}.{DEFAULT_NAMESPACE}.{self.datacenter}.{_QUERY}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.sni


@dataclass(frozen=True, slots=True)
class PeeringServerName:
    """``server.<dc>.peering.<td>``: the servers of a cluster, as a peer dials them."""

    datacenter: str
    trust_domain: str

    @property
    def sni(self) -> str:
        return f"{_SERVER}.{self.datacenter}.{_PEERING}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.sni


@dataclass(frozen=True, slots=True)
class PeeredServiceName:
    """``<svc>.<ns>.<ap>.<peer>.external.<td>``: a service imported from a peer."""

    service: str
    namespace: str
    partition: str
    peer: str
    trust_domain: str

    @property
    def sni(self) -> str:
        return (
            f"{self.service}.{self.namespace}.{self.partition}.{self.peer}"
            f".{_EXTERNAL}.{self.trust_domain}"
        )

    def __str__(self) -> str:
        return self.sni


SniName = ServerName | ServiceName | GatewayName | QueryName | PeeringServerName | PeeredServiceName


# --------------------------------------------------------------------------------------------
# Formatting. Inputs come from settings and from Consul's catalog: they are checked here, once,
# so a table built from them can only hold names that a ClientHello can match.


def _label(field: str, value: str) -> str:
    low = value.lower()
    if not is_valid_label(low):
        raise ValueError(
            f"{field} {value!r} cannot be part of an SNI name: it must be one DNS label "
            f"of 1-63 letters, digits, '-' or '_'"
        )
    return low


def _domain(field: str, value: str) -> str:
    norm = normalize_host_name(value)
    if norm is None:
        raise ValueError(
            f"{field} {value!r} is not a valid DNS name: use dot-separated labels of "
            f"letters, digits, '-' or '_' (e.g. 'consul' or '<cluster-id>.consul')"
        )
    return norm


def server_sni(dc: str, domain: str = DEFAULT_DOMAIN, node: str | None = None) -> str:
    """``ServerSNI``: ``server.<dc>.<domain>`` for ``node`` None, ``""`` or ``"*"``, else the
    node's own name. The domain loses a trailing dot, as in Consul."""
    node_label = None if node is None or node in ("", "*") else _label("node name", node)
    return ServerName(node_label, _label("datacenter", dc), _domain("domain", domain)).sni


def service_sni(
    service: str,
    namespace: str,
    partition: str,
    dc: str,
    trust_domain: str,
    subset: str | None = None,
) -> str:
    """``ServiceSNI``; an empty namespace or partition means ``default``."""
    return ServiceName(
        service=_label("service", service),
        namespace=_label("namespace", namespace or DEFAULT_NAMESPACE),
        partition=_label("partition", partition or DEFAULT_PARTITION),
        datacenter=_label("datacenter", dc),
        trust_domain=_domain("trust domain", trust_domain),
        subset=_label("subset", subset) if subset else None,
    ).sni


def gateway_sni(dc: str, trust_domain: str, partition: str = DEFAULT_PARTITION) -> str:
    """``GatewaySNI`` (``DatacenterSNI`` for the default partition)."""
    return GatewayName(
        datacenter=_label("datacenter", dc),
        partition=_label("partition", partition or DEFAULT_PARTITION),
        trust_domain=_domain("trust domain", trust_domain),
    ).sni


def query_sni(service: str, dc: str, trust_domain: str) -> str:
    """``QuerySNI``."""
    return QueryName(
        _label("service", service), _label("datacenter", dc), _domain("trust domain", trust_domain)
    ).sni


def peered_service_sni(
    service: str, namespace: str, partition: str, peer: str, trust_domain: str
) -> str:
    """``PeeredServiceSNI``; an empty namespace or partition means ``default``."""
    return PeeredServiceName(
        service=_label("service", service),
        namespace=_label("namespace", namespace or DEFAULT_NAMESPACE),
        partition=_label("partition", partition or DEFAULT_PARTITION),
        peer=_label("peer", peer),
        trust_domain=_domain("trust domain", trust_domain),
    ).sni


def peering_server_sni(dc: str, trust_domain: str) -> str:
    """``PeeringServerSAN``."""
    return PeeringServerName(_label("datacenter", dc), _domain("trust domain", trust_domain)).sni


# --------------------------------------------------------------------------------------------
# Parsing.

_MARKERS: Final = frozenset({_INTERNAL, _INTERNAL_V1, _QUERY, _EXTERNAL, _PEERING})
# How many labels stand before each marker in some form; the marker can sit nowhere else.
_ARITIES: Final[dict[str, frozenset[int]]] = {
    _INTERNAL: frozenset({1, 3, 4}),
    _INTERNAL_V1: frozenset({2, 4, 5}),
    _QUERY: frozenset({3}),
    _EXTERNAL: frozenset({4}),
    _PEERING: frozenset({2}),
}
_MAX_PREFIX: Final = 5


def parse_sni(
    name: str, *, domain: str = DEFAULT_DOMAIN, trust_domain: str | None = None
) -> SniName | None:
    """Recognise one of Consul's SNI forms, or return ``None``.

    ``name`` is normalized first (see :func:`normalize_host_name`), so the result's ``.sni`` is
    the canonical spelling of ``name``. Server forms are tried first, under ``domain``.

    With ``trust_domain`` given, mesh forms must end in exactly it. Without it, the marker label
    (``internal``, ``internal-v1``, ``query``, ``external``, ``peering``) is located and every
    label after it is taken as the trust domain; when several labels could be the marker, the
    right-most one in a valid position wins, so service, namespace and datacenter names may
    themselves be spelled like markers. (A real trust domain is ``<uuid>.consul`` and holds no
    marker; pass ``trust_domain`` if yours might.)

    Names Consul never produces are refused rather than guessed at: ``internal-v1`` with the
    default partition (Consul uses ``internal`` there) and a query name whose namespace label is
    not ``default``.
    """
    norm = normalize_host_name(name)
    if norm is None:
        return None
    labels = norm.split(".")

    dom = normalize_host_name(domain)
    if dom is not None:
        server = _parse_server(norm, labels, dom)
        if server is not None:
            return server

    if trust_domain is not None:
        td = normalize_host_name(trust_domain)
        if td is None or not norm.endswith("." + td):
            return None
        prefix = labels[: len(labels) - td.count(".") - 1]
        if len(prefix) < 2 or prefix[-1] not in _MARKERS:
            return None
        return _parse_mesh(prefix[:-1], prefix[-1], td)

    # Right-most marker within reach of the front, leaving at least one label for the td.
    for i in range(min(_MAX_PREFIX, len(labels) - 2), 0, -1):
        marker = labels[i]
        if marker in _MARKERS and i in _ARITIES[marker]:
            return _parse_mesh(labels[:i], marker, ".".join(labels[i + 1 :]))
    return None


def _parse_server(norm: str, labels: list[str], domain: str) -> ServerName | None:
    if not norm.endswith("." + domain):
        return None
    rest = labels[: len(labels) - domain.count(".") - 1]
    if len(rest) == 2 and rest[0] == _SERVER:
        return ServerName(None, rest[1], domain)
    if len(rest) == 3 and rest[1] == _SERVER:
        return ServerName(rest[0], rest[2], domain)
    return None


def _parse_mesh(prefix: list[str], marker: str, td: str) -> SniName | None:
    n = len(prefix)
    if marker == _INTERNAL:
        if n == 1:
            return GatewayName(prefix[0], DEFAULT_PARTITION, td)
        if n in (3, 4):
            subset = prefix[0] if n == 4 else None
            svc, ns, dc = prefix[-3:]
            return ServiceName(svc, ns, DEFAULT_PARTITION, dc, td, subset)
        return None
    if marker == _INTERNAL_V1:
        if n == 2:
            ap, dc = prefix
            return None if ap == DEFAULT_PARTITION else GatewayName(dc, ap, td)
        if n in (4, 5):
            subset = prefix[0] if n == 5 else None
            svc, ns, ap, dc = prefix[-4:]
            return None if ap == DEFAULT_PARTITION else ServiceName(svc, ns, ap, dc, td, subset)
        return None
    if marker == _QUERY:
        if n == 3 and prefix[1] == DEFAULT_NAMESPACE:
            return QueryName(prefix[0], prefix[2], td)
        return None
    if marker == _EXTERNAL:
        if n == 4:
            svc, ns, ap, peer = prefix
            return PeeredServiceName(svc, ns, ap, peer, td)
        return None
    if marker == _PEERING and n == 2 and prefix[0] == _SERVER:
        return PeeringServerName(prefix[1], td)
    return None
