"""Behaviour of the policy engine (broker.policy): default deny, deny beats allow, globs, roles."""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path

import pytest

from broker.errors import Unprocessable
from broker.policy import (
    ACTIONS,
    ADMIN_ACTIONS,
    MODEL_TEXT,
    CasbinPolicy,
    builtin_rules,
    parse_policy_csv,
    rule_id,
    validate_rule,
)
from broker.ports import Decision, Grant, Rule

ROOT = Path(__file__).resolve().parent.parent


def allow(subject: str, obj: str, action: str = "invoke") -> Rule:
    return validate_rule(subject, obj, action, "allow")


def deny(subject: str, obj: str, action: str = "invoke") -> Rule:
    return validate_rule(subject, obj, action, "deny")


def engine(*rules: Rule, grants: tuple[Grant, ...] = ()) -> CasbinPolicy:
    policy = CasbinPolicy()
    policy.load(list(rules), list(grants))
    return policy


# --- decisions ----------------------------------------------------------------------------


def test_default_deny_names_no_rule() -> None:
    policy = engine(allow("agent:other", "github.*"))
    assert policy.decide("agent:a", "github.issues.create", "invoke") == Decision(
        False, None, reason="no rule matched"
    )


def test_empty_policy_denies_invoke() -> None:
    assert CasbinPolicy().decide("agent:a", "demo.echo", "invoke").allowed is False


def test_allow_through_a_role_grant_names_the_rule() -> None:
    rule = allow("role:dev", "github.*")
    policy = engine(rule, grants=(Grant("agent:a", "role:dev"),))
    assert policy.decide("agent:a", "github.issues.create", "invoke") == Decision(True, rule.id)
    assert policy.decide("agent:b", "github.issues.create", "invoke").allowed is False


def test_allow_through_a_direct_agent_rule() -> None:
    rule = allow("agent:a", "slack.post")
    policy = engine(rule)
    assert policy.decide("agent:a", "slack.post", "invoke") == Decision(True, rule.id)
    assert policy.decide("agent:a", "slack.post", "audit.read").allowed is False


def test_action_must_match() -> None:
    policy = engine(allow("agent:a", "*", "audit.read"))
    assert policy.decide("agent:a", "demo.echo", "invoke").allowed is False
    assert policy.decide("agent:a", "demo.echo", "audit.read").allowed is True


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("github.*", "github.issues.create", True),
        ("github.*", "github.x", True),
        ("github.*", "githubx.y", False),
        ("github.*", "gitlab.x", False),
        ("github.*", "github", False),
        ("github.issues.create", "github.issues.create", True),
        ("github.issues.create", "github.issues.created", False),
        ("github.issues", "github.issues.create", False),
        ("*", "anything.at.all", True),
        ("*", "x", True),
        ("demo.?", "demo.a", True),
        ("demo.?", "demo.ab", False),
        ("demo.[ab]", "demo.b", True),
        ("demo.[ab]", "demo.c", False),
        ("*.create", "github.issues.create", True),
        ("github.*", "GITHUB.x", False),
    ],
)
def test_glob_semantics(pattern: str, name: str, expected: bool) -> None:
    policy = engine(allow("agent:a", pattern))
    assert policy.decide("agent:a", name, "invoke").allowed is expected


@pytest.mark.parametrize("deny_first", [True, False])
def test_explicit_deny_beats_allow_on_an_agent_rule(deny_first: bool) -> None:
    granted, refused = allow("agent:a", "github.*"), deny("agent:a", "github.repos.delete")
    rules = (refused, granted) if deny_first else (granted, refused)
    policy = engine(*rules)
    assert policy.decide("agent:a", "github.repos.delete", "invoke") == Decision(
        False, refused.id, reason="explicit deny"
    )
    assert policy.decide("agent:a", "github.issues.create", "invoke") == Decision(True, granted.id)


@pytest.mark.parametrize("deny_first", [True, False])
def test_explicit_deny_through_a_role_beats_a_direct_allow(deny_first: bool) -> None:
    granted, refused = allow("agent:a", "*"), deny("role:restricted", "slack.*")
    rules = (refused, granted) if deny_first else (granted, refused)
    policy = engine(*rules, grants=(Grant("agent:a", "role:restricted"),))
    assert policy.decide("agent:a", "slack.post", "invoke") == Decision(
        False, refused.id, reason="explicit deny"
    )
    assert policy.decide("agent:a", "github.x", "invoke").allowed is True


@pytest.mark.parametrize("deny_first", [True, False])
def test_direct_deny_beats_an_allow_through_an_inherited_role(deny_first: bool) -> None:
    granted, refused = allow("role:reader", "http.get"), deny("agent:a", "http.*")
    rules = (refused, granted) if deny_first else (granted, refused)
    grants = (Grant("agent:a", "role:writer"), Grant("role:writer", "role:reader"))
    policy = engine(*rules, grants=grants)
    assert policy.decide("agent:a", "http.get", "invoke") == Decision(
        False, refused.id, reason="explicit deny"
    )
    assert policy.decide("agent:b", "http.get", "invoke").allowed is False


def test_role_inheritance_writer_gets_reader_rules() -> None:
    read, write = allow("role:reader", "http.get"), allow("role:writer", "github.*")
    grants = (Grant("role:writer", "role:reader"), Grant("agent:w", "role:writer"))
    policy = engine(read, write, grants=(*grants, Grant("agent:r", "role:reader")))
    assert policy.decide("agent:w", "http.get", "invoke") == Decision(True, read.id)
    assert policy.decide("agent:w", "github.x", "invoke") == Decision(True, write.id)
    assert policy.decide("agent:r", "http.get", "invoke").allowed is True
    assert policy.decide("agent:r", "github.x", "invoke").allowed is False  # not upward
    assert policy.roles_of("agent:w") == ["role:writer", "role:reader"]
    assert policy.roles_of("agent:r") == ["role:reader"]
    assert policy.roles_of("agent:nobody") == []


def test_role_cycles_do_not_hang() -> None:
    grants = (Grant("role:a", "role:b"), Grant("role:b", "role:a"), Grant("agent:x", "role:a"))
    policy = engine(allow("role:b", "demo.echo"), grants=grants)
    assert sorted(policy.roles_of("agent:x")) == ["role:a", "role:b"]
    assert policy.decide("agent:x", "demo.echo", "invoke").allowed is True
    assert policy.decide("agent:x", "demo.other", "invoke").allowed is False


def test_bare_role_names_in_grants_are_normalized() -> None:
    policy = engine(allow("role:writer", "github.*"), grants=(Grant("agent:a", "writer"),))
    assert policy.decide("agent:a", "github.x", "invoke").allowed is True
    assert policy.grants() == [Grant("agent:a", "role:writer")]


def test_revoke_takes_effect_after_load() -> None:
    rule = allow("role:dev", "github.*")
    policy = engine(rule, grants=(Grant("agent:a", "role:dev"),))
    assert policy.decide("agent:a", "github.x", "invoke").allowed is True
    policy.load([rule], [])
    assert policy.decide("agent:a", "github.x", "invoke").allowed is False
    assert policy.roles_of("agent:a") == []
    policy.load([rule], [Grant("agent:a", "role:dev")])
    assert policy.decide("agent:a", "github.x", "invoke").allowed is True
    policy.load([], [Grant("agent:a", "role:dev")])  # the rule deleted instead
    assert policy.decide("agent:a", "github.x", "invoke").allowed is False


def test_conditional_rules_fail_closed_until_conditions_exist() -> None:
    # Rules with a condition cannot come through validate_rule yet; if one is loaded anyway,
    # an allow without its condition would be too broad and a deny without it only stricter.
    cond_allow = Rule("r1", "agent:a", "github.*", "invoke", "allow", condition="owner == 'x'")
    cond_deny = Rule("r2", "agent:a", "slack.*", "invoke", "deny", condition="owner == 'x'")
    policy = engine(cond_allow, cond_deny, allow("agent:a", "slack.*"))
    assert policy.decide("agent:a", "github.x", "invoke").allowed is False
    assert policy.decide("agent:a", "slack.post", "invoke") == Decision(
        False, "r2", reason="explicit deny"
    )
    assert "r1" not in {rule.id for rule in policy.rules()}


# --- admin --------------------------------------------------------------------------------


def test_builtin_rules_are_admin_actions_only() -> None:
    rules = builtin_rules()
    assert {rule.action for rule in rules} == set(ADMIN_ACTIONS)
    assert all(rule.subject == "role:admin" and rule.object == "*" for rule in rules)
    assert all(rule.effect == "allow" and rule.source == "builtin" for rule in rules)
    assert {rule.id for rule in rules} == {f"builtin:admin:{a}" for a in ADMIN_ACTIONS}
    assert ("invoke", *ADMIN_ACTIONS) == ACTIONS


@pytest.mark.parametrize("action", ADMIN_ACTIONS)
def test_admin_role_holds_every_admin_action_without_any_policy(action: str) -> None:
    policy = CasbinPolicy(grants=[Grant("agent:root", "role:admin")])
    assert policy.decide("agent:root", "github.x", action) == Decision(
        True, f"builtin:admin:{action}"
    )
    assert policy.decide("role:admin", "*", action).allowed is True
    assert policy.decide("agent:someone", "github.x", action).allowed is False


def test_admin_role_does_not_invoke() -> None:
    policy = CasbinPolicy(grants=[Grant("agent:root", "role:admin")])
    assert policy.decide("agent:root", "github.x", "invoke") == Decision(
        False, None, reason="no rule matched"
    )


def test_builtin_admin_rules_survive_any_load() -> None:
    policy = CasbinPolicy()
    policy.load([], [Grant("agent:root", "role:admin")])
    assert policy.decide("agent:root", "*", "policies.write").allowed is True
    ids = {rule.id for rule in policy.rules()}
    assert {rule.id for rule in builtin_rules()} <= ids


def test_admin_can_be_denied_explicitly() -> None:
    refused = deny("agent:root", "*", "audit.read")
    policy = engine(refused, grants=(Grant("agent:root", "role:admin"),))
    assert policy.decide("agent:root", "x", "audit.read") == Decision(
        False, refused.id, reason="explicit deny"
    )


def test_default_roles_give_no_admin_action_to_non_admins() -> None:
    rules, grants = parse_policy_csv((ROOT / "policies" / "policy.csv").read_text())
    grants += [Grant("agent:w", "role:writer"), Grant("agent:r", "role:reader")]
    policy = engine(*rules, grants=tuple(grants))
    for subject in ("agent:w", "agent:r"):
        for action in ADMIN_ACTIONS:
            assert policy.decide(subject, "github.x", action).allowed is False
            assert policy.decide(subject, "*", action).allowed is False
    assert policy.decide("agent:w", "github.issues.create", "invoke").allowed is True
    assert policy.decide("agent:w", "http.get", "invoke").allowed is True  # inherited
    assert policy.decide("agent:r", "http.get", "invoke").allowed is True
    assert policy.decide("agent:r", "github.issues.create", "invoke").allowed is False


# --- the policy file, validation and ids --------------------------------------------------


def test_repo_policy_file_yields_the_documented_roles() -> None:
    rules, grants = parse_policy_csv((ROOT / "policies" / "policy.csv").read_text())
    by_role: dict[str, set[tuple[str, str]]] = {}
    for rule in rules:
        assert rule.effect == "allow" and rule.source == "file" and rule.condition is None
        by_role.setdefault(rule.subject, set()).add((rule.object, rule.action))
    assert by_role["role:admin"] == {("*", action) for action in ADMIN_ACTIONS}
    assert by_role["role:reader"] == {
        ("http.get", "invoke"),
        ("demo.echo", "invoke"),
        ("demo.status", "invoke"),
        ("demo.weather", "invoke"),
    }
    assert by_role["role:writer"] == {
        (obj, "invoke") for obj in ("github.*", "slack.*", "llm.*", "demo.*")
    }
    assert set(by_role) == {"role:admin", "role:reader", "role:writer"}
    assert grants == [Grant("role:writer", "role:reader")]


def test_applying_a_file_twice_never_duplicates() -> None:
    text = (ROOT / "policies" / "policy.csv").read_text()
    first, grants = parse_policy_csv(text)
    second, _ = parse_policy_csv(text)
    assert [rule.id for rule in first] == [rule.id for rule in second]
    policy = engine(*first, *second, grants=(*grants, *grants))
    assert len(policy.rules()) == len(builtin_rules()) + len(first)
    assert len(policy.grants()) == len(grants)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("p, user:x, demo.echo, invoke, allow", "subject"),
        ("p, alice, demo.echo, invoke, allow", "subject"),
        ("p, role:r, Demo.Echo, invoke, allow", "object"),
        ("p, role:r, demo/echo, invoke, allow", "object"),
        ("p, role:r, , invoke, allow", "object"),
        ("p, role:r, demo.echo, delete, allow", "action"),
        ("p, role:r, demo.echo, invoke, maybe", "effect"),
        ("p, role:r, demo.echo, invoke, allow, owner == 'acme'", "conditions are not supported"),
        ("p, role:r, demo.echo", "expected p"),
        ("g, agent:a", "expected g"),
        ("g, agent:a, writer", "role"),
        ("g, nobody, role:writer", "subject"),
        ("x, role:r, demo.echo, invoke, allow", "unknown line type"),
    ],
)
def test_malformed_lines_are_refused_with_their_number(line: str, fragment: str) -> None:
    text = "# a comment\n\np, role:r, demo.echo, invoke, allow\n" + line + "\n"
    with pytest.raises(ValueError, match=r"line 4\b") as info:
        parse_policy_csv(text)
    assert fragment in str(info.value)


def test_comments_blank_lines_and_trailing_empty_condition_are_accepted() -> None:
    text = "\n  # indented comment\np, role:r, demo.echo, invoke, allow,\n\ng, agent:a, role:r\n"
    rules, grants = parse_policy_csv(text)
    assert [(r.subject, r.object, r.condition) for r in rules] == [("role:r", "demo.echo", None)]
    assert grants == [Grant("agent:a", "role:r")]


def test_validate_rule_returns_the_rule_with_its_derived_id() -> None:
    rule = validate_rule("role:reader", "httpbin.*", "invoke", "allow", None)
    assert rule == Rule(
        id=rule_id("role:reader", "httpbin.*", "invoke", "allow", None),
        subject="role:reader",
        object="httpbin.*",
        action="invoke",
        effect="allow",
        condition=None,
        source="api",
    )


@pytest.mark.parametrize(
    "fields",
    [
        ("reader", "httpbin.*", "invoke", "allow", None),
        ("role:reader", "httpbin.*", "read", "allow", None),
        ("role:reader", "httpbin.*", "invoke", "permit", None),
        ("role:reader", "http bin", "invoke", "allow", None),
        ("role:reader", "httpbin.*", "invoke", "allow", 'owner == "acme"'),
    ],
)
def test_validate_rule_refuses_invalid_rules(
    fields: tuple[str, str, str, str, str | None],
) -> None:
    with pytest.raises(Unprocessable):
        validate_rule(*fields)


def test_engine_offers_builtin_rules_and_make_rule() -> None:
    policy = CasbinPolicy()
    assert policy.builtin_rules() == builtin_rules()
    made = policy.make_rule("role:reader", "httpbin.*", "invoke", "allow", None)
    assert made == validate_rule("role:reader", "httpbin.*", "invoke", "allow")
    with pytest.raises(Unprocessable, match="conditions are not supported yet"):
        policy.make_rule("role:reader", "httpbin.*", "invoke", "allow", "x == 1")


def test_validate_rule_names_the_condition_problem() -> None:
    with pytest.raises(Unprocessable, match="conditions are not supported yet"):
        validate_rule("role:r", "demo.*", "invoke", "allow", "x == 1")


def test_rule_id_is_deterministic_and_distinct() -> None:
    a = rule_id("role:r", "github.*", "invoke", "allow", None)
    assert a == rule_id("role:r", "github.*", "invoke", "allow", None)
    assert re.fullmatch(r"pol_[0-9a-f]{16}", a)
    others = {
        rule_id("role:r", "github.*", "invoke", "deny", None),
        rule_id("role:r", "github.*", "invoke", "allow", "x"),
        rule_id("role:s", "github.*", "invoke", "allow", None),
        rule_id("role:r", "github.x", "invoke", "allow", None),
        rule_id("role:r", "github.*", "audit.read", "allow", None),
    }
    assert a not in others and len(others) == 5


def test_model_text_equals_the_model_file() -> None:
    assert MODEL_TEXT.strip() == (ROOT / "policies" / "model.conf").read_text().strip()


# --- operations ---------------------------------------------------------------------------


def test_casbin_does_not_log_decisions(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # A later logging.config.dictConfig(disable_existing_loggers=False) re-enables casbin's
    # loggers that casbin had disabled; decisions must stay quiet even then.
    enforcer_logger = logging.getLogger("casbin.enforcer")
    was_disabled = enforcer_logger.disabled
    policy = engine(allow("agent:a", "demo.*"))
    enforcer_logger.disabled = False
    try:
        policy.decide("agent:a", "demo.echo", "invoke")
        policy.decide("agent:a", "github.x", "invoke")
        policy.load([allow("agent:a", "demo.*")], [Grant("agent:a", "role:x")])
        policy.decide("agent:a", "github.x", "invoke")
    finally:
        enforcer_logger.disabled = was_disabled
    assert [r for r in caplog.records if r.name.startswith("casbin")] == []


def test_concurrent_decisions_see_one_whole_policy_and_revocation_sticks() -> None:
    writer = allow("role:writer", "github.*")
    secret_deny = deny("agent:c", "github.secret")
    secret_allow = allow("agent:c", "github.secret")
    # State A: agent:c holds writer and is denied github.secret. State B: no grant, but a
    # direct allow on github.secret. Each query has a distinct answer in each state.
    state_a = ([writer, secret_deny], [Grant("agent:c", "role:writer")])
    state_b: tuple[list[Rule], list[Grant]] = ([writer, secret_allow], [])
    expected = {
        "github.x": {Decision(True, writer.id), Decision(False, None, reason="no rule matched")},
        "github.secret": {
            Decision(False, secret_deny.id, reason="explicit deny"),
            Decision(True, secret_allow.id),
        },
    }
    policy = CasbinPolicy(*state_b)
    phase: list[tuple[int, str]] = [(0, "b-done")]  # (load cycle, what has completed)
    errors: list[str] = []
    finished: list[int] = []
    cycles: list[int] = []
    start = threading.Barrier(5)

    def loader() -> None:
        start.wait()
        # Keep swapping while the deciders run (bounded; every cycle ends in state B).
        for cycle in range(1, 20_001):
            phase[0] = (cycle, "a-started")
            policy.load(*state_a)
            policy.load(*state_b)
            phase[0] = (cycle, "b-done")
            if len(finished) == 4:
                break
        cycles.append(cycle)

    def decider() -> None:
        start.wait()
        try:
            for i in range(750):
                check("github.x" if i % 2 else "github.secret")
        except Exception as exc:  # e.g. casbin failing under concurrency: report, not hang
            errors.append(repr(exc))
        finished.append(1)

    def check(obj: str) -> None:
        before = phase[0]
        decision = policy.decide("agent:c", obj, "invoke")
        after = phase[0]
        if decision not in expected[obj]:
            errors.append(f"{obj}: inconsistent {decision}")
        # B completed and A did not start since: the grant is gone, nothing via writer.
        if before == after and before[1] == "b-done" and obj == "github.x" and decision.allowed:
            errors.append(f"allowed after revocation in cycle {before[0]}")

    threads = [threading.Thread(target=loader)] + [
        threading.Thread(target=decider) for _ in range(4)
    ]
    # Switch threads often, so decisions land in the middle of loads, not only between them.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert cycles and cycles[0] > 1  # the loads really overlapped the decisions
    assert policy.decide("agent:c", "github.x", "invoke").allowed is False
    assert policy.decide("agent:c", "github.secret", "invoke") == Decision(True, secret_allow.id)


def test_parallel_decisions_do_not_trip_casbin() -> None:
    # casbin ast.parses its matcher on every decision; unserialized, parallel decisions fail
    # on CPython 3.11 with "AST constructor recursion depth mismatch" (cpython gh-106905).
    rule = allow("role:writer", "github.*")
    policy = engine(rule, grants=(Grant("agent:c", "role:writer"),))
    outcomes: list[object] = []
    start = threading.Barrier(8)

    def decider() -> None:
        start.wait()
        try:
            outcomes.extend(policy.decide("agent:c", "github.x", "invoke") for _ in range(500))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=decider) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch often, so parses overlap
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert [o for o in outcomes if o != Decision(True, rule.id)] == []
    assert len(outcomes) == 8 * 500


@pytest.mark.parametrize(
    ("casbin_says", "expected_reason"),
    [((False, []), "explicit deny"), ((True, []), "no rule matched")],
)
def test_decide_stays_correct_if_casbin_names_no_rule(
    casbin_says: tuple[bool, list[str]], expected_reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # enforce_ex names the deciding rule today; should a casbin release stop doing so, a
    # refusal still names the deny and an unexplained allow is refused.
    refused = deny("agent:a", "github.x")
    policy = engine(refused, allow("agent:a", "github.*"))
    monkeypatch.setattr(policy._state().enforcer, "enforce_ex", lambda *_: casbin_says)
    decision = policy.decide("agent:a", "github.x", "invoke")
    assert decision.allowed is False and decision.reason == expected_reason
    assert decision.rule == (refused.id if expected_reason == "explicit deny" else None)
