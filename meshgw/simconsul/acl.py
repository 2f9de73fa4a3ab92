"""ACLs: tokens with Consul-like rules, token resolution, and Consul's 403 texts.

Default deny when ACLs are on. Resources are Consul's (``service``, ``node``, ``agent``,
``operator``, ``mesh``, ``peering``, ...). As in Consul, ``mesh`` and ``peering`` fall back to the
``operator`` rule when a token has no rule of their own.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ANONYMOUS_ACCESSOR_ID = "00000000-0000-0000-0000-000000000002"
_FALLS_BACK_TO_OPERATOR = ("mesh", "peering")


class Access(enum.IntEnum):
    DENY = 0
    READ = 1
    WRITE = 2


@dataclass(frozen=True, slots=True)
class AclToken:
    """A token and its rules.

    A rule is ``"resource:access"`` (every name) or ``"resource:access:prefix"`` (names starting
    with prefix, longest prefix wins as in Consul's ``*_prefix`` rules); access is ``read``,
    ``write`` (implies read) or ``deny``. Unnamed resources: ``"operator:read"``.
    Example: ``AclToken("s3cr3t", ("service:write:mesh-gateway", "service:read", "node:read"))``.
    """

    secret_id: str
    rules: tuple[str, ...] = ()
    accessor_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    management: bool = False

    def access(self, resource: str, name: str = "") -> Access:
        if self.management:
            return Access.WRITE
        best: tuple[int, Access] | None = None
        for rule in self.rules:
            parts = rule.split(":", 2)
            if len(parts) < 2 or parts[0] != resource:
                continue
            prefix = parts[2] if len(parts) == 3 else ""
            if not name.startswith(prefix):
                continue
            level = Access[parts[1].upper()]
            if best is None or len(prefix) >= best[0]:
                best = (len(prefix), level)
        if best is None and resource in _FALLS_BACK_TO_OPERATOR:
            return self.access("operator")
        return best[1] if best else Access.DENY

    def allows(self, resource: str, access: Access, name: str = "") -> bool:
        return self.access(resource, name) >= access


class Denied(Exception):
    """Answered as 403 with Consul's text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Acl:
    """The ACL system of one simulated cluster: on when tokens were given (even none)."""

    def __init__(
        self, tokens: Iterable[AclToken] | None, anonymous_rules: tuple[str, ...] = ()
    ) -> None:
        self.enabled = tokens is not None
        self.tokens: dict[str, AclToken] = {t.secret_id: t for t in tokens or ()}
        self.anonymous = AclToken("anonymous", anonymous_rules, accessor_id=ANONYMOUS_ACCESSOR_ID)

    def resolve(self, headers: Mapping[str, str], query: Mapping[str, str]) -> AclToken | None:
        """The request's token (X-Consul-Token, Bearer, ?token=); None without ACLs."""
        if not self.enabled:
            return None
        secret = headers.get("X-Consul-Token", "")
        auth = headers.get("Authorization", "")
        if not secret and auth.lower().startswith("bearer "):
            secret = auth[7:].strip()
        secret = secret or query.get("token", "")
        if not secret:
            return self.anonymous
        token = self.tokens.get(secret)
        if token is None:
            raise Denied("ACL not found")
        return token


def require(token: AclToken | None, resource: str, access: Access, name: str = "") -> None:
    """Raise Denied with Consul's text unless the token (None: ACLs off) has the permission."""
    if token is None or token.allows(resource, access, name):
        return
    anonymous = token.accessor_id == ANONYMOUS_ACCESSOR_ID
    who = "anonymous token" if anonymous else f"token with AccessorID '{token.accessor_id}'"
    text = f"Permission denied: {who} lacks permission '{resource}:{access.name.lower()}'"
    if name:
        text += f' on "{name}"'
    if anonymous:
        text += ". The anonymous token is used implicitly when a request does not specify a token."
    raise Denied(text)


def can_see(token: AclToken | None, csn: Mapping[str, Any]) -> bool:
    """A CheckServiceNode survives Consul's list filtering: service:read and node:read."""
    if token is None:
        return True
    return token.allows("service", Access.READ, csn["Service"]["Service"]) and token.allows(
        "node", Access.READ, csn["Node"]["Node"]
    )
