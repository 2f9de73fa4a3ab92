"""meshgw's Consul client against the Consul API double: configuration, transport, errors,
blocking queries. Every wait is bounded; backoff and rate limits are shrunk so the file runs fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshgw.control.consul import (
    Backoff,
    BlockingQuery,
    ConsulBadResponse,
    ConsulClient,
    ConsulConfig,
    ConsulConfigError,
    ConsulForbidden,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulRequestError,
    ConsulTimeout,
    ConsulUnavailable,
    RateLimit,
    Response,
    Secret,
)
from meshgw.control.consul.blocking import TokenBucket
from meshgw.control.consul.client import acl_hint
from meshgw.simconsul import GATEWAY_BODY, AclToken, SimConsul
from meshgw.tls.certs import create_ca, create_cert

TOKEN = "b1gs3cr3t-0000-4000-8000-00000000f00d"
FAST: dict[str, Any] = {
    "rate_limit": RateLimit(rate=float("inf")),
    "backoff": Backoff(base=0.01, cap=0.05),
}


def config_for(double: SimConsul, **kwargs: Any) -> ConsulConfig:
    return ConsulConfig.from_env({"CONSUL_HTTP_ADDR": double.url}, **kwargs)


@pytest.fixture
async def double() -> AsyncIterator[SimConsul]:
    async with SimConsul() as running:
        yield running


@pytest.fixture
async def acl_double() -> AsyncIterator[SimConsul]:
    tokens = [
        AclToken(TOKEN, ("service:read", "node:read"), accessor_id="aaaa-bbbb"),
        AclToken("writer", ("service:write:mesh-gateway", "node:read"), accessor_id="cccc"),
    ]
    async with SimConsul(acl_tokens=tokens) as running:
        yield running


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "kwargs", "address", "unix"),
    [
        ({}, {}, "http://127.0.0.1:8500", None),
        ({"CONSUL_HTTP_ADDR": "10.1.2.3:8501"}, {}, "http://10.1.2.3:8501", None),
        (
            {"CONSUL_HTTP_ADDR": "https://consul.service:8501"},
            {},
            "https://consul.service:8501",
            None,
        ),
        ({"CONSUL_HTTP_ADDR": "http://h:8500/prefix/"}, {}, "http://h:8500/prefix", None),
        (
            {"CONSUL_HTTP_ADDR": "10.1.2.3:8501", "CONSUL_HTTP_SSL": "true"},
            {},
            "https://10.1.2.3:8501",
            None,
        ),
        ({"CONSUL_HTTP_ADDR": "http://h:1", "CONSUL_HTTP_SSL": "1"}, {}, "http://h:1", None),
        ({"CONSUL_HTTP_ADDR": "[::1]:8500"}, {}, "http://[::1]:8500", None),
        ({"CONSUL_HTTP_ADDR": "consul.example"}, {}, "http://consul.example:80", None),
        ({"CONSUL_HTTP_ADDR": "https://consul.example"}, {}, "https://consul.example:443", None),
        (
            {"CONSUL_HTTP_ADDR": "unix:///run/consul.sock"},
            {},
            "unix:///run/consul.sock",
            "/run/consul.sock",
        ),
        (
            {"CONSUL_HTTP_ADDR": "10.9.9.9:1"},
            {"address": "10.0.0.2:8500"},
            "http://10.0.0.2:8500",
            None,
        ),
    ],
)
def test_address_forms(
    environ: dict[str, str], kwargs: dict[str, Any], address: str, unix: str | None
) -> None:
    config = ConsulConfig.from_env(environ, **kwargs)
    assert config.address == address
    assert config.unix_socket == unix


def test_tls_variables(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    config = ConsulConfig.from_env(
        {
            "CONSUL_HTTP_ADDR": "https://127.0.0.1:8501",
            "CONSUL_CACERT": str(pki.ca),
            "CONSUL_CAPATH": str(pki.ca_dir),
            "CONSUL_CLIENT_CERT": str(pki.client_cert),
            "CONSUL_CLIENT_KEY": str(pki.client_key),
            "CONSUL_TLS_SERVER_NAME": "consul.test",
            "CONSUL_HTTP_SSL_VERIFY": "false",
        }
    )
    assert (config.ca_file, config.ca_path) == (str(pki.ca), str(pki.ca_dir))
    assert (config.client_cert, config.client_key) == (str(pki.client_cert), str(pki.client_key))
    assert config.tls_server_name == "consul.test"
    assert config.verify is False
    assert config.source_of("ca_file") == "CONSUL_CACERT"
    explicit = ConsulConfig.from_env(
        {"CONSUL_HTTP_ADDR": "https://h:1", "CONSUL_HTTP_SSL_VERIFY": "false"}, verify=True
    )
    assert explicit.verify is True  # explicit arguments beat the environment


@pytest.mark.parametrize(
    ("environ", "kwargs", "message"),
    [
        ({"CONSUL_HTTP_SSL": "yes"}, {}, "CONSUL_HTTP_SSL='yes' is not a boolean"),
        (
            {"CONSUL_HTTP_SSL_VERIFY": "maybe"},
            {},
            "CONSUL_HTTP_SSL_VERIFY='maybe' is not a boolean",
        ),
        ({"CONSUL_HTTP_ADDR": "ftp://h:1"}, {}, "CONSUL_HTTP_ADDR: unknown protocol scheme 'ftp'"),
        ({"CONSUL_HTTP_ADDR": "h:99999"}, {}, "port 99999 is out of range"),
        ({"CONSUL_HTTP_ADDR": "unix://"}, {}, "unix:// needs a socket path"),
        ({"CONSUL_HTTP_ADDR": "h:1:2"}, {}, "is not HOST:PORT"),
        ({}, {"address": "bad:port"}, "--consul='bad:port' is not HOST:PORT"),
        (
            {"CONSUL_CACERT": "/nonexistent/ca.pem"},
            {},
            "CONSUL_CACERT=/nonexistent/ca.pem: no such file",
        ),
        ({"CONSUL_CAPATH": "/nonexistent"}, {}, "CONSUL_CAPATH=/nonexistent: not a directory"),
        (
            {"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/t"},
            {},
            "CONSUL_HTTP_TOKEN_FILE=/nonexistent/t: cannot read",
        ),
        ({}, {"token_file": "/nonexistent/t"}, "--token-file=/nonexistent/t: cannot read"),
        (
            {},
            {"address": "h:0", "names": {"address": "MESHGW_CONSUL"}},
            "MESHGW_CONSUL='h:0': port 0 is out of range",
        ),
    ],
)
def test_bad_values_name_the_variable(
    environ: dict[str, str], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConsulConfigError) as error:
        ConsulConfig.from_env(environ, **kwargs)
    assert message in str(error.value)


def test_bad_tls_material_is_reported_at_configuration(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConsulConfigError, match=r"CONSUL_CACERT=.*junk.pem: not a PEM CA"):
        ConsulConfig.from_env({"CONSUL_HTTP_ADDR": "https://h:1", "CONSUL_CACERT": str(junk)})
    with pytest.raises(ConsulConfigError, match="CONSUL_CLIENT_KEY is not"):
        ConsulConfig.from_env({"CONSUL_CLIENT_CERT": str(pki.client_cert)})
    with pytest.raises(ConsulConfigError, match="not a matching PEM certificate and key"):
        ConsulConfig.from_env(
            {
                "CONSUL_HTTP_ADDR": "https://h:1",
                "CONSUL_CLIENT_CERT": str(pki.client_cert),
                "CONSUL_CLIENT_KEY": str(pki.server_key),
            }
        )


def test_token_precedence(tmp_path: Path) -> None:
    env_file = tmp_path / "env-token"
    env_file.write_text("from-env-file\n")
    flag_file = tmp_path / "flag-token"
    flag_file.write_text("  from-flag-file  \n")
    env = {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(env_file)}

    def token(environ: dict[str, str], **kwargs: Any) -> tuple[str | None, str]:
        config = ConsulConfig.from_env(environ, **kwargs)
        return (config.token.reveal() if config.token else None), config.token_source

    assert token(env, token="explicit", token_file=str(flag_file)) == (
        "explicit",
        "the token argument",
    )
    assert token(env, token_file=str(flag_file)) == ("from-flag-file", f"--token-file {flag_file}")
    assert token(env) == ("from-env", "CONSUL_HTTP_TOKEN")
    assert token({"CONSUL_HTTP_TOKEN_FILE": str(env_file)}) == (
        "from-env-file",
        f"CONSUL_HTTP_TOKEN_FILE={env_file}",
    )
    assert token({}) == (None, "none")


def test_unusable_tokens_are_refused_without_echoing_them(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConsulConfigError, match="is empty"):
        ConsulConfig.from_env({"CONSUL_HTTP_TOKEN_FILE": str(empty)})
    two_lines = tmp_path / "two-lines"
    two_lines.write_text("s3cr3t-part-one\ns3cr3t-part-two\n")
    with pytest.raises(ConsulConfigError) as error:
        ConsulConfig.from_env({}, token_file=str(two_lines))
    assert "single line" in str(error.value)
    assert "s3cr3t" not in str(error.value)
    with pytest.raises(ConsulConfigError) as error:
        ConsulConfig.from_env({}, address="http://user:hunter2@h:1")
    assert "hunter2" not in str(error.value)


def test_token_never_printed() -> None:
    config = ConsulConfig.from_env({"CONSUL_HTTP_TOKEN": TOKEN})
    client = ConsulClient(config)
    for text in (repr(config), str(config), repr(client), f"{config.token}", str(config.token)):
        assert TOKEN not in text
    assert config.token == Secret(TOKEN)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(config.token)


# --- transport --------------------------------------------------------------------------------


async def test_get_parses_body_index_and_leader(double: SimConsul) -> None:
    async with ConsulClient(config_for(double)) as client:
        answer = await client.get("/v1/health/service/consul")
        assert isinstance(answer, Response)
        assert [e["Node"]["Node"] for e in answer.body] == ["consul-server-0"]
        assert answer.index >= 1
        me = await client.get("agent/self")  # "/v1/" is implied
        assert me.body["Config"]["Datacenter"] == "dc1"
        assert me.index == 0  # agent/self sends no X-Consul-Index
        assert (await client.get("/v1/status/leader")).body == "10.0.0.10:8300"


async def test_params_and_dc_are_sent(double: SimConsul) -> None:
    double.gateways.add("dc2", "gw", "10.2.0.5")
    async with ConsulClient(config_for(double)) as client:
        answer = await client.get(
            "/v1/health/service/mesh-gateway", params={"passing": True, "stale": False}, dc="dc2"
        )
    assert [e["Node"]["Datacenter"] for e in answer.body] == ["dc2"]
    sent = double.requests.find("/v1/health/service/mesh-gateway")[-1]
    assert dict(sent.query) == {"passing": "", "dc": "dc2"}


async def test_put_registration_sends_token_and_body(acl_double: SimConsul) -> None:
    config = config_for(acl_double, token="writer")
    async with ConsulClient(config) as client:
        assert await client.put("/v1/agent/service/register", GATEWAY_BODY) is None
    sent = acl_double.requests.find("/v1/agent/service/register")[-1]
    assert sent.token == "writer"
    assert sent.json == GATEWAY_BODY
    assert sent.headers["Content-Type"] == "application/json"
    assert acl_double.agent.service("mesh-gateway") is not None


async def test_no_token_header_without_a_token(double: SimConsul) -> None:
    async with ConsulClient(config_for(double)) as client:
        await client.get("/v1/agent/self")
    assert double.requests.find("/v1/agent/self")[-1].token is None


async def test_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "consul.sock"
    double = SimConsul()
    await double.start(unix_path=str(socket_path))
    try:
        config = ConsulConfig.from_env({"CONSUL_HTTP_ADDR": f"unix://{socket_path}"})
        async with ConsulClient(config) as client:
            me = await client.get("/v1/agent/self")
        assert me.body["Config"]["NodeName"] == "consul-client-0"
    finally:
        await double.stop()


async def test_https_with_ca_server_name_and_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    server.load_verify_locations(pki.ca)
    server.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as verify_incoming = true
    double = SimConsul()
    await double.start(ssl_context=server)
    try:
        base = {
            "CONSUL_HTTP_ADDR": f"127.0.0.1:{double.port}",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_CLIENT_CERT": str(pki.client_cert),
            "CONSUL_CLIENT_KEY": str(pki.client_key),
        }
        # The server certificate names 127.0.0.1 and consul.test.
        for extra in (
            {"CONSUL_CACERT": str(pki.ca)},
            {"CONSUL_CAPATH": str(pki.ca_dir)},
            {"CONSUL_CACERT": str(pki.ca), "CONSUL_TLS_SERVER_NAME": "consul.test"},
            {"CONSUL_HTTP_SSL_VERIFY": "false"},
        ):
            async with ConsulClient(ConsulConfig.from_env(base | extra)) as client:
                assert (await client.get("/v1/status/leader")).body == "10.0.0.10:8300"

        wrong_name = base | {"CONSUL_CACERT": str(pki.ca), "CONSUL_TLS_SERVER_NAME": "other.test"}
        untrusted = {k: v for k, v in base.items()}  # system CAs do not know our CA
        no_client_cert = {
            "CONSUL_HTTP_ADDR": base["CONSUL_HTTP_ADDR"],
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_CACERT": str(pki.ca),
        }
        for environ in (wrong_name, untrusted, no_client_cert):
            async with ConsulClient(ConsulConfig.from_env(environ), timeout=5) as client:
                with pytest.raises(ConsulUnavailable) as error:
                    await client.get("/v1/status/leader")
            assert f"127.0.0.1:{double.port}" in str(error.value)
    finally:
        await double.stop()


# --- errors -----------------------------------------------------------------------------------


def assert_no_token(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    assert TOKEN not in text
    assert TOKEN not in repr(error)


async def test_forbidden_names_the_permission_and_hides_the_token(acl_double: SimConsul) -> None:
    async with ConsulClient(config_for(acl_double, token=TOKEN)) as client:
        with pytest.raises(ConsulForbidden) as error:
            await client.put("/v1/agent/service/register", GATEWAY_BODY)
    message = str(error.value)
    assert "Permission denied: token with AccessorID 'aaaa-bbbb'" in message
    assert 'service:write on "mesh-gateway"' in message
    assert "the token from the token argument needs" in message
    assert error.value.permission == 'service:write on "mesh-gateway"'
    assert error.value.status == 403
    assert_no_token(error.value)


async def test_forbidden_without_token_or_with_unknown_token(acl_double: SimConsul) -> None:
    async with ConsulClient(config_for(acl_double)) as client:
        with pytest.raises(ConsulForbidden, match="no ACL token was sent: set CONSUL_HTTP_TOKEN"):
            await client.get("/v1/agent/self")
    environ = {"CONSUL_HTTP_ADDR": acl_double.url, "CONSUL_HTTP_TOKEN": "deleted-token"}
    async with ConsulClient(ConsulConfig.from_env(environ)) as client:
        with pytest.raises(ConsulForbidden) as error:
            await client.get("/v1/agent/self")
    assert "ACL not found" in str(error.value)
    assert "does not know the token from CONSUL_HTTP_TOKEN" in str(error.value)
    assert "deleted-token" not in str(error.value)


async def test_http_errors_carry_status_and_an_excerpt(double: SimConsul) -> None:
    double.faults.fail("/v1/health/", status=500, body="rpc error: " + "x" * 400)
    async with ConsulClient(config_for(double)) as client:
        with pytest.raises(ConsulHTTPError) as error:
            await client.get("/v1/health/service/consul")
        assert error.value.status == 500
        assert error.value.body.startswith("rpc error: xxx")
        assert len(error.value.body) == 200
        with pytest.raises(ConsulNotFound):
            await client.get("/v1/internal/federation-state/dc9")
        with pytest.raises(ConsulNotFound):
            await client.get("/v1/agent/service/nope")
        # A JSON object where Consul answers a list is refused; a list endpoint expected.
        double.faults.clear()
        double.faults.fail("/v1/health/", status=200, body='{"not": "a list"}')
        with pytest.raises(ConsulBadResponse, match="expected a JSON array, got object"):
            await client.get("/v1/health/service/consul")


async def test_garbage_is_a_bad_response(double: SimConsul) -> None:
    double.faults.garbage("/v1/catalog/services")
    async with ConsulClient(config_for(double, token=TOKEN)) as client:
        with pytest.raises(ConsulBadResponse, match="invalid JSON") as error:
            await client.get("/v1/catalog/services")
    assert_no_token(error.value)


async def test_dropped_connection_is_unavailable(double: SimConsul) -> None:
    double.faults.drop("/v1/status/leader")
    async with ConsulClient(config_for(double, token=TOKEN)) as client:
        with pytest.raises(ConsulUnavailable, match="closed the connection") as error:
            await client.get("/v1/status/leader")
    assert_no_token(error.value)


async def test_hang_is_a_timeout(double: SimConsul) -> None:
    double.faults.hang("/v1/agent/self")
    async with ConsulClient(config_for(double), timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(ConsulTimeout, match=r"did not answer GET /v1/agent/self within 0.2s"):
            await client.get("/v1/agent/self")
    assert time.monotonic() - started < 2


async def test_down_is_unavailable_and_names_the_address(double: SimConsul) -> None:
    await double.down()
    async with ConsulClient(config_for(double, token=TOKEN)) as client:
        with pytest.raises(ConsulUnavailable) as error:
            await client.get("/v1/agent/self")
    assert f"cannot connect to Consul at {double.url}" in str(error.value)
    assert "CONSUL_HTTP_ADDR" in str(error.value)
    assert_no_token(error.value)


async def test_blocking_request_timeout_covers_wait_and_jitter(double: SimConsul) -> None:
    async with ConsulClient(config_for(double), timeout=0.2) as client:
        first = await client.get("/v1/health/service/consul")
        started = time.monotonic()
        again = await client.get("/v1/health/service/consul", index=first.index, wait="400ms")
    assert again.index == first.index
    assert 0.4 <= time.monotonic() - started < 1.5
    sent = double.requests.find("/v1/health/service/consul")[-1]
    assert (sent.query["index"], sent.query["wait"]) == (str(first.index), "400ms")


# --- blocking queries -------------------------------------------------------------------------


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def collect(query: BlockingQuery, queue: asyncio.Queue[Response]) -> None:
    async for answer in query:
        await queue.put(answer)


async def test_watch_yields_on_change_and_not_on_timeout(double: SimConsul) -> None:
    path = "/v1/health/service/consul"
    async with ConsulClient(config_for(double)) as client:
        queue: asyncio.Queue[Response] = asyncio.Queue()
        task = asyncio.create_task(
            collect(BlockingQuery(client, path, wait="200ms", **FAST), queue)
        )
        try:
            first = await asyncio.wait_for(queue.get(), 5)
            assert len(first.body) == 1
            # Request 2 blocks and times out with the same index; request 3 blocks again.
            await double.requests.wait_for_async(path, count=3)
            await double.raft.wait_blocked_async(1)
            assert queue.empty()
            double.servers.add("consul-server-1", "10.0.0.11")
            second = await asyncio.wait_for(queue.get(), 5)
            assert second.index > first.index
            assert len(second.body) == 2
        finally:
            await stop(task)
    sent = double.requests.find(path)
    assert "index" not in sent[0].query  # the first request does not block
    assert all(int(r.query["index"]) >= 1 and r.query["wait"] == "200ms" for r in sent[1:])


async def test_watch_resets_a_backwards_index_and_never_sends_zero(double: SimConsul) -> None:
    path = "/v1/health/service/consul"
    async with ConsulClient(config_for(double)) as client:
        queue: asyncio.Queue[Response] = asyncio.Queue()
        query = BlockingQuery(client, path, wait="200ms", **FAST)
        task = asyncio.create_task(collect(query, queue))
        try:
            first = await asyncio.wait_for(queue.get(), 5)
            await double.raft.wait_blocked_async(1)
            double.raft.reset(1)
            backwards = await asyncio.wait_for(queue.get(), 5)
            assert backwards.index == 1 < first.index  # yielded: the data may be new
            await double.raft.wait_blocked_async(1)
            blocked_on = double.requests.find(path)[-1]
            assert blocked_on.query["index"] == "1"  # reset to 0, then raised to 1
            double.servers.add("consul-server-1", "10.0.0.11")
            after = await asyncio.wait_for(queue.get(), 5)
            assert 1 < after.index < first.index
            assert len(after.body) == 2
        finally:
            await stop(task)
    for request in double.requests.find(path)[1:]:
        assert int(request.query["index"]) >= 1


async def test_watch_backs_off_while_down_and_recovers(double: SimConsul) -> None:
    path = "/v1/health/service/consul"
    errors: list[tuple[type, int, float]] = []
    failing, recovered = asyncio.Event(), asyncio.Event()

    def on_error(exc: ConsulRequestError, failures: int, retry_in: float) -> None:
        errors.append((type(exc), failures, retry_in))
        if failures >= 3:
            failing.set()

    async with ConsulClient(config_for(double), timeout=1) as client:
        queue: asyncio.Queue[Response] = asyncio.Queue()
        query = BlockingQuery(
            client,
            path,
            wait="5s",
            on_error=on_error,
            on_recover=lambda failures: recovered.set(),
            **FAST,
        )
        task = asyncio.create_task(collect(query, queue))
        try:
            first = await asyncio.wait_for(queue.get(), 5)
            await double.raft.wait_blocked_async(1)
            await double.down()
            await asyncio.wait_for(failing.wait(), 5)
            assert query.last is first  # the last good answer is kept
            double.servers.add("consul-server-1", "10.0.0.11")
            await double.up()
            await asyncio.wait_for(recovered.wait(), 5)
            second = await asyncio.wait_for(queue.get(), 5)
            assert len(second.body) == 2
            assert query.failures == 0
        finally:
            await stop(task)
    assert [f for _, f, _ in errors[:3]] == [1, 2, 3]
    assert all(issubclass(kind, ConsulUnavailable) for kind, _, _ in errors)
    assert all(0 <= delay <= 0.05 for _, _, delay in errors)


async def test_watch_survives_forbidden_and_garbage(double: SimConsul) -> None:
    path = "/v1/internal/federation-states/mesh-gateways"
    double.faults.fail(path, status=403, body="ACL not found", times=1)
    double.faults.garbage(path, times=1)
    seen: list[type] = []
    async with ConsulClient(config_for(double)) as client:
        query = BlockingQuery(
            client, path, on_error=lambda exc, n, d: seen.append(type(exc)), **FAST
        )
        answer = await asyncio.wait_for(anext(aiter(query)), 5)
    assert seen == [ConsulForbidden, ConsulBadResponse]
    assert answer.body == {}


# --- pieces -----------------------------------------------------------------------------------


def test_backoff_is_full_jitter_and_capped() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    rng = random.Random(7)
    for failures, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (500, 30.0)):
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # full jitter spreads over the whole range


async def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(RateLimit(rate=50.0, burst=2))
    started = time.monotonic()
    for _ in range(5):
        await bucket.acquire()
    elapsed = time.monotonic() - started
    assert 3 / 50 - 0.01 <= elapsed < 1.0
    with pytest.raises(ValueError):
        TokenBucket(RateLimit(rate=0))


@pytest.mark.parametrize(
    ("method", "path", "hint"),
    [
        ("PUT", "/v1/agent/service/register", 'service:write on "mesh-gateway"'),
        (
            "PUT",
            "/v1/agent/service/deregister/mesh-gateway",
            "service:write on the registered service",
        ),
        ("GET", "/v1/agent/self", "agent:read on this agent's node"),
        ("GET", "/v1/health/service/consul", 'service:read on "consul" and node:read'),
        ("GET", "/v1/catalog/service/web", 'service:read on "web" and node:read'),
        ("GET", "/v1/internal/federation-states", "operator:read"),
        ("GET", "/v1/internal/federation-state/dc2", "operator:read"),
        ("GET", "/v1/internal/federation-states/mesh-gateways", "service:read and node:read"),
        ("GET", "/v1/connect/ca/roots", None),
        ("GET", "/v1/status/leader", None),
    ],
)
def test_acl_hints(method: str, path: str, hint: str | None) -> None:
    result = acl_hint(method, path, {"Name": "mesh-gateway"})
    assert result == hint or (hint is not None and result is not None and result.startswith(hint))


# --- certificates for the TLS tests -----------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_dir: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and consul.test, and a client certificate,
    made by `meshgw tls` itself."""
    ca = create_ca()
    server = create_cert(ca, "server", additional_dnsnames=("consul.test",))
    client = create_cert(ca, "client")
    ca_dir = directory / "ca.d"
    ca_dir.mkdir()
    pki = Pki(
        ca=directory / "ca.pem",
        ca_dir=ca_dir,
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    pki.ca.write_bytes(ca.cert_pem)
    (ca_dir / "consul-agent-ca.pem").write_bytes(ca.cert_pem)
    pki.server_cert.write_bytes(server.cert_pem)
    pki.server_key.write_bytes(server.key_pem)
    pki.client_cert.write_bytes(client.cert_pem)
    pki.client_key.write_bytes(client.key_pem)
    return pki
