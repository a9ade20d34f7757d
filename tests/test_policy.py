"""Behaviour of the policy engine (broker.policy): default deny, deny beats allow, globs, roles."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.errors import Unprocessable
from broker.policy import (
    ACTIONS,
    ADMIN_ACTIONS,
    MODEL_TEXT,
    ORACLE_MODEL_TEXT,
    CasbinPolicy,
    LintIssue,
    builtin_rules,
    lint,
    parse_policy_csv,
    raise_for_lint,
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


def test_loaded_rules_whose_condition_does_not_parse_fail_closed() -> None:
    # Changed on purpose: this was "conditional rules fail closed until conditions exist".
    # Conditions exist now; a stored rule whose condition does not parse (here a bare name,
    # which the language refuses) is still loaded fail-closed: an allow without its condition
    # would be too broad (dropped), a deny without it only stricter (applies always).
    cond_allow = Rule("r1", "agent:a", "github.*", "invoke", "allow", condition="owner == 'x'")
    cond_deny = Rule("r2", "agent:a", "slack.*", "invoke", "deny", condition="owner == 'x'")
    policy = engine(cond_allow, cond_deny, allow("agent:a", "slack.*"))
    assert policy.decide("agent:a", "github.x", "invoke").allowed is False
    assert policy.decide("agent:a", "slack.post", "invoke") == Decision(
        False, "r2", reason="explicit deny"
    )
    assert "r1" not in {rule.id for rule in policy.rules()}
    assert policy.oracle_decide("agent:a", "slack.post", "invoke").rule == "r2"
    (matched,) = policy.explain("agent:a", "slack.post", "invoke")["matched"][:1]
    assert matched["id"] == "r2" and "applies unconditionally" in matched["note"]


# --- admin --------------------------------------------------------------------------------


def test_builtin_rules_are_admin_actions_only() -> None:
    rules = builtin_rules()
    assert {rule.action for rule in rules} == set(ADMIN_ACTIONS)
    assert all(rule.subject == "role:admin" and rule.object == "*" for rule in rules)
    assert all(rule.effect == "allow" and rule.source == "builtin" for rule in rules)
    assert {rule.id for rule in rules} == {f"builtin:admin:{a}" for a in ADMIN_ACTIONS}
    assert ("invoke", "approve", *ADMIN_ACTIONS) == ACTIONS  # admin holds neither call action


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
        ("p, group:x, demo.echo, invoke, allow", "subject"),
        ("p, alice, demo.echo, invoke, allow", "subject"),
        ("p, role:r, Demo.Echo, invoke, allow", "object"),
        ("p, role:r, demo/echo, invoke, allow", "object"),
        ("p, role:r, , invoke, allow", "object"),
        ("p, role:r, demo.echo, delete, allow", "action"),
        ("p, role:r, demo.echo, invoke, maybe", "effect"),
        ("p, role:r, demo.echo, invoke, allow, owner == 'acme'", "unknown name 'owner'"),
        ("p, role:r, demo.echo, invoke, allow, args.x ==", "condition: expected a value"),
        ("p, role:r, demo.echo, invoke, allow, args.x in ['a', 'b']", "must be double-quoted"),
        ('p, role:r, demo.echo, invoke, allow, "args.x == 1" x', "not a valid CSV line"),
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
    # Changed on purpose: make_rule accepts conditions now (it refused every one before).
    made = policy.make_rule("role:reader", "httpbin.*", "invoke", "allow", " args.x == 1 ")
    assert made.condition == "args.x == 1"
    assert made.id == rule_id("role:reader", "httpbin.*", "invoke", "allow", "args.x == 1")
    with pytest.raises(Unprocessable, match=r"condition: unknown name 'x'.* at position 0"):
        policy.make_rule("role:reader", "httpbin.*", "invoke", "allow", "x == 1")


def test_validate_rule_names_the_condition_problem_and_position() -> None:
    with pytest.raises(Unprocessable) as info:
        validate_rule("role:r", "demo.*", "invoke", "allow", "args.x == 1 and args.y =< 2")
    assert info.value.message == (
        "invalid policy rule: condition: unexpected '=' (use == to compare) at position 23"
    )


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
        policy.oracle_decide("agent:a", "demo.echo", "invoke")
        policy.oracle_decide("agent:a", "github.x", "invoke")
        policy.load([allow("agent:a", "demo.*")], [Grant("agent:a", "role:x")])
        policy.decide("agent:a", "github.x", "invoke")
        policy.oracle_decide("agent:a", "github.x", "invoke")
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
            # Decisions are now far faster than loads: keep deciding until loads did overlap.
            i = 0
            while i < 750 or phase[0][0] < 20:
                check("github.x" if i % 2 else "github.secret")
                i += 1
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


def test_parallel_oracle_decisions_do_not_trip_casbin() -> None:
    # casbin ast.parses its matcher on every decision; unserialized, parallel decisions fail
    # on CPython 3.11 with "AST constructor recursion depth mismatch" (cpython gh-106905).
    # Only the oracle runs casbin now (decide does not), so the oracle is what runs here.
    rule = allow("role:writer", "github.*")
    policy = engine(rule, grants=(Grant("agent:c", "role:writer"),))
    outcomes: list[object] = []
    start = threading.Barrier(8)

    def decider() -> None:
        start.wait()
        try:
            outcomes.extend(
                policy.oracle_decide("agent:c", "github.x", "invoke") for _ in range(500)
            )
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
def test_oracle_stays_correct_if_casbin_names_no_rule(
    casbin_says: tuple[bool, list[str]], expected_reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # enforce_ex names the deciding rule today; should a casbin release stop doing so, a
    # refusal still names the deny and an unexplained allow is refused. (decide no longer
    # runs casbin; the oracle, which tests hold the fast path to, does.)
    refused = deny("agent:a", "github.x")
    policy = engine(refused, allow("agent:a", "github.*"))
    monkeypatch.setattr(policy._state().enforcer, "enforce_ex", lambda *_: casbin_says)
    decision = policy.oracle_decide("agent:a", "github.x", "invoke")
    assert decision.allowed is False and decision.reason == expected_reason
    assert decision.rule == (refused.id if expected_reason == "explicit deny" else None)


# --- conditions in rules ------------------------------------------------------------------


def conditional(subject: str, obj: str, effect: str, condition: str) -> Rule:
    return validate_rule(subject, obj, "invoke", effect, condition)


def test_a_conditional_allow_allows_only_when_its_condition_holds() -> None:
    rule = conditional("role:ops", "slack.*", "allow", "args.channel in ['#ops', '#alerts']")
    policy = engine(rule, grants=(Grant("agent:a", "role:ops"),))
    assert policy.decide("agent:a", "slack.post", "invoke", args={"channel": "#ops"}) == Decision(
        True, rule.id
    )
    refused = Decision(False, None, reason="condition not met")
    assert policy.decide("agent:a", "slack.post", "invoke", args={"channel": "#x"}) == refused
    assert policy.decide("agent:a", "slack.post", "invoke", args={}) == refused  # absent: closed
    assert policy.decide("agent:a", "slack.post", "invoke") == refused  # no args at all
    # The decision cache keeps the candidates, not the answer, of a conditional request.
    assert policy.decide("agent:a", "slack.post", "invoke", args={"channel": "#alerts"}).allowed
    assert policy.oracle_decide("agent:a", "slack.post", "invoke", args={"channel": "#x"}) == (
        Decision(False, None, reason="no rule matched")
    )


def test_a_conditional_deny_applies_only_when_its_condition_holds() -> None:
    granted = allow("role:pay", "payments.*")
    capped = conditional("role:pay", "payments.send", "deny", "args.amount > 100")
    policy = engine(granted, capped, grants=(Grant("agent:a", "role:pay"),))
    small, large = {"amount": 100}, {"amount": 100.5}
    assert policy.decide("agent:a", "payments.send", "invoke", args=small) == Decision(
        True, granted.id
    )
    assert policy.decide("agent:a", "payments.send", "invoke", args=large) == Decision(
        False, capped.id, reason="explicit deny"
    )
    # A deny on an absent argument does not apply: constrain allows, not denies, to be closed.
    assert policy.decide("agent:a", "payments.send", "invoke", args={}).allowed is True
    assert policy.decide("agent:a", "payments.send", "invoke", args={"amount": "999"}).allowed


def test_conditions_read_the_agent() -> None:
    rule = conditional("role:fs", "fs.write", "allow", "args.path startswith agent.attributes.home")
    policy = engine(rule, grants=(Grant("agent:a", "role:fs"),))
    me = {"id": "a", "name": "A", "attributes": {"home": "/home/a/"}}
    ok, other = {"path": "/home/a/notes"}, {"path": "/home/b/notes"}
    assert policy.decide("agent:a", "fs.write", "invoke", args=ok, agent=me).allowed is True
    assert policy.decide("agent:a", "fs.write", "invoke", args=other, agent=me).allowed is False
    assert policy.decide("agent:a", "fs.write", "invoke", args=ok, agent={"id": "a"}).allowed is (
        False
    )


def test_an_unconditional_deny_beats_a_conditional_allow_and_the_reverse() -> None:
    owner = conditional("agent:a", "github.*", "allow", "args.owner == 'acme'")
    refused = deny("agent:a", "github.repos.delete")
    policy = engine(owner, refused)
    acme = {"owner": "acme"}
    assert policy.decide("agent:a", "github.repos.delete", "invoke", args=acme).rule == refused.id
    assert policy.decide("agent:a", "github.issues.create", "invoke", args=acme).allowed is True


def test_the_deciding_rule_is_the_one_casbin_names() -> None:
    # Two denies and two allows apply: casbin names the first deny in load order, and,
    # without a deny, the last allow. The fast path names the same rules.
    a1, a2 = allow("agent:a", "x.*"), allow("agent:a", "x.y")
    d1, d2 = deny("agent:a", "x.?"), deny("agent:a", "*.y")
    policy = engine(a1, d1, a2, d2)
    assert policy.decide("agent:a", "x.y", "invoke") == Decision(False, d1.id, "explicit deny")
    assert policy.oracle_decide("agent:a", "x.y", "invoke") == Decision(
        False, d1.id, "explicit deny"
    )
    policy = engine(a1, a2)
    assert policy.decide("agent:a", "x.y", "invoke") == Decision(True, a2.id)
    assert policy.oracle_decide("agent:a", "x.y", "invoke") == Decision(True, a2.id)


def test_rules_with_an_effect_other_than_allow_or_deny_never_decide() -> None:
    odd = Rule("odd", "agent:a", "x.y", "invoke", "maybe")
    policy = engine(odd, allow("agent:a", "x.*"))
    assert policy.decide("agent:a", "x.y", "invoke").allowed is True
    assert policy.oracle_decide("agent:a", "x.y", "invoke").allowed is True
    assert "odd" not in {rule.id for rule in policy.rules()}


def test_policy_file_conditions_are_csv_quoted() -> None:
    text = (
        "p, role:ops, slack.chat.post, invoke, allow, \"args.channel in ['#ops', '#alerts']\"\n"
        'p, role:ops, slack.chat.post, invoke, deny, "args.text contains ""secret"""\n'
        "p, role:ops, github.*, invoke, allow, args.owner == 'acme'\n"
    )
    rules, _ = parse_policy_csv(text)
    assert [rule.condition for rule in rules] == [
        "args.channel in ['#ops', '#alerts']",
        'args.text contains "secret"',
        "args.owner == 'acme'",
    ]
    assert rules[0].id == rule_id(
        "role:ops", "slack.chat.post", "invoke", "allow", "args.channel in ['#ops', '#alerts']"
    )
    api = validate_rule(*("role:ops", "github.*", "invoke", "allow", "args.owner == 'acme'"))
    assert rules[2].id == api.id  # the same rule from the file or the API: the same id
    policy = engine(*rules, grants=(Grant("agent:o", "role:ops"),))
    post = {"channel": "#ops", "text": "hello"}
    assert policy.decide("agent:o", "slack.chat.post", "invoke", args=post).allowed is True
    post = {"channel": "#ops", "text": "the secret is"}
    assert policy.decide("agent:o", "slack.chat.post", "invoke", args=post).allowed is False


def test_policy_file_condition_errors_name_line_and_position() -> None:
    with pytest.raises(ValueError) as info:
        parse_policy_csv(
            "p, role:r, demo.echo, invoke, allow\n"
            "p, role:r, x, invoke, allow, \"args.x matches '(a+)+'\"\n"
        )
    assert str(info.value).startswith(
        "policy line 2: invalid policy rule: condition: pattern refused"
    )
    assert str(info.value).endswith("at position 15")


# --- explain ------------------------------------------------------------------------------


def test_explain_names_no_rule_when_nothing_matched() -> None:
    policy = engine(allow("agent:b", "x.*"))
    assert policy.explain("agent:a", "x.y", "invoke") == {
        "subject": "agent:a",
        "object": "x.y",
        "action": "invoke",
        "roles": [],
        "allowed": False,
        "rule": None,
        "reason": "no rule matched",
        "matched": [],
    }


def test_explain_lists_every_matching_rule_with_its_checks() -> None:
    granted = conditional("role:dev", "github.*", "allow", "args.owner == 'acme' and args.n <= 5")
    refused = conditional("role:base", "github.repos.*", "deny", "args.force == true")
    other = allow("role:dev", "slack.*")  # does not match the object: not listed
    grants = (Grant("agent:a", "role:dev"), Grant("role:dev", "role:base"))
    policy = engine(granted, refused, other, grants=grants)
    call = {"owner": "acme", "n": 9, "force": False}
    out = policy.explain("agent:a", "github.repos.delete", "invoke", args=call)
    assert json.loads(json.dumps(out)) == out  # plain data
    assert (out["allowed"], out["rule"], out["reason"]) == (False, None, "condition not met")
    assert out["roles"] == ["role:dev", "role:base"]
    assert out["matched"] == [
        {
            "id": granted.id,
            "subject": "role:dev",
            "object": "github.*",
            "action": "invoke",
            "effect": "allow",
            "source": "api",
            "condition": "args.owner == 'acme' and args.n <= 5",
            "condition_met": False,
            "checks": [
                {"check": "args.owner == 'acme'", "result": True},
                {"check": "args.n <= 5", "result": False},
            ],
            "applies": False,
            "decided": False,
        },
        {
            "id": refused.id,
            "subject": "role:base",
            "object": "github.repos.*",
            "action": "invoke",
            "effect": "deny",
            "source": "api",
            "condition": "args.force == true",
            "condition_met": False,
            "checks": [{"check": "args.force == true", "result": False}],
            "applies": False,
            "decided": False,
        },
    ]
    out = policy.explain("agent:a", "github.repos.delete", "invoke", args={**call, "force": True})
    assert (out["allowed"], out["rule"], out["reason"]) == (False, refused.id, "explicit deny")
    assert [m["decided"] for m in out["matched"]] == [False, True]
    out = policy.explain("agent:a", "github.repos.delete", "invoke", args={**call, "n": 1})
    assert (out["allowed"], out["rule"]) == (True, granted.id)
    assert [m["applies"] for m in out["matched"]] == [True, False]


def test_explain_agrees_with_decide() -> None:
    rule = allow("agent:a", "x.*")
    policy = engine(rule, deny("agent:a", "x.z"))
    for obj in ("x.y", "x.z", "y.y"):
        decision = policy.decide("agent:a", obj, "invoke")
        out = policy.explain("agent:a", obj, "invoke")
        assert Decision(out["allowed"], out["rule"], out["reason"]) == decision


# --- lint ---------------------------------------------------------------------------------

CAPS: dict[str, set[str]] = {
    "github.issues.create": {"owner", "repo", "title"},
    "github.repos.delete": {"owner", "repo"},
    "github.search": {"query"},
    "slack.post": {"channel", "text"},
}


def issues_of(*rules: Rule, **kwargs: object) -> list[tuple[str, str]]:
    return [(i.level, i.message) for i in lint(rules, CAPS, **kwargs)]  # type: ignore[arg-type]


@pytest.mark.parametrize("subject", ["role:dev", "agent:a"])
@pytest.mark.parametrize("pattern", ["*", "**"])
def test_lint_refuses_invoke_on_everything(subject: str, pattern: str) -> None:
    rule = allow(subject, pattern)
    (issue,) = lint([rule], CAPS)
    assert issue == LintIssue(
        "error",
        rule.id,
        f"{subject} may invoke every capability ({pattern!r}); name the capabilities or a "
        "narrower glob, or flag the rule allow_wildcard",
    )
    with pytest.raises(Unprocessable, match=f"policy refused: {rule.id}: {subject} may invoke"):
        raise_for_lint(lint([rule], CAPS))


def test_lint_wildcard_exceptions() -> None:
    rule = allow("role:dev", "*")
    assert lint([rule], CAPS, allow_wildcard=True) == []
    assert lint([rule], CAPS, allow_wildcard={rule.id}) == []
    assert lint([rule], CAPS, allow_wildcard={"pol_other"}) != []
    flagged = FlaggedRule(**{**rule.__dict__, "allow_wildcard": True})
    assert lint([flagged], CAPS) == []  # a future Rule.allow_wildcard field is honoured
    assert issues_of(allow("role:admin", "*")) == []
    assert issues_of(deny("role:dev", "*")) == []
    assert issues_of(allow("role:dev", "*", "audit.read")) == []
    assert issues_of(*builtin_rules()) == []
    assert issues_of(allow("role:dev", "*.*")) == []  # narrower than everything


@dataclass(frozen=True)
class FlaggedRule(Rule):
    allow_wildcard: bool = False


def test_lint_warns_on_rules_that_name_no_capability() -> None:
    assert issues_of(allow("role:dev", "github.issues.delete")) == [
        ("warning", "no capability named 'github.issues.delete'")
    ]
    assert issues_of(allow("role:dev", "gitlab.*")) == [
        ("warning", "glob 'gitlab.*' matches no capability")
    ]
    assert issues_of(allow("role:dev", "github.*"), allow("role:dev", "slack.post")) == []


def test_lint_refuses_conditions_on_arguments_the_capability_lacks() -> None:
    exact = conditional("role:dev", "slack.post", "allow", "args.owner == 'acme'")
    assert issues_of(exact) == [
        ("error", "condition uses args.owner, which slack.post does not have")
    ]
    glob = conditional("role:dev", "slack.*", "deny", "args.owner == 'acme'")
    assert issues_of(glob) == [
        ("error", "condition uses args.owner, which no capability matching 'slack.*' has")
    ]
    partial = conditional("role:dev", "github.*", "deny", "args.owner.login == 'x'")
    assert issues_of(partial) == [
        (
            "warning",
            "condition uses args.owner, which 1 of the 3 capabilities matching 'github.*' lack "
            "(github.search): the rule never applies to those",
        )
    ]
    fine = conditional("role:dev", "github.repos.*", "allow", "args.owner == agent.attributes.org")
    assert issues_of(fine) == []


def test_lint_other_condition_problems() -> None:
    admin_args = validate_rule("role:dev", "*", "audit.read", "allow", "args.x == 1")
    assert issues_of(admin_args) == [
        ("warning", "audit.read carries no arguments: a condition on args is never true")
    ]
    admin_agent = validate_rule("role:dev", "*", "audit.read", "allow", "agent.id == 'a'")
    assert issues_of(admin_agent) == []
    stored = Rule("r1", "role:dev", "slack.post", "invoke", "allow", condition="owner == 1")
    assert issues_of(stored) == [
        (
            "error",
            "condition does not parse: unknown name 'owner': paths start with args. or agent. "
            "(args.owner?) at position 0",
        )
    ]


def test_engine_lints_its_own_rules() -> None:
    policy = engine(allow("agent:a", "*"), allow("agent:a", "slack.post"))
    assert [i.level for i in policy.lint(CAPS)] == ["error"]
    assert policy.lint(CAPS, allow_wildcard=True) == []


# --- roles, caches, memory ----------------------------------------------------------------


def test_role_chains_deeper_than_casbins_default_limit_are_followed() -> None:
    # pycasbin's role manager stops after 10 levels by default; the engine follows every
    # grant (and the oracle is configured to), so a deny through a deep role still applies.
    chain = [Grant(f"role:r{i}", f"role:r{i + 1}") for i in range(15)]
    rules = (allow("role:r15", "x.*"), deny("role:r14", "x.secret"))
    policy = engine(*rules, grants=(Grant("agent:a", "role:r0"), *chain))
    assert policy.roles_of("agent:a") == [f"role:r{i}" for i in range(16)]
    for obj in ("x.y", "x.secret"):
        assert policy.decide("agent:a", obj, "invoke") == policy.oracle_decide(
            "agent:a", obj, "invoke"
        )
    assert policy.decide("agent:a", "x.y", "invoke").allowed is True
    assert policy.decide("agent:a", "x.secret", "invoke").allowed is False


def test_unknown_subjects_do_not_grow_the_cache() -> None:
    policy = engine(allow("role:dev", "x.*"), grants=(Grant("agent:a", "role:dev"),))
    for i in range(5_000):
        assert policy.decide(f"agent:stranger{i}", "x.y", "invoke").allowed is False
    assert len(policy._state().cache) == 0
    assert policy.decide("agent:a", "x.y", "invoke").allowed is True
    assert len(policy._state().cache) == 1


def test_the_cache_is_bounded_and_dropped_on_load() -> None:
    policy = CasbinPolicy(cache_size=10)
    policy.load([allow("role:dev", "x.*")], [Grant("agent:a", "role:dev")])
    for i in range(1_000):
        policy.decide("agent:a", f"x.{i}", "invoke")
        assert len(policy._state().cache) <= 10
    policy.load([], [Grant("agent:a", "role:dev")])
    assert len(policy._state().cache) == 0
    assert policy.decide("agent:a", "x.1", "invoke").allowed is False
    uncached = CasbinPolicy([allow("agent:a", "x.*")], cache_size=0)
    assert uncached.decide("agent:a", "x.1", "invoke").allowed is True
    assert len(uncached._state().cache) == 0


def test_the_oracle_model_is_the_model_plus_conditions() -> None:
    assert ORACLE_MODEL_TEXT != MODEL_TEXT
    assert ORACLE_MODEL_TEXT.replace(", ctx", "").replace(" && cond(p.id, r.ctx)", "") == (
        MODEL_TEXT
    )
