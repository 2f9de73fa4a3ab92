"""Send one request to the Consul agent; every way it can fail becomes one typed error.

Each error message names the address, the request and the fix (a 403 names the ACL permission
the endpoint needs); none carries the token (docs/consul.md#errors-and-acls).
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from meshgw import __version__
from meshgw.control.consul.config import (
    ENV_ADDR,
    ENV_CACERT,
    ENV_CLIENT_CERT,
    ENV_CLIENT_KEY,
    ENV_TLS_SERVER_NAME,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ConsulConfig,
)
from meshgw.control.consul.errors import (
    ConsulBadResponse,
    ConsulForbidden,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulRequestError,
    ConsulTimeout,
    ConsulUnavailable,
)
from meshgw.durations import go_duration, parse_duration

DEFAULT_TIMEOUT = 10.0  # seconds for a request that does not block
DEFAULT_WAIT = 300.0  # Consul's default_query_time: what a blocking query waits without ?wait
MAX_WAIT = 600.0  # Consul's max_query_time: longer waits are cut to this
JITTER_FRACTION = 16  # Consul adds up to wait/16 to every blocking wait

Params = Mapping[str, str | int | bool | None]
_Error = TypeVar("_Error", bound=ConsulRequestError)


@dataclass(frozen=True, slots=True)
class Response:
    """One answer. `index` is X-Consul-Index (0 when the endpoint sends none)."""

    body: Any
    index: int


# Top-level JSON type of the answer of each endpoint meshgw reads, to refuse garbage early.
_SHAPES: tuple[tuple[re.Pattern[str], type], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"^/v1/agent/self$", dict),
        (r"^/v1/agent/service/[^/]+$", dict),
        (r"^/v1/catalog/datacenters$", list),
        (r"^/v1/catalog/services$", dict),
        (r"^/v1/health/(service|connect)/[^/]+$", list),
        (r"^/v1/internal/federation-states$", list),
        (r"^/v1/internal/federation-states/mesh-gateways$", dict),
        (r"^/v1/connect/ca/roots$", dict),
        (r"^/v1/status/leader$", str),
        (r"^/v1/config/service-resolver$", list),
        (r"^/v1/config/[^/]+/[^/]+$", dict),
        (r"^/v1/peerings$", list),
        (r"^/v1/exported-services$", list),
        (r"^/v1/discovery-chain/[^/]+$", dict),
    )
)


def _expected_type(path: str) -> type | None:
    return next((kind for pattern, kind in _SHAPES if pattern.match(path)), None)


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
    if path == "/v1/config/service-resolver":
        return "service:read (the list is filtered by ACLs)"
    if path.startswith(("/v1/config/service-defaults/", "/v1/discovery-chain/")):
        return f'service:read on "{name}"'
    if path == "/v1/peerings":
        return "peering:read"
    if path == "/v1/exported-services":
        return "mesh:read"
    # /v1/connect/ca/roots, /v1/status/*, /v1/catalog/datacenters and the mesh entry need none
    return None


def _no_answer(exc: aiohttp.ClientError | ssl.SSLError, address: str, request: str) -> str:
    """Why `request` got no answer, pointing at the fix. Most specific first: aiohttp's TLS
    errors are connector errors, and its connector errors are OS errors."""
    tls = (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError, ssl.SSLError)
    if isinstance(exc, tls):
        return (
            f"TLS with Consul at {address} failed during {request}: {exc}. "
            f"Check {ENV_CACERT} (the CA that signed the agent's certificate), "
            f"{ENV_TLS_SERVER_NAME} and, for mutual TLS, {ENV_CLIENT_CERT}/{ENV_CLIENT_KEY}"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error)
        return (
            f"cannot connect to Consul at {address} for {request}: {reason}. "
            f"Is the agent running there? Set {ENV_ADDR} or --consul to its HTTP address"
        )
    closed = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)
    if isinstance(exc, closed):
        return (
            f"Consul at {address} closed the connection during {request} "
            f"({type(exc).__name__}: {str(exc) or 'no answer'})"
        )
    return f"request {request} to Consul at {address} failed: {exc}"


def _normalize_path(path: str) -> str:
    if path.startswith("/v1/"):
        return path
    return "/v1/" + path.lstrip("/")


def _query(params: Params | None, dc: str | None) -> dict[str, str]:
    query: dict[str, str] = {}
    for key, value in (params or {}).items():
        if value is None or value is False:
            continue
        # Consul reads flags such as ?passing and ?stale by presence.
        query[key] = "" if value is True else str(value)
    if dc:
        query["dc"] = dc
    return query


def _json_name(kind: type) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(kind, "number" if kind in (int, float) else kind.__name__)


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

    async def get(
        self,
        path: str,
        *,
        params: Params | None = None,
        index: int | None = None,
        wait: str | float | None = None,
        dc: str | None = None,
        timeout: float | None = None,
    ) -> Response:
        """GET a JSON endpoint. With `index` (≥1) it is a blocking query that waits up to `wait`
        (seconds or a Go duration, default Consul's 5m, at most 10m) for the index to pass it.
        `timeout` replaces the client's for this request (a blocking wait is added to it)."""
        path = _normalize_path(path)
        query = _query(params, dc)
        timeout = self.timeout if timeout is None else timeout
        if index is not None and index > 0:
            wait_s = DEFAULT_WAIT if wait is None else min(parse_duration(wait), MAX_WAIT)
            query["index"] = str(index)
            query["wait"] = go_duration(wait_s)
            timeout += wait_s + wait_s / JITTER_FRACTION
        headers, raw = await self._send("GET", path, query, None, timeout)
        body = self._decode("GET", path, raw)
        kind = _expected_type(path)
        if kind is not None:
            if body is None and kind in (list, dict):
                body = kind()  # Consul answers null for some empty lists in older versions
            elif not isinstance(body, kind):
                what = f"expected a JSON {_json_name(kind)}, got {_json_name(type(body))}"
                raise self._bad("GET", path, what)
        return Response(body=body, index=self._index(path, headers))

    async def put(self, path: str, json_body: Any = None) -> Any:
        """PUT (with a JSON body); returns the parsed answer, None for Consul's empty 200."""
        path = _normalize_path(path)
        data = None if json_body is None else json.dumps(json_body).encode()
        _, raw = await self._send("PUT", path, {}, data, self.timeout, json_body)
        return self._decode("PUT", path, raw) if raw.strip() else None

    async def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        data: bytes | None,
        timeout: float,
        json_body: Any = None,
    ) -> tuple[Mapping[str, str], bytes]:
        headers = {"Content-Type": "application/json"} if data is not None else None
        session = self._open()
        try:
            async with session.request(
                method,
                self.config.base_url + path,
                params=query,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                server_hostname=self.config.tls_server_name,
            ) as answer:
                raw = await answer.read()
                status, answer_headers = answer.status, answer.headers
        except TimeoutError:
            address = self.config.address
            message = f"Consul at {address} did not answer {method} {path} within {timeout:.1f}s"
            raise self._error(ConsulTimeout, method, path, message) from None
        except (aiohttp.ClientError, ssl.SSLError) as exc:
            message = _no_answer(exc, self.config.address, f"{method} {path}")
            raise self._error(ConsulUnavailable, method, path, message) from exc
        if 200 <= status < 300:
            return answer_headers, raw
        raise self._http_error(method, path, status, raw, json_body)

    def _error(self, kind: type[_Error], method: str, path: str, message: str) -> _Error:
        """An error of `kind` for this request, its message redacted."""
        return kind(self._redact(message), method=method, path=path, address=self.config.address)

    def _bad(self, method: str, path: str, what: str) -> ConsulBadResponse:
        message = f"Consul at {self.config.address} answered {method} {path} with {what}"
        return self._error(ConsulBadResponse, method, path, message)

    def _http_error(
        self, method: str, path: str, status: int, raw: bytes, json_body: Any
    ) -> ConsulHTTPError:
        address = self.config.address
        text = self._redact(raw.decode("utf-8", "replace").strip())[:200]
        if status == 403:
            permission = acl_hint(method, path, json_body)
            advice = self._forbidden_advice(text, permission)
            return ConsulForbidden(
                f"Consul refused {method} {path} (403 {text or 'Forbidden'}): {advice}",
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

    def _forbidden_advice(self, text: str, permission: str | None) -> str:
        """What to do about a 403: the token is unknown, missing, or lacks `permission`."""
        if "ACL not found" in text:
            return (
                f"Consul does not know the token from {self.config.token_source} "
                "(deleted, mistyped, or from another cluster)"
            )
        if self.config.token is None:
            return f"no ACL token was sent: set {ENV_TOKEN}, {ENV_TOKEN_FILE} or --token-file" + (
                f" to a token with {permission}" if permission else ""
            )
        return f"the token from {self.config.token_source} needs " + (
            permission or "a policy that allows this request"
        )

    def _redact(self, text: str) -> str:
        # Belt and braces: nothing Consul or a library says may carry the token out.
        token = self.config.token
        return text.replace(token.reveal(), "<redacted>") if token is not None else text

    def _decode(self, method: str, path: str, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            excerpt = raw[:80].decode("utf-8", "replace")
            raise self._bad(method, path, f"invalid JSON ({exc}): {excerpt!r}") from None

    def _index(self, path: str, headers: Mapping[str, str]) -> int:
        raw = headers.get("X-Consul-Index")
        if raw is None:
            return 0
        try:
            index = int(raw)
        except ValueError:
            index = -1
        if index < 0:
            raise self._bad("GET", path, f"an invalid X-Consul-Index {raw[:40]!r}")
        return index
