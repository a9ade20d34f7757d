"""The policy engine: who may do which action on which capability (the ``PolicyEngine`` port).

This module owns the Casbin model (``MODEL_TEXT``, mirrored by ``policies/model.conf``), the
built-in admin rules, rule ids, the parsing and validation of policy lines, and ``CasbinPolicy``,
the in-memory enforcer. It is the only module that imports casbin; persistence of rules and
grants belongs to the rulebook and the directory, which hand them over through ``load()``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import casbin

from broker.errors import Unprocessable
from broker.ports import Decision, Grant, Rule

MODEL_TEXT = """\
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act, eft, id

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = r.act == p.act && capMatch(r.obj, p.obj) && g(r.sub, p.sub)
"""

ADMIN_ACTIONS = (
    "capabilities.write",
    "agents.write",
    "roles.grant",
    "policies.write",
    "audit.read",
    "approvals.decide",
)
ACTIONS = ("invoke", *ADMIN_ACTIONS)
EFFECTS = ("allow", "deny")

_SUBJECT = re.compile(r"^(agent|role):[A-Za-z0-9][A-Za-z0-9_.@\-]{0,127}$")
_ROLE = re.compile(r"^role:[A-Za-z0-9][A-Za-z0-9_.@\-]{0,127}$")
_OBJECT = re.compile(r"^[a-z0-9*?_.\-\[\]]{1,200}$")

_log = logging.getLogger(__name__)

# casbin parses the matcher with ast.parse on every enforce, and CPython 3.11/3.12 build AST
# objects with interpreter-wide state that is not thread-safe (concurrent parses fail with
# "SystemError: AST constructor recursion depth mismatch", cpython gh-106905). A decision is
# pure Python holding the GIL throughout, so serializing decisions process-wide loses nothing.
_ENFORCE_LOCK = threading.Lock()


# --- rules and ids ------------------------------------------------------------------------


def rule_id(subject: str, object: str, action: str, effect: str, condition: str | None) -> str:
    """A deterministic id: the same rule applied twice (file or API) gets the same id."""
    # A JSON list is an unambiguous encoding: no separator can be smuggled inside a field.
    canonical = json.dumps([subject, object, action, effect, condition], separators=(",", ":"))
    return "pol_" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def builtin_rules() -> list[Rule]:
    """role:admin holds every admin action on everything, so a fresh broker can be administered."""
    return [
        Rule(
            id=f"builtin:admin:{action}",
            subject="role:admin",
            object="*",
            action=action,
            effect="allow",
            source="builtin",
        )
        for action in ADMIN_ACTIONS
    ]


def _rule_problem(
    subject: str, object: str, action: str, effect: str, condition: str | None
) -> str | None:
    """What is wrong with a rule, or None when it is acceptable."""
    if not _SUBJECT.match(subject):
        return f"subject {subject!r} must be agent:<id> or role:<name>"
    if not _OBJECT.match(object):
        return f"object {object!r} must be a capability name or glob ([a-z0-9*?_.-[]])"
    if action not in ACTIONS:
        return f"action {action!r} must be one of {', '.join(ACTIONS)}"
    if effect not in EFFECTS:
        return f"effect {effect!r} must be allow or deny"
    if condition is not None:
        return "conditions are not supported yet"
    return None


def _blank_to_none(condition: str | None) -> str | None:
    # An empty condition (a trailing comma, "" from a client) means no condition.
    return condition if condition is not None and condition.strip() else None


def validate_rule(
    subject: str,
    object: str,
    action: str,
    effect: str,
    condition: str | None = None,
    *,
    source: str = "api",
) -> Rule:
    """The Rule for POST /v1/policies, with its derived id; raises Unprocessable when invalid."""
    condition = _blank_to_none(condition)
    problem = _rule_problem(subject, object, action, effect, condition)
    if problem is not None:
        raise Unprocessable(f"invalid policy rule: {problem}")
    return Rule(
        id=rule_id(subject, object, action, effect, condition),
        subject=subject,
        object=object,
        action=action,
        effect=effect,
        condition=condition,
        source=source,
    )


def _grant_problem(subject: str, role: str) -> str | None:
    if not _SUBJECT.match(subject):
        return f"subject {subject!r} must be agent:<id> or role:<name>"
    if not _ROLE.match(role):
        return f"role {role!r} must be role:<name>"
    return None


# --- the policy file ----------------------------------------------------------------------


def parse_policy_csv(text: str) -> tuple[list[Rule], list[Grant]]:
    """Rules (source "file") and grants of a policy file; ValueError naming the bad line."""
    rules: list[Rule] = []
    grants: list[Grant] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(",")]
        try:
            if fields[0] == "p":
                rules.append(_parse_p(fields))
            elif fields[0] == "g":
                grants.append(_parse_g(fields))
            else:
                raise ValueError(f"unknown line type {fields[0]!r} (expected p or g)")
        except (ValueError, Unprocessable) as exc:
            message = exc.message if isinstance(exc, Unprocessable) else str(exc)
            raise ValueError(f"policy line {number}: {message}") from None
    return rules, grants


def _parse_p(fields: list[str]) -> Rule:
    if len(fields) < 5:
        raise ValueError("expected p, <subject>, <object>, <action>, <effect>")
    # Anything after the effect is a condition (it may itself contain commas).
    condition = ",".join(fields[5:]) if len(fields) > 5 else None
    subject, obj, action, effect = fields[1:5]
    return validate_rule(subject, obj, action, effect, condition, source="file")


def _parse_g(fields: list[str]) -> Grant:
    if len(fields) != 3:
        raise ValueError("expected g, <subject>, <role>")
    problem = _grant_problem(fields[1], fields[2])
    if problem is not None:
        raise ValueError(problem)
    return Grant(subject=fields[1], role=fields[2])


# --- casbin -------------------------------------------------------------------------------


def _cap_match(*args: Any) -> bool:
    """capMatch(name, pattern): whole-name glob match, `*` and `?` crossing dots.

    casbin's own matchers do not fit: keyMatch ignores everything after the first `*`
    (`*.create` would match anything), regexMatch reads `.` as any character and is not
    anchored at the end, globMatch (wcmatch) refuses `/` and a leading `.`. fnmatchcase is
    anchored at both ends, case-sensitive, and has no special characters besides `*?[]`.
    """
    name, pattern = args[0], args[1]
    return isinstance(name, str) and isinstance(pattern, str) and fnmatch.fnmatchcase(name, pattern)


def _quiet_casbin_logs() -> None:
    # casbin logs every enforce (allowed at INFO, denied at WARNING) and prints the model at
    # INFO; decisions are audited by the broker, so only casbin's errors may reach the logs.
    # A level (unlike casbin's own `disabled` flag) survives a later dictConfig.
    for name in ("casbin", "casbin.enforcer", "casbin.policy", "casbin.role"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _normalize_role(role: str) -> str:
    # Grants may name the role bare ("writer") or as a subject ("role:writer").
    return role if role.startswith("role:") else f"role:{role}"


def _effective_rule(rule: Rule) -> Rule | None:
    """The rule as enforced; a condition that cannot be evaluated yet must fail closed."""
    if rule.condition is None:
        return rule
    if rule.effect == "deny":
        return rule  # an unconditional deny is stricter than the conditional one
    _log.warning("policy rule %s has a condition, not supported yet: ignored", rule.id)
    return None  # an allow without its condition would be broader than intended


def _new_enforcer(rules: Sequence[Rule], grants: Sequence[Grant]) -> Any:
    """A fresh, fully built enforcer holding exactly these rules and grants."""
    _quiet_casbin_logs()
    model = casbin.Model()
    model.load_model_from_text(MODEL_TEXT)
    enforcer = casbin.Enforcer(model)
    enforcer.add_function("capMatch", _cap_match)
    # add_policies refuses the whole batch if one row already exists: deduplicate first.
    p_rows = list(dict.fromkeys((r.subject, r.object, r.action, r.effect, r.id) for r in rules))
    g_rows = list(dict.fromkeys((g.subject, g.role) for g in grants))
    if p_rows and not enforcer.add_policies([list(row) for row in p_rows]):
        raise RuntimeError("casbin refused the policy rules")
    if g_rows and not enforcer.add_grouping_policies([list(row) for row in g_rows]):
        raise RuntimeError("casbin refused the role grants")
    return enforcer


@dataclass(frozen=True)
class _Snapshot:
    """One complete policy state; decisions read one snapshot, load() swaps in a new one."""

    enforcer: Any
    rules: tuple[Rule, ...]
    grants: tuple[Grant, ...]


def _snapshot(rules: Sequence[Rule], grants: Sequence[Grant]) -> _Snapshot:
    held: dict[str, Rule] = {}
    for rule in [*builtin_rules(), *rules]:
        effective = _effective_rule(rule)
        if effective is not None:
            held.setdefault(effective.id, effective)
    normalized = tuple(
        dict.fromkeys(Grant(subject=g.subject, role=_normalize_role(g.role)) for g in grants)
    )
    kept = tuple(held.values())
    return _Snapshot(_new_enforcer(kept, normalized), kept, normalized)


class CasbinPolicy:
    """The PolicyEngine: default deny, an explicit deny beats any allow, roles inherit roles."""

    def __init__(self, rules: Sequence[Rule] = (), grants: Sequence[Grant] = ()) -> None:
        self._swap = threading.Lock()  # guards the reference to the current snapshot
        self._loading = threading.Lock()  # orders concurrent load() calls: the last call wins
        self._current = _snapshot(rules, grants)

    def load(self, rules: Sequence[Rule], grants: Sequence[Grant]) -> None:
        """Replace the whole policy; the new enforcer is complete before anyone can see it."""
        with self._loading:
            snapshot = _snapshot(rules, grants)
            with self._swap:
                self._current = snapshot

    def _state(self) -> _Snapshot:
        with self._swap:
            return self._current

    def decide(self, subject: str, obj: str, action: str) -> Decision:
        state = self._state()
        with _ENFORCE_LOCK:
            allowed, matched = state.enforcer.enforce_ex(subject, obj, action)
        # enforce_ex names the last matching rule; with this effect it stops at the first
        # matching deny, so a refusal names that deny, and an empty list means no match.
        if allowed:
            if not matched:
                return Decision(False, None, reason="no rule matched")  # fail closed
            return Decision(True, str(matched[4]))
        if matched and matched[3] == "deny":
            return Decision(False, str(matched[4]), reason="explicit deny")
        deny = _find_deny(state, subject, obj, action)
        if deny is not None:
            return Decision(False, deny.id, reason="explicit deny")
        return Decision(False, None, reason="no rule matched")

    def roles_of(self, subject: str) -> list[str]:
        """Every role the subject holds, inherited ones included, as role:<name>."""
        roles = self._state().enforcer.get_implicit_roles_for_user(subject)
        return [str(role) for role in roles]

    def rules(self) -> list[Rule]:
        """The rules being enforced, the built-in ones included."""
        return list(self._state().rules)

    def grants(self) -> list[Grant]:
        return list(self._state().grants)

    def builtin_rules(self) -> list[Rule]:
        """The rules that hold from the first start, whatever load() is given."""
        return builtin_rules()

    def make_rule(
        self, subject: str, obj: str, action: str, effect: str, condition: str | None
    ) -> Rule:
        """A validated rule with its derived id (source "api"); raises Unprocessable."""
        return validate_rule(subject, obj, action, effect, condition)


def _find_deny(state: _Snapshot, subject: str, obj: str, action: str) -> Rule | None:
    """A matching deny rule, should casbin refuse without naming it (kept for safety)."""
    subjects = {subject, *state.enforcer.get_implicit_roles_for_user(subject)}
    for rule in state.rules:
        if (
            rule.effect == "deny"
            and rule.action == action
            and rule.subject in subjects
            and _cap_match(obj, rule.object)
        ):
            return rule
    return None
