"""Filter expressions (``?filter=``), the subset the tests use."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


class FilterError(ValueError):
    """An expression Consul would refuse; the text is Consul's."""


class Filter:
    """A small subset of go-bexpr: clauses joined by `and`, each `Selector == "v"`,
    `Selector != "v"`, `"v" in Selector` or `Selector is empty`/`is not empty`.
    Selectors are dotted paths with optional ["key"] indexes, e.g.
    `Service.Meta["consul-wan-federation"]`."""

    _CLAUSE = re.compile(
        r'^\s*(?:(?P<sel>[A-Za-z][\w.]*(?:\["[^"]*"\]|\.[\w-]+)*)\s*(?P<op>==|!=)\s*'
        r'(?:"(?P<val>[^"]*)"|(?P<bare>[\w.-]+))'
        r'|"(?P<inval>[^"]*)"\s+(?P<neg>not\s+)?in\s+(?P<insel>[A-Za-z][\w.]*(?:\["[^"]*"\])*)'
        r"|(?P<esel>[A-Za-z][\w.]*(?:\[\"[^\"]*\"\])*)\s+is\s+(?P<enot>not\s+)?empty)\s*$"
    )

    def __init__(self, clauses: list[Callable[[Any], bool]]) -> None:
        self._clauses = clauses

    @classmethod
    def parse(cls, text: str) -> Filter | None:
        if not text.strip():
            return None
        clauses: list[Callable[[Any], bool]] = []
        for part in re.split(r"\s+and\s+", text.strip()):
            match = cls._CLAUSE.match(part)
            if not match:
                raise FilterError(
                    "Failed to create boolean expression evaluator: "
                    f"unsupported by the double: {part!r}"
                )
            clauses.append(cls._clause(match))
        return cls(clauses)

    @staticmethod
    def _select(obj: Any, selector: str) -> Any:
        for name, key in re.findall(r'([\w-]+)|\["([^"]*)"\]', selector):
            step = name or key
            if isinstance(obj, dict):
                obj = obj.get(step)
            else:
                return None
        return obj

    @classmethod
    def _clause(cls, match: re.Match[str]) -> Callable[[Any], bool]:
        if match.group("sel"):
            sel, op = match.group("sel"), match.group("op")
            val = match.group("val") if match.group("val") is not None else match.group("bare")

            def equal(o: Any) -> bool:
                found = cls._select(o, sel)
                if isinstance(found, bool):  # bexpr coerces the literal to the field's type
                    return str(found).lower() == val.lower()
                return found == val or (isinstance(found, int | float) and str(found) == val)

            if op == "==":
                return equal
            return lambda o: not equal(o)
        if match.group("insel"):
            sel, val, neg = match.group("insel"), match.group("inval"), bool(match.group("neg"))
            return lambda o: (val in (cls._select(o, sel) or ())) != neg
        sel, negate = match.group("esel"), bool(match.group("enot"))
        return lambda o: (not cls._select(o, sel)) != negate

    def matches(self, obj: Any) -> bool:
        return all(clause(obj) for clause in self._clauses)
