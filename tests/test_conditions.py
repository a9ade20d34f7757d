"""The condition language of policy rules (broker.conditions): syntax, semantics, limits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.conditions import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_LIST,
    MAX_NODES,
    MAX_PATTERN,
    MISSING,
    Condition,
    ConditionError,
    parse,
)

AGENT = {"id": "a1", "name": "Bot", "attributes": {"home": "/srv/a1/", "team": "ops"}}
ARGS: dict[str, Any] = {
    "owner": "acme",
    "channel": "#ops",
    "amount": 100,
    "price": 9.5,
    "flag": True,
    "none": None,
    "path": "/srv/a1/notes.txt",
    "tags": ["x", "y", 3],
    "nested": {"login": "octo", "deep": {"n": 1}},
    "with-dash": "ok",
}


def holds(text: str, args: Any = ARGS, agent: Any = AGENT) -> bool:
    return parse(text).evaluate(args, agent)


# --- what conditions mean -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('args.owner == "acme"', True),
        ("args.owner == 'acme'", True),
        ("args.owner != 'acme'", False),
        ("args.owner != 'evil'", True),
        ("args.channel in ['#ops', '#alerts']", True),
        ("args.channel in ['#dev', '#alerts',]", False),
        ("args.channel not in ['#dev']", True),
        ("args.channel not in ['#ops']", False),
        ("args.amount <= 100", True),
        ("args.amount < 100", False),
        ("args.amount >= 100.0", True),
        ("args.amount > -1e3", True),
        ("args.price == 9.5", True),
        ("args.price > 9", True),
        ("args.owner < 'b'", True),  # strings order by code point
        ("args.owner > 'B'", True),
        ("args.path startswith agent.attributes.home", True),
        ("args.path startswith '/srv/a2/'", False),
        ("args.path endswith '.txt'", True),
        ("args.path contains 'a1/n'", True),
        ("args.tags contains 'x'", True),
        ("args.tags contains 3", True),
        ("args.tags contains 'z'", False),
        ("'x' in args.tags", True),
        ("args.tags == ['x', 'y', 3]", True),
        ("args.tags == ['x', 'y']", False),
        ("args.nested.login == 'octo'", True),
        ("args.nested.deep.n == 1", True),
        ("args.with-dash == 'ok'", True),
        ("args.flag == true", True),
        ("args.flag != false", True),
        ("args.none == null", True),
        ("agent.id == 'a1'", True),
        ("agent.name == 'Bot'", True),
        ("agent.attributes.team in ['ops', 'sec']", True),
        ("args.owner matches 'ac.e'", True),
        ("args.owner matches 'cm'", False),  # anchored at both ends
        ("args.owner matches 'acm'", False),
        ("args.owner matches '[a-z]+'", True),
        ("args.owner matches '(?i)ACME'", True),
        ("args.owner == 'acme' and args.amount <= 100", True),
        ("args.owner == 'x' or args.amount <= 100", True),
        ("not args.owner == 'x'", True),
        ("not (args.owner == 'acme')", False),
        ("args.owner == 'x' or args.owner == 'y' and args.amount == 100", False),
        ("(args.owner == 'x' or args.owner == 'acme') and args.amount == 100", True),
        ("not args.owner == 'x' and args.amount == 1", False),  # not binds tighter than and
        ("args.owner == 'x' or not args.amount == 1", True),
    ],
)
def test_conditions_mean_what_they_say(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize(
    "text",
    [
        "args.absent == 'x'",
        "args.absent != 'x'",
        "args.absent == null",
        "args.absent < 1",
        "args.absent >= 1",
        "args.absent in ['x']",
        "args.absent not in ['x']",
        "args.absent startswith 'x'",
        "args.absent endswith 'x'",
        "args.absent contains 'x'",
        "args.absent matches '.*'",
        "args.owner == args.absent",
        "args.owner != args.absent",
        "args.tags contains args.absent",
        "args.owner.login == 'x'",  # walks through a string
        "args.tags.x == 'x'",  # walks through a list
        "agent.attributes.absent == 'x'",
        "args.path startswith agent.attributes.absent",
    ],
)
def test_a_missing_path_makes_every_comparison_false(text: str) -> None:
    assert holds(text) is False
    assert holds(f"not ({text})") is True  # the documented caveat: write conditions positively


@pytest.mark.parametrize(
    "text",
    [
        "args.amount == '100'",
        "args.owner == 1",
        "args.flag == 1",  # a boolean is not a number
        "args.amount == true",
        "args.none == false",
        "args.owner < 5",
        "args.amount < 'z'",
        "args.flag > 0",
        "args.none < 1",
        "args.owner in 'acme'",  # in needs a list (substring: contains)
        "args.tags in ['x']",  # only a scalar is in a list
        "args.tags not in ['x']",
        "args.amount startswith '1'",
        "args.owner startswith 1",
        "args.amount contains 1",
        "args.owner contains 1",
        "args.amount matches '100'",
        "args.nested == args.nested",  # objects are never equal
        "args.tags == 'x'",
        "args.nested == ['x']",
        "args.tags contains args.tags",
    ],
)
def test_type_mismatches_are_false_not_errors(text: str) -> None:
    assert holds(text) is False


def test_not_equal_is_true_for_present_values_of_another_kind() -> None:
    # != is "present and not ==", so a value of another kind is not equal (documented).
    assert holds("args.amount != '100'") is True
    assert holds("args.nested != 'x'") is True


def test_numbers_compare_across_int_and_float() -> None:
    assert holds("args.x == 1.0", {"x": 1}) is True
    assert holds("args.x < 2", {"x": 1.5}) is True
    assert holds("args.x == 1", {"x": float("nan")}) is False
    assert holds("args.x != 1", {"x": float("nan")}) is True


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'a\\b'", "a\\b"),
        (r"'tab\there'", "tab\there"),
        (r"'line\nbreak'", "line\nbreak"),
        ("'\"'", '"'),
        ('"\'"', "'"),
        ("'ünï'", "ünï"),
        ("''", ""),
    ],
)
def test_string_literals(literal: str, value: str) -> None:
    assert holds(f"args.s == {literal}", {"s": value}) is True


def test_evaluate_without_data_and_with_odd_data_never_raises() -> None:
    condition = parse("args.a.b == 1 or agent.attributes.x contains 'y' or args.a matches 'z'")
    assert condition.evaluate() is False
    assert condition.evaluate(None, None) is False
    for odd in ({"a": object()}, {"a": [1, {"b": 1}]}, {"a": {"b": [1]}}, {"a": None}):
        assert condition.evaluate(odd, {"attributes": None}) is False
    assert condition.evaluate({"a": {"b": 1}}) is True


def test_no_python_is_reachable() -> None:
    assert holds("args.__class__ == 'x'", {}) is False
    assert holds("args.owner.__class__ == 'str'") is False
    assert holds("agent.attributes.__dict__ == null") is False
    for text in ("__import__('os')", "args.x == __import__('os')", "eval('1') == 1"):
        with pytest.raises(ConditionError, match="function calls"):
            parse(text)


def test_paths_lists_the_argument_names_used() -> None:
    condition = parse("args.b == 1 and (args.a.x in [1] or agent.id == 'q') and args.b < 3")
    assert condition.paths() == ("a", "b")
    assert parse("agent.id == 'x'").paths() == ()


def test_explain_lists_each_comparison_as_written() -> None:
    condition = parse("args.owner == 'acme'  and not (args.amount>5 or args.x == 1)")
    assert condition.explain(ARGS, AGENT) == [
        {"check": "args.owner == 'acme'", "result": True},
        {"check": "args.amount>5", "result": True},
        {"check": "args.x == 1", "result": False},
    ]
    assert condition.evaluate(ARGS, AGENT) is False


def test_conditions_compare_by_text() -> None:
    assert parse("args.a == 1") == parse("args.a == 1")
    assert parse("args.a == 1") != parse("args.a==1")
    assert len({parse("args.a == 1"), parse("args.a == 1")}) == 1
    assert repr(parse("args.a == 1")) == "Condition('args.a == 1')"
    assert repr(MISSING) == "MISSING" and not MISSING


# --- what is refused ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("owner == 'acme'", "unknown name 'owner': paths start with args. or agent.", 0),
        ("args == 1", "args needs a key", 0),
        ("args.x = 1", "unexpected '=' (use == to compare)", 7),
        ("args.x == 1 && args.y == 2", "unexpected '&&' (use and)", 12),
        ("args.x == 1 || args.y == 2", "unexpected '||' (use or)", 12),
        ("!(args.x == 1)", "unexpected '!' (use not)", 0),
        ("args.x == ", "expected a value, found the end of the condition", 10),
        ("args.x 'a'", "expected an operator", 7),
        ("args.x is 'a'", "expected an operator", 7),
        ("args.x == 'abc", "unterminated string", 10),
        ("args.x == 'a\\qb'", "unknown escape", 12),
        ("args.x == 1 and", "expected a value, found the end", 15),
        ("(args.x == 1", "expected ) to close the ( opened at position 0", 12),
        ("args.x == 1)", "unexpected ')'", 11),
        ("args.x == 1 args.y == 2", "unexpected 'args.y'", 12),
        ("1 < args.x < 5", "comparisons cannot be chained", 11),
        ("args.x == args.y not in [1]", "comparisons cannot be chained", 17),
        ("1 == 1", "a comparison must name args.<key> or agent.<key>", 0),
        ("'args.x' == 'a'", "a comparison must name", 0),
        ("agent.attributes == 1", "agent paths are agent.id, agent.name", 0),
        ("agent.roles contains 'x'", "agent paths are", 0),
        ("user.id == 1", "unknown name 'user'", 0),
        ("args.x in [args.y]", "list items must be literals", 11),
        ("args.x in [[1]]", "list items must be literals", 11),
        ("args.x in [1 2]", "expected , between list items", 13),
        ("args.x in [1,", "list items must be literals", 13),
        ("regexMatch(args.x, 'a.*')", "function calls such as regexMatch(...) are not", 0),
        ("keyMatch(args.x, 'a')", "function calls such as keyMatch", 0),
        ("args.x matches args.y", "matches needs a string literal pattern", 15),
        ("args.x matches 1", "matches needs a string literal pattern", 15),
        ("args.x matches '('", "invalid pattern: missing ), unterminated subpattern", 15),
        ("args.x == 1 and and", "expected a value, found 'and'", 16),
        ("args.x == #", "unexpected character '#'", 10),
        ("args.x. == 1", "unexpected character '.'", 6),
        ("args.x == 1.", "unexpected character '.'", 11),
        ("", "condition is empty", 0),
        ("   ", "condition is empty", 0),
    ],
)
def test_malformed_conditions_are_refused_with_position(
    text: str, message: str, position: int
) -> None:
    with pytest.raises(ConditionError) as info:
        parse(text)
    assert message in info.value.message
    assert info.value.position == position
    assert str(info.value) == f"{info.value.message} at position {position}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("(a+)+", "a quantified group contains a quantifier"),
        ("(a*)*b", "a quantified group contains a quantifier"),
        ("(.*a){3}", "a quantified group contains a quantifier"),
        ("((a|b)+c)*", "a quantified group contains a quantifier"),
        ("(\\w+\\s?)*$", "a quantified group contains a quantifier"),
        ("(a)\\1", "back references"),
        ("(?P<x>a)(?P=x)", "back references"),
        ("[[a]", "ambiguous character class"),
        ("[a--b]", "ambiguous character class"),
        ("a" * (MAX_PATTERN + 1), f"longer than {MAX_PATTERN} characters"),
    ],
)
def test_dangerous_patterns_are_refused(pattern: str, problem: str) -> None:
    with pytest.raises(ConditionError, match="pattern refused") as info:
        parse(f"args.x matches '{pattern.replace(chr(92), chr(92) * 2)}'")
    assert problem in info.value.message


@pytest.mark.parametrize(
    ("pattern", "subject"),
    [
        ("[a-z]+", "abc"),
        ("(ab)+", "abab"),
        ("(foo|bar)-[0-9]{2}", "bar-42"),
        ("(a+)?b", "aab"),
        ("[(]+x[)*]", "((x*"),
        ("\\(a+\\)+", "(aa))"),
        ("\\d{3}-\\d{4}", "555-1234"),
        ("a" * MAX_PATTERN, "a" * MAX_PATTERN),
    ],
)
def test_ordinary_patterns_are_accepted(pattern: str, subject: str) -> None:
    assert holds(f"args.x matches '{pattern.replace(chr(92), chr(92) * 2)}'", {"x": subject})


# --- limits -------------------------------------------------------------------------------


def test_length_limit() -> None:
    head = "args.x == '"
    fits = head + "a" * (MAX_LENGTH - len(head) - 1) + "'"
    assert len(fits) == MAX_LENGTH and parse(fits)
    with pytest.raises(ConditionError, match=f"longer than {MAX_LENGTH} characters"):
        parse(fits + " ")


def test_node_limit() -> None:
    # Each comparison with two operands is 3 nodes, each "or" one more.
    within = " or ".join(["args.x == 1"] * 32)  # 32 * 3 + 31 = 127 nodes
    assert parse(within).evaluate({"x": 1}) is True
    with pytest.raises(ConditionError, match=f"more than {MAX_NODES} parts"):
        parse(within + " or args.x == 2")


def test_nesting_limit() -> None:
    def nested(depth: int) -> str:
        return "(" * (depth - 1) + "args.x == 1" + ")" * (depth - 1)

    assert parse(nested(MAX_DEPTH)).evaluate({"x": 1}) is True
    with pytest.raises(ConditionError, match=f"deeper than {MAX_DEPTH} levels"):
        parse(nested(MAX_DEPTH + 1))
    with pytest.raises(ConditionError, match="deeper than"):
        parse("not " * 20 + "args.x == 1")
    with pytest.raises(ConditionError):  # far beyond the recursion limit: refused, not crashed
        parse("(" * 990 + "args.x == 1" + ")" * 9)


def test_list_limit() -> None:
    items = ", ".join(str(i) for i in range(MAX_LIST))
    assert parse(f"args.x in [{items}]").evaluate({"x": MAX_LIST - 1}) is True
    with pytest.raises(ConditionError, match=f"more than {MAX_LIST} items"):
        parse(f"args.x in [{items}, {MAX_LIST}]")


def test_path_limit() -> None:
    assert parse("args." + ".".join("k" * 8) + " == 1")
    with pytest.raises(ConditionError, match="more than 8 keys"):
        parse("args." + ".".join("k" * 9) + " == 1")


def test_a_condition_must_be_text() -> None:
    with pytest.raises(ConditionError, match="must be a string"):
        parse(1)  # type: ignore[arg-type]


# --- properties ---------------------------------------------------------------------------

_PATHS = ["args.a", "args.b", "args.c.d", "agent.id", "agent.attributes.home"]
_PATTERNS = ["a+", "[ab]*c", "x.*", ".*", "ab|cd", "", "(ab)+"]
_OPS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in", "startswith", "endswith", "contains"]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-3, 3, allow_nan=False, allow_infinity=False),
    st.text("abcx'\"\\", max_size=3),
)
_lists = st.lists(_scalars, max_size=3)
_values = st.one_of(_scalars, _lists, st.dictionaries(st.sampled_from("dx"), _scalars, max_size=2))


def _render_literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(_render_literal(item) for item in value) + "]"
    return repr(value)


@st.composite
def _comparisons(draw: st.DrawFn) -> tuple[Any, ...]:
    path = draw(st.sampled_from(_PATHS))
    if draw(st.booleans()):
        return ("matches", ("path", path), ("lit", draw(st.sampled_from(_PATTERNS))))
    op = draw(st.sampled_from(_OPS))
    other = draw(
        st.one_of(
            st.sampled_from(_PATHS).map(lambda p: ("path", p)),
            st.one_of(_scalars, _lists).map(lambda v: ("lit", v)),
        )
    )
    sides = [("path", path), other]
    if draw(st.booleans()):
        sides.reverse()
    return (op, sides[0], sides[1])


_trees = st.recursive(
    _comparisons(),
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.tuples(st.sampled_from(["and", "or"]), inner, inner),
    ),
    max_leaves=6,
)


def _render(tree: tuple[Any, ...]) -> str:
    head = tree[0]
    if head == "not":
        return f"not ({_render(tree[1])})"
    if head in ("and", "or"):
        return f"({_render(tree[1])}) {head} ({_render(tree[2])})"
    return f"{_render_operand(tree[1])} {head} {_render_operand(tree[2])}"


def _render_operand(operand: tuple[str, Any]) -> str:
    return operand[1] if operand[0] == "path" else _render_literal(operand[1])


# The reference: the documented semantics written out plainly, independently of the module.
_ABSENT = object()


def _ref_value(operand: tuple[str, Any], args: Any, agent: Any) -> Any:
    if operand[0] == "lit":
        return operand[1]
    root, *keys = operand[1].split(".")
    data = args if root == "args" else agent
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return _ABSENT
        data = data[key]
    return data


def _ref_kind(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "bool"
    if type(value) in (int, float):
        return "number"
    if type(value) is str:
        return "string"
    if type(value) is list:
        return "list"
    return "other"


def _ref_eq(a: Any, b: Any) -> bool:
    if _ref_kind(a) != _ref_kind(b) or _ref_kind(a) == "other":
        return False
    if _ref_kind(a) == "list":
        return len(a) == len(b) and all(
            _ref_kind(x) not in ("list", "other") and _ref_eq(x, y) for x, y in zip(a, b)
        )
    return bool(a == b)


def _ref_compare(op: str, a: Any, b: Any) -> bool:
    if a is _ABSENT or b is _ABSENT:
        return False
    scalar = _ref_kind(a) in ("null", "bool", "number", "string")
    if op == "==":
        return _ref_eq(a, b)
    if op == "!=":
        return not _ref_eq(a, b)
    if op in ("<", "<=", ">", ">="):
        if _ref_kind(a) != _ref_kind(b) or _ref_kind(a) not in ("number", "string"):
            return False
        return bool({"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])
    if op in ("in", "not in"):
        if not scalar or _ref_kind(b) != "list":
            return False
        found = any(_ref_eq(a, item) for item in b)
        return found if op == "in" else not found
    if op in ("startswith", "endswith"):
        both = _ref_kind(a) == _ref_kind(b) == "string"
        return both and (a.startswith(b) if op == "startswith" else a.endswith(b))
    if op == "contains":
        if _ref_kind(a) == "string":
            return _ref_kind(b) == "string" and b in a
        b_scalar = _ref_kind(b) in ("null", "bool", "number", "string")
        return _ref_kind(a) == "list" and b_scalar and any(_ref_eq(b, item) for item in a)
    import re

    return _ref_kind(a) == "string" and re.fullmatch(b, a) is not None


def _ref_eval(tree: tuple[Any, ...], args: Any, agent: Any) -> bool:
    head = tree[0]
    if head == "not":
        return not _ref_eval(tree[1], args, agent)
    if head == "and":
        return _ref_eval(tree[1], args, agent) and _ref_eval(tree[2], args, agent)
    if head == "or":
        return _ref_eval(tree[1], args, agent) or _ref_eval(tree[2], args, agent)
    return _ref_compare(head, _ref_value(tree[1], args, agent), _ref_value(tree[2], args, agent))


_arg_maps = st.dictionaries(
    st.sampled_from("abc"),
    st.one_of(_values, st.fixed_dictionaries({}, optional={"d": _values})),
    max_size=3,
)
_agents = st.fixed_dictionaries(
    {},
    optional={
        "id": _scalars,
        "attributes": st.dictionaries(st.sampled_from(["home", "team"]), _scalars, max_size=2),
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees, args=_arg_maps, agent=_agents)
def test_evaluation_matches_the_documented_semantics(
    tree: tuple[Any, ...], args: dict[str, Any], agent: dict[str, Any]
) -> None:
    text = _render(tree)
    try:
        condition = parse(text)
    except ConditionError as exc:
        # Only the limits may refuse a generated condition.
        assert "parts" in exc.message or "deeper" in exc.message or "longer" in exc.message
        return
    assert condition.evaluate(args, agent) is _ref_eval(tree, args, agent), text


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(
            list("args.x agent.id()[]'\"=!<>,0123456789-and or not in matches\\")
        )
    )
)
def test_parse_refuses_with_condition_error_only(text: str) -> None:
    try:
        condition = parse(text)
    except ConditionError as exc:
        assert 0 <= exc.position <= len(text)
        return
    assert isinstance(condition, Condition)
    assert condition.evaluate(ARGS, AGENT) in (True, False)


@settings(max_examples=200, deadline=None)
@given(
    args=st.recursive(
        _values,
        lambda v: st.one_of(st.lists(v), st.dictionaries(st.text(max_size=2), v)),
        max_leaves=8,
    )
)
def test_evaluate_never_raises_on_any_json(args: Any) -> None:
    condition = parse(
        "args.a == 1 or args.a.b in [1, 'x'] or args.a contains 'q' or args.a matches 'a.*'"
        " or args.a < 'z' or args.a != args.b or args.a not in [null, true]"
    )
    for data in (args, {"a": args}, {"a": args, "b": args}):
        assert condition.evaluate(data, {"attributes": args}) in (True, False)
