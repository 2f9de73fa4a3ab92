"""Consul's ``?filter=`` expressions (go-bexpr v0.1.2): parse, check against the Go type of what
is filtered, evaluate on the JSON documents.

The rules are bexpr's: every selector must name a field of the filtered type (map keys are free);
each field type allows its own operators (strings: ==, !=, in/contains, matches; numbers and
booleans: ==, !=; lists of scalars: in, is empty; maps: in (a key), is empty); a selector that
goes through a list is true when it holds for *any* element (``Checks.Status == passing``); a
missing map key makes ``==``, ``in`` and ``is not empty`` false and their negations true.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshgw.simconsul.bexpr_grammar import Binary, GrammarError, Match, Node, Not, Op, Parser

PREFIX = "Failed to create boolean expression evaluator: "


class FilterError(ValueError):
    """An expression Consul refuses; str() is Consul's text."""


# --- the Go types of what endpoints filter ---------------------------------------------------

STRING, INT, BOOL = "string", "int", "bool"


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Type


@dataclass(frozen=True, slots=True)
class MapOf:
    value: Type


Type = str | ListOf | MapOf | Mapping[str, "Type"]
Struct = Mapping[str, Type]

_STRINGS = ListOf(STRING)
_STRING_MAP = MapOf(STRING)
_SERVICE_ADDRESS: Struct = {"Address": STRING, "Port": INT}
_WEIGHTS: Struct = {"Passing": INT, "Warning": INT}
_UPSTREAM: Struct = {
    "DestinationType": STRING,
    "DestinationNamespace": STRING,
    "DestinationPartition": STRING,
    "DestinationPeer": STRING,
    "DestinationName": STRING,
    "Datacenter": STRING,
    "LocalBindAddress": STRING,
    "LocalBindPort": INT,
    "LocalBindSocketPath": STRING,
    "CentrallyConfigured": BOOL,
    "MeshGateway": {"Mode": STRING},
}
_PROXY: Struct = {
    "DestinationServiceName": STRING,
    "DestinationServiceID": STRING,
    "LocalServiceAddress": STRING,
    "LocalServicePort": INT,
    "LocalServiceSocketPath": STRING,
    "Mode": STRING,
    "Upstreams": ListOf(_UPSTREAM),
    "MeshGateway": {"Mode": STRING},
    "Expose": {"Checks": BOOL},
    "TransparentProxy": {"OutboundListenerPort": INT, "DialedDirectly": BOOL},
}
_CONNECT: Struct = {
    "Native": BOOL,
    "PeerMeta": {"SNI": _STRINGS, "SpiffeID": _STRINGS, "Protocol": STRING},
}
HEALTH_CHECK: Struct = {
    "Node": STRING,
    "CheckID": STRING,
    "Name": STRING,
    "Status": STRING,
    "Notes": STRING,
    "Output": STRING,
    "ServiceID": STRING,
    "ServiceName": STRING,
    "ServiceTags": _STRINGS,
    "Type": STRING,
    "PeerName": STRING,
    "ExposedPort": INT,
}
NODE: Struct = {
    "ID": STRING,
    "Node": STRING,
    "Address": STRING,
    "Datacenter": STRING,
    "PeerName": STRING,
    "TaggedAddresses": _STRING_MAP,
    "Meta": _STRING_MAP,
}
NODE_SERVICE: Struct = {
    "Kind": STRING,
    "ID": STRING,
    "Service": STRING,
    "Tags": _STRINGS,
    "Address": STRING,
    "TaggedAddresses": MapOf(_SERVICE_ADDRESS),
    "Meta": _STRING_MAP,
    "Port": INT,
    "SocketPath": STRING,
    "Weights": _WEIGHTS,
    "EnableTagOverride": BOOL,
    "Proxy": _PROXY,
    "Connect": _CONNECT,
    "PeerName": STRING,
}
# /v1/health/service and /v1/health/connect, and service-resolver subset filters.
CHECK_SERVICE_NODE: Struct = {"Node": NODE, "Service": NODE_SERVICE, "Checks": ListOf(HEALTH_CHECK)}
# /v1/catalog/service/<name> and /v1/catalog/services (Consul filters the flat ServiceNodes).
SERVICE_NODE: Struct = {
    "ID": STRING,
    "Node": STRING,
    "Address": STRING,
    "Datacenter": STRING,
    "TaggedAddresses": _STRING_MAP,
    "NodeMeta": _STRING_MAP,
    "ServiceKind": STRING,
    "ServiceID": STRING,
    "ServiceName": STRING,
    "ServiceTags": _STRINGS,
    "ServiceAddress": STRING,
    "ServiceTaggedAddresses": MapOf(_SERVICE_ADDRESS),
    "ServiceWeights": _WEIGHTS,
    "ServiceMeta": _STRING_MAP,
    "ServicePort": INT,
    "ServiceSocketPath": STRING,
    "ServiceEnableTagOverride": BOOL,
    "ServiceProxy": _PROXY,
    "ServiceConnect": _CONNECT,
    "ServicePeerName": STRING,
}
# /v1/agent/services
AGENT_SERVICE: Struct = {
    **{k: v for k, v in NODE_SERVICE.items() if k != "PeerName"},
    "Datacenter": STRING,
    "ContentHash": STRING,
}


# --- what each type allows (bexpr's field configurations) ------------------------------------

_SCALAR_OPS = {Op.EQUAL, Op.NOT_EQUAL}
_STRING_OPS = _SCALAR_OPS | {Op.IN, Op.NOT_IN, Op.MATCHES, Op.NOT_MATCHES}
_COLLECTION_OPS = {Op.IS_EMPTY, Op.IS_NOT_EMPTY}


def _operators(kind: Type) -> set[Op]:
    if kind == STRING:
        return _STRING_OPS
    if isinstance(kind, str):
        return _SCALAR_OPS
    if isinstance(kind, ListOf):
        scalar = isinstance(kind.item, str)
        return _COLLECTION_OPS | ({Op.IN, Op.NOT_IN} if scalar else set())
    if isinstance(kind, MapOf):
        return _COLLECTION_OPS | {Op.IN, Op.NOT_IN}
    return set()  # a struct: only its fields can be matched


def _step(kind: Type, name: str) -> Type | None:
    """The type one selector part leads to (lists are looked through)."""
    if isinstance(kind, ListOf):
        kind = kind.item
        if isinstance(kind, str):
            return None
    if isinstance(kind, MapOf):
        return kind.value
    if isinstance(kind, Mapping):
        return kind.get(name)
    return None


def _coerce(kind: Type, raw: str, selector: str) -> Any:
    scalar = kind.item if isinstance(kind, ListOf) else STRING if isinstance(kind, MapOf) else kind
    try:
        if scalar == INT:
            return _go_int(raw)
        if scalar == BOOL:
            return _go_bool(raw)
    except ValueError as exc:
        raise FilterError(
            f'{PREFIX}Failed to coerce value "{raw}" for selector "{selector}": {exc}'
        ) from None
    return raw


def _go_int(raw: str) -> int:
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f'strconv.ParseInt: parsing "{raw}": invalid syntax') from None


def _go_bool(raw: str) -> bool:
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f'strconv.ParseBool: parsing "{raw}": invalid syntax')


# --- checked expressions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Check:
    """A match expression checked against the type: its path of types, value coerced."""

    match: Match
    kinds: tuple[Type, ...]  # the type at each depth, root first
    value: Any


class Filter:
    """A parsed and checked expression; `matches(document)` evaluates it on one JSON document."""

    def __init__(self, tree: Node, checks: dict[int, _Check]) -> None:
        self._tree = tree
        self._checks = checks

    @classmethod
    def parse(cls, text: str, kind: Struct) -> Filter | None:
        """None for an empty expression (no filtering), FilterError for one Consul refuses."""
        if not text:
            return None
        try:
            tree = Parser(text).parse()
        except GrammarError as exc:
            raise FilterError(PREFIX + str(exc)) from None
        checks: dict[int, _Check] = {}
        _check_tree(tree, kind, checks)
        return cls(tree, checks)

    def matches(self, document: Any) -> bool:
        return self._evaluate(self._tree, document)

    def _evaluate(self, node: Node, document: Any) -> bool:
        if isinstance(node, Not):
            return not self._evaluate(node.operand, document)
        if isinstance(node, Binary):
            left = self._evaluate(node.left, document)
            if node.op == "and":
                return left and self._evaluate(node.right, document)
            return left or self._evaluate(node.right, document)
        check = self._checks[id(node)]
        return _evaluate_match(check, document, 0)


def _check_tree(node: Node, kind: Mapping[str, Type], checks: dict[int, _Check]) -> None:
    if isinstance(node, Not):
        _check_tree(node.operand, kind, checks)
    elif isinstance(node, Binary):
        _check_tree(node.left, kind, checks)
        _check_tree(node.right, kind, checks)
    else:
        checks[id(node)] = _check_match(node, kind)


def _check_match(match: Match, root: Mapping[str, Type]) -> _Check:
    kinds: list[Type] = [root]
    for depth, part in enumerate(match.selector):
        nxt = _step(kinds[-1], part)
        if nxt is None:
            shown = ".".join(match.selector[: depth + 1])
            raise FilterError(f'{PREFIX}Selector "{shown}" is not valid')
        kinds.append(nxt)
    selector = ".".join(match.selector)
    if match.op not in _operators(kinds[-1]):
        raise FilterError(
            f'{PREFIX}Invalid match operator "{match.op.value}" for selector "{selector}"'
        )
    value: Any = None
    if match.value is not None:
        value = _coerce(kinds[-1], match.value, selector)
        if match.op in (Op.MATCHES, Op.NOT_MATCHES):
            try:
                value = re.compile(match.value)
            except re.error as exc:
                raise FilterError(
                    f'{PREFIX}Failed to compile regular expression "{match.value}": '
                    f"error parsing regexp: {exc}"
                ) from None
    return _Check(match, tuple(kinds), value)


# --- evaluation on JSON ----------------------------------------------------------------------


def _zero(kind: Type) -> Any:
    """Go's zero value, for fields JSON leaves out (omitempty) or sets to null."""
    if isinstance(kind, ListOf):
        return []
    if isinstance(kind, MapOf | Mapping):
        return {}
    return {STRING: "", INT: 0, BOOL: False}.get(kind, "")


def _evaluate_match(check: _Check, value: Any, depth: int) -> bool:
    kind = check.kinds[depth]
    if value is None:
        value = _zero(kind)
    path = check.match.selector
    if depth == len(path):
        return _leaf(check, value)
    if isinstance(kind, ListOf):  # implicitly ANY element, same depth
        kinds = (*check.kinds[:depth], kind.item, *check.kinds[depth + 1 :])
        inner = replace(check, kinds=kinds)
        return any(_evaluate_match(inner, item, depth) for item in value)
    if isinstance(kind, MapOf) and path[depth] not in value:
        # bexpr 0.1.2: a missing key fails ==, in and is-not-empty; every other operator
        # (matches included) holds.
        return check.match.op not in (Op.EQUAL, Op.IS_NOT_EMPTY, Op.IN)
    return _evaluate_match(check, value.get(path[depth]), depth + 1)


def _leaf(check: _Check, value: Any) -> bool:
    op, wanted = check.match.op, check.value
    if op in (Op.EQUAL, Op.NOT_EQUAL):
        return (value == wanted and type(value) is type(wanted)) == (op is Op.EQUAL)
    if op in (Op.IN, Op.NOT_IN):
        found = wanted in value  # a map key, a list item, or a substring
        return found == (op is Op.IN)
    if op in (Op.IS_EMPTY, Op.IS_NOT_EMPTY):
        return (len(value) == 0) == (op is Op.IS_EMPTY)
    found = wanted.search(str(value)) is not None
    return found == (op is Op.MATCHES)
