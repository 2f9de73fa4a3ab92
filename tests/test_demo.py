"""`meshgw demo`: its wire formats, its simulated Consul servers, and the whole run end to end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshgw.demo import report
from meshgw.demo.federation import Federation, Shape
from meshgw.demo.gateways import parse_counters
from meshgw.demo.layout import Pki, ServerSpec, make_pki
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
from meshgw.demo.servers import SimServer, client_context
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


# --- a federation in this process: a path that fails is reported, not hidden -----------------


@pytest.mark.slow
async def test_a_server_that_goes_away_fails_its_paths(tmp_path: Path) -> None:
    federation = Federation(Shape(datacenters=2, servers_per_dc=2, gateways_per_dc=2), tmp_path)
    try:
        await federation.start(lambda _: None)
        first = await federation.round()
        assert all(r.ok for r in first), report.failed_paths(first)
        assert all(r.rtt is not None and r.rtt > 0 for r in first)
        # Every path names the remote gateways that carried it, learned from the access log.
        assert all(r.remote_gateways for r in first)
        assert all(g.startswith(r.target_dc + "/") for r in first for g in r.remote_gateways)

        gone_server = next(s for s in federation.servers if s.member == "node-1.dc2")
        await gone_server.close()
        second = await federation.round()
    finally:
        await federation.close()
    failed = report.failed_paths(second)
    assert len(failed) == 2  # node-0.dc1 and node-1.dc1 could not reach node-1.dc2
    assert all(
        line.startswith(("node-0.dc1 -> node-1.dc2", "node-1.dc1 -> node-1.dc2")) for line in failed
    )
    members = report.members_table(federation.servers, second)
    assert re.search(r"node-1\.dc2\s+\S+\s+failed\s+server\s+dc2\s+0/2", members), members
    assert re.search(r"node-0\.dc2\s+\S+\s+alive", members), members
    assert all(not child.running for child in federation.children)


# --- the whole demo ----------------------------------------------------------------------------


def demo_env() -> dict[str, str]:
    # A MESHGW_DC or CONSUL_HTTP_ADDR in the developer's shell must not change the demo.
    return {k: v for k, v in os.environ.items() if not k.startswith(("MESHGW_", "CONSUL_"))}


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
