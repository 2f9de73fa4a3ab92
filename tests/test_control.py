"""The control plane against the Consul API double: registration, discovery, failures, bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.control import discovery
from meshgw.control.consul.client import Response
from meshgw.control.registrar import GatewayRegistration, Registrar
from meshgw.simconsul import GATEWAY_BODY, AclToken
from tests.conftest import WAIT, ask, closed_by_peer, connect, eventually, marker
from tests.hellos import TRUST_DOMAIN as TD

TOKEN = "3f1c9b6e-0d2a-4c57-9e43-8b2f6d1a7c55"


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
        return json.loads(response.read())


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=WAIT) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def route_targets(port: int, match: str) -> list[str]:
    for route in admin_json(port, "/v1/routes")["routes"]:
        if route["match"] == match:
            return [e["address"] for e in route["endpoints"]]
    return []


# --- registration ------------------------------------------------------------------------------


def test_registration_body_is_consuls_own(consul, gateway_factory) -> None:
    double = consul()
    gw = gateway_factory(
        consul=double.url,
        register=True,
        expose_servers=True,
        address="10.0.0.5:8443",
        wan_address="203.0.113.5:443",
    )
    double.requests.wait_for("/v1/agent/service/register")
    body = double.requests.find("/v1/agent/service/register")[0].json
    assert body == GATEWAY_BODY
    assert double.agent.service("mesh-gateway") is not None
    assert gw.gateway is not None


def test_registration_without_addresses_or_wan_federation(consul, gateway_factory) -> None:
    double = consul()
    gw = gateway_factory(consul=double.url, register=True, service_name="gw-east", proxy_id="gw-1")
    double.requests.wait_for("/v1/agent/service/register")
    body = double.requests.find("/v1/agent/service/register")[0].json
    assert body["Name"] == "gw-east" and body["ID"] == "gw-1"
    # Without --address: what --listen really binds (127.0.0.1 here), so the check finds it.
    assert body["Address"] == "127.0.0.1" and body["Port"] == gw.port
    assert body["TaggedAddresses"] == {"lan": {"Address": "127.0.0.1", "Port": gw.port}}
    assert "Meta" not in body
    assert body["Check"]["TCP"] == f"127.0.0.1:{gw.port}"


@pytest.mark.parametrize(("bind_addr", "loopback"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]")])
def test_listening_everywhere_registers_consuls_way_and_checks_the_agents_loopback(
    consul, gateway_factory, bind_addr, loopback
) -> None:
    double = consul(bind_addr=bind_addr)
    gw = gateway_factory(consul=double.url, register=True, listen="0.0.0.0:0")
    double.requests.wait_for("/v1/agent/service/register")
    body = double.requests.find("/v1/agent/service/register")[0].json
    assert body["Address"] == "" and body["Port"] == gw.port
    assert "TaggedAddresses" not in body
    # As `consul connect envoy`: ::1 when the agent is dual-stack (its BindAddr is IPv6).
    assert body["Check"]["TCP"] == f"{loopback}:{gw.port}"


def test_agent_losing_the_registration_gets_it_back(consul, gateway_factory) -> None:
    double = consul()
    gw = gateway_factory(consul=double.url, register=True, expose_servers=True)
    double.requests.wait_for("/v1/agent/service/register")
    # An agent restarted with a fresh data dir has forgotten every service.
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{double.url}/v1/agent/service/deregister/mesh-gateway", method="PUT"
        ),
        timeout=WAIT,
    ):
        pass
    gw.call(gw.gateway.control.registrar.wake)  # rather than waiting out the 10 s interval
    double.requests.wait_for("/v1/agent/service/register", count=2)
    assert double.agent.service("mesh-gateway") is not None


class StalledRegisterClient:
    """A Consul client whose register PUT never answers: the agent may or may not apply it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.register_sent = asyncio.Event()

    async def put(self, path: str, body: Any = None) -> None:
        self.paths.append(path)
        if path.endswith("/register"):
            self.register_sent.set()
            await asyncio.Event().wait()

    async def get(self, path: str, **_: Any) -> Response:
        assert path == "/v1/agent/self"  # the registrar asks which loopback the agent has
        return Response(body={"Config": {"BindAddr": "0.0.0.0"}}, index=1)


async def test_stop_during_a_register_in_flight_still_deregisters() -> None:
    client = StalledRegisterClient()
    registrar = Registrar(client, GatewayRegistration())  # type: ignore[arg-type]
    task = asyncio.create_task(registrar.run())
    await asyncio.wait_for(client.register_sent.wait(), WAIT)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await registrar.deregister()
    assert client.paths[-1] == "/v1/agent/service/deregister/mesh-gateway"


async def test_stop_before_any_register_sends_nothing() -> None:
    client = StalledRegisterClient()
    registrar = Registrar(client, GatewayRegistration())  # type: ignore[arg-type]
    await registrar.deregister()
    assert client.paths == []


class HeldFirstPutClient:
    """A Consul client that holds the first PUT until released and records every PUT."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, Any]] = []
        self.release = asyncio.Event()
        self.arrived = [asyncio.Event(), asyncio.Event()]  # the first and the second PUT

    async def put(self, path: str, body: Any = None) -> None:
        self.puts.append((path, body))
        self.arrived[min(len(self.puts), 2) - 1].set()
        if len(self.puts) == 1:
            await self.release.wait()

    async def get(self, path: str, **_: Any) -> Response:
        return Response(body={"Config": {}}, index=1)


async def test_settings_replaced_during_a_register_in_flight_are_sent() -> None:
    client = HeldFirstPutClient()
    old = GatewayRegistration(wan_address=("203.0.113.5", 443))
    new = GatewayRegistration(wan_address=("198.51.100.7", 8443))
    registrar = Registrar(client, old, check_interval=60)  # type: ignore[arg-type]
    task = asyncio.create_task(registrar.run())
    try:
        await asyncio.wait_for(client.arrived[0].wait(), WAIT)
        registrar.replace(new)  # SIGHUP while the first PUT is out
        client.release.set()
        await asyncio.wait_for(client.arrived[1].wait(), WAIT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    path, body = client.puts[1]
    assert path == "/v1/agent/service/register"
    assert body["TaggedAddresses"]["wan"] == {"Address": "198.51.100.7", "Port": 8443}
    assert registrar.registered_as == new


def test_sigterm_deregisters_before_draining(consul, gateway_process) -> None:
    double = consul()
    gw = gateway_process(
        "--dc", "dc1", "--consul", double.url, "--register", "--expose-servers",
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--drain-timeout", "5",
    ).wait_listening()  # fmt: skip
    double.requests.wait_for("/v1/agent/service/register")
    held = connect(gw.port)
    held.sendall(b"\x16")  # a hello begun and never finished keeps the drain open
    try:
        gw.signal(signal.SIGTERM)
        gw.wait_for("deregistered from Consul")
        assert double.agent.service("mesh-gateway") is None
        gw.wait_for("draining")
        lines = "".join(gw.lines)
        assert lines.index("deregistered from Consul") < lines.index("draining")
    finally:
        held.close()
    assert gw.wait_exit(WAIT) == 0


def test_sigterm_keeps_accepting_through_the_drain_delay(
    consul, gateway_process, backend_factory
) -> None:
    server = marker(backend_factory, b"server-0")
    double = consul()
    gw = gateway_process(
        "--dc", "dc1", "--consul", double.url, "--register", "--expose-servers",
        "--server", f"s0=127.0.0.1:{server.port}", "--listen", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--drain-delay", "30",
    ).wait_listening()  # fmt: skip
    double.requests.wait_for("/v1/agent/service/register")
    gw.signal(signal.SIGTERM)
    gw.wait_for("deregistered; still accepting")
    assert double.agent.service("mesh-gateway") is None  # sidecars learn of it from now on
    assert not ready(gw.admin_port)  # /ready says so from the start of the window
    assert ask(gw.port, "s0.server.dc1.consul") == b"server-0"  # and connections still work
    gw.signal(signal.SIGTERM)  # a second one: no more waiting
    gw.wait_for("draining")
    assert gw.wait_exit(WAIT) == 0


# --- discovery ---------------------------------------------------------------------------------


def test_routes_from_discovered_servers_and_federation_states(
    consul, gateway_factory, backend_factory
) -> None:
    server = marker(backend_factory, b"server-0")
    remote = marker(backend_factory, b"dc2-gateway")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.servers.add("consul-server-0", "127.0.0.1", port=server.port)
    double.gateways.add("dc2", "gw-node", "10.2.0.1", wan=("127.0.0.1", remote.port))
    gw = gateway_factory(dc=None, consul=double.url, expose_servers=True)
    eventually(lambda: route_targets(gw.admin_port, "*.server.dc2.consul"))
    assert ready(gw.admin_port)
    assert ask(gw.port, "consul-server-0.server.dc1.consul") == b"server-0"
    assert ask(gw.port, "server.dc1.consul") == b"server-0"
    assert ask(gw.port, "consul-server-0.server.dc2.consul") == b"dc2-gateway"
    # The trust domain came from the CA roots: mesh names of dc2 route too.
    assert ask(gw.port, f"web.default.dc2.internal.{TD}") == b"dc2-gateway"
    topology = admin_json(gw.admin_port, "/v1/topology")
    assert topology["datacenter"] == "dc1" and topology["trust_domain"] == TD
    watched = topology["sources"]["consul"]["watches"]["sources"]
    assert watched["federation-states"]["index"] > 0


def test_a_dotted_server_node_name_does_not_stop_discovery(
    consul, gateway_process, backend_factory
) -> None:
    first = marker(backend_factory, b"ec2")
    second = marker(backend_factory, b"server-1")
    double = consul()
    double.servers.add("ip-10-0-0-1.ec2.internal", "127.0.0.1", port=first.port)
    gw = gateway_process(
        "--dc", "dc1", "--consul", double.url, "--expose-servers",
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "1",
    ).wait_listening()  # fmt: skip
    gw.wait_for("route skipped: server node 'ip-10-0-0-1.ec2.internal'")
    eventually(lambda: route_targets(gw.admin_port, "server.dc1.consul"))
    assert ask(gw.port, "server.dc1.consul") == b"ec2"
    # The watch lives on: a change after the dotted name is still learned.
    double.servers.add("consul-server-1", "127.0.0.1", port=second.port)
    eventually(lambda: route_targets(gw.admin_port, "consul-server-1.server.dc1.consul"))
    assert ask(gw.port, "consul-server-1.server.dc1.consul") == b"server-1"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=WAIT)
    assert 'meshgw_routes_skipped{reason="invalid_name"} 1.0' in metrics.read().decode()
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(WAIT) == 0
    assert len([line for line in gw.lines if "route skipped" in line]) == 1


def test_remote_gateway_moving_is_followed(consul, gateway_factory, backend_factory) -> None:
    old = marker(backend_factory, b"old")
    new = marker(backend_factory, b"new")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "gw-node", "10.2.0.1", wan=("127.0.0.1", old.port))
    gw = gateway_factory(consul=double.url, expose_servers=True)
    eventually(lambda: route_targets(gw.admin_port, "server.dc2.consul"))
    assert ask(gw.port, "server.dc2.consul") == b"old"
    double.gateways.update("dc2", "gw-node", wan=("127.0.0.1", new.port))
    started = time.monotonic()
    eventually(
        lambda: route_targets(gw.admin_port, "server.dc2.consul") == [f"127.0.0.1:{new.port}"]
    )
    assert time.monotonic() - started < 5
    assert ask(gw.port, "server.dc2.consul") == b"new"


def test_critical_gateways_are_tried_last(consul, gateway_factory, backend_factory) -> None:
    good = marker(backend_factory, b"good")
    sick = marker(backend_factory, b"sick")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "a", "10.2.0.1", wan=("127.0.0.1", sick.port), status="critical")
    double.gateways.add("dc2", "b", "10.2.0.2", wan=("127.0.0.1", good.port))
    gw = gateway_factory(consul=double.url, expose_servers=True)
    eventually(lambda: len(route_targets(gw.admin_port, "server.dc2.consul")) == 2)
    assert {ask(gw.port, "server.dc2.consul") for _ in range(4)} == {b"good"}


def test_consul_unreachable_at_start_then_arriving(
    consul, gateway_factory, backend_factory
) -> None:
    remote = marker(backend_factory, b"dc2-gateway")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "gw-node", "10.2.0.1", wan=("127.0.0.1", remote.port))
    double.down()
    gw = gateway_factory(dc=None, consul=double.url, expose_servers=True)
    assert not ready(gw.admin_port)  # the datacenter itself comes from the agent
    with connect(gw.port) as client:
        client.sendall(python_hello("server.dc2.consul"))
        assert closed_by_peer(client)
    double.up()
    eventually(lambda: ready(gw.admin_port), timeout=40)  # backoff caps at 30 s
    assert ask(gw.port, "server.dc2.consul") == b"dc2-gateway"


def test_garbage_and_5xx_keep_the_last_good_topology(
    consul, gateway_factory, backend_factory
) -> None:
    remote = marker(backend_factory, b"dc2-gateway")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "gw-node", "10.2.0.1", wan=("127.0.0.1", remote.port))
    gw = gateway_factory(consul=double.url, expose_servers=True)
    eventually(lambda: route_targets(gw.admin_port, "server.dc2.consul"))
    double.faults.garbage("/v1/internal/federation-states")
    double.faults.fail("/v1/health/service", status=500, body="rpc error: No cluster leader")
    # Cut the blocking queries in flight so that every watch asks again and meets the faults.
    double.down()
    double.up()
    double.gateways.add("dc2", "other", "10.2.0.9", wan=("127.0.0.1", 9))
    seen = len(double.requests.find("/v1/internal/federation-states/mesh-gateways"))
    double.requests.wait_for("/v1/internal/federation-states/mesh-gateways", count=seen + 1)
    double.requests.wait_for("/v1/health/service/mesh-gateway", count=2)
    assert route_targets(gw.admin_port, "server.dc2.consul") == [f"127.0.0.1:{remote.port}"]
    assert ask(gw.port, "server.dc2.consul") == b"dc2-gateway"


def test_a_hung_agent_is_seen_within_seconds(
    consul, gateway_factory, backend_factory, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="meshgw.discovery")
    monkeypatch.setattr(discovery, "AGENT_PROBE_INTERVAL", 0.2)
    monkeypatch.setattr(discovery, "AGENT_PROBE_TIMEOUT", 0.5)
    remote = marker(backend_factory, b"dc2-gateway")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "gw-node", "10.2.0.1", wan=("127.0.0.1", remote.port))
    gw = gateway_factory(consul=double.url, expose_servers=True)
    eventually(lambda: route_targets(gw.admin_port, "server.dc2.consul"))

    def sources() -> dict[str, Any]:
        topology = admin_json(gw.admin_port, "/v1/topology")
        return topology["sources"]["consul"]["watches"]["sources"]

    assert sources()["agent"]["state"] == "ok"
    # The agent accepts connections and never answers: blocking queries alone would not
    # notice for minutes.
    double.faults.hang("/v1/")
    eventually(lambda: sources()["agent"]["state"] == "failing", timeout=5)
    assert all(source["stale"] for source in sources().values())
    assert metric_value(gw.admin_port, 'meshgw_consul_up{source="agent"}') == 0
    assert "Consul unavailable for agent" in caplog.text
    assert ask(gw.port, "server.dc2.consul") == b"dc2-gateway"  # the last good routes stay
    double.faults.clear()
    eventually(lambda: sources()["agent"]["state"] == "ok", timeout=5)
    assert metric_value(gw.admin_port, 'meshgw_consul_up{source="agent"}') == 1
    assert "Consul answers agent again" in caplog.text


def metric_value(port: int, sample: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rpartition(" ")[2])
    return None


def test_forbidden_names_the_permission_and_hides_the_token(consul, gateway_process) -> None:
    double = consul(acl_tokens=[AclToken(TOKEN, ("service:read", "node:read", "operator:read"))])
    gw = gateway_process(
        "--dc", "dc1", "--consul", double.url, "--register", "--expose-servers",
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        env={"CONSUL_HTTP_TOKEN": TOKEN},
    ).wait_listening()  # fmt: skip
    line = gw.wait_for("cannot register this gateway.*").group(0)
    assert "service:write" in line
    assert any(r.token == TOKEN for r in double.requests.find("/v1/agent/service/register"))
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=WAIT
    ).read()
    topology = urllib.request.urlopen(
        f"http://127.0.0.1:{gw.admin_port}/v1/topology", timeout=WAIT
    ).read()
    assert b'meshgw_consul_up{source="registration"} 0.0' in metrics
    gw.signal(signal.SIGTERM)
    gw.wait_exit(WAIT)
    output = "".join(gw.lines).encode() + metrics + topology
    assert TOKEN.encode() not in output


# --- bootstrap ---------------------------------------------------------------------------------


def test_primary_gateways_route_until_federation_states_know_better(
    consul, gateway_factory, backend_factory
) -> None:
    bootstrap = marker(backend_factory, b"bootstrap")
    discovered = marker(backend_factory, b"discovered")
    double = consul(datacenter="dc2", primary_datacenter="dc1")
    double.catalog.set_datacenters(["dc1", "dc2"])
    gw = gateway_factory(
        dc="dc2",
        consul=double.url,
        expose_servers=True,
        primary_dc="dc1",
        primary_gateway=[f"localhost:{bootstrap.port}"],
    )
    eventually(lambda: route_targets(gw.admin_port, "server.dc1.consul"))
    assert ask(gw.port, "server.dc1.consul") == b"bootstrap"
    double.gateways.add("dc1", "gw-node", "10.1.0.1", wan=("127.0.0.1", discovered.port))
    eventually(
        lambda: (
            route_targets(gw.admin_port, "server.dc1.consul") == [f"127.0.0.1:{discovered.port}"]
        )
    )
    assert ask(gw.port, "server.dc1.consul") == b"discovered"
    double.gateways.remove("dc1", "gw-node")
    eventually(
        lambda: (
            route_targets(gw.admin_port, "server.dc1.consul") != [f"127.0.0.1:{discovered.port}"]
        )
    )
    assert ask(gw.port, "server.dc1.consul") == b"bootstrap"


def test_primary_gateways_without_consul(gateway_factory, backend_factory) -> None:
    bootstrap = marker(backend_factory, b"bootstrap")
    gw = gateway_factory(
        dc="dc2",
        expose_servers=True,
        primary_dc="dc1",
        primary_gateway=[f"127.0.0.1:{bootstrap.port}"],
    )
    assert ask(gw.port, "node-1.server.dc1.consul") == b"bootstrap"


def test_sighup_reloads_routes_and_registration(consul, gateway_process, tmp_path) -> None:
    double = consul()
    config = tmp_path / "meshgw.toml"
    config.write_text(
        'dc = "dc1"\nexpose_servers = true\nregister = true\n'
        'server = ["s1=127.0.0.1:8300"]\nwan_address = "203.0.113.5:443"\n'
    )
    gw = gateway_process(
        "--config", str(config), "--consul", double.url,
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
    ).wait_listening()  # fmt: skip
    double.requests.wait_for("/v1/agent/service/register")
    config.write_text(
        'dc = "dc1"\nexpose_servers = true\nregister = true\n'
        'server = ["s2=127.0.0.1:8301"]\nwan_address = "198.51.100.7:8443"\n'
    )
    gw.signal(signal.SIGHUP)
    gw.wait_for("settings reloaded")
    double.requests.wait_for("/v1/agent/service/register", count=2)
    body = double.requests.find("/v1/agent/service/register")[-1].json
    assert body["TaggedAddresses"]["wan"] == {"Address": "198.51.100.7", "Port": 8443}
    assert route_targets(gw.admin_port, "s2.server.dc1.consul") == ["127.0.0.1:8301"]
    assert route_targets(gw.admin_port, "s1.server.dc1.consul") == []


def test_sighup_with_a_new_service_id_removes_the_old_registration(
    consul, gateway_process, tmp_path
) -> None:
    double = consul()
    config = tmp_path / "meshgw.toml"
    config.write_text('dc = "dc1"\nexpose_servers = true\nregister = true\n')
    gw = gateway_process(
        "--config", str(config), "--consul", double.url,
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
    ).wait_listening()  # fmt: skip
    double.requests.wait_for("/v1/agent/service/register")
    assert double.agent.service("mesh-gateway") is not None
    config.write_text(
        'dc = "dc1"\nexpose_servers = true\nregister = true\nproxy_id = "mesh-gateway-east"\n'
    )
    gw.signal(signal.SIGHUP)
    double.requests.wait_for("/v1/agent/service/register", count=2)
    # The old entry would keep passing its TCP check on the same port: a phantom gateway.
    assert double.agent.service("mesh-gateway") is None
    assert double.agent.service("mesh-gateway-east") is not None
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(WAIT) == 0
    assert double.agent.service("mesh-gateway-east") is None


def test_sighup_names_the_settings_that_need_a_restart(gateway_process, tmp_path) -> None:
    config = tmp_path / "meshgw.toml"
    config.write_text('dc = "dc1"\nmax_connections = 100\n')
    gw = gateway_process(
        "--config", str(config), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"
    ).wait_listening()  # fmt: skip
    config.write_text('dc = "dc1"\nmax_connections = 200\nlog_level = "debug"\n')
    gw.signal(signal.SIGHUP)
    gw.wait_for("reload: max_connections, log_level take effect only after a restart")
    gw.wait_for("settings reloaded")
