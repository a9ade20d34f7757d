"""Conditions of policy rules: a small, safe expression language over a call's arguments.

A policy rule may carry a condition that narrows it by the call's arguments (``args``) and the
calling agent (``agent``). An allow rule with a condition allows only when the condition is
true; a deny rule with a condition denies only when the condition is true. Examples::

    args.owner == "acme"
    args.channel in ["#ops", "#alerts"] and args.amount <= 100
    args.path startswith agent.attributes.home
    not (args.repo matches 'tmp-[0-9]+') or agent.id == "ci"

``parse(text)`` checks a condition and compiles it once; a condition that is not valid raises
``ConditionError`` (a ValueError) whose message names the problem and its position (0-based
character offset, also in ``.position``). ``Condition.evaluate(args, agent)`` answers True or
False and never raises. Nothing is handed to Python's ``eval``: the text is tokenized and
parsed by hand into a small tree, and only the operations below exist.

Grammar (EBNF; keywords are lower case and reserved; whitespace is free between tokens)::

    condition  = or_expr ;
    or_expr    = and_expr , { "or" , and_expr } ;
    and_expr   = not_expr , { "and" , not_expr } ;
    not_expr   = "not" , not_expr | "(" , or_expr , ")" | comparison ;
    comparison = operand , operator , operand ;          (at least one operand is a path)
    operator   = "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" , "in"
               | "startswith" | "endswith" | "contains" | "matches" ;
    operand    = path | literal | list ;
    path       = "args" , "." , key , { "." , key }       (at most 8 keys)
               | "agent.id" | "agent.name" | "agent.attributes" , "." , key ;
    key        = ( letter | digit | "_" ) , { letter | digit | "_" | "-" } ;
    list       = "[" , [ literal , { "," , literal } , [ "," ] ] , "]" ;
    literal    = string | number | "true" | "false" | "null" ;
    string     = "'" , { char } , "'" | '"' , { char } , '"' ;   (escapes: \\ \' \" \n \r \t)
    number     = [ "-" ] , digits , [ "." , digits ] , [ ( "e" | "E" ) , [ "+" | "-" ] , digits ] ;

``not`` binds tighter than ``and``, which binds tighter than ``or``; comparisons do not chain
(``1 < args.x < 5`` is refused: write ``args.x > 1 and args.x < 5``). There are no function
calls (Casbin's ``regexMatch(...)`` and the like are refused: use ``matches``).

Semantics:

* Values are JSON values: null, booleans, numbers (integers and decimals alike; a boolean is
  not a number), strings, lists and objects. ``args`` is the call's arguments; ``agent`` is
  the calling agent (``agent.id``, ``agent.name``, ``agent.attributes.<key>``).
* A path that does not exist (or that walks through something that is not an object) is
  *missing*. Every comparison with a missing operand is false, ``!=`` and ``not in``
  included, so a constraint on an absent argument fails closed for an allow rule. (``not``
  of such a comparison is true: write conditions positively.)
* ``==`` is true when both operands are of the same kind and equal; lists are equal element
  by element (elements compared as scalars); objects are never equal to anything.
  ``!=`` is true when both operands are present and not ``==``.
* ``<`` ``<=`` ``>`` ``>=`` compare two numbers or two strings (by code point); any other
  pair is false.
* ``x in L`` is true when ``L`` is a list and the scalar ``x`` is ``==`` to one of its items;
  ``x not in L`` is true when ``L`` is a list and the scalar ``x`` is ``==`` to none of them.
  Any other pair is false for both.
* ``startswith`` and ``endswith`` take two strings. ``contains`` is true for a string that
  contains a string, or for a list holding an item ``==`` to the scalar on the right.
* ``s matches 'pattern'``: the pattern must be a string literal; it is a Python ``re``
  pattern matched against the whole string (anchored at both ends, ``re.fullmatch``); a
  left side that is not a string is false. Patterns are at most 200 characters; back
  references and a quantified group that itself contains a quantifier (``(a+)+``, which can
  take exponential time) are refused.
* A type mismatch is false, never an error. ``and`` and ``or`` short-circuit.

Limits: a condition has at most 1,000 characters, 128 nodes (operands, comparisons and
``and``/``or``/``not``), 16 levels of nesting, and lists of at most 64 items.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

MAX_LENGTH: Final = 1000
MAX_NODES: Final = 128
MAX_DEPTH: Final = 16
MAX_LIST: Final = 64
MAX_PATH: Final = 8
MAX_PATTERN: Final = 200

__all__ = ["MISSING", "Condition", "ConditionError", "parse"]


class ConditionError(ValueError):
    """A condition that is not valid; ``position`` is the 0-based offset of the problem."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.message = message
        self.position = position


class _MissingType:
    """The value of a path that does not exist; every comparison with it is false."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _MissingType()
_EMPTY: Final[Mapping[str, Any]] = {}

# --- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # str | num | word | op | ( | ) | [ | ] | , | end
    value: Any
    start: int
    end: int


_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_][A-Za-z0-9_\-]*)*")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_MISTAKES = {"&&": "use and", "||": "use or", "=": "use == to compare", "!": "use not"}
_PUNCTUATION = "()[],"
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while True:
        space = _SPACE.match(text, i)
        if space:
            i = space.end()
        if i >= len(text):
            tokens.append(_Token("end", None, i, i))
            return tokens
        token = _next_token(text, i)
        tokens.append(token)
        i = token.end


def _next_token(text: str, i: int) -> _Token:
    char = text[i]
    if char in _PUNCTUATION:
        return _Token(char, char, i, i + 1)
    if char in "'\"":
        return _string(text, i)
    for op in _OPERATORS:
        if text.startswith(op, i):
            return _Token("op", op, i, i + len(op))
    for mistake, hint in _MISTAKES.items():
        if text.startswith(mistake, i):
            raise ConditionError(f"unexpected {mistake!r} ({hint})", i)
    number = _NUMBER.match(text, i)
    if number:
        return _number(number.group(), i)
    word = _WORD.match(text, i)
    if word:
        return _Token("word", word.group(), i, word.end())
    raise ConditionError(f"unexpected character {char!r}", i)


def _number(raw: str, start: int) -> _Token:
    if len(raw) > 40:
        raise ConditionError("number is too long", start)
    is_int = not any(c in raw for c in ".eE")
    return _Token("num", int(raw) if is_int else float(raw), start, start + len(raw))


def _string(text: str, start: int) -> _Token:
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        char = text[i]
        if char == quote:
            return _Token("str", "".join(out), start, i + 1)
        if char == "\\":
            escaped = _ESCAPES.get(text[i + 1 : i + 2])
            if escaped is None:
                raise ConditionError("unknown escape in string (use \\\\ \\' \\\" \\n \\r \\t)", i)
            out.append(escaped)
            i += 2
            continue
        out.append(char)
        i += 1
    raise ConditionError("unterminated string", start)


# --- the tree -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Any


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Path:
    root: str  # args | agent
    keys: tuple[str, ...]


_Operand = _Literal | _List | _Path


@dataclass(frozen=True, slots=True)
class _Compare:
    op: str
    left: _Operand
    right: _Operand
    text: str  # the comparison as written, for explanations
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class _Not:
    item: _Node


@dataclass(frozen=True, slots=True)
class _And:
    items: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Or:
    items: tuple[_Node, ...]


_Node = _Compare | _Not | _And | _Or

_WORD_OPERATORS = ("in", "startswith", "endswith", "contains", "matches")
_KEYWORDS = frozenset({"and", "or", "not", "true", "false", "null", *_WORD_OPERATORS})
_CONSTANTS: dict[str, Any] = {"true": True, "false": False, "null": None}
_OPERATOR_LIST = "==, !=, <, <=, >, >=, in, not in, startswith, endswith, contains, matches"


# --- the parser ---------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the token list, counting nodes and nesting as it goes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.nodes = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return token

    def is_word(self, word: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "word" and token.value == word

    def count(self, at: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConditionError(f"condition has more than {MAX_NODES} parts", at)

    def condition(self) -> _Node:
        node = self.or_expr()
        token = self.peek()
        if token.kind != "end":
            raise ConditionError(
                f"unexpected {_describe(token)}; expected and, or, or the end", token.start
            )
        return node

    def or_expr(self) -> _Node:
        items = [self.and_expr()]
        while self.is_word("or"):
            self.count(self.take().start)
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else _Or(tuple(items))

    def and_expr(self) -> _Node:
        items = [self.not_expr()]
        while self.is_word("and"):
            self.count(self.take().start)
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else _And(tuple(items))

    def not_expr(self) -> _Node:
        token = self.peek()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(f"condition nests deeper than {MAX_DEPTH} levels", token.start)
        try:
            if self.is_word("not"):
                self.count(self.take().start)
                return _Not(self.not_expr())
            if token.kind == "(":
                self.take()
                node = self.or_expr()
                self.expect(")", f"to close the ( opened at position {token.start}")
                return node
            return self.comparison()
        finally:
            self.depth -= 1

    def expect(self, kind: str, why: str) -> _Token:
        token = self.take()
        if token.kind != kind:
            raise ConditionError(f"expected {kind} {why}, found {_describe(token)}", token.start)
        return token

    def comparison(self) -> _Node:
        start = self.peek().start
        left = self.operand()
        op = self.operator(start)
        right_token = self.peek()
        right = self.operand()
        end = self.tokens[self.i - 1].end
        if not isinstance(left, _Path) and not isinstance(right, _Path):
            raise ConditionError("a comparison must name args.<key> or agent.<key>", start)
        self.refuse_chain()
        self.count(start)
        pattern = _pattern(right, right_token.start) if op == "matches" else None
        return _Compare(op, left, right, self.text[start:end], pattern)

    def refuse_chain(self) -> None:
        token = self.peek()
        chained = token.kind == "op" or (token.kind == "word" and token.value in _WORD_OPERATORS)
        if chained or (self.is_word("not") and self.is_word("in", 1)):
            raise ConditionError("comparisons cannot be chained (join them with and)", token.start)

    def operator(self, start: int) -> str:
        token = self.take()
        if token.kind == "op":
            return str(token.value)
        if token.kind == "word" and token.value in _WORD_OPERATORS:
            return str(token.value)
        if token.kind == "word" and token.value == "not" and self.is_word("in"):
            self.take()
            return "not in"
        left = self.text[start : token.start].strip()
        raise ConditionError(
            f"expected an operator ({_OPERATOR_LIST}) after {left!r}, found {_describe(token)}",
            token.start,
        )

    def operand(self) -> _Operand:
        token = self.take()
        self.count(token.start)
        if token.kind in ("str", "num"):
            return _Literal(token.value)
        if token.kind == "[":
            return self.list_literal(token)
        if token.kind == "word":
            return self.word_operand(token)
        raise ConditionError(f"expected a value, found {_describe(token)}", token.start)

    def word_operand(self, token: _Token) -> _Operand:
        word = str(token.value)
        if word in _CONSTANTS:
            return _Literal(_CONSTANTS[word])
        if self.peek().kind == "(":
            raise ConditionError(
                f"function calls such as {word}(...) are not supported (use the operators, "
                "e.g. matches for a regular expression)",
                token.start,
            )
        if "." in word:
            return _path(word, token.start)
        if word in ("args", "agent"):
            raise ConditionError(f"{word} needs a key, e.g. {word}.id", token.start)
        if word in _KEYWORDS:
            raise ConditionError(f"expected a value, found {word!r}", token.start)
        raise ConditionError(
            f"unknown name {word!r}: paths start with args. or agent. (args.{word}?)", token.start
        )

    def list_literal(self, opening: _Token) -> _List:
        items: list[Any] = []
        while self.peek().kind != "]":
            token = self.take()
            if token.kind in ("str", "num"):
                items.append(token.value)
            elif token.kind == "word" and token.value in _CONSTANTS:
                items.append(_CONSTANTS[token.value])
            else:
                raise ConditionError(
                    f"list items must be literals (strings, numbers, true, false, null), "
                    f"found {_describe(token)}",
                    token.start,
                )
            if len(items) > MAX_LIST:
                raise ConditionError(f"list has more than {MAX_LIST} items", token.start)
            if self.peek().kind != "]":
                self.expect(",", "between list items")
        self.take()
        return _List(tuple(items))


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "the end of the condition"
    if token.kind == "str":
        return f"string {token.value!r}"
    return repr(str(token.value))


def _path(word: str, at: int) -> _Path:
    root, *keys = word.split(".")
    if root == "args":
        if len(keys) > MAX_PATH:
            raise ConditionError(f"path has more than {MAX_PATH} keys", at)
        return _Path("args", tuple(keys))
    if root == "agent":
        if keys in (["id"], ["name"]) or (len(keys) == 2 and keys[0] == "attributes"):
            return _Path("agent", tuple(keys))
        raise ConditionError("agent paths are agent.id, agent.name and agent.attributes.<key>", at)
    raise ConditionError(f"unknown name {root!r}: paths start with args. or agent.", at)


# --- patterns -----------------------------------------------------------------------------


def _pattern(operand: _Operand, at: int) -> re.Pattern[str]:
    if not isinstance(operand, _Literal) or not isinstance(operand.value, str):
        raise ConditionError("matches needs a string literal pattern on its right", at)
    problem = _pattern_problem(operand.value)
    if problem is not None:
        raise ConditionError(f"pattern refused: {problem}", at)
    try:
        return re.compile(operand.value)
    except re.error as exc:
        raise ConditionError(f"invalid pattern: {exc.msg}", at) from None


_BACKREF_DIGITS = frozenset("123456789")


def _pattern_problem(pattern: str) -> str | None:
    """Why a regular expression is refused: too long, back references, nested quantifiers."""
    if len(pattern) > MAX_PATTERN:
        return f"longer than {MAX_PATTERN} characters"
    quantified = [False]  # per open group: does it contain a quantifier?
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if pattern[i + 1 : i + 2] in _BACKREF_DIGITS:
                return "back references are not supported"
            i += 2
        elif char == "[":
            i = _skip_class(pattern, i)
            if i < 0:
                return "ambiguous character class (escape [ and doubled -&~| inside [...])"
        elif char == "(":
            if pattern.startswith("(?P=", i):
                return "back references are not supported"
            quantified.append(False)
            i += 2 if pattern.startswith("(?", i) else 1
        elif char == ")" and len(quantified) > 1:
            inner = quantified.pop()
            i += 1
            if inner and pattern[i : i + 1] in ("*", "+", "{"):
                return "a quantified group contains a quantifier, e.g. (a+)+ (exponential time)"
            quantified[-1] = quantified[-1] or inner
        else:
            quantified[-1] = quantified[-1] or char in "*+?{"
            i += 1
    return None


def _skip_class(pattern: str, i: int) -> int:
    """The index after the character class opening at i; -1 for syntax re would warn about."""
    j = i + 1
    if pattern[j : j + 1] == "^":
        j += 1
    if pattern[j : j + 1] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        if pattern[j] == "\\":
            j += 2
            continue
        if pattern[j] == "[" or pattern[j : j + 2] in ("--", "&&", "~~", "||"):
            return -1
        j += 1
    return j + 1


# --- evaluation ---------------------------------------------------------------------------

_Data = Mapping[str, Any]
_Getter = Callable[[_Data, _Data], Any]
_Test = Callable[[_Data, _Data], bool]
_SCALARS = frozenset({"null", "bool", "number", "string"})


_KINDS: dict[type, str] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "bool",
    type(None): "null",
    list: "list",
    tuple: "list",
}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value)) or _kind_of_subclass(value)


def _kind_of_subclass(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    return "other"  # objects, MISSING and anything that is not JSON


def _scalar_eq(a: Any, b: Any) -> bool:
    kind = _kind(a)
    return kind in _SCALARS and kind == _kind(b) and bool(a == b)


_PLAIN = frozenset({str, int, float, bool, type(None)})  # exact types compared directly


def _eq(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in _PLAIN:  # the common case, without _kind
        return bool(a == b)
    kind = _kind(a)
    if kind != _kind(b):
        return False
    if kind in _SCALARS:
        return bool(a == b)
    if kind == "list":
        return len(a) == len(b) and all(_scalar_eq(x, y) for x, y in zip(a, b, strict=True))
    return False


def _ne(a: Any, b: Any) -> bool:
    return a is not MISSING and b is not MISSING and not _eq(a, b)


_ORDERED = frozenset({str, int, float})


def _ordered(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def test(a: Any, b: Any) -> bool:
        if type(a) is type(b) and type(a) in _ORDERED:
            return compare(a, b)
        kind = _kind(a)
        return kind in ("number", "string") and kind == _kind(b) and compare(a, b)

    return test


def _member(a: Any, b: Any) -> bool | None:
    """Whether scalar a is in list b; None when the pair is not (scalar, list)."""
    if _kind(a) not in _SCALARS or _kind(b) != "list":
        return None
    return any(_scalar_eq(a, item) for item in b)


def _in(a: Any, b: Any) -> bool:
    return _member(a, b) is True


def _not_in(a: Any, b: Any) -> bool:
    return _member(a, b) is False


def _startswith(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.startswith(b)


def _endswith(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.endswith(b)


def _contains(a: Any, b: Any) -> bool:
    if isinstance(a, str):
        return isinstance(b, str) and b in a
    return _member(b, a) is True


_TESTS: dict[str, Callable[[Any, Any], bool]] = {
    "==": _eq,
    "!=": _ne,
    "<": _ordered(operator.lt),
    "<=": _ordered(operator.le),
    ">": _ordered(operator.gt),
    ">=": _ordered(operator.ge),
    "in": _in,
    "not in": _not_in,
    "startswith": _startswith,
    "endswith": _endswith,
    "contains": _contains,
}


def _walk(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if type(data) is not dict and not isinstance(data, Mapping):
            return MISSING
        data = data.get(key, MISSING)
        if data is MISSING:
            return MISSING
    return data


def _getter(operand: _Operand) -> _Getter:
    if isinstance(operand, _Literal):
        value = operand.value
        return lambda args, agent: value
    if isinstance(operand, _List):
        items = operand.items
        return lambda args, agent: items
    keys = operand.keys
    if operand.root == "args" and len(keys) == 1:  # the common case: args.<name>
        key = keys[0]
        return lambda args, agent: (
            args.get(key, MISSING) if type(args) is dict else _walk(args, keys)
        )
    if operand.root == "args":
        return lambda args, agent: _walk(args, keys)
    return lambda args, agent: _walk(agent, keys)


def _compile(node: _Node) -> _Test:
    if isinstance(node, _Compare):
        return _compile_compare(node)
    if isinstance(node, _Not):
        inner = _compile(node.item)
        return lambda args, agent: not inner(args, agent)
    tests = [_compile(item) for item in node.items]
    return functools.reduce(_both if isinstance(node, _And) else _either, tests)


def _both(first: _Test, second: _Test) -> _Test:
    return lambda args, agent: first(args, agent) and second(args, agent)


def _either(first: _Test, second: _Test) -> _Test:
    return lambda args, agent: first(args, agent) or second(args, agent)


def _compile_compare(node: _Compare) -> _Test:
    left, right = _getter(node.left), _getter(node.right)
    if node.pattern is not None:
        fullmatch = node.pattern.fullmatch

        def matches(args: _Data, agent: _Data) -> bool:
            value = left(args, agent)
            return isinstance(value, str) and fullmatch(value) is not None

        return matches
    if isinstance(node.right, _List) and node.op in ("in", "not in"):
        return _compile_membership(left, node.right.items, node.op == "in")
    test = _TESTS[node.op]
    if isinstance(node.right, _Literal | _List):  # the common case: a path against a constant
        value = node.right.value if isinstance(node.right, _Literal) else node.right.items
        return lambda args, agent: test(left(args, agent), value)
    return lambda args, agent: test(left(args, agent), right(args, agent))


def _compile_membership(left: _Getter, items: tuple[Any, ...], wanted: bool) -> _Test:
    """x in [literals] as one set lookup: a scalar keyed by its kind (so 1 is not true)."""
    members = frozenset((_kind(item), item) for item in items)

    def test(args: _Data, agent: _Data) -> bool:
        value = left(args, agent)
        kind = _kind(value)
        return kind in _SCALARS and ((kind, value) in members) is wanted

    return test


def _comparisons(node: _Node) -> list[_Compare]:
    if isinstance(node, _Compare):
        return [node]
    if isinstance(node, _Not):
        return _comparisons(node.item)
    return [compare for item in node.items for compare in _comparisons(item)]


# --- the public face ----------------------------------------------------------------------


class Condition:
    """A parsed, compiled condition; immutable and safe to share between threads."""

    __slots__ = ("_checks", "_test", "text")

    def __init__(self, text: str, root: _Node) -> None:
        self.text = text
        self._test = _compile(root)
        self._checks = tuple((c, _compile_compare(c)) for c in _comparisons(root))

    def evaluate(self, args: _Data | None = None, agent: _Data | None = None) -> bool:
        """Whether the condition holds for these arguments and this agent."""
        return self._test(_EMPTY if args is None else args, _EMPTY if agent is None else agent)

    def paths(self) -> tuple[str, ...]:
        """The argument names the condition uses (the first key after ``args.``), sorted."""
        names = set()
        for compare, _ in self._checks:
            for operand in (compare.left, compare.right):
                if isinstance(operand, _Path) and operand.root == "args":
                    names.add(operand.keys[0])
        return tuple(sorted(names))

    def explain(
        self, args: _Data | None = None, agent: _Data | None = None
    ) -> list[dict[str, Any]]:
        """Every comparison as written, in order, with its value for this call."""
        args = _EMPTY if args is None else args
        agent = _EMPTY if agent is None else agent
        return [{"check": c.text, "result": test(args, agent)} for c, test in self._checks]

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def parse(text: str) -> Condition:
    """Check and compile a condition; raises ConditionError naming the problem and position."""
    if not isinstance(text, str):
        raise ConditionError("a condition must be a string", 0)
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"condition is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    if not text.strip():
        raise ConditionError("condition is empty", 0)
    return Condition(text, _Parser(text).condition())
