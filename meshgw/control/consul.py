"""meshgw's Consul HTTP client: CONSUL_* configuration, typed errors, blocking queries.

Three parts:

- `ConsulConfig.from_env` reads the same variables as the `consul` CLI (CONSUL_HTTP_ADDR,
  CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_SSL, CONSUL_CACERT, ...). Values given to
  it explicitly (command-line flags, settings) beat the environment. The token is a `Secret`:
  it never appears in a repr, a log line or an exception message.
- `ConsulClient` sends one request and turns every way it can fail into one exception type with
  a message that names the address, the request and the fix (`ConsulUnavailable`,
  `ConsulForbidden`, `ConsulHTTPError`, `ConsulBadResponse`).
- `BlockingQuery` (or `watch()`) follows a blocking endpoint by Consul's rules
  (docs/consul.md#blocking-queries): index from X-Consul-Index, reset when it goes backwards, never
  below 1, a token-bucket rate limit, exponential backoff with full jitter on errors, and a yield
  only when the index moved.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import json
import math
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from meshgw import __version__

DEFAULT_ADDRESS = "http://127.0.0.1:8500"
DEFAULT_TIMEOUT = 10.0  # seconds for a request that does not block
DEFAULT_WAIT = 300.0  # Consul's default_query_time: what a blocking query waits without ?wait
MAX_WAIT = 600.0  # Consul's max_query_time: longer waits are cut to this
JITTER_FRACTION = 16  # Consul adds up to wait/16 to every blocking wait

# Environment variables, named once.
ENV_ADDR = "CONSUL_HTTP_ADDR"
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
ENV_TOKEN_FILE = "CONSUL_HTTP_TOKEN_FILE"
ENV_SSL = "CONSUL_HTTP_SSL"
ENV_SSL_VERIFY = "CONSUL_HTTP_SSL_VERIFY"
ENV_CACERT = "CONSUL_CACERT"
ENV_CAPATH = "CONSUL_CAPATH"
ENV_CLIENT_CERT = "CONSUL_CLIENT_CERT"
ENV_CLIENT_KEY = "CONSUL_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "CONSUL_TLS_SERVER_NAME"


# --- errors -------------------------------------------------------------------------------------


class ConsulError(Exception):
    """Base of every error raised here."""


class ConsulConfigError(ConsulError, ValueError):
    """A CONSUL_* variable or flag is wrong; the message names it and the fix."""


class ConsulRequestError(ConsulError):
    """A request to Consul failed. `method`, `path` and `address` say which one."""

    def __init__(self, message: str, *, method: str, path: str, address: str) -> None:
        super().__init__(message)
        self.method = method
        self.path = path
        self.address = address


class ConsulUnavailable(ConsulRequestError):
    """No answer: connection refused or reset, TLS handshake failed, or closed mid-request."""


class ConsulTimeout(ConsulUnavailable):
    """Consul accepted the request but did not answer in time."""


class ConsulHTTPError(ConsulRequestError):
    """Consul answered with a status other than 2xx. `body` is the first 200 characters."""

    def __init__(
        self, message: str, *, method: str, path: str, address: str, status: int, body: str
    ) -> None:
        super().__init__(message, method=method, path=path, address=address)
        self.status = status
        self.body = body


class ConsulForbidden(ConsulHTTPError):
    """403: the token is unknown or lacks a permission. `permission` names the one needed."""

    def __init__(self, message: str, *, permission: str | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.permission = permission


class ConsulNotFound(ConsulHTTPError):
    """404: e.g. no federation state for that datacenter, or an unknown agent service."""


class ConsulBadResponse(ConsulRequestError):
    """2xx with a body that is not JSON, or not the JSON type the endpoint returns."""


# --- configuration ------------------------------------------------------------------------------


class Secret:
    """A string that shows as <redacted> however it is printed; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # pickling would write the value in clear
        raise TypeError("a Secret cannot be pickled")


_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _go_bool(value: str, source: str) -> bool:
    """strconv.ParseBool, which is how Consul reads its boolean variables."""
    text = value.strip()
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ConsulConfigError(f"{source}={value!r} is not a boolean: use true or false")


_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]/]+))(?::(?P<port>\d*))?$"
)


def _check_token(token: str, source: str) -> Secret:
    if not token:
        raise ConsulConfigError(f"{source} is empty: give the ACL token's SecretID, or unset it")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in token):
        # Never echo the value: it is a credential (and would break the header).
        raise ConsulConfigError(
            f"{source}: the token contains whitespace or control characters; "
            "it must be the token's SecretID on a single line"
        )
    return Secret(token)


def _read_token_file(path: str, source: str) -> Secret:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConsulConfigError(
            f"{source}={path}: cannot read the token file ({exc.strerror}); "
            "point it at a readable file that holds the ACL token"
        ) from None
    except UnicodeDecodeError:
        raise ConsulConfigError(
            f"{source}={path}: the token file is not UTF-8 text; it must hold the SecretID"
        ) from None
    return _check_token(text.strip(), f"{source}={path}")


@dataclass(frozen=True, slots=True)
class _Address:
    scheme: str
    host: str
    port: int
    unix_socket: str | None
    path_prefix: str


def _parse_address(text: str, source: str, *, ssl_on: bool) -> _Address:
    """CONSUL_HTTP_ADDR forms: host:port, http://host:port, https://host:port, unix:///path.

    As in Consul's Go client, an explicit http:// or https:// wins over CONSUL_HTTP_SSL, which
    only decides the scheme of a scheme-less address; a missing port is the scheme's (80/443)."""
    raw = text.strip()
    if not raw:
        raise ConsulConfigError(
            f"{source} is empty: give HOST:PORT, http(s)://HOST:PORT or unix:///PATH"
        )
    scheme = "https" if ssl_on else "http"
    rest = raw
    if "://" in raw:
        given, rest = raw.split("://", 1)
        given = given.lower()
        if given == "unix":
            if not rest:
                raise ConsulConfigError(
                    f"{source}={raw!r}: unix:// needs a socket path, e.g. unix:///run/consul.sock"
                )
            return _Address(scheme, "localhost", 0, rest, "")
        if given not in ("http", "https"):
            raise ConsulConfigError(
                f"{source}: unknown protocol scheme {given!r}; use http://, https:// or unix://"
            )
        scheme = given
    hostport, slash, prefix = rest.partition("/")
    if "@" in hostport:
        # Not echoed: the part before @ is a password.
        raise ConsulConfigError(
            f"{source}: credentials in the address are not supported; "
            f"give the ACL token in {ENV_TOKEN} or {ENV_TOKEN_FILE}"
        )
    match = _HOST_PORT.match(hostport)
    if not match:
        raise ConsulConfigError(f"{source}={raw!r} is not HOST:PORT (write IPv6 as [::1]:8500)")
    host = match.group("v6") or match.group("host")
    port_text = match.group("port")
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise ConsulConfigError(f"{source}={raw!r}: port {port} is out of range 1-65535")
    return _Address(
        scheme, host, port, None, ("/" + prefix.strip("/")) if slash and prefix.strip("/") else ""
    )


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    """How to reach the Consul agent. Build it with `from_env`.

    `token_source` says where the token came from (a variable or flag name and file path, never
    the token), for messages such as "the token from CONSUL_HTTP_TOKEN_FILE=... lacks ...".
    `sources` maps each field that was set to the variable or flag that set it.
    """

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8500
    unix_socket: str | None = None
    path_prefix: str = ""
    token: Secret | None = field(default=None, repr=False)
    token_source: str = "none"
    ca_file: str | None = None
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None
    verify: bool = True
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def address(self) -> str:
        """The agent's address for people: http://127.0.0.1:8500, unix:///run/consul.sock."""
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path_prefix}"

    @property
    def base_url(self) -> str:
        """What aiohttp requests go to (over a unix socket the host part is a placeholder)."""
        if self.unix_socket is not None:
            return f"{self.scheme}://localhost{self.path_prefix}"
        return self.address

    def source_of(self, name: str) -> str:
        return dict(self.sources).get(name, name)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        ca_path: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        tls_server_name: str | None = None,
        verify: bool | None = None,
        names: Mapping[str, str] | None = None,
    ) -> ConsulConfig:
        """Read the configuration; `environ` defaults to os.environ.

        `names` tells messages where the caller got an explicit argument, e.g.
        {"address": "MESHGW_CONSUL"} (default: the flag, "--consul", "--token-file", ...).

        Precedence, first match wins:
        - address: `address` (--consul) > CONSUL_HTTP_ADDR > http://127.0.0.1:8500; a scheme-less
          address uses https when CONSUL_HTTP_SSL is true;
        - token: `token` > `token_file` (--token-file) > CONSUL_HTTP_TOKEN >
          CONSUL_HTTP_TOKEN_FILE > none (Consul's anonymous token);
        - TLS: each argument > its variable (CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT,
          CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_SSL_VERIFY).
        Raises ConsulConfigError naming the variable or flag and the fix.
        """
        env = os.environ if environ is None else environ
        sources: dict[str, str] = {}
        named = dict(names or {})

        def pick(name: str, explicit: Any, flag: str, var: str) -> Any:
            if explicit is not None:
                sources[name] = named.get(name, flag)
                return explicit
            value = env.get(var)
            if value:
                sources[name] = var
                return value
            return None

        ssl_text = env.get(ENV_SSL, "")
        ssl_on = _go_bool(ssl_text, ENV_SSL) if ssl_text.strip() else False
        raw_address = pick("address", address, "--consul", ENV_ADDR) or DEFAULT_ADDRESS
        parsed = _parse_address(
            raw_address, sources.get("address", "the default address"), ssl_on=ssl_on
        )

        secret: Secret | None = None
        token_source = "none"
        if token is not None:
            token_source = "the token argument"
            secret = _check_token(token, token_source)
        elif token_file is not None:
            flag = named.get("token_file", "--token-file")
            token_source = f"{flag} {token_file}"
            secret = _read_token_file(token_file, flag)
        elif env.get(ENV_TOKEN):
            token_source = ENV_TOKEN
            secret = _check_token(env[ENV_TOKEN].strip(), ENV_TOKEN)
        elif env.get(ENV_TOKEN_FILE):
            path = env[ENV_TOKEN_FILE]
            token_source = f"{ENV_TOKEN_FILE}={path}"
            secret = _read_token_file(path, ENV_TOKEN_FILE)

        cafile = pick("ca_file", ca_file, "--ca-file", ENV_CACERT)
        capath = pick("ca_path", ca_path, "--ca-path", ENV_CAPATH)
        cert = pick("client_cert", client_cert, "--client-cert", ENV_CLIENT_CERT)
        key = pick("client_key", client_key, "--client-key", ENV_CLIENT_KEY)
        server_name = pick(
            "tls_server_name", tls_server_name, "--tls-server-name", ENV_TLS_SERVER_NAME
        )
        verify_raw = pick("verify", verify, "--ssl-verify", ENV_SSL_VERIFY)
        do_verify = (
            True
            if verify_raw is None
            else verify_raw
            if isinstance(verify_raw, bool)
            else _go_bool(str(verify_raw), ENV_SSL_VERIFY)
        )

        if cafile is not None and not Path(cafile).is_file():
            raise ConsulConfigError(
                f"{sources['ca_file']}={cafile}: no such file; give the PEM file of the CA that "
                "signed the agent's HTTPS certificate"
            )
        if capath is not None and not Path(capath).is_dir():
            raise ConsulConfigError(
                f"{sources['ca_path']}={capath}: not a directory; give a directory of PEM CA "
                f"certificates (or use {ENV_CACERT} for one file)"
            )
        if (cert is None) != (key is None):
            have, missing = (
                ("client_cert", "client_key") if key is None else ("client_key", "client_cert")
            )
            missing_name = {"client_cert": ENV_CLIENT_CERT, "client_key": ENV_CLIENT_KEY}[missing]
            raise ConsulConfigError(
                f"{sources[have]} is set but {missing_name} is not: a client certificate needs "
                "its key (set both, or neither)"
            )
        for name, value in (("client_cert", cert), ("client_key", key)):
            if value is not None and not Path(value).is_file():
                raise ConsulConfigError(f"{sources[name]}={value}: no such file")

        config = cls(
            scheme=parsed.scheme,
            host=parsed.host,
            port=parsed.port,
            unix_socket=parsed.unix_socket,
            path_prefix=parsed.path_prefix,
            token=secret,
            token_source=token_source,
            ca_file=cafile,
            ca_path=capath,
            client_cert=cert,
            client_key=key,
            tls_server_name=server_name,
            verify=do_verify,
            sources=tuple(sorted(sources.items())),
        )
        config.ssl_context()  # surface bad PEM files now, naming the variable
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https, as Consul's Go client builds it: only the given CAs when
        CONSUL_CACERT/CONSUL_CAPATH are set (else the system's), the client pair for mTLS."""
        if self.scheme != "https":
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if self.ca_file is None and self.ca_path is None:
                context.load_default_certs()
            if self.ca_file is not None:
                context.load_verify_locations(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConsulConfigError(
                f"{self.source_of('ca_file')}={self.ca_file}: not a PEM CA certificate ({exc})"
            ) from None
        if self.ca_path is not None:
            for entry in sorted(Path(self.ca_path).iterdir()):
                if not entry.is_file():
                    continue
                try:
                    context.load_verify_locations(cafile=str(entry))
                except (ssl.SSLError, OSError) as exc:
                    raise ConsulConfigError(
                        f"{self.source_of('ca_path')}={self.ca_path}: {entry.name} is not a PEM "
                        f"CA certificate ({exc}); keep only CA certificates in that directory"
                    ) from None
        if self.client_cert is not None and self.client_key is not None:
            try:
                context.load_cert_chain(self.client_cert, self.client_key)
            except (ssl.SSLError, OSError) as exc:
                raise ConsulConfigError(
                    f"{self.source_of('client_cert')}={self.client_cert} with "
                    f"{self.source_of('client_key')}={self.client_key}: not a matching PEM "
                    f"certificate and key ({exc})"
                ) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One answer. `index` is X-Consul-Index (0 when the endpoint sends none)."""

    body: Any
    index: int
    known_leader: bool | None = None
    last_contact_ms: int | None = None


def go_duration(seconds: float) -> str:
    """Seconds → a Go duration for ?wait= ("300s", "500ms")."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float) -> float:
    """A wait given as seconds or as a Go duration string ("10s", "5m", "1m30s")."""
    if not isinstance(value, str):
        seconds = float(value)
    else:
        text, seconds, pos = value.strip(), 0.0, 0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ValueError(f"{value!r} is not a duration such as 10s, 5m or 500ms")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a non-negative duration")
    return seconds


# Top-level JSON type of each endpoint's answer, to refuse garbage early.
_SHAPES: tuple[tuple[re.Pattern[str], type], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"^/v1/agent/self$", dict),
        (r"^/v1/agent/services$", dict),
        (r"^/v1/agent/service/[^/]+$", dict),
        (r"^/v1/catalog/datacenters$", list),
        (r"^/v1/catalog/services$", dict),
        (r"^/v1/catalog/service/[^/]+$", list),
        (r"^/v1/health/(service|connect)/[^/]+$", list),
        (r"^/v1/internal/federation-states$", list),
        (r"^/v1/internal/federation-states/mesh-gateways$", dict),
        (r"^/v1/internal/federation-state/[^/]+$", dict),
        (r"^/v1/connect/ca/roots$", dict),
        (r"^/v1/status/leader$", str),
        (r"^/v1/status/peers$", list),
    )
)


def expected_type(path: str) -> type | None:
    for pattern, kind in _SHAPES:
        if pattern.match(path):
            return kind
    return None


def acl_hint(method: str, path: str, body: Any = None) -> str | None:
    """The ACL permission an endpoint needs, as Consul's docs state it (None: no ACL needed)."""
    name = path.rsplit("/", 1)[-1]
    if method == "PUT" and path == "/v1/agent/service/register":
        service = ""
        if isinstance(body, Mapping):
            service = next((str(v) for k, v in body.items() if k.lower() == "name"), "")
        return f'service:write on "{service}"' if service else "service:write on the service"
    if path.startswith("/v1/agent/service/deregister/"):
        return "service:write on the registered service"
    if path == "/v1/agent/self":
        return "agent:read on this agent's node"
    if path == "/v1/agent/services" or path.startswith("/v1/agent/service/"):
        return "service:read"
    if path.startswith(("/v1/catalog/service/", "/v1/health/service/", "/v1/health/connect/")):
        return f'service:read on "{name}" and node:read'
    if path == "/v1/catalog/services":
        return "service:read"
    if path == "/v1/internal/federation-states/mesh-gateways":
        return "service:read and node:read (the list is filtered by ACLs)"
    if path.startswith("/v1/internal/federation-state"):
        return "operator:read"
    return None  # /v1/connect/ca/roots, /v1/status/*, /v1/catalog/datacenters need none


def _normalize_path(path: str) -> str:
    if path.startswith("/v1/"):
        return path
    return "/v1/" + path.lstrip("/")


class ConsulClient:
    """Talks to one Consul agent. Create inside a running loop's task; `close()` when done.

    `timeout` bounds a request that does not block; a blocking one gets
    wait + wait/16 (Consul's jitter) + `timeout`.
    """

    def __init__(self, config: ConsulConfig, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._ssl = config.ssl_context()

    def __repr__(self) -> str:
        return f"ConsulClient({self.config.address}, token from {self.config.token_source})"

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self.config.unix_socket is not None:
                connector = aiohttp.UnixConnector(path=self.config.unix_socket)
            else:
                connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            headers = {"User-Agent": f"meshgw/{__version__}"}
            if self.config.token is not None:
                headers["X-Consul-Token"] = self.config.token.reveal()
            self._session = aiohttp.ClientSession(
                connector=connector, headers=headers, raise_for_status=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _redact(self, text: str) -> str:
        # Belt and braces: nothing Consul or a library says may carry the token out.
        token = self.config.token
        return text.replace(token.reveal(), "<redacted>") if token is not None else text

    async def get(
        self,
        path: str,
        *,
        params: Mapping[str, str | int | bool | None] | None = None,
        index: int | None = None,
        wait: str | float | None = None,
        dc: str | None = None,
        expect: type | None = None,
        timeout: float | None = None,
    ) -> Response:
        """GET a JSON endpoint. With `index` (≥1) it is a blocking query that waits up to `wait`
        (seconds or a Go duration, default Consul's 5m, at most 10m) for the index to pass it.
        `expect` is the JSON type of the answer (default: known per endpoint); `timeout`
        replaces the client's for this request (a blocking wait is added to it)."""
        path = _normalize_path(path)
        query = self._query(params, dc)
        timeout = self.timeout if timeout is None else timeout
        if index is not None and index > 0:
            wait_s = DEFAULT_WAIT if wait is None else min(parse_duration(wait), MAX_WAIT)
            query["index"] = str(index)
            query["wait"] = go_duration(wait_s)
            timeout += wait_s + wait_s / JITTER_FRACTION
        headers, raw = await self._send("GET", path, query, None, timeout)
        body = self._decode("GET", path, raw)
        kind = expect or expected_type(path)
        if kind is not None:
            if body is None and kind in (list, dict):
                body = kind()  # Consul answers null for some empty lists in older versions
            elif not isinstance(body, kind):
                raise self._bad(
                    "GET",
                    path,
                    f"expected a JSON {_json_name(kind)}, got {_json_name(type(body))}",
                )
        return Response(
            body=body,
            index=self._index("GET", path, headers),
            known_leader=_header_bool(headers.get("X-Consul-KnownLeader")),
            last_contact_ms=_header_int(headers.get("X-Consul-LastContact")),
        )

    async def put(
        self,
        path: str,
        json_body: Any = None,
        *,
        params: Mapping[str, str | int | bool | None] | None = None,
    ) -> Any:
        """PUT (with a JSON body); returns the parsed answer, None for Consul's empty 200."""
        path = _normalize_path(path)
        data = None if json_body is None else json.dumps(json_body).encode()
        _, raw = await self._send(
            "PUT", path, self._query(params, None), data, self.timeout, json_body
        )
        return self._decode("PUT", path, raw) if raw.strip() else None

    @staticmethod
    def _query(
        params: Mapping[str, str | int | bool | None] | None, dc: str | None
    ) -> dict[str, str]:
        query: dict[str, str] = {}
        for key, value in (params or {}).items():
            if value is None or value is False:
                continue
            # Consul reads flags such as ?passing and ?stale by presence.
            query[key] = "" if value is True else str(value)
        if dc:
            query["dc"] = dc
        return query

    async def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        data: bytes | None,
        timeout: float,
        json_body: Any = None,
    ) -> tuple[Mapping[str, str], bytes]:
        address = self.config.address
        url = self.config.base_url + path
        headers = {"Content-Type": "application/json"} if data is not None else None
        session = self._open()
        try:
            async with session.request(
                method,
                url,
                params=query,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                server_hostname=self.config.tls_server_name,
            ) as answer:
                raw = await answer.read()
                status, answer_headers = answer.status, answer.headers
        except TimeoutError:
            raise ConsulTimeout(
                f"Consul at {address} did not answer {method} {path} within {timeout:.1f}s",
                method=method,
                path=path,
                address=address,
            ) from None
        except (
            aiohttp.ClientSSLError,
            aiohttp.ClientConnectorCertificateError,
            ssl.SSLError,
        ) as exc:
            raise ConsulUnavailable(
                self._redact(
                    f"TLS with Consul at {address} failed during {method} {path}: {exc}. "
                    f"Check {ENV_CACERT} (the CA that signed the agent's certificate), "
                    f"{ENV_TLS_SERVER_NAME} and, for mutual TLS, "
                    f"{ENV_CLIENT_CERT}/{ENV_CLIENT_KEY}"
                ),
                method=method,
                path=path,
                address=address,
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error)
            raise ConsulUnavailable(
                f"cannot connect to Consul at {address} for {method} {path}: {reason}. "
                f"Is the agent running there? Set {ENV_ADDR} or --consul to its HTTP address",
                method=method,
                path=path,
                address=address,
            ) from exc
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
            aiohttp.ClientPayloadError,
        ) as exc:
            raise ConsulUnavailable(
                self._redact(
                    f"Consul at {address} closed the connection during {method} {path} "
                    f"({type(exc).__name__}: {exc or 'no answer'})"
                ),
                method=method,
                path=path,
                address=address,
            ) from exc
        except aiohttp.ClientError as exc:
            raise ConsulUnavailable(
                self._redact(f"request {method} {path} to Consul at {address} failed: {exc}"),
                method=method,
                path=path,
                address=address,
            ) from exc
        if 200 <= status < 300:
            return answer_headers, raw
        raise self._http_error(method, path, status, raw, json_body)

    def _http_error(
        self, method: str, path: str, status: int, raw: bytes, json_body: Any
    ) -> ConsulHTTPError:
        address = self.config.address
        text = self._redact(raw.decode("utf-8", "replace").strip())[:200]
        if status == 403:
            permission = acl_hint(method, path, json_body)
            if "ACL not found" in text:
                advice = (
                    f"Consul does not know the token from {self.config.token_source} "
                    "(deleted, mistyped, or from another cluster)"
                )
            elif self.config.token is None:
                advice = (
                    f"no ACL token was sent: set {ENV_TOKEN}, {ENV_TOKEN_FILE} or --token-file"
                    + (f" to a token with {permission}" if permission else "")
                )
            else:
                advice = f"the token from {self.config.token_source} needs " + (
                    permission or "a policy that allows this request"
                )
            message = f"Consul refused {method} {path} (403 {text or 'Forbidden'}): {advice}"
            return ConsulForbidden(
                message,
                permission=permission,
                method=method,
                path=path,
                address=address,
                status=status,
                body=text,
            )
        message = f"Consul answered {method} {path} with {status}: {text!r}"
        kind = ConsulNotFound if status == 404 else ConsulHTTPError
        return kind(message, method=method, path=path, address=address, status=status, body=text)

    def _bad(self, method: str, path: str, what: str) -> ConsulBadResponse:
        address = self.config.address
        return ConsulBadResponse(
            self._redact(f"Consul at {address} answered {method} {path} with {what}"),
            method=method,
            path=path,
            address=address,
        )

    def _decode(self, method: str, path: str, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            excerpt = raw[:80].decode("utf-8", "replace")
            raise self._bad(method, path, f"invalid JSON ({exc}): {excerpt!r}") from None

    def _index(self, method: str, path: str, headers: Mapping[str, str]) -> int:
        raw = headers.get("X-Consul-Index")
        if raw is None:
            return 0
        try:
            index = int(raw)
        except ValueError:
            index = -1
        if index < 0:
            raise self._bad(method, path, f"an invalid X-Consul-Index {raw[:40]!r}")
        return index


def _json_name(kind: type) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(kind, "number" if kind in (int, float) else kind.__name__)


def _header_bool(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() == "true"


def _header_int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


# --- blocking queries ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket for a watch loop: Consul asks clients to rate-limit blocking loops, burst 2
    (docs/consul.md#blocking-queries)."""

    rate: float = 1.0  # requests per second, sustained; math.inf disables the limit
    burst: int = 2


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th consecutive failure waits a random time in
    [0, min(cap, base * 2**(n-1))] — so many gateways losing Consul at once do not retry in step."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(max(failures - 1, 0), 62))
        return (rng or random).uniform(0.0, ceiling)


class TokenBucket:
    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic) -> None:
        if limit.rate <= 0 or limit.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self._limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._tokens = min(float(self._limit.burst), self._tokens + elapsed * self._limit.rate)
        self._last = now

    async def acquire(self) -> None:
        if math.isinf(self._limit.rate):
            return
        self._refill()
        if self._tokens < 1.0:
            # Time is the only thing to wait for here.
            await asyncio.sleep((1.0 - self._tokens) / self._limit.rate)
            self._refill()
        self._tokens = max(0.0, self._tokens - 1.0)


class WatchState(enum.Enum):
    STARTING = "starting"  # no answer yet
    OK = "ok"  # the last request succeeded
    FAILING = "failing"  # the last request failed; retrying with backoff


ErrorCallback = Callable[[ConsulRequestError, int, float], None]


class BlockingQuery:
    """Follow one blocking endpoint; iterate to get a `Response` each time its index moves.

    Errors never end the iteration: each failed request calls `on_error(exc, failures,
    retry_in)` (failures counts consecutive failures, so `failures == 1` marks the change from
    working to failing), then the loop backs off and retries; the first success after failures
    calls `on_recover(failures)`. `state`, `last` (the last good answer) and `last_error` are
    there to read at any time. Cancel the iterating task to stop.

    The index rules (docs/consul.md#blocking-queries):
    - the first request has no index: it answers at once;
    - then the index is the answer's X-Consul-Index; the next request blocks until it moves;
    - an answer whose index is lower than the one sent means the index went backwards (snapshot
      restore, a new cluster): reset to 0, then
    - "always send an index of at least 1": an index that ends below 1 (after a reset, or a
      buggy 0 from Consul) is sent as 1, which answers at once whenever the data exists, and never
      degenerates into a busy loop of non-blocking requests;
    - an answer with the index already seen is a spurious wake-up (a timeout or a change
      elsewhere) and is not yielded.
    """

    def __init__(
        self,
        client: ConsulClient,
        path: str,
        *,
        params: Mapping[str, str | int | bool | None] | None = None,
        dc: str | None = None,
        wait: str | float = "5m",
        rate_limit: RateLimit = RateLimit(),
        backoff: Backoff = Backoff(),
        on_error: ErrorCallback | None = None,
        on_recover: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.path = _normalize_path(path)
        self.params = dict(params or {})
        self.dc = dc
        self.wait = parse_duration(wait)
        self.backoff = backoff
        self.on_error = on_error
        self.on_recover = on_recover
        self._bucket = TokenBucket(rate_limit)
        self._rng = rng or random.Random()
        self.state = WatchState.STARTING
        self.last: Response | None = None
        self.last_error: ConsulRequestError | None = None
        self.failures = 0
        self.index = 0  # the index the next request sends (0: none)

    def __repr__(self) -> str:
        return f"BlockingQuery({self.path}, state={self.state.value}, index={self.index})"

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._run()

    async def _run(self) -> AsyncIterator[Response]:
        while True:
            await self._bucket.acquire()
            try:
                answer = await self.client.get(
                    self.path,
                    params=self.params,
                    index=self.index or None,
                    wait=self.wait if self.index else None,
                    dc=self.dc,
                )
            except ConsulRequestError as exc:
                self.failures += 1
                self.state = WatchState.FAILING
                self.last_error = exc
                delay = self.backoff.delay(self.failures, self._rng)
                if self.on_error is not None:
                    self.on_error(exc, self.failures, delay)
                await asyncio.sleep(delay)
                continue
            if self.failures:
                failures, self.failures = self.failures, 0
                if self.on_recover is not None:
                    self.on_recover(failures)
            self.state = WatchState.OK
            self.last_error = None
            sent = self.index
            changed = self.last is None or answer.index != self.last.index
            self.index = 0 if answer.index < sent else answer.index  # backwards: reset
            self.index = max(self.index, 1)  # never send an index below 1
            if changed:
                self.last = answer
                yield answer


def watch(
    client: ConsulClient,
    path: str,
    params: Mapping[str, str | int | bool | None] | None = None,
    **kwargs: Any,
) -> BlockingQuery:
    """`async for answer in watch(client, "/v1/health/service/consul"): ...` (see BlockingQuery)."""
    return BlockingQuery(client, path, params=params, **kwargs)


__all__ = [
    "DEFAULT_ADDRESS",
    "Backoff",
    "BlockingQuery",
    "ConsulBadResponse",
    "ConsulClient",
    "ConsulConfig",
    "ConsulConfigError",
    "ConsulError",
    "ConsulForbidden",
    "ConsulHTTPError",
    "ConsulNotFound",
    "ConsulRequestError",
    "ConsulTimeout",
    "ConsulUnavailable",
    "RateLimit",
    "Response",
    "Secret",
    "TokenBucket",
    "WatchState",
    "acl_hint",
    "go_duration",
    "parse_duration",
    "watch",
]
