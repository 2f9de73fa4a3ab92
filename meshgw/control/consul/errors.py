"""Every way talking to Consul can fail, as one exception type each.

A message names the address, the request and the fix; it never carries the ACL token.
"""

from __future__ import annotations

from typing import Any


class ConsulError(Exception):
    """Base of every error raised by meshgw's Consul client."""


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
