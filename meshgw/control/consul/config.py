"""How to reach the Consul agent: address, ACL token and TLS files, as the `consul` CLI reads them.

`ConsulConfig.from_env` reads the same variables as the `consul` CLI (CONSUL_HTTP_ADDR,
CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_SSL, CONSUL_CACERT, ...). Values given to it
explicitly (command-line flags, settings) beat the environment. The token is a `Secret`: it never
appears in a repr, a log line or an exception message.
"""

from __future__ import annotations

import hmac
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshgw.control.consul.errors import ConsulConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8500"

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

_T = TypeVar("_T")


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


# --- the token ----------------------------------------------------------------------------------


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


def _pick_token(
    env: Mapping[str, str], token: str | None, token_file: str | None, names: Mapping[str, str]
) -> tuple[Secret | None, str]:
    """The token and where it came from (for messages; never the token itself):
    `token` > `token_file` > CONSUL_HTTP_TOKEN > CONSUL_HTTP_TOKEN_FILE > none."""
    if token is not None:
        return _check_token(token, "the token argument"), "the token argument"
    if token_file is not None:
        flag = names.get("token_file", "--token-file")
        return _read_token_file(token_file, flag), f"{flag} {token_file}"
    if env.get(ENV_TOKEN):
        return _check_token(env[ENV_TOKEN].strip(), ENV_TOKEN), ENV_TOKEN
    if env.get(ENV_TOKEN_FILE):
        path = env[ENV_TOKEN_FILE]
        return _read_token_file(path, ENV_TOKEN_FILE), f"{ENV_TOKEN_FILE}={path}"
    return None, "none"  # Consul's anonymous token


# --- the address --------------------------------------------------------------------------------

_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]/]+))(?::(?P<port>\d*))?$"
)


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


# --- TLS ----------------------------------------------------------------------------------------


def _check_tls_files(
    sources: Mapping[str, str],
    ca_file: str | None,
    ca_path: str | None,
    cert: str | None,
    key: str | None,
) -> None:
    """Refuse missing TLS files now, naming the variable or flag that gave each."""
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConsulConfigError(
            f"{sources['ca_file']}={ca_file}: no such file; give the PEM file of the CA that "
            "signed the agent's HTTPS certificate"
        )
    if ca_path is not None and not Path(ca_path).is_dir():
        raise ConsulConfigError(
            f"{sources['ca_path']}={ca_path}: not a directory; give a directory of PEM CA "
            f"certificates (or use {ENV_CACERT} for one file)"
        )
    if (cert is None) != (key is None):
        have, missing = (
            ("client_cert", ENV_CLIENT_KEY) if key is None else ("client_key", ENV_CLIENT_CERT)
        )
        raise ConsulConfigError(
            f"{sources[have]} is set but {missing} is not: a client certificate needs "
            "its key (set both, or neither)"
        )
    for name, value in (("client_cert", cert), ("client_key", key)):
        if value is not None and not Path(value).is_file():
            raise ConsulConfigError(f"{sources[name]}={value}: no such file")


class _Sources:
    """Each value from its explicit argument (a flag, a setting), else from its variable;
    `chosen` remembers which of the two set it, for messages."""

    def __init__(self, env: Mapping[str, str], names: Mapping[str, str] | None) -> None:
        self.env = env
        self.names = dict(names or {})
        self.chosen: dict[str, str] = {}

    def pick(self, name: str, explicit: _T | None, flag: str, var: str) -> _T | str | None:
        if explicit is not None:
            self.chosen[name] = self.names.get(name, flag)
            return explicit
        value = self.env.get(var)
        if value:
            self.chosen[name] = var
            return value
        return None


def _verify(value: bool | str | None) -> bool:
    if value is None or isinstance(value, bool):
        return value is not False
    return _go_bool(value, ENV_SSL_VERIFY)


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
        given = _Sources(env, names)
        ssl_text = env.get(ENV_SSL, "")
        ssl_on = _go_bool(ssl_text, ENV_SSL) if ssl_text.strip() else False
        raw_address = given.pick("address", address, "--consul", ENV_ADDR) or DEFAULT_ADDRESS
        where = given.chosen.get("address", "the default address")
        parsed = _parse_address(raw_address, where, ssl_on=ssl_on)
        secret, token_source = _pick_token(env, token, token_file, given.names)
        cafile = given.pick("ca_file", ca_file, "--ca-file", ENV_CACERT)
        capath = given.pick("ca_path", ca_path, "--ca-path", ENV_CAPATH)
        cert = given.pick("client_cert", client_cert, "--client-cert", ENV_CLIENT_CERT)
        key = given.pick("client_key", client_key, "--client-key", ENV_CLIENT_KEY)
        server_name = given.pick(
            "tls_server_name", tls_server_name, "--tls-server-name", ENV_TLS_SERVER_NAME
        )
        do_verify = _verify(given.pick("verify", verify, "--ssl-verify", ENV_SSL_VERIFY))
        _check_tls_files(given.chosen, cafile, capath, cert, key)
        config = cls(
            **asdict(parsed),  # scheme, host, port, unix_socket, path_prefix
            token=secret,
            token_source=token_source,
            ca_file=cafile,
            ca_path=capath,
            client_cert=cert,
            client_key=key,
            tls_server_name=server_name,
            verify=do_verify,
            sources=tuple(sorted(given.chosen.items())),
        )
        config.ssl_context()  # surface bad PEM files now, naming the variable
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https, as Consul's Go client builds it: only the given CAs when
        CONSUL_CACERT/CONSUL_CAPATH are set (else the system's), the client pair for mTLS."""
        if self.scheme != "https":
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._load_cas(context)
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

    def _load_cas(self, context: ssl.SSLContext) -> None:
        try:
            if self.ca_file is None and self.ca_path is None:
                context.load_default_certs()
            if self.ca_file is not None:
                context.load_verify_locations(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConsulConfigError(
                f"{self.source_of('ca_file')}={self.ca_file}: not a PEM CA certificate ({exc})"
            ) from None
        if self.ca_path is None:
            return
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
