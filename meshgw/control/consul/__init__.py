"""meshgw's Consul HTTP client, one job per module:

- `config`: `ConsulConfig.from_env` reads CONSUL_* variables and flags (address, ACL token as a
  `Secret`, TLS files) as the `consul` CLI does;
- `client`: `ConsulClient` sends one request and turns every failure into one typed error;
- `errors`: those errors (`ConsulUnavailable`, `ConsulForbidden`, `ConsulHTTPError`, ...);
- `blocking`: `BlockingQuery` follows a blocking endpoint by Consul's rules.

meshgw's own modules import from the submodules; the names below are the short public surface.
"""

from meshgw.control.consul.blocking import Backoff, BlockingQuery, RateLimit
from meshgw.control.consul.client import ConsulClient, Response
from meshgw.control.consul.config import ConsulConfig, Secret
from meshgw.control.consul.errors import (
    ConsulBadResponse,
    ConsulConfigError,
    ConsulError,
    ConsulForbidden,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulRequestError,
    ConsulTimeout,
    ConsulUnavailable,
)

__all__ = [
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
]
