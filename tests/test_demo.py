"""`meshgw demo`: its wire formats, its simulated Consul servers, and the whole run end to end."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from meshgw.addresses import parse_address
from meshgw.app.gateway import bind_error
from meshgw.control.registrar import GatewayRegistration
from meshgw.demo import console, demo_command, report, runner
from meshgw.demo.agents import Agents, ServerEntry
from meshgw.demo.federation import Federation, Shape, start_gateways
from meshgw.demo.gateways import (
    GatewayChild,
    GatewayStartError,
    fetch_admin,
    missing_routes,
    parse_counters,
)
from meshgw.demo.layout import GatewaySpec, Pki, ServerSpec, make_pki
from meshgw.demo.peering import PeeringDemo
from meshgw.demo.peering_round import peered_l7, peering_round
from meshgw.demo.peering_story import try_by_hand
from meshgw.demo.protocols import (
    ALPN_PACKET,
    ALPN_RPC,
    MAX_PACKET,
    Ack,
    MemberState,
    PacketReader,
    PacketTooLarge,
    Ping,
    PushPull,
    RpcFacts,
    decode_message,
    decode_push_pull,
    encode_message,
    encode_push_pull,
    frame,
    rpc_answer,
)
from meshgw.demo.runner import DemoOptions
from meshgw.demo.servers import SimServer, client_context
from meshgw.simconsul import SimConsul, decode_registration
from tests.conftest import REPO, lines_until

DEMO_TIMEOUT = 90.0
WAIT = 10.0


# --- gossip packet framing ---------------------------------------------------------------------


def test_frame_is_a_big_endian_length_then_the_payload() -> None:
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"x" * 0x0102) == b"\x00\x00\x01\x02" + b"x" * 0x0102


def test_reader_takes_several_packets_from_one_feed() -> None:
    reader = PacketReader()
    assert reader.feed(frame(b"one") + frame(b"") + frame(b"three")) == [b"one", b"", b"three"]
    assert reader.pending == 0


def test_reader_reassembles_packets_split_anywhere() -> None:
    wire = frame(b"first packet") + frame(b"second") + frame(bytes(range(256)))
    for cut in range(1, len(wire)):
        reader = PacketReader()
        got = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert got == [b"first packet", b"second", bytes(range(256))], cut
    reader = PacketReader()
    got = [packet for byte in wire for packet in reader.feed(bytes([byte]))]
    assert got == [b"first packet", b"second", bytes(range(256))]
    assert reader.pending == 0


def test_reader_keeps_a_partial_packet_pending() -> None:
    reader = PacketReader()
    assert reader.feed(frame(b"hello")[:6]) == []
    assert reader.pending == 6
    assert reader.feed(b"llo") == [b"hello"]


def test_packets_up_to_4_mib_pass_and_larger_are_refused() -> None:
    payload = bytes(MAX_PACKET)
    assert PacketReader().feed(frame(payload)) == [payload]
    with pytest.raises(PacketTooLarge):
        frame(payload + b"x")
    reader = PacketReader()
    # Refused on the length prefix alone, before any of the announced bytes arrive.
    with pytest.raises(PacketTooLarge):
        reader.feed((MAX_PACKET + 1).to_bytes(4, "big"))
    split = PacketReader()
    assert split.feed(b"\xff\xff") == []  # not a whole length yet
    with pytest.raises(PacketTooLarge):
        split.feed(b"\xff\xff")


def test_messages_round_trip_and_garbage_is_refused() -> None:
    for message in (Ping(7, "node-1.dc2", "node-0.dc1"), Ack(7, "node-1.dc2")):
        assert decode_message(encode_message(message)) == message
    assert encode_message(Ping(1, "a.dc1", "b.dc2"))[0] == 0  # memberlist pingMsg
    assert encode_message(Ack(1, "a.dc1"))[0] == 2  # memberlist ackRespMsg
    for garbage in (b"", b"\x00not json", b"\x09{}", b"\x00{}"):
        with pytest.raises(ValueError):
            decode_message(garbage)
    view = PushPull("node-0.dc2", (MemberState("node-0.dc2", "127.0.2.10:8300"),))
    assert decode_push_pull(encode_push_pull(view)) == view
    with pytest.raises(ValueError):
        decode_push_pull(b'{"type": "other"}\n')


def test_command_limits_are_the_layouts() -> None:
    import meshgw.demo as command
    from meshgw.demo import layout

    assert command.MAX_DATACENTERS == layout.MAX_DATACENTERS
    assert command.MAX_SERVERS_PER_DC == layout.MAX_SERVERS_PER_DC
    assert command.MAX_GATEWAYS_PER_DC == layout.MAX_GATEWAYS_PER_DC


def test_rpc_answers() -> None:
    facts = RpcFacts("node-1.dc2", "127.0.2.10:8300", ("dc1", "dc2"))
    assert rpc_answer(facts, "Status.Ping\n") == "pong node-1.dc2"
    assert rpc_answer(facts, "Status.Leader") == "127.0.2.10:8300"
    assert rpc_answer(facts, "Catalog.ListDatacenters") == "dc1 dc2"
    assert rpc_answer(facts, "Nope").startswith("error: unknown method 'Nope'")


def test_counters_are_read_from_prometheus_text() -> None:
    text = "\n".join(
        [
            "# TYPE meshgw_connections counter",
            'meshgw_connections_total{route_kind="local_server",datacenter="dc1",'
            'outcome="closed"} 5.0',
            'meshgw_connections_total{route_kind="remote_server",datacenter="dc2",'
            'outcome="closed"} 3.0',
            'meshgw_connections_total{route_kind="remote_server",datacenter="dc2",'
            'outcome="upstream_reset"} 1.0',
            "# TYPE meshgw_bytes counter",
            'meshgw_bytes_total{route_kind="remote_server",datacenter="dc2",'
            'direction="upstream"} 100.0',
            "# TYPE meshgw_upstream_connect_failures counter",
            'meshgw_upstream_connect_failures_total{route_kind="remote_server",'
            'datacenter="dc2",reason="econnrefused"} 2.0',
            "# TYPE meshgw_rejections counter",
            'meshgw_rejections_total{reason="unknown_sni"} 4.0',
            "",
        ]
    )
    counters = parse_counters(text)
    assert (counters.to_local, counters.to_remote, counters.aborted) == (5, 4, 1)
    assert (counters.bytes, counters.failovers) == (100, 2)
    assert counters.rejections == (("unknown_sni", 4),)


# --- a simulated server refuses what a Consul server refuses ------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    nodes = [("dc1", "node-0"), ("dc1", "node-1"), ("dc2", "node-0")]
    return make_pki(tmp_path_factory.mktemp("pki"), nodes)


def spec_of(pki: Pki, dc: str, node: str) -> ServerSpec:
    cert, key = pki.servers[(dc, node)]
    return ServerSpec(node, dc, "127.0.0.1", cert, key)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[SimServer]:
    sim = SimServer(spec_of(pki, "dc1", "node-0"), pki.ca, ("dc1", "dc2"))
    await sim.start(None)
    try:
        yield sim
    finally:
        await sim.close()


async def talk(
    port: int, context: ssl.SSLContext, sni: str, request: bytes
) -> tuple[bytes | None, str | None]:
    """Connect, send `request`, read the answer: (answer, None), or (None, why it failed).

    With TLS 1.3 a refused client certificate shows only after the client's handshake is done,
    as an alert or a close on the first read; both count as refused.
    """
    writer = None
    try:
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=sni
            )
            writer.write(request)
            await writer.drain()
            answer = await reader.readline()
            return (answer, None) if answer else (None, "closed")
    except (OSError, EOFError) as error:
        return None, type(error).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_server_answers_a_consul_like_client(server: SimServer, pki: Pki) -> None:
    context = client_context(spec_of(pki, "dc2", "node-0"), pki.ca, ALPN_RPC)
    answer, error = await talk(server.port, context, server.spec.sni, b"Status.Ping\n")
    assert error is None
    assert answer == b"pong node-0.dc1\n"
    assert server.accepted[ALPN_RPC] == 1


async def test_server_refuses_a_client_without_certificate(server: SimServer, pki: Pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca)
    context.set_alpn_protocols([ALPN_RPC])
    answer, error = await talk(server.port, context, server.spec.sni, b"Status.Ping\n")
    assert answer is None and error is not None
    assert not server.accepted


async def test_server_refuses_a_certificate_of_another_ca(
    server: SimServer, tmp_path: Path
) -> None:
    stranger = make_pki(tmp_path, [("dc1", "node-9")])
    cert, key = stranger.servers[("dc1", "node-9")]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the server's verification is under test here
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols([ALPN_RPC])
    answer, error = await talk(server.port, context, server.spec.sni, b"Status.Ping\n")
    assert answer is None and error is not None
    assert not server.accepted


async def test_server_refuses_another_servers_name(server: SimServer, pki: Pki) -> None:
    """A connection for node-1 delivered to node-0 (a misrouting gateway) is refused by the
    server, and a Consul client with hostname verification would refuse it as well."""
    other = "node-1.server.dc1.consul"
    lenient = client_context(spec_of(pki, "dc2", "node-0"), pki.ca, ALPN_RPC)
    lenient.check_hostname = False
    answer, error = await talk(server.port, lenient, other, b"Status.Ping\n")
    assert answer is None and error is not None
    assert server.refused["wrong_server_name"] == 1
    strict = client_context(spec_of(pki, "dc2", "node-0"), pki.ca, ALPN_RPC)
    answer, error = await talk(server.port, strict, other, b"Status.Ping\n")
    assert answer is None and error is not None
    assert not server.accepted


async def test_server_closes_on_a_packet_over_4_mib(server: SimServer, pki: Pki) -> None:
    context = client_context(spec_of(pki, "dc2", "node-0"), pki.ca, ALPN_PACKET)
    ping = frame(encode_message(Ping(1, "node-0.dc1", "node-0.dc2")))
    too_big = (MAX_PACKET + 1).to_bytes(4, "big")
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=context, server_hostname=server.spec.sni
        )
        writer.write(ping + ping)  # two packets in one write: two acks
        await writer.drain()
        packets = PacketReader()
        acks: list[bytes] = []
        while len(acks) < 2:
            data = await reader.read(65536)
            assert data, "closed before both acks"
            acks += packets.feed(data)
        assert [decode_message(a) for a in acks] == [Ack(1, "node-0.dc1")] * 2
        writer.write(too_big)
        await writer.drain()
        with contextlib.suppress(OSError):
            assert await reader.read(65536) == b""
        writer.close()
    assert server.refused["packet_too_large"] == 1


# --- the agents: each datacenter's own, the others' reached with ?dc= ---------------------------


def gateway_registration(host: str, port: int, service_id: str) -> dict[str, Any]:
    """What `meshgw run --register --expose-servers` sends (the registrar's own body)."""
    registration = GatewayRegistration(
        service_id=service_id,
        address=(host, port),
        wan_address=(host, port),
        expose_servers=True,
    )
    return decode_registration(registration.body())


async def test_agents_forward_every_datacenter_and_follow_its_catalog() -> None:
    agents = Agents(("dc1", "dc2"))
    servers = {
        "dc1": [ServerEntry("node-0", "127.0.0.10", 8300)],
        "dc2": [ServerEntry("node-0", "127.0.0.20", 8300)],
    }
    hosts = {"dc1": "127.0.0.1", "dc2": "127.0.0.1"}
    await agents.start(hosts, servers, well_known_ports=False)
    dc1, dc2 = agents.sims["dc1"], agents.sims["dc2"]
    try:
        assert dc1.url != dc2.url
        async with aiohttp.ClientSession() as http:

            async def get(sim: SimConsul, path: str) -> Any:
                async with http.get(sim.url + path) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            assert (await get(dc1, "/v1/agent/self"))["Config"]["Datacenter"] == "dc1"
            assert await get(dc2, "/v1/catalog/datacenters") == ["dc2", "dc1"]
            remote = await get(dc1, "/v1/health/service/consul?dc=dc2")
            assert [(e["Node"]["Node"], e["Node"]["Address"]) for e in remote] == [
                ("node-0", "127.0.0.20")
            ]
            assert await get(dc1, "/v1/internal/federation-states") == []

            # A gateway registers with dc2's agent: dc1's agent lists it with ?dc=dc2, and both
            # agents' federation states hold it.
            dc2.agent.register(
                gateway_registration("127.0.0.2", 8443, "mesh-gateway-0"), replace_checks=True
            )
            await dc1.raft.signal.wait_async(lambda: dc1.federation.state("dc2") is not None, WAIT)
            listed = await get(dc1, "/v1/health/service/mesh-gateway?dc=dc2")
            assert [e["Service"]["ID"] for e in listed] == ["mesh-gateway-0"]
            assert listed[0]["Service"]["TaggedAddresses"]["wan"] == {
                "Address": "127.0.0.2",
                "Port": 8443,
            }
            states = await get(dc2, "/v1/internal/federation-states")
            assert [s["Datacenter"] for s in states] == ["dc2"]
            assert agents.gateway_locator("dc2") == ["127.0.0.2:8443"]
            assert agents.gateway_locator("dc1") == []
            assert agents.check_status("dc2", "mesh-gateway-0") == "passing"

            dc2.agent.deregister("mesh-gateway-0")
            await dc1.raft.signal.wait_async(
                lambda: not (dc1.federation.state("dc2") or {}).get("MeshGateways"), WAIT
            )
            assert await get(dc1, "/v1/health/service/mesh-gateway?dc=dc2") == []
            assert agents.check_status("dc2", "mesh-gateway-0") == "-"
    finally:
        await agents.stop()


# --- what a route table holds, and the same routes as settings ---------------------------------


def routes_document(*routes: tuple[str, list[str], str], refused: tuple[str, ...] = ()) -> Any:
    return {
        "routes": [
            {
                "match": match,
                "endpoints": [{"address": a, "healthy": True, "source": source} for a in addresses],
            }
            for match, addresses, source in routes
        ],
        "refused": {name: "peered_l7" for name in refused},
    }


def test_missing_routes_names_what_is_not_there_yet() -> None:
    both = ["127.0.2.1:8443", "127.0.2.2:8443"]
    want = {"*.server.dc2.consul": set(both)}
    complete = routes_document(("*.server.dc2.consul", both, "consul"))
    assert missing_routes(complete, want) == []
    assert missing_routes(routes_document(), want) == ["no route for *.server.dc2.consul"]
    one = routes_document(("*.server.dc2.consul", ["127.0.2.1:8443"], "consul"))
    assert missing_routes(one, want) == [
        "*.server.dc2.consul -> 127.0.2.1:8443, not 127.0.2.1:8443, 127.0.2.2:8443"
    ]
    # The same addresses, but from the primary_gateways bootstrap: not learned from Consul yet.
    boot = routes_document(("*.server.dc2.consul", both, "primary-gateways"))
    assert missing_routes(boot, want) == [
        "*.server.dc2.consul: an endpoint is unhealthy or not from Consul"
    ]
    # Every gateway of a datacenter stopped: no route is what is expected.
    assert missing_routes(routes_document(), {"*.server.dc2.consul": set()}) == []
    assert missing_routes(complete, want, refused=["api.x"]) == ["api.x not refused"]
    assert missing_routes(routes_document(refused=("api.x",)), {}, refused=["api.x"]) == []


# --- a federation in this process: the gateways learn it from the agents ----------------------


def demo_env() -> dict[str, str]:
    # A MESHGW_DC or CONSUL_HTTP_ADDR in the developer's shell must not change the demo.
    return {k: v for k, v in os.environ.items() if not k.startswith(("MESHGW_", "CONSUL_"))}


async def run_command(argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=demo_env()
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, output.decode()


async def test_gateways_register_discover_and_doctor_passes(tmp_path: Path) -> None:
    federation = Federation(Shape(datacenters=2, servers_per_dc=1, gateways_per_dc=1), tmp_path)
    try:
        await federation.start(lambda _: None)
        for dc in federation.datacenters:
            child = federation.gateways[dc][0]
            config = child.spec.config.read_text()
            # Nothing routable is configured: no servers, no gateways, not even the datacenter.
            assert not re.search(r"^(server|gateway|dc) =", config, re.M), config
            # The agent saw the registration, as `consul connect envoy -register` sends it.
            sim = federation.agents.sims[dc]
            assert sim.requests.find("/v1/agent/service/register", "PUT")
            service = federation.agents.registrations(dc)["mesh-gateway-0"]
            assert service["Kind"] == "mesh-gateway"
            assert service["Meta"] == {"consul-wan-federation": "1"}
            assert service["TaggedAddresses"]["wan"] == {
                "Address": child.spec.host,
                "Port": child.spec.port,
            }
            # Every route the table holds came from the agent.
            routes = json.loads(await fetch_admin(child.spec.admin, "/v1/routes"))
            sources = {e["source"] for r in routes["routes"] for e in r["endpoints"]}
            assert sources == {"consul"}, routes
            assert routes["datacenter"] == dc
        results = await federation.round()
        assert report.verdict(results) == "2 of 2 paths work through the gateways"
        assert all(r.remote_gateways for r in results)

        assert federation.pki is not None
        gateway = federation.gateways["dc1"][0]
        hints = report.Hints(
            agent=federation.agents.url("dc1"),
            ca=federation.pki.ca,
            client_cert=federation.pki.servers[("dc1", "node-0")],
            gateway=gateway,
            target_sni="node-0.server.dc2.consul",
            local_sni="node-0.server.dc1.consul",
        )
        printed = report.try_by_hand(hints)
        doctor = next(line for line in printed.splitlines() if " doctor --consul " in line)
        status, output = await run_command(shlex.split(doctor))
        assert status == 0, output
        assert "0 failed, 0 skipped" in output, output
        assert re.search(r"PASS\s+tls\s+node-0\.server\.dc2\.consul via", output), output
        assert re.search(r"PASS\s+forwarding\s+dc2", output), output
        routes = next(line for line in printed.splitlines() if " routes --config " in line)
        status, output = await run_command(shlex.split(routes))
        assert status == 0, output
        assert "node-0.server.dc2.consul: remote_server" in output, output
    finally:
        await federation.close()
    assert all(not child.running for child in federation.children)


async def test_check_fails_when_a_server_goes_away(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --check story itself: node-0.dc2 goes away during the failover; every path to it
    fails in round 2, and the check says so and fails."""
    federation = Federation(Shape(datacenters=2, servers_per_dc=1, gateways_per_dc=2), tmp_path)
    real_round = federation.round
    rounds: list[list[Any]] = []

    async def round_with_a_server_gone() -> list[Any]:
        if rounds:
            gone = next(s for s in federation.servers if s.member == "node-0.dc2")
            await gone.close()
        rounds.append(await real_round())
        return rounds[-1]

    federation.round = round_with_a_server_gone  # type: ignore[method-assign]
    options = DemoOptions(federation.shape, check=True)
    try:
        status = await runner._story(federation, options, asyncio.Event())
    finally:
        await federation.close()
    output = capsys.readouterr().out
    assert status == console.EXIT_FAILED, output
    assert all(r.ok for r in rounds[0]), output
    assert "check FAILED" in output
    assert "node-0.dc1 -> node-0.dc2 via dc1/gw-1" in output
    assert "1 of 2 paths work through the gateways; 1 FAIL, towards node-0.dc2" in output
    members = report.members_table(federation.servers, rounds[1])
    assert re.search(r"node-0\.dc2\s+\S+\s+failed\s+server\s+dc2\s+0/1", members), members
    assert re.search(r"node-0\.dc1\s+\S+\s+alive", members), members
    assert all(not child.running for child in federation.children)


def test_a_gateway_that_lost_its_port_says_so_as_the_demo_reads_it(tmp_path: Path) -> None:
    taken = OSError(errno.EADDRINUSE, "Address already in use")
    line = "meshgw: error: " + bind_error("--listen", parse_address("127.0.1.1:8443"), taken)
    spec = GatewaySpec("dc1", 0, "127.0.1.1", 8443, 19100, tmp_path / "c", tmp_path / "l")
    assert GatewayStartError(spec, "exited with status 2", [line]).address_in_use
    other = "meshgw: error: --dc 'a.b': not a datacenter name"
    assert not GatewayStartError(spec, "exited with status 2", [other]).address_in_use


class StandInGateway(GatewayChild):
    """Says what `meshgw run` says when its port is taken, or that it listens, then waits."""

    def command(self) -> list[str]:
        if self.spec.port == TAKEN_PORT:
            line = "meshgw: error: " + bind_error(
                "--listen", parse_address(self.spec.listen), OSError(errno.EADDRINUSE, "in use")
            )
            return [sys.executable, "-c", f"import sys; print({line!r}, file=sys.stderr); exit(2)"]
        line = f"info meshgw meshgw listening listen={self.spec.listen} admin={self.spec.admin}"
        script = f"import sys, time; print({line!r}, file=sys.stderr, flush=True); time.sleep(60)"
        return [sys.executable, "-c", script]


TAKEN_PORT = 8443


async def test_gateways_start_again_when_a_port_was_taken(tmp_path: Path) -> None:
    """Somebody binds a gateway's port between the demo's look and the gateway's bind: the
    gateway exits saying so, and the set starts again on ports the kernel picks."""
    attempts: list[bool] = []
    said: list[str] = []

    def build(well_known_ports: bool) -> list[GatewayChild]:
        attempts.append(well_known_ports)
        port = TAKEN_PORT if well_known_ports else 9443
        log = tmp_path / f"gw-{len(attempts)}.log"
        spec = GatewaySpec("dc1", 0, "127.0.0.1", port, 19100, tmp_path / "gw.toml", log)
        return [StandInGateway(spec)]

    children = await start_gateways(build, said.append)
    try:
        assert attempts == [True, False]
        assert children[0].running
        assert said == [
            "gateways: a port was taken meanwhile; starting them again on other ports",
            "gateways: 1 `meshgw run` processes, all listening",
        ]
    finally:
        await children[0].stop()
    assert "address already in use" in (tmp_path / "gw-1.log").read_text()
    assert not children[0].running


# --- peering in this process ---------------------------------------------------------------------


async def test_peering_paths_work_and_the_l7_export_is_refused(tmp_path: Path) -> None:
    demo = PeeringDemo(Shape(datacenters=2, servers_per_dc=1, gateways_per_dc=1), tmp_path)
    try:
        await demo.start(lambda _: None)
        paths = await peering_round(demo)
        by_kind = {p.kind: p for p in paths}
        assert len(paths) == 4 and set(by_kind) == {"peering", "service", "l7"}
        assert all(p.ok for p in paths), [(p.kind, p.detail) for p in paths]
        dials = [p for p in paths if p.kind == "peering"]
        assert {(p.local_gateway, p.remote_gateway) for p in dials} == {
            ("dc1/gw-0", "dc2/gw-0"),
            ("dc2/gw-0", "dc1/gw-0"),
        }
        assert {p.dialed.answered for p in dials} == {"node-0"}
        assert {p.dialed.alpn for p in dials} == {"h2"}
        service = by_kind["service"]
        assert (service.local_gateway, service.remote_gateway) == ("dc2/gw-0", "dc1/gw-0")
        assert service.dialed.answered == "db-0"
        assert demo.exporter.instances["db"].accepted == 1
        # The L7 export: refused by the exporter's gateway, counted, never connected onwards.
        assert not by_kind["l7"].dialed.ok
        assert by_kind["l7"].remote_gateway == "dc1/gw-0"
        assert demo.exporter.instances["api"].accepted == 0
        assert await peered_l7(demo) == 1
        # The importer's agent lists the imports at the exporter's gateway, with their SNI.
        importer = demo.importer.agent
        assert importer is not None
        imported = importer.peerings.imported("cluster-01", "db")
        assert [e["Service"]["Connect"]["PeerMeta"]["SNI"] for e in imported] == [
            [demo.service_sni("db")]
        ]
        # The printed `meshgw routes` runs the importer's gateway's discovery and explains
        # the names as that gateway routes them.
        routes = next(line for line in try_by_hand(demo) if " routes --config " in line)
        status, output = await run_command(shlex.split(routes))
        assert status == 0, output
        assert f"{demo.service_sni('db')}: peered_import" in output, output
        assert "cluster-01" in output, output
        wan = imported[0]["Service"]["TaggedAddresses"]["wan"]
        assert f"{wan['Address']}:{wan['Port']}" == demo.exporter.gateways[0].spec.listen
        for child in demo.children:
            assert child.last_routes is not None
            sources = {e["source"] for r in child.last_routes["routes"] for e in r["endpoints"]}
            assert sources == {"consul"}
    finally:
        await demo.close()
    assert all(not child.running for child in demo.children)


# --- the whole demo ----------------------------------------------------------------------------


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text()


def gateway_pids(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\s+dc\d+/gw-\d+\s+\S+\s+\S+\s+(\d+)\s", output, re.M)]


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT + 10)
def test_demo_check_passes_and_every_member_is_alive() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meshgw", "demo", "--check"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        cwd=REPO,
        env=demo_env(),
    )
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert elapsed < DEMO_TIMEOUT
    members = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\s+(node-\d+\.dc\d+)\s+\S+\s+(alive|failed)\s+server", output, re.M)
    }
    expected = {f"node-{i}.dc{k}" for i in range(3) for k in range(1, 4)}
    assert set(members) == expected, output
    assert set(members.values()) == {"alive"}, output
    assert "check passed" in output
    assert "54/54 paths" in output
    # The WAN members lead each round, then the verdict, then the pairs.
    first = output.index("Round 1")
    assert first < output.index("WAN members", first) < output.index("54 of 54 paths work")
    assert output.index("54 of 54 paths work") < output.index("Paths by datacenter pair")
    pairs = re.findall(r"^\s+dc\d\s+dc\d\s+9/9\s", output, re.M)
    assert len(pairs) == 12, output  # 6 datacenter pairs, each round
    pids = gateway_pids(output)
    assert len(set(pids)) == 6, output
    assert all(gone(pid) for pid in pids), "a gateway outlived the demo"


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT + 10)
def test_demo_runs_until_sigterm_then_stops_every_gateway(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    args = ["--dcs", "2", "--servers-per-dc", "1", "--gateways-per-dc", "1", "--dir", str(folder)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshgw", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=demo_env(),
    )
    try:
        assert proc.stdout is not None
        output = "".join(lines_until(proc.stdout, lambda line: "tail -f" in line, DEMO_TIMEOUT))
        assert "tail -f" in output, output
        assert "openssl s_client -connect" in output
        assert "-alpn consul/rpc-multi" in output
        pids = gateway_pids(output)
        assert len(pids) == 2 and not any(gone(pid) for pid in pids), output
        # The doctor command it prints succeeds while the demo runs.
        doctor = next(line for line in output.splitlines() if " doctor --consul " in line)
        checked = subprocess.run(
            shlex.split(doctor), capture_output=True, text=True, timeout=WAIT * 3, env=demo_env()
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert " 0 failed" in checked.stdout
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=WAIT * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0, output + rest
    assert all(gone(pid) for pid in pids)
    assert "meshgw listening" in (folder / "logs" / "dc1-gw-0.log").read_text()
    assert (folder / "gateways" / "dc2-gw-0.toml").exists()


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT + 10)
def test_peering_demo_check_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshgw", "demo", "--peering", "--check"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        cwd=REPO,
        env=demo_env(),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "8 of 8 connections went as they should" in output, output
    assert len(re.findall(r"^\s+peering dial\s.*ok: answered by", output, re.M)) == 4, output
    assert len(re.findall(r"^\s+tcp service\s.*ok: answered by cluster-01/db-0", output, re.M)) == 2
    assert len(re.findall(r"^\s+http export\s.*ok: refused", output, re.M)) == 2, output
    assert re.search(r"^\s+dc1/gw-\d.*\d peered_l7$", output, re.M), output
    pids = gateway_pids(output)
    assert len(set(pids)) == 4, output
    assert all(gone(pid) for pid in pids), "a gateway outlived the demo"


def test_peering_refuses_dcs() -> None:
    result = CliRunner().invoke(demo_command, ["--peering", "--dcs", "3"])
    assert result.exit_code == 2
    assert "--peering runs two clusters" in result.output
