"""The grammar of Consul's filter expressions (go-bexpr v0.1.2, the version Consul pins), parsed
as its generated PEG parser parses: ordered choice with backtracking, and on failure the error
it reports: ``1:<col> (<offset>): no match found, expected: ...`` listing what the farthest
failed position wanted, or ``rule "number": Invalid number literal`` and the like.

    expression := or                         or  := and ("or" or)?
    and        := not ("and" and)?           not := "not" not | "(" or ")" | match
    match      := selector ("==" | "!=" | "contains" | "not contains" | "matches"
                            | "not matches") value
                | selector "is" ["not"] "empty"
                | value ["not"] "in" selector
    selector   := identifier ("." identifier | "[" string "]")*
    value      := selector | number | string ("..." or `...`)
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

_IDENT_START = re.compile(r"[a-zA-Z]")
_IDENT_REST = re.compile(r"[a-zA-Z0-9_]")
_WS = re.compile(r"[ \t\r\n]")
_DIGIT = re.compile(r"[0-9]")
_NONZERO = re.compile(r"[1-9]")


class Op(enum.Enum):
    EQUAL = "Equal"
    NOT_EQUAL = "Not Equal"
    IN = "In"
    NOT_IN = "Not In"
    IS_EMPTY = "Is Empty"
    IS_NOT_EMPTY = "Is Not Empty"
    MATCHES = "Matches"
    NOT_MATCHES = "Not Matches"


@dataclass(frozen=True, slots=True)
class Match:
    selector: tuple[str, ...]
    op: Op
    value: str | None  # the raw literal; None for the emptiness checks


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # "and" | "or"
    left: Node
    right: Node


Node = Match | Not | Binary
Rule = Callable[[int], "tuple[Node, int] | None"]
Operators = tuple[tuple[Op, tuple[str, ...]], ...]

_AFTER_SELECTOR: Operators = (
    (Op.EQUAL, ("==",)),
    (Op.NOT_EQUAL, ("!=",)),
    (Op.IN, ("contains",)),
    (Op.NOT_IN, ("not", "contains")),
    (Op.MATCHES, ("matches",)),
    (Op.NOT_MATCHES, ("not", "matches")),
)
_EMPTINESS: Operators = ((Op.IS_EMPTY, ("is", "empty")), (Op.IS_NOT_EMPTY, ("is", "not", "empty")))
_BEFORE_SELECTOR: Operators = ((Op.IN, ("in",)), (Op.NOT_IN, ("not", "in")))


class GrammarError(ValueError):
    pass


class _Terminals:
    """Matching terminals while remembering what the farthest failed position wanted."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.far = 0
        self.wanted: set[str] = set()
        self.invert = False  # inside a !predicate: successes are recorded, not failures
        self.errors: list[str] = []

    def _fail_at(self, failed: bool, pos: int, want: str) -> None:
        if failed == self.invert:
            return
        if pos > self.far:
            self.far, self.wanted = pos, set()
        if pos == self.far:
            self.wanted.add("!" + want if self.invert else want)

    def lit(self, pos: int | None, word: str) -> int | None:
        if pos is None:
            return None
        ok = self.text.startswith(word, pos)
        self._fail_at(not ok, pos, json.dumps(word))
        return pos + len(word) if ok else None

    def cls(self, pos: int, pattern: re.Pattern[str]) -> int | None:
        ok = pos < len(self.text) and pattern.fullmatch(self.text[pos]) is not None
        self._fail_at(not ok, pos, pattern.pattern)
        return pos + 1 if ok else None

    def eof(self, pos: int) -> bool:
        """EOF <- !. (something there is recorded as "!.", reported as EOF)."""
        self.invert = not self.invert
        anything = pos < len(self.text)
        self._fail_at(not anything, pos, ".")
        self.invert = not self.invert
        return not anything

    def ws(self, pos: int | None) -> int | None:
        """_ <- [ \\t\\r\\n]+"""
        if pos is None:
            return None
        end = self.cls(pos, _WS)
        if end is None:
            return None
        while (more := self.cls(end, _WS)) is not None:
            end = more
        return end

    def opt_ws(self, pos: int) -> int:
        end = self.ws(pos)
        return pos if end is None else end

    def error(self, pos: int, rule: str, text: str) -> None:
        self.errors.append(f"{self.where(pos)}: rule {rule}: {text}")

    def where(self, pos: int) -> str:
        line = 1 + self.text.count("\n", 0, pos + 1)
        start = self.text.rfind("\n", 0, pos + 1)
        col = pos + 1 if start < 0 else pos - start
        return f"{line}:{col} ({len(self.text[:pos].encode())})"

    def no_match(self) -> str:
        wanted = sorted(w for w in self.wanted if w != "!.")
        if "!." in self.wanted:
            wanted.append("EOF")
        listed = wanted[0] if len(wanted) == 1 else ", ".join(wanted[:-1]) + " or " + wanted[-1]
        return f"{self.where(self.far)}: no match found, expected: {listed}"


class Parser(_Terminals):
    """One parse of one expression: `parse()` returns the tree or raises GrammarError."""

    def parse(self) -> Node:
        found = self._input()
        if self.errors:
            raise GrammarError("\n".join(dict.fromkeys(self.errors)))
        if found is None:
            raise GrammarError(self.no_match())
        return found

    def _input(self) -> Node | None:
        pos = self.opt_ws(0)
        after = self.lit(pos, "(")
        if after is not None:
            inner = self._or(self.opt_ws(after))
            if inner is not None:
                close = self.lit(self.opt_ws(inner[1]), ")")
                if close is not None and self.eof(self.opt_ws(close)):
                    return inner[0]
        found = self._or(pos)
        if found is not None and self.eof(self.opt_ws(found[1])):
            return found[0]
        return None

    def _or(self, pos: int) -> tuple[Node, int] | None:
        return self._binary(pos, "or", self._and, self._or)

    def _and(self, pos: int) -> tuple[Node, int] | None:
        return self._binary(pos, "and", self._not, self._and)

    def _binary(self, pos: int, word: str, operand: Rule, again: Rule) -> tuple[Node, int] | None:
        left = operand(pos)
        if left is None:
            return None
        after = self.ws(self.lit(self.ws(left[1]), word))
        right = again(after) if after is not None else None
        if right is not None:
            return Binary(word, left[0], right[0]), right[1]
        return left

    def _not(self, pos: int) -> tuple[Node, int] | None:
        after = self.ws(self.lit(pos, "not"))
        inner = self._not(after) if after is not None else None
        if inner is not None:
            if isinstance(inner[0], Not):  # not not x is x
                return inner[0].operand, inner[1]
            return Not(inner[0]), inner[1]
        return self._grouping(pos)

    def _grouping(self, pos: int) -> tuple[Node, int] | None:
        after = self.lit(pos, "(")
        inner = self._or(self.opt_ws(after)) if after is not None else None
        if inner is not None:
            close = self.lit(self.opt_ws(inner[1]), ")")
            if close is not None:
                return inner[0], close
        found = self._match(pos)
        if found is not None:
            return found
        if inner is not None:  # "(" or without ")"
            self.error(self.opt_ws(inner[1]), '"grouping"', "Unmatched parentheses")
        return None

    def _match(self, pos: int) -> tuple[Node, int] | None:
        selector = self._selector(pos)
        if selector is not None:
            after, op = self._first_operator(selector[1], _AFTER_SELECTOR)
            value = self._value(after) if after is not None else None
            if value is not None:
                return Match(selector[0], op, value[0]), value[1]
            after, op = self._first_operator(selector[1], _EMPTINESS)
            if after is not None:
                return Match(selector[0], op, None), after
        value = self._value(pos)
        if value is None:
            return None
        after, op = self._first_operator(value[1], _BEFORE_SELECTOR)
        if after is None:
            return None
        target = self._selector(after)
        if target is None:
            self.error(after, '"match"', "Invalid selector")
            return None
        return Match(target[0], op, value[0]), target[1]

    def _first_operator(self, pos: int, choices: Operators) -> tuple[int | None, Op]:
        """The first operator of an ordered choice that matches (PEG commits to it)."""
        for op, words in choices:
            if words[0] in ("==", "!="):  # _? "==" _?
                after = self.lit(self.opt_ws(pos), words[0])
                if after is not None:
                    return self.opt_ws(after), op
                continue
            current: int | None = pos
            for word in words:  # _ word (_ word)* and a trailing _ unless it ends in "empty"
                current = self.lit(self.ws(current), word)
            if current is not None and words[-1] != "empty":
                current = self.ws(current)
            if current is not None:
                return current, op
        return None, choices[0][0]

    def _selector(self, pos: int) -> tuple[tuple[str, ...], int] | None:
        first = self._identifier(pos)
        if first is None:
            return None
        parts, pos = [first[0]], first[1]
        while True:
            dot = self.lit(pos, ".")
            ident = self._identifier(dot) if dot is not None else None
            step = ident if ident is not None else self._index(pos)
            if step is None:
                return tuple(parts), pos
            parts.append(step[0])
            pos = step[1]

    def _identifier(self, pos: int) -> tuple[str, int] | None:
        end = self.cls(pos, _IDENT_START)
        if end is None:
            return None
        while (more := self.cls(end, _IDENT_REST)) is not None:
            end = more
        return self.text[pos:end], end

    def _index(self, pos: int) -> tuple[str, int] | None:
        after = self.lit(pos, "[")
        if after is None:
            return None
        inside = self.opt_ws(after)
        literal = self._string(inside)
        if literal is None:
            self.error(inside, '"index"', "Invalid index")
            return None
        close = self.lit(self.opt_ws(literal[1]), "]")
        if close is None:
            self.error(self.opt_ws(literal[1]), '"index"', "Unclosed index expression")
            return None
        return literal[0], close

    def _value(self, pos: int) -> tuple[str, int] | None:
        selector = self._selector(pos)
        if selector is not None:
            return ".".join(selector[0]), selector[1]
        return self._number(pos) or self._string(pos)

    def _number(self, pos: int) -> tuple[str, int] | None:
        start = pos
        pos = self.lit(pos, "-") or pos
        end = self.lit(pos, "0")
        if end is None:
            end = self.cls(pos, _NONZERO)
            if end is None:
                return None
            while (more := self.cls(end, _DIGIT)) is not None:
                end = more
        dot = self.lit(end, ".")
        fraction = self.cls(dot, _DIGIT) if dot is not None else None
        if fraction is not None:
            while (more := self.cls(fraction, _DIGIT)) is not None:
                fraction = more
            end = fraction
        # AfterNumbers <- &(_ / EOF / ")")
        if self.ws(end) is not None or self.eof(end) or self.lit(end, ")") is not None:
            return self.text[start:end], end
        self.error(end, '"number"', "Invalid number literal")
        return None

    def _string(self, pos: int) -> tuple[str, int] | None:
        for quote in ("`", '"'):
            start = self.lit(pos, quote)
            if start is None:
                continue
            end = self.text.find(quote, start)  # an escaped quote still ends it, as in bexpr
            if end < 0:
                self.error(len(self.text), '"string"', "Unterminated string literal")
                return None
            raw = self.text[start:end]
            if quote == "`":
                return raw, end + 1
            try:
                return unquote(raw), end + 1
            except ValueError:
                self.error(pos, '"string"', "invalid syntax")  # strconv.ErrSyntax
                return raw, end + 1
        return None


_ESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|[abfnrtv\\"])')
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def unquote(body: str) -> str:
    """strconv.Unquote of a double-quoted Go string, without its quotes; ValueError if bad."""
    if "\n" in body:
        raise ValueError(body)
    out, pos = [], 0
    while (slash := body.find("\\", pos)) >= 0:
        match = _ESCAPE.match(body, slash)
        if match is None:
            raise ValueError(body)
        out.append(body[pos:slash])
        code = match.group(1)
        if code[0].isdigit():
            out.append(chr(int(code, 8)))
        elif code[0] in "xuU":
            out.append(chr(int(code[1:], 16)))
        else:
            out.append(_SIMPLE.get(code, code))
        pos = match.end()
    out.append(body[pos:])
    return "".join(out)
