"""The compiled discovery chain on the simulated agent, read through py-consul: what a gateway
needs (protocol, targets with subset filters, timeouts and SNI, redirects, default subsets,
failover targets), blocking, overrides and permissions."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import consul as pyconsul
import pytest
from consul.exceptions import ACLPermissionDenied, ConsulException

from meshgw.simconsul import AclToken, SimConsulThread

TD = "11111111-2222-3333-4444-555555555555.consul"


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sim(consul: Callable[..., SimConsulThread]) -> Iterator[SimConsulThread]:
    yield consul(trust_domain=TD)


def chain(sim: SimConsulThread, service: str, **kwargs: Any) -> dict[str, Any]:
    c = pyconsul.Consul(host=sim.host, port=sim.port, token=kwargs.pop("token", None))
    return c.discovery_chain.get(service, **kwargs)["Chain"]


def test_a_service_without_entries_has_the_default_chain(sim: SimConsulThread) -> None:
    assert chain(sim, "web") == {
        "ServiceName": "web",
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": "dc1",
        "Default": True,
        "Protocol": "tcp",
        "StartNode": "resolver:web.default.default.dc1",
        "Nodes": {
            "resolver:web.default.default.dc1": {
                "Type": "resolver",
                "Name": "web.default.default.dc1",
                "Resolver": {
                    "Default": True,
                    "ConnectTimeout": "5s",
                    "Target": "web.default.default.dc1",
                },
            }
        },
        "Targets": {
            "web.default.default.dc1": {
                "ID": "web.default.default.dc1",
                "Service": "web",
                "Namespace": "default",
                "Partition": "default",
                "Datacenter": "dc1",
                "MeshGateway": {},
                "Subset": {},
                "TransparentProxy": {},
                "ConnectTimeout": "5s",
                "SNI": f"web.default.dc1.internal.{TD}",
                "Name": f"web.default.dc1.internal.{TD}",
            }
        },
    }


def test_protocol_comes_from_service_defaults_then_proxy_defaults(sim: SimConsulThread) -> None:
    sim.config.set_proxy_defaults({"protocol": "HTTP"})
    assert chain(sim, "web")["Protocol"] == "http"
    sim.config.set_service_defaults("web", protocol="grpc", Meta={"team": "a"})
    web = chain(sim, "web")
    assert (web["Protocol"], web["ServiceMeta"]) == ("grpc", {"team": "a"})
    assert chain(sim, "api")["Protocol"] == "http"


def test_default_subset_subsets_and_failover(sim: SimConsulThread) -> None:
    sim.config.set_service_resolver(
        "web",
        ConnectTimeout="15s",
        DefaultSubset="v1",
        Subsets={
            "v1": {"Filter": "Service.Meta.version == v1", "OnlyPassing": True},
            "v2": {"Filter": "Service.Meta.version == v2"},
        },
        Failover={"*": {"Datacenters": ["dc2", "dc3"]}},
    )
    web = chain(sim, "web")
    assert "Default" not in web
    assert web["StartNode"] == "resolver:v1.web.default.default.dc1"
    resolver = web["Nodes"][web["StartNode"]]["Resolver"]
    assert resolver == {
        "ConnectTimeout": "15s",
        "Target": "v1.web.default.default.dc1",
        "Failover": {"Targets": ["v1.web.default.default.dc2", "v1.web.default.default.dc3"]},
    }
    primary = web["Targets"]["v1.web.default.default.dc1"]
    assert primary["ServiceSubset"] == "v1"
    assert primary["Subset"] == {"Filter": "Service.Meta.version == v1", "OnlyPassing": True}
    assert primary["ConnectTimeout"] == "15s"
    assert primary["SNI"] == f"v1.web.default.dc1.internal.{TD}"
    assert (
        web["Targets"]["v1.web.default.default.dc3"]["SNI"] == f"v1.web.default.dc3.internal.{TD}"
    )


def test_redirect_is_followed_to_its_target(sim: SimConsulThread) -> None:
    sim.config.set_service_resolver(
        "web", DefaultSubset="v2", Subsets={"v2": {"Filter": "Service.Meta.version == v2"}}
    )
    sim.config.set_service_resolver("legacy", Redirect={"Service": "web"})
    legacy = chain(sim, "legacy")
    assert legacy["ServiceName"] == "legacy"
    assert legacy["StartNode"] == "resolver:v2.web.default.default.dc1"
    assert list(legacy["Targets"]) == ["v2.web.default.default.dc1"]
    sim.config.set_service_resolver("elsewhere", Redirect={"Service": "web", "Datacenter": "dc2"})
    assert chain(sim, "elsewhere")["StartNode"] == "resolver:v2.web.default.default.dc2"


def test_failover_to_other_services_and_explicit_targets(sim: SimConsulThread) -> None:
    sim.config.set_service_resolver(
        "api",
        DefaultSubset="stable",
        Subsets={"stable": {"Filter": "Service.Tags contains stable"}},
    )
    sim.config.set_service_resolver(
        "web",
        Subsets={"v1": {"Filter": "Service.Meta.version == v1"}},
        Failover={
            "v1": {"Service": "api"},
            "*": {"Targets": [{"Datacenter": "dc2"}, {"Service": "api", "Datacenter": "dc3"}]},
        },
    )
    web = chain(sim, "web")
    failover = web["Nodes"][web["StartNode"]]["Resolver"]["Failover"]["Targets"]
    assert failover == ["web.default.default.dc2", "stable.api.default.default.dc3"]
    assert web["Targets"]["stable.api.default.default.dc3"]["Subset"] == {
        "Filter": "Service.Tags contains stable"
    }


def test_overrides_and_compile_dc(sim: SimConsulThread) -> None:
    sim.catalog.set_datacenters(["dc2"])
    overridden = chain(sim, "web", override_connect_timeout="10s", override_protocol="http")
    assert overridden["Protocol"] == "http"
    assert overridden["CustomizationHash"]
    assert overridden["Targets"]["web.default.default.dc1"]["ConnectTimeout"] == "10s"
    remote = chain(sim, "web", compile_dc="dc2")
    assert remote["Datacenter"] == "dc2"
    assert remote["Targets"]["web.default.default.dc2"]["SNI"] == f"web.default.dc2.internal.{TD}"


def test_chain_blocks_until_an_entry_changes(sim: SimConsulThread) -> None:
    c = pyconsul.Consul(host=sim.host, port=sim.port)
    index, _ = c.http.get(
        lambda r: (r.headers["X-Consul-Index"], r.body), "/v1/discovery-chain/web"
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            c.http.get,
            lambda r: (r.headers["X-Consul-Index"], r.body),
            "/v1/discovery-chain/web",
            params=[("index", index), ("wait", "5s")],
        )
        sim.raft.wait_blocked(1)
        sim.config.set_service_defaults("web", protocol="http")
        new_index, body = pending.result(5)
    assert int(new_index) > int(index)
    assert '"Protocol": "http"' in body


def test_chain_needs_service_read_and_refuses_circular_redirects(
    consul: Callable[..., SimConsulThread],
) -> None:
    sim = consul(acl_tokens=[AclToken("t", ("service:read:web",), accessor_id="a-1")])
    assert chain(sim, "web", token="t")["ServiceName"] == "web"
    with pytest.raises(ACLPermissionDenied, match="lacks permission 'service:read' on \"api\""):
        chain(sim, "api", token="t")
    sim.config.set_service_resolver("web", Redirect={"Service": "api"})
    sim.config.set_service_resolver("api", Redirect={"Service": "web"})
    with pytest.raises(ConsulException, match="circular resolver redirect"):
        chain(sim, "web", token="t")
