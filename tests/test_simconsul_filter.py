"""?filter= on the simulated agent: go-bexpr 0.1.2's grammar, type checks, semantics and errors.

The error texts are checked against ones Consul users reported (hashicorp/consul#7338 and #9441,
and the expected-list of #6467); the semantics against bexpr's rules: implicit *any* through
lists, missing map keys, operators allowed per field type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import consul as pyconsul
import pytest
from consul.exceptions import ConsulException

from meshgw.simconsul import SimConsulThread
from meshgw.simconsul.bexpr import CHECK_SERVICE_NODE, SERVICE_NODE, Filter, FilterError

PREFIX = "Failed to create boolean expression evaluator: "


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def estate(consul: Callable[..., SimConsulThread]) -> Iterator[SimConsulThread]:
    """web v1 (passing, rack r1), web v2 canary (one check critical, rack r2), web without
    meta or tags; a mesh gateway in dc1 and one named differently in dc2."""
    sim = consul()
    sim.services.add("web", "n1", "10.0.0.1", 80, meta={"version": "v1"}, node_meta={"rack": "r1"})
    sim.services.add(
        "web",
        "n2",
        "10.0.0.2",
        80,
        tags=["canary", "blue"],
        meta={"version": "v2"},
        node_meta={"rack": "r2"},
    )
    sim.catalog.set_check_status("n2", "critical", service_id="web")
    sim.services.add("web", "n3", "web-3.internal.example", 80)  # a host name, no meta
    sim.gateways.add("dc1", "gw1", "10.0.0.9")
    sim.gateways.add("dc2", "gw2", "10.2.0.9", name="gateway-east")
    yield sim


def client(sim: SimConsulThread) -> pyconsul.Consul:
    return pyconsul.Consul(host=sim.host, port=sim.port)


def nodes(entries: list[dict]) -> list[str]:
    return [e["Node"]["Node"] for e in entries]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Service.Meta.version == v1", ["n1"]),  # a bare identifier is a value
        ('Service.Meta.version != "v1"', ["n2", "n3"]),  # a missing key is "not equal"
        ('Service.Meta["version"] == "v2"', ["n2"]),
        ('"canary" in Service.Tags', ["n2"]),
        ('Service.Tags contains "blue"', ["n2"]),
        ('Service.Tags not contains "blue"', ["n1", "n3"]),
        ('"canary" not in Service.Tags', ["n1", "n3"]),
        ("Service.Tags is empty", ["n1", "n3"]),
        ("Service.Meta is not empty", ["n1", "n2"]),
        ('"version" in Service.Meta', ["n1", "n2"]),  # in on a map: a key
        ('Node.Meta.rack == "r2"', ["n2"]),
        ('Service.Address contains "internal"', ["n3"]),  # in on a string: a substring
        ('Service.Address matches "^10\\\\.0\\\\.0\\\\.[12]$"', ["n1", "n2"]),
        ('Service.Address not matches "^10\\\\."', ["n3"]),
        ("Checks.Status == critical", ["n2"]),  # any check
        ("Checks.Status != critical", ["n1", "n2", "n3"]),  # any check that is not critical
        ("not Checks.Status == critical", ["n1", "n3"]),
        ("Service.Port == 80 and Service.Meta.version == v1", ["n1"]),
        ('Service.Meta.version == v1 or Node.Meta.rack == "r2"', ["n1", "n2"]),
        ('not (Service.Meta.version == v1 or "canary" in Service.Tags)', ["n3"]),
        ("(Service.EnableTagOverride == false)", ["n1", "n2", "n3"]),
        ('Service.Weights.Passing == 1 and Service.Kind == ""', ["n1", "n2", "n3"]),
    ],
)
def test_health_service_filter(estate: SimConsulThread, expression: str, expected: list) -> None:
    _, entries = client(estate).health.service("web", filter_expr=expression)
    assert nodes(entries) == expected


def test_health_connect_filter_sees_the_sidecars(estate: SimConsulThread) -> None:
    # Sidecars carry their service's tags and meta, so subsets select on them too.
    _, entries = client(estate).health.connect("web", filter_expr="Service.Meta.version == v2")
    assert [(e["Node"]["Node"], e["Service"]["Kind"]) for e in entries] == [("n2", "connect-proxy")]


def test_catalog_services_filter_finds_gateways_of_any_name(estate: SimConsulThread) -> None:
    c = client(estate)
    expression = 'ServiceKind == "mesh-gateway"'
    _, here = c.catalog.services(filter_expr=expression)
    _, there = c.catalog.services(dc="dc2", filter_expr=expression)
    assert (here, there) == ({"mesh-gateway": []}, {"gateway-east": []})
    _, tagged = c.catalog.services(filter_expr='"canary" in ServiceTags')
    assert tagged == {"web": ["canary", "blue"], "web-sidecar-proxy": ["canary", "blue"]}


def test_filtered_blocking_query_follows_the_unfiltered_index(estate: SimConsulThread) -> None:
    c = client(estate)
    index, before = c.health.service("web", filter_expr="Service.Meta.version == v1")
    estate.services.add("web", "n4", "10.0.0.4", 80, meta={"version": "v1"})
    again, after = c.health.service(
        "web", filter_expr="Service.Meta.version == v1", index=index, wait="5s"
    )
    assert int(again) > int(index)
    assert nodes(after) == [*nodes(before), "n4"]


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        # hashicorp/consul#7338, verbatim
        ("foo", '1:4 (3): no match found, expected: "!=", ".", "==", "[", [ \\t\\r\\n] or '),
        # hashicorp/consul#9441, verbatim
        ("Address == 10.10.10.10 ", '1:17 (16): rule "number": Invalid number literal'),
        # the expected-list hashicorp/consul#6467 shows for an unquoted name with a dash
        ("Node==host-name", '1:11 (10): no match found, expected: ".", "[", [ \\t\\r\\n], '),
        ("(Node == a", '1:11 (10): rule "grouping": Unmatched parentheses'),
        ('Node == "a', '1:11 (10): rule "string": Unterminated string literal'),
        ('"a" in 3', '1:8 (7): rule "match": Invalid selector'),
        ("Meta[1] == a", '1:6 (5): rule "index": Invalid index'),
        ("Nope == a", 'Selector "Nope" is not valid'),
        ("Service.Nope.Deeper == a", 'Selector "Service.Nope" is not valid'),
        ("Service.Port contains 8", 'Invalid match operator "In" for selector "Service.Port"'),
        ("Service == a", 'Invalid match operator "Equal" for selector "Service"'),
        ("Service.Tags == a", 'Invalid match operator "Equal" for selector "Service.Tags"'),
        ("Service.Kind is empty", 'Invalid match operator "Is Empty" for selector "Service.Kind"'),
        (
            "Service.Port == abc",
            'Failed to coerce value "abc" for selector "Service.Port": '
            'strconv.ParseInt: parsing "abc": invalid syntax',
        ),
        (
            "Service.EnableTagOverride == yes",
            'Failed to coerce value "yes" for selector "Service.EnableTagOverride": '
            'strconv.ParseBool: parsing "yes": invalid syntax',
        ),
    ],
)
def test_bad_expressions_are_refused_with_bexpr_texts(expression: str, error: str) -> None:
    with pytest.raises(FilterError) as refused:
        Filter.parse(expression, CHECK_SERVICE_NODE)
    assert str(refused.value).startswith(PREFIX + error)


def test_full_expected_list_for_a_bare_word() -> None:
    with pytest.raises(FilterError) as refused:
        Filter.parse("foo", SERVICE_NODE)
    assert str(refused.value) == (
        PREFIX + '1:4 (3): no match found, expected: "!=", ".", "==", "[", [ \\t\\r\\n] or '
        "[a-zA-Z0-9_]"
    )


def test_a_bad_filter_is_a_500_from_the_servers(estate: SimConsulThread) -> None:
    # Consul checks the expression in the server RPC a client agent forwards: 500, with the
    # RPC prefix; the agent's own /v1/agent/services has no RPC in between.
    c = client(estate)
    with pytest.raises(ConsulException) as refused:
        c.health.service("web", filter_expr="Service.Nope == x")
    assert str(refused.value) == (
        "500 rpc error making call: Failed to create boolean expression evaluator: "
        'Selector "Service.Nope" is not valid'
    )
    with pytest.raises(ConsulException, match=r"^500 rpc error making call: Failed to create"):
        c.catalog.services(filter_expr="ServiceKind = x")
    with pytest.raises(ConsulException, match=r"^500 Failed to create boolean expression"):
        c.agent.services(filter_expr="Kind = x")


def test_an_empty_filter_filters_nothing() -> None:
    assert Filter.parse("", CHECK_SERVICE_NODE) is None
