"""Consul's SNI grammar (docs/consul.md#sni-names): format and parse tables, round trips and
validators."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgw.wire.names import (
    GatewayName,
    PeeredServiceName,
    PeeringServerName,
    QueryName,
    ServerName,
    ServiceName,
    SniName,
    gateway_sni,
    is_valid_datacenter,
    is_valid_label,
    is_valid_node_name,
    normalize_host_name,
    parse_sni,
    peered_service_sni,
    peering_server_sni,
    query_sni,
    server_sni,
    service_sni,
)
from tests.hellos import TRUST_DOMAIN as TD

# ---------------------------------------------------------------------------------------------
# Formatting, by the examples and rules of docs/consul.md#sni-names.

FORMATS = [
    (server_sni("dc2", "consul", "consul-server-0"), "consul-server-0.server.dc2.consul"),
    (server_sni("dc2"), "server.dc2.consul"),
    (server_sni("dc2", node="*"), "server.dc2.consul"),
    (server_sni("dc2", node=""), "server.dc2.consul"),
    (server_sni("dc1", "example.com."), "server.dc1.example.com"),  # trailing dot removed
    (server_sni("dc1", "consul", "Consul-Server-0"), "consul-server-0.server.dc1.consul"),
    (service_sni("web", "default", "default", "dc2", TD), f"web.default.dc2.internal.{TD}"),
    (service_sni("web", "", "", "dc2", TD), f"web.default.dc2.internal.{TD}"),
    (service_sni("web", "", "", "dc2", TD, "v1"), f"v1.web.default.dc2.internal.{TD}"),
    (service_sni("web", "", "", "dc2", TD, ""), f"web.default.dc2.internal.{TD}"),
    (service_sni("web", "ns1", "ap1", "dc2", TD), f"web.ns1.ap1.dc2.internal-v1.{TD}"),
    (service_sni("web", "", "ap1", "dc2", TD, "v2"), f"v2.web.default.ap1.dc2.internal-v1.{TD}"),
    (gateway_sni("dc2", TD), f"dc2.internal.{TD}"),
    (gateway_sni("dc2", TD, ""), f"dc2.internal.{TD}"),
    (gateway_sni("dc2", TD, "ap1"), f"ap1.dc2.internal-v1.{TD}"),
    (query_sni("db", "dc3", TD), f"db.default.dc3.query.{TD}"),
    (
        peered_service_sni("web", "", "", "cluster-02", TD),
        f"web.default.default.cluster-02.external.{TD}",
    ),
    (peered_service_sni("web", "ns", "ap", "p", TD), f"web.ns.ap.p.external.{TD}"),
    (peering_server_sni("dc1", TD), f"server.dc1.peering.{TD}"),
]


@pytest.mark.parametrize(("got", "want"), FORMATS, ids=[w for _, w in FORMATS])
def test_format(got: str, want: str) -> None:
    assert got == want


@pytest.mark.parametrize(
    "call",
    [
        lambda: server_sni("dc.1"),
        lambda: server_sni("dc1", node="node.1"),
        lambda: server_sni("dc1", node="a/b"),
        lambda: server_sni("", "consul"),
        lambda: server_sni("dc1", "bad..domain"),
        lambda: service_sni("we b", "", "", "dc1", TD),
        lambda: service_sni("web", "", "", "dc1", "10.0.0.1"),
        lambda: service_sni("web", "", "", "dc1", TD, "sub.set"),
        lambda: gateway_sni("x" * 64, TD),
        lambda: query_sni("caf\u00e9", "dc1", TD),
        lambda: peered_service_sni("web", "", "", "", TD),
        lambda: peering_server_sni("dc1", ""),
    ],
)
def test_format_refuses_what_no_hello_can_carry(call: object) -> None:
    with pytest.raises(ValueError, match=r"SNI name|DNS name"):
        call()  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# Parsing.

PARSES: list[tuple[str, dict[str, str | None], SniName | None]] = [
    ("consul-server-0.server.dc2.consul", {}, ServerName("consul-server-0", "dc2", "consul")),
    ("server.dc2.consul", {}, ServerName(None, "dc2", "consul")),
    ("Server.DC2.Consul.", {}, ServerName(None, "dc2", "consul")),
    ("node_1.server.dc_2.consul", {}, ServerName("node_1", "dc_2", "consul")),
    ("server.dc1.example.com", {"domain": "example.com."}, ServerName(None, "dc1", "example.com")),
    ("server.dc1.example.com", {}, None),  # not under the domain
    ("a.b.server.dc1.consul", {}, None),
    ("server.consul", {}, None),
    (
        f"web.default.dc2.internal.{TD}",
        {},
        ServiceName("web", "default", "default", "dc2", TD),
    ),
    (
        f"web.default.dc2.internal.{TD}",
        {"trust_domain": TD},
        ServiceName("web", "default", "default", "dc2", TD),
    ),
    (
        f"v1.web.default.dc2.internal.{TD}",
        {},
        ServiceName("web", "default", "default", "dc2", TD, "v1"),
    ),
    (
        f"web.ns1.ap1.dc2.internal-v1.{TD}",
        {},
        ServiceName("web", "ns1", "ap1", "dc2", TD),
    ),
    (
        f"v2.web.ns1.ap1.dc2.internal-v1.{TD}",
        {"trust_domain": TD},
        ServiceName("web", "ns1", "ap1", "dc2", TD, "v2"),
    ),
    (f"dc2.internal.{TD}", {}, GatewayName("dc2", "default", TD)),
    (f"ap1.dc2.internal-v1.{TD}", {}, GatewayName("dc2", "ap1", TD)),
    (f"db.default.dc3.query.{TD}", {}, QueryName("db", "dc3", TD)),
    (f"db.other.dc3.query.{TD}", {}, None),  # Consul always writes "default" there
    (f"server.dc1.peering.{TD}", {}, PeeringServerName("dc1", TD)),
    (f"client.dc1.peering.{TD}", {}, None),
    (
        f"web.default.default.cluster-02.external.{TD}",
        {},
        PeeredServiceName("web", "default", "default", "cluster-02", TD),
    ),
    # Forms Consul never writes are refused, not guessed.
    (f"default.dc2.internal-v1.{TD}", {}, None),
    (f"web.ns.default.dc2.internal-v1.{TD}", {}, None),
    (f"a.b.c.d.e.f.internal.{TD}", {}, None),
    (f"internal.{TD}", {}, None),
    (f"web.default.dc2.internal.{TD}", {"trust_domain": "other.consul"}, None),
    (f"dc2.internal.{TD}", {"trust_domain": "bad..td"}, None),
    (f"web.default.dc2.secret.{TD}", {}, None),
    # Service, namespace or datacenter names spelled like markers still parse.
    (
        f"internal.internal.internal.internal.{TD}",
        {},
        ServiceName("internal", "internal", "default", "internal", TD),
    ),
    (
        f"query.default.peering.query.{TD}",
        {},
        QueryName("query", "peering", TD),
    ),
    # A trust domain holding a marker label needs trust_domain to be told.
    (
        "web.default.dc2.internal.internal.consul",
        {},
        ServiceName("default", "dc2", "default", "internal", "consul", "web"),
    ),
    (
        "web.default.dc2.internal.internal.consul",
        {"trust_domain": "internal.consul"},
        ServiceName("web", "default", "default", "dc2", "internal.consul"),
    ),
    ("", {}, None),
    ("10.0.0.1", {}, None),
    ("*.server.dc1.consul", {}, None),
    ("caf\u00e9.server.dc1.consul", {}, None),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "want"), PARSES, ids=[p[0][:60] or "empty" for p in PARSES]
)
def test_parse(name: str, kwargs: dict[str, str], want: SniName | None) -> None:
    got = parse_sni(name, **kwargs)
    assert got == want
    if got is not None:
        assert got.sni == normalize_host_name(name)
        assert str(got) == got.sni


@pytest.mark.parametrize(("_", "want"), FORMATS, ids=[w for _, w in FORMATS])
def test_parse_inverts_format(_: str, want: str) -> None:
    domain = "example.com" if want.endswith("example.com") else "consul"
    parsed = parse_sni(want, domain=domain)
    assert parsed is not None
    assert parsed.sni == want


# ---------------------------------------------------------------------------------------------
# Round trips.

RESERVED = {"server", "internal", "internal-v1", "query", "external", "peering", "default"}
label = st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True)
plain = label.filter(lambda s: s not in RESERVED)
tld = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True).filter(lambda s: s not in RESERVED)
domains = st.one_of(st.just("consul"), st.builds(lambda a, b: f"{a}.{b}", plain, tld), tld)
trust_domains = st.uuids().map(lambda u: f"{u}.consul")
partitions = st.one_of(st.just("default"), plain)


@st.composite
def sni_values(draw: st.DrawFn) -> tuple[SniName, str, str]:
    domain = draw(domains)
    td = draw(trust_domains)
    kind = draw(st.integers(0, 5))
    value: SniName
    if kind == 0:
        value = ServerName(draw(st.none() | plain), draw(plain), domain)
    elif kind == 1:
        value = ServiceName(
            draw(plain), draw(label), draw(partitions), draw(plain), td, draw(st.none() | plain)
        )
    elif kind == 2:
        value = GatewayName(draw(plain), draw(partitions), td)
    elif kind == 3:
        value = QueryName(draw(plain), draw(plain), td)
    elif kind == 4:
        value = PeeringServerName(draw(plain), td)
    else:
        value = PeeredServiceName(draw(plain), draw(label), draw(label), draw(plain), td)
    return value, domain, td


@settings(max_examples=400, deadline=None)
@given(sni_values())
def test_parse_format_round_trip(case: tuple[SniName, str, str]) -> None:
    value, domain, td = case
    assert parse_sni(value.sni, domain=domain) == value
    assert parse_sni(value.sni, domain=domain, trust_domain=td) == value
    assert parse_sni(value.sni.upper() + ".", domain=domain) == value


@settings(max_examples=300, deadline=None)
@given(sni_values())
def test_format_functions_agree_with_values(case: tuple[SniName, str, str]) -> None:
    value = case[0]
    match value:
        case ServerName(node, dc, dom):
            assert server_sni(dc, dom, node) == value.sni
        case ServiceName(svc, ns, ap, dc, tdom, subset):
            assert service_sni(svc, ns, ap, dc, tdom, subset) == value.sni
        case GatewayName(dc, ap, tdom):
            assert gateway_sni(dc, tdom, ap) == value.sni
        case QueryName(svc, dc, tdom):
            assert query_sni(svc, dc, tdom) == value.sni
        case PeeringServerName(dc, tdom):
            assert peering_server_sni(dc, tdom) == value.sni
        case PeeredServiceName(svc, ns, ap, peer, tdom):
            assert peered_service_sni(svc, ns, ap, peer, tdom) == value.sni


@settings(max_examples=400, deadline=None)
@given(
    labels=st.lists(st.sampled_from([*RESERVED, "dc1", "web", "a_b", "x-1", "consul"]), max_size=9),
    domain=st.sampled_from(["consul", "dc1.consul", "internal"]),
    td=st.none() | st.sampled_from(["consul", "x.consul", "internal.consul"]),
)
def test_any_parse_formats_back(labels: list[str], domain: str, td: str | None) -> None:
    # Whatever parse_sni accepts, even where the grammar is ambiguous, formats back to itself.
    name = ".".join(labels)
    parsed = parse_sni(name, domain=domain, trust_domain=td)
    if parsed is not None:
        assert parsed.sni == name


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_never_raises_on_text(name: str) -> None:
    parsed = parse_sni(name)
    norm = normalize_host_name(name)
    if parsed is not None:
        assert parsed.sni == norm


# ---------------------------------------------------------------------------------------------
# Validators.


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("consul.", "consul"),
        ("Server.DC1.Consul", "server.dc1.consul"),
        ("a_b.c-d", "a_b.c-d"),
        ("-lead.trail-", "-lead.trail-"),  # hyphen position not policed (Consul does not)
        ("1.2.3.consul", "1.2.3.consul"),
        ("a" * 63, "a" * 63),
        (("a" * 62 + ".") * 4 + "b", ("a" * 62 + ".") * 4 + "b"),
        ("", None),
        (".", None),
        ("a..b", None),
        ("a.b..", None),
        (".a", None),
        ("a" * 64, None),
        (("a" * 62 + ".") * 4 + "bc", None),  # 254
        ("10.0.0.1", None),
        ("1.2.3.4.", None),
        ("123", None),
        ("::1", None),
        ("[::1]", None),
        ("caf\u00e9.consul", None),
        ("\u212a.consul", None),
        ("a b", None),
        ("a\x00b", None),
        ("*.consul", None),
        ("a/b", None),
        ("a\n", None),
    ],
)
def test_normalize_host_name(name: str, want: str | None) -> None:
    assert normalize_host_name(name) == want


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("dc1", True),
        ("us-east_1", True),
        ("a" * 63, True),
        ("DC1", False),  # Consul: ^[a-z0-9_-]+$
        ("dc.1", False),
        ("", False),
        ("a" * 64, False),
        ("dc/1", False),
        ("d\u00e9", False),
    ],
)
def test_is_valid_datacenter(name: str, valid: bool) -> None:
    assert is_valid_datacenter(name) is valid


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("consul-server-0", True),
        ("Consul-Server-0", True),
        ("node_1", True),
        ("ip-10-0-0-1", True),
        ("node.example.com", False),  # wanfed SplitNodeName needs no dots
        ("a/b", False),
        ("", False),
        ("a" * 64, False),
        ("n\u00f6de", False),
        ("node 1", False),
    ],
)
def test_is_valid_node_name(name: str, valid: bool) -> None:
    assert is_valid_node_name(name) is valid


def test_is_valid_label() -> None:
    assert is_valid_label("web")
    assert not is_valid_label("Web")  # canonical labels are lower-case
    assert not is_valid_label("a.b")


def test_values_are_frozen() -> None:
    value = ServerName(None, "dc1")
    with pytest.raises(AttributeError):
        value.datacenter = "dc2"  # type: ignore[misc]
    assert hash(value) == hash(ServerName(None, "dc1", "consul"))
