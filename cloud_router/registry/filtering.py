"""The part of Consul's ``filter`` language (go-bexpr, features/filtering.mdx) edgegen uses.

    Service.Meta.model == "smollm2"        Service.Meta.region != "eu"
    "digest=abc" in Service.Tags           Service.Tags contains "model=x"
    Service.Meta.zone is empty             Service.Meta.node matches "^edge-"
    (a or b) and not c

Selectors are dotted paths into the JSON entry being filtered, with Consul's field names.
A malformed expression is a 400, as in Consul.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from cloud_router.errors import InvalidRequest

Predicate = Callable[[dict], bool]
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
      | (?P<op>==|!=|\(|\))
      | (?P<word>[A-Za-z0-9_.\-:/\[\]]+)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "contains", "is", "empty", "matches"}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InvalidRequest(f"Failed to create boolean expression evaluator: "
                                 f"unexpected input at {text[pos:pos + 10]!r}")
        pos = m.end()
        if m.group("str") is not None:
            raw = m.group("str")
            value = raw[1:-1] if raw.startswith("`") else bytes(raw[1:-1], "utf-8").decode(
                "unicode_escape")
            tokens.append(("value", value))
        elif m.group("op") is not None:
            tokens.append(("op", m.group("op")))
        else:
            word = m.group("word")
            kind = "kw" if word.lower() in _KEYWORDS else "word"
            tokens.append((kind, word.lower() if kind == "kw" else word))
    return tokens


def _resolve(entry: Any, selector: str) -> tuple[bool, Any]:
    cur = entry
    for part in selector.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return False, None
    return True, cur


def _as_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def fail(self, why: str):
        raise InvalidRequest(f"Failed to create boolean expression evaluator: {why} "
                             f"in {self.text!r}")

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            self.fail("unexpected end of expression")
        self.i += 1
        return tok

    def accept(self, kind: str, value: str | None = None) -> bool:
        tok = self.peek()
        if tok and tok[0] == kind and (value is None or tok[1] == value):
            self.i += 1
            return True
        return False

    def parse(self) -> Predicate:
        pred = self.or_()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")
        return pred

    def or_(self) -> Predicate:
        parts = [self.and_()]
        while self.accept("kw", "or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else (lambda e: any(p(e) for p in parts))

    def and_(self) -> Predicate:
        parts = [self.not_()]
        while self.accept("kw", "and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else (lambda e: all(p(e) for p in parts))

    def not_(self) -> Predicate:
        if self.accept("kw", "not"):
            inner = self.not_()
            return lambda e: not inner(e)
        if self.accept("op", "("):
            inner = self.or_()
            if not self.accept("op", ")"):
                self.fail("missing ')'")
            return inner
        return self.match()

    def value(self) -> str:
        kind, text = self.take()
        if kind not in ("value", "word"):
            self.fail(f"expected a value, got {text!r}")
        return text

    def selector(self) -> str:
        kind, text = self.take()
        if kind != "word":
            self.fail(f"expected a selector, got {text!r}")
        return text

    def match(self) -> Predicate:
        tok = self.peek()
        if tok and tok[0] == "value" or (tok and tok[0] == "word" and self._next_is_in()):
            value = self.value()
            negate = self.accept("kw", "not")
            if not self.accept("kw", "in"):
                self.fail("expected 'in' after a value")
            sel = self.selector()
            return _negate(negate, lambda e: _contains(e, sel, value))
        sel = self.selector()
        if self.accept("op", "=="):
            value = self.value()
            return lambda e: _equals(e, sel, value)
        if self.accept("op", "!="):
            value = self.value()
            return lambda e: not _equals(e, sel, value)
        if self.accept("kw", "is"):
            negate = self.accept("kw", "not")
            if not self.accept("kw", "empty"):
                self.fail("expected 'empty'")
            return _negate(negate, lambda e: _empty(e, sel))
        negate = self.accept("kw", "not")
        if self.accept("kw", "contains"):
            value = self.value()
            return _negate(negate, lambda e: _contains(e, sel, value))
        if self.accept("kw", "matches"):
            pattern = self.value()
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                self.fail(f"bad regular expression {pattern!r}: {exc}")
            return _negate(negate, lambda e: _matches(e, sel, rx))
        self.fail(f"expected an operator after {sel!r}")

    def _next_is_in(self) -> bool:
        nxt = self.peek(1)
        nxt2 = self.peek(2)
        return bool(nxt and (nxt == ("kw", "in") or (nxt == ("kw", "not") and nxt2 == ("kw", "in"))))


def _negate(negate: bool, pred: Predicate) -> Predicate:
    return (lambda e: not pred(e)) if negate else pred


def _equals(entry: dict, sel: str, value: str) -> bool:
    found, v = _resolve(entry, sel)
    return found and not isinstance(v, (dict, list)) and _as_str(v) == value


def _contains(entry: dict, sel: str, value: str) -> bool:
    found, v = _resolve(entry, sel)
    if not found or v is None:
        return False
    if isinstance(v, (list, dict)):
        return value in v
    return value in _as_str(v)


def _empty(entry: dict, sel: str) -> bool:
    found, v = _resolve(entry, sel)
    return not found or v in (None, "", [], {})


def _matches(entry: dict, sel: str, rx: re.Pattern) -> bool:
    found, v = _resolve(entry, sel)
    return found and not isinstance(v, (dict, list)) and rx.search(_as_str(v)) is not None


def compile_filter(text: str | None) -> Predicate | None:
    """A predicate over one JSON entry, or None for no filter; InvalidRequest when malformed."""
    if text is None or not text.strip():
        return None
    return _Parser(text).parse()
