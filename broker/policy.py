"""The policy engine: who may do which action on which capability (the ``PolicyEngine`` port).

This module owns the Casbin model (``MODEL_TEXT``, mirrored by ``policies/model.conf``), the
built-in admin rules, rule ids, the parsing and validation of policy lines, the policy lint,
and ``CasbinPolicy``, the in-memory engine. It is the only module that imports casbin;
persistence of rules and grants belongs to the rulebook and the directory, which hand them
over through ``load()``.

Semantics (the Casbin model plus conditions): subjects are ``agent:<id>``, ``user:<id>`` (the
end user a call acts for; see onbehalf.py) and ``role:<name>``;
a subject holds every role reachable through grants (roles inherit roles, cycles allowed);
objects are anchored, case-sensitive globs over capability names (``*``, ``?``, ``[...]``);
a rule applies when its action equals the request's, its object matches, its subject is the
requester or one of its roles, and its condition (``broker.conditions``) is true. Default deny;
any applying deny beats every applying allow.

Decisions do not run casbin. ``load()`` compiles the grants into each subject's transitive
roles and the rules into an index: per action and subject, a bucket of exact names (a dict)
and globs grouped by their literal prefix, plus, per subject holding roles, one bucket merging
its own rules and those of all its roles (shared by subjects holding the same roles), so a
decision reads one bucket. All of it is one immutable snapshot swapped in by a single reference
assignment; decisions read the reference once, so one decision sees one whole policy, and a
decision that starts after ``load()`` returned sees the new one. Each snapshot carries a
bounded cache of decisions (and of the candidate rules of conditional ones), dropped with it;
only subjects the policy knows are cached, so unknown agents cannot grow memory.
A real casbin enforcer for the same rules, with conditions as a custom matcher function, is
built on first use and answers ``oracle_decide``: the tests hold the fast path to it.

The deciding rule is named as casbin names it: the first applying deny in load order (the
built-in rules first), else the last applying allow.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import logging
import operator
import re
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import casbin

from broker.conditions import Condition, ConditionError
from broker.conditions import parse as parse_condition
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

# The oracle's model: MODEL_TEXT with the call (arguments, agent) as one more request field and
# the rule's condition as one more term of the matcher (a custom function looked up by rule id).
ORACLE_MODEL_TEXT = MODEL_TEXT.replace("r = sub, obj, act", "r = sub, obj, act, ctx").replace(
    "g(r.sub, p.sub)", "g(r.sub, p.sub) && cond(p.id, r.ctx)"
)

ADMIN_ACTIONS = (
    "capabilities.write",
    "agents.write",
    "roles.grant",
    "policies.write",
    "audit.read",
    "approvals.decide",
    "users.write",
)
# "approve": an allow of it makes invoking the capability wait for a human approval (its
# condition may look at the arguments, e.g. only above an amount); a deny exempts.
ACTIONS = ("invoke", "approve", *ADMIN_ACTIONS)
ARG_ACTIONS = ("invoke", "approve")  # actions decided with the call's arguments
EFFECTS = ("allow", "deny")
DECISION_CACHE_SIZE = 65_536  # entries per snapshot; the cache is emptied when full

_SUBJECT = re.compile(r"^(agent|role|user):[A-Za-z0-9][A-Za-z0-9_.@\-]{0,127}$")
_ROLE = re.compile(r"^role:[A-Za-z0-9][A-Za-z0-9_.@\-]{0,127}$")
_OBJECT = re.compile(r"^[a-z0-9*?_.\-\[\]]{1,200}$")
_GLOB_CHARS = "*?["

_ORDER = operator.attrgetter("order")
_NO_MATCH = Decision(False, None, reason="no rule matched")
_UNMET = Decision(False, None, reason="condition not met")
_EMPTY: Mapping[str, Any] = {}

_log = logging.getLogger(__name__)

# casbin parses the matcher with ast.parse on every enforce, and CPython 3.11/3.12 build AST
# objects with interpreter-wide state that is not thread-safe (concurrent parses fail with
# "SystemError: AST constructor recursion depth mismatch", cpython gh-106905). Only the
# oracle runs casbin; it is serialized process-wide.
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
        return f"subject {subject!r} must be agent:<id>, user:<id> or role:<name>"
    if not _OBJECT.match(object):
        return f"object {object!r} must be a capability name or glob ([a-z0-9*?_.-[]])"
    if action not in ACTIONS:
        return f"action {action!r} must be one of {', '.join(ACTIONS)}"
    if effect not in EFFECTS:
        return f"effect {effect!r} must be allow or deny"
    if condition is not None:
        try:
            parse_condition(condition)
        except ConditionError as exc:
            return f"condition: {exc}"
    return None


def _blank_to_none(condition: str | None) -> str | None:
    # An empty condition (a trailing comma, "" from a client) means no condition.
    return condition.strip() if condition is not None and condition.strip() else None


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
        return f"subject {subject!r} must be agent:<id>, user:<id> or role:<name>"
    if not _ROLE.match(role):
        return f"role {role!r} must be role:<name>"
    return None


# --- the policy file ----------------------------------------------------------------------


def parse_policy_csv(text: str) -> tuple[list[Rule], list[Grant]]:
    """Rules (source "file") and grants of a policy file; ValueError naming the bad line.

    Lines are CSV: ``p, <subject>, <object>, <action>, <effect>[, <condition>]`` and
    ``g, <subject>, <role>``. A condition containing commas or double quotes must be quoted
    with double quotes (doubling any inside), e.g.
    ``p, role:ops, slack.chat.post, invoke, allow, "args.channel in ['#ops', '#alerts']"``.
    """
    rules: list[Rule] = []
    grants: list[Grant] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            fields = _split_line(line)
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


def _split_line(line: str) -> list[str]:
    try:
        row = next(csv.reader([line], skipinitialspace=True, strict=True))
    except csv.Error as exc:
        raise ValueError(f'not a valid CSV line ({exc}); quote a condition with "..."') from None
    return [field.strip() for field in row]


def _parse_p(fields: list[str]) -> Rule:
    if len(fields) < 5:
        raise ValueError("expected p, <subject>, <object>, <action>, <effect>[, <condition>]")
    if len(fields) > 6:
        raise ValueError(
            "too many fields: a condition containing commas must be double-quoted, "
            "e.g. \"args.channel in ['#ops', '#alerts']\""
        )
    condition = fields[5] if len(fields) == 6 else None
    subject, obj, action, effect = fields[1:5]
    return validate_rule(subject, obj, action, effect, condition, source="file")


def _parse_g(fields: list[str]) -> Grant:
    if len(fields) != 3:
        raise ValueError("expected g, <subject>, <role>")
    problem = _grant_problem(fields[1], fields[2])
    if problem is not None:
        raise ValueError(problem)
    return Grant(subject=fields[1], role=fields[2])


# --- lint ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LintIssue:
    """A rule that would surprise: an error refuses the policy, a warning is reported."""

    level: Literal["error", "warning"]
    rule_id: str
    message: str


def lint(
    rules: Iterable[Rule],
    capabilities: Mapping[str, Collection[str]],
    *,
    allow_wildcard: bool | Collection[str] = False,
) -> list[LintIssue]:
    """Issues of the rules against the capabilities (name -> its argument names).

    Errors: a condition that does not parse; an allow of ``invoke`` on every capability (``*``)
    for any subject but role:admin, unless waived (``allow_wildcard=True`` for all rules, a
    collection of rule ids, or a truthy ``allow_wildcard`` attribute on the rule); a condition
    on an argument that the capability (or every capability the glob matches) does not have.
    Warnings: a rule naming no existing capability; a glob matching none; a condition on an
    argument some matched capabilities lack; a condition on ``args`` in an admin-action rule
    (admin actions carry no arguments). Built-in rules are not linted.
    """
    names = sorted(capabilities)
    issues: list[LintIssue] = []
    for rule in rules:
        if rule.source != "builtin":
            issues.extend(_lint_rule(rule, capabilities, names, _waived(rule, allow_wildcard)))
    return issues


def raise_for_lint(issues: Iterable[LintIssue]) -> None:
    """Raise Unprocessable listing every error among the issues; warnings pass."""
    errors = [f"{issue.rule_id}: {issue.message}" for issue in issues if issue.level == "error"]
    if errors:
        raise Unprocessable("policy refused: " + "; ".join(errors))


def _waived(rule: Rule, allow_wildcard: bool | Collection[str]) -> bool:
    if getattr(rule, "allow_wildcard", False):  # a flag on the rule itself, once Rule has one
        return True
    if isinstance(allow_wildcard, bool):
        return allow_wildcard
    ids = {allow_wildcard} if isinstance(allow_wildcard, str) else allow_wildcard
    return rule.id in ids


def _lint_rule(
    rule: Rule, capabilities: Mapping[str, Collection[str]], names: list[str], waived: bool
) -> list[LintIssue]:
    issues: list[LintIssue] = []

    def add(level: Literal["error", "warning"], message: str) -> None:
        issues.append(LintIssue(level, rule.id, message))

    if _is_wildcard_invoke(rule) and not waived:
        add(
            "error",
            f"{rule.subject} may invoke every capability ({rule.object!r}); name the "
            "capabilities or a narrower glob, or flag the rule allow_wildcard",
        )
    matched = _lint_targets(rule, capabilities, names, add)
    condition = _blank_to_none(rule.condition)
    if condition is not None:
        try:
            used = parse_condition(condition).paths()
        except ConditionError as exc:
            add("error", f"condition does not parse: {exc}")
            return issues
        _lint_arguments(rule, used, matched, capabilities, add)
    return issues


def _is_wildcard_invoke(rule: Rule) -> bool:
    """An allow of invoke on every capability for a subject other than role:admin."""
    everything = bool(rule.object) and not rule.object.strip("*")
    allows_invoke = rule.action == "invoke" and rule.effect == "allow"
    return everything and allows_invoke and rule.subject != "role:admin"


def _lint_targets(
    rule: Rule,
    capabilities: Mapping[str, Collection[str]],
    names: list[str],
    add: Callable[[Literal["error", "warning"], str], None],
) -> list[str]:
    """The capabilities the rule's object names, warning when there are none."""
    if not _is_glob(rule.object):
        if rule.object not in capabilities:
            add("warning", f"no capability named {rule.object!r}")
            return []
        return [rule.object]
    matched = [name for name in names if fnmatch.fnmatchcase(name, rule.object)]
    if not matched:
        add("warning", f"glob {rule.object!r} matches no capability")
    return matched


def _lint_arguments(
    rule: Rule,
    used: Sequence[str],
    matched: list[str],
    capabilities: Mapping[str, Collection[str]],
    add: Callable[[Literal["error", "warning"], str], None],
) -> None:
    if used and rule.action not in ARG_ACTIONS:
        add("warning", f"{rule.action} carries no arguments: a condition on args is never true")
        return
    for arg in used:
        lacking = [name for name in matched if arg not in capabilities[name]]
        if not matched or not lacking:
            continue
        if len(lacking) == len(matched):
            if _is_glob(rule.object):
                where = f"no capability matching {rule.object!r} has"
            else:
                where = f"{rule.object} does not have"
            add("error", f"condition uses args.{arg}, which {where}")
        else:
            few = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
            add(
                "warning",
                f"condition uses args.{arg}, which {len(lacking)} of the "
                f"{len(matched)} capabilities matching {rule.object!r} lack ({few}): the "
                "rule never applies to those",
            )


# --- casbin (the oracle) ------------------------------------------------------------------


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


def _new_enforcer(entries: Sequence[_Entry], grants: Sequence[Grant]) -> Any:
    """A fresh casbin enforcer holding exactly these rules (with their conditions) and grants."""
    _quiet_casbin_logs()
    model = casbin.Model()
    model.load_model_from_text(ORACLE_MODEL_TEXT)
    enforcer = casbin.Enforcer(model)
    conditions = {entry.rule.id: entry.condition for entry in entries}

    def cond(*args: Any) -> bool:
        condition = conditions.get(args[0])
        call_args, agent = args[1]
        return condition is None or condition.evaluate(call_args, agent)

    enforcer.add_function("capMatch", _cap_match)
    enforcer.add_function("cond", cond)
    # casbin stops following grants after 10 levels; the engine follows them all.
    names = {name for grant in grants for name in (grant.subject, grant.role)}
    enforcer.get_role_manager().max_hierarchy_level = min(500, max(10, len(names) + 1))
    # add_policies refuses the whole batch if one row already exists: deduplicate first.
    rules = [entry.rule for entry in entries]
    p_rows = list(dict.fromkeys((r.subject, r.object, r.action, r.effect, r.id) for r in rules))
    g_rows = list(dict.fromkeys((g.subject, g.role) for g in grants))
    if p_rows and not enforcer.add_policies([list(row) for row in p_rows]):
        raise RuntimeError("casbin refused the policy rules")
    if g_rows and not enforcer.add_grouping_policies([list(row) for row in g_rows]):
        raise RuntimeError("casbin refused the role grants")
    return enforcer


# --- the compiled policy ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One rule as the engine holds it: its place in load order, condition and verdict."""

    rule: Rule
    order: int
    condition: Condition | None
    verdict: Decision  # what this rule decides when it applies
    deny: bool
    note: str = ""


def _normalize_role(role: str) -> str:
    # Grants may name the role bare ("writer") or as a subject ("role:writer").
    return role if role.startswith("role:") else f"role:{role}"


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in _GLOB_CHARS)


def _literal_prefix(pattern: str) -> str:
    for i, char in enumerate(pattern):
        if char in _GLOB_CHARS:
            return pattern[:i]
    return pattern


def _entry(rule: Rule, order: int) -> _Entry | None:
    """The rule as enforced, or None when it cannot apply; a bad condition fails closed."""
    if rule.effect not in EFFECTS:
        return None  # casbin treats any other effect as indeterminate: never decides
    deny = rule.effect == "deny"
    verdict = Decision(False, rule.id, reason="explicit deny") if deny else Decision(True, rule.id)
    text = _blank_to_none(rule.condition)
    if text is None:
        return _Entry(rule, order, None, verdict, deny)
    try:
        return _Entry(rule, order, parse_condition(text), verdict, deny)
    except ConditionError as exc:
        if not deny:
            _log.warning("policy rule %s: condition does not parse (%s): ignored", rule.id, exc)
            return None  # an allow without its condition would be broader than intended
        _log.warning("policy rule %s: condition does not parse (%s): denies always", rule.id, exc)
        note = f"condition does not parse ({exc}): the deny applies unconditionally"
        return _Entry(rule, order, None, verdict, deny, note)


def _compile_entries(rules: Sequence[Rule]) -> list[_Entry]:
    held: dict[str, _Entry] = {}
    for rule in [*builtin_rules(), *rules]:
        if rule.id not in held:
            entry = _entry(rule, len(held))
            if entry is not None:
                held[rule.id] = entry
    return list(held.values())


def _role_closure(grants: Sequence[Grant]) -> dict[str, tuple[str, ...]]:
    """Each granted subject's roles, inherited ones included, breadth first (cycles allowed)."""
    edges: dict[str, list[str]] = {}
    for grant in grants:
        edges.setdefault(grant.subject, []).append(grant.role)
    closure: dict[str, tuple[str, ...]] = {}
    for start in edges:
        seen: dict[str, None] = {}
        queue = deque([start])
        while queue:
            for role in edges.get(queue.popleft(), ()):
                if role not in seen:
                    seen[role] = None
                    queue.append(role)
        closure[start] = tuple(seen)
    return closure


_Matcher = Callable[[str], object] | None  # None: the literal prefix alone decides


class _Bucket:
    """The rules of one (action, subject): exact names, and globs by their literal prefix.

    Globs whose literal prefix is empty or ends at a dot (``github.*``, ``*.create``) are
    found by looking up the object's prefixes at its dots; the others by each distinct
    prefix length. Either way a handful of dict lookups, however many rules there are.
    """

    __slots__ = ("dotted", "exact", "lengths", "other")

    def __init__(self) -> None:
        self.exact: dict[str, list[_Entry]] = {}
        self.dotted: dict[str, list[tuple[_Matcher, _Entry]]] = {}
        self.other: dict[str, list[tuple[_Matcher, _Entry]]] = {}
        self.lengths: tuple[int, ...] = ()

    def add(self, entry: _Entry) -> None:
        pattern = entry.rule.object
        if not _is_glob(pattern):
            self.exact.setdefault(pattern, []).append(entry)
            return
        prefix = _literal_prefix(pattern)
        match: _Matcher = None  # `github.*`: any name with the prefix matches
        if pattern != prefix + "*":
            match = re.compile(fnmatch.translate(pattern)).match  # what fnmatchcase runs
        groups = self.dotted if not prefix or prefix.endswith(".") else self.other
        groups.setdefault(prefix, []).append((match, entry))

    def freeze(self) -> None:
        self.lengths = tuple(sorted({len(prefix) for prefix in self.other}))

    def collect(self, obj: str, found: list[_Entry]) -> None:
        """Append the rules matching obj (exact and glob) to found. The hot loop."""
        exact = self.exact.get(obj)
        if exact:
            found += exact
        if self.dotted:
            end = 0
            while True:
                group = self.dotted.get(obj[:end])
                if group:
                    _matching(group, obj, found)
                end = obj.find(".", end) + 1
                if not end:
                    break
        for length in self.lengths:
            if length > len(obj):
                break
            group = self.other.get(obj[:length])
            if group:
                _matching(group, obj, found)

    @classmethod
    def merge(cls, buckets: Iterable[_Bucket]) -> _Bucket:
        """One bucket with the rules of all (candidates are sorted by load order after)."""
        out = cls()
        for bucket in buckets:
            for name, entries in bucket.exact.items():
                out.exact.setdefault(name, []).extend(entries)
            for mine, theirs in ((out.dotted, bucket.dotted), (out.other, bucket.other)):
                for prefix, globs in theirs.items():
                    mine.setdefault(prefix, []).extend(globs)
        out.freeze()
        return out

    def size(self) -> int:
        globs = [*self.dotted.values(), *self.other.values()]
        return sum(len(entries) for entries in self.exact.values()) + sum(len(g) for g in globs)


def _matching(group: list[tuple[_Matcher, _Entry]], obj: str, found: list[_Entry]) -> None:
    for match, entry in group:
        if match is None or match(obj):
            found.append(entry)


def _index(entries: Iterable[_Entry]) -> dict[str, dict[str, _Bucket]]:
    """action -> subject -> the subject's own rules."""
    index: dict[str, dict[str, _Bucket]] = {}
    for entry in entries:
        by_subject = index.setdefault(entry.rule.action, {})
        by_subject.setdefault(entry.rule.subject, _Bucket()).add(entry)
    for by_subject in index.values():
        for bucket in by_subject.values():
            bucket.freeze()
    return index


_MERGE_BUDGET = 400_000  # rule references that merged buckets may hold, per action


def _views(
    own: dict[str, _Bucket], subjects: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[_Bucket, ...]]:
    """subject -> the buckets to read: one merging its own rules and those of all its roles.

    A decision then reads one bucket however many roles the subject holds; subjects holding
    the same rule-bearing roles (and no rules of their own) share the merged bucket. Past a
    budget (pathological sizes) the buckets are listed instead of merged.
    """
    views: dict[str, tuple[_Bucket, ...]] = {s: (bucket,) for s, bucket in own.items()}
    merged: dict[tuple[str, ...], _Bucket] = {}
    budget = _MERGE_BUDGET
    for subject, held in subjects.items():
        key = tuple(name for name in held if name in own)
        if len(key) < 2:
            if key:
                views[subject] = (own[key[0]],)
            continue
        if key not in merged and budget > 0:
            merged[key] = _Bucket.merge([own[name] for name in key])
            budget -= merged[key].size()
        views[subject] = (merged[key],) if key in merged else tuple(own[n] for n in key)
    return views


_Plan = Decision | tuple[_Entry, ...]  # a final decision, or the candidates to evaluate


def _judge(
    entries: Iterable[_Entry], args: Mapping[str, Any], agent: Mapping[str, Any]
) -> Decision:
    """Deny wins (the first applying one); else the last applying allow; else default deny."""
    allow: _Entry | None = None
    unmet = False
    for entry in entries:
        if entry.condition is not None and not entry.condition.evaluate(args, agent):
            unmet = unmet or not entry.deny
            continue
        if entry.deny:
            return entry.verdict
        allow = entry
    if allow is not None:
        return allow.verdict
    return _UNMET if unmet else _NO_MATCH


class _Snapshot:
    """One complete, immutable policy state with its own decision cache."""

    def __init__(self, rules: Sequence[Rule], grants: Sequence[Grant], cache_size: int) -> None:
        self.entries = tuple(_compile_entries(rules))
        self.rules = tuple(entry.rule for entry in self.entries)
        self.grants = tuple(
            dict.fromkeys(Grant(subject=g.subject, role=_normalize_role(g.role)) for g in grants)
        )
        self.roles = _role_closure(self.grants)
        self.subjects = {s: tuple(dict.fromkeys((s, *roles))) for s, roles in self.roles.items()}
        index = _index(self.entries)
        # action -> subject -> the buckets holding the rules of the subject and all its roles
        self.views = {action: _views(own, self.subjects) for action, own in index.items()}
        # Only subjects the policy knows are cached: unknown agents cannot crowd the cache.
        self.known = frozenset(self.subjects).union(*index.values())
        self.cache: dict[tuple[str, str, str], _Plan] = {}
        self.cache_size = cache_size
        self._enforcer: Any = None
        self._building = threading.Lock()

    def candidates(self, subject: str, obj: str, action: str) -> list[_Entry]:
        """Every rule whose action, object and subject match, in load order (no conditions)."""
        found: list[_Entry] = []
        view = self.views.get(action)
        buckets = None if view is None else view.get(subject)
        if buckets is None:
            return found
        for bucket in buckets:
            bucket.collect(obj, found)
        if len(found) > 1:
            found.sort(key=_ORDER)
        return found

    def decide(
        self, subject: str, obj: str, action: str, args: Mapping[str, Any], agent: Mapping[str, Any]
    ) -> Decision:
        key = (subject, obj, action)
        plan = self.cache.get(key)
        if plan is None:
            plan = self._plan(subject, obj, action)
            if subject in self.known and self.cache_size > 0:
                if len(self.cache) >= self.cache_size:
                    self.cache.clear()
                self.cache[key] = plan
        if isinstance(plan, Decision):
            return plan
        return _judge(plan, args, agent)

    def _plan(self, subject: str, obj: str, action: str) -> _Plan:
        found = self.candidates(subject, obj, action)
        for entry in found:
            if entry.condition is not None:
                return tuple(found)
        return _judge(found, _EMPTY, _EMPTY)

    @property
    def enforcer(self) -> Any:
        """The casbin enforcer for this state, built on first use (the oracle)."""
        if self._enforcer is None:
            with self._building:
                if self._enforcer is None:
                    self._enforcer = _new_enforcer(self.entries, self.grants)
        return self._enforcer


# --- the engine ---------------------------------------------------------------------------


class CasbinPolicy:
    """The PolicyEngine: default deny, an explicit deny beats any allow, roles inherit roles."""

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        grants: Sequence[Grant] = (),
        *,
        cache_size: int = DECISION_CACHE_SIZE,
    ) -> None:
        self._cache_size = cache_size
        self._loading = threading.Lock()  # orders concurrent load() calls: the last call wins
        # Replaced whole by load(); a reference assignment is atomic, so readers need no lock.
        self._current = _Snapshot(rules, grants, cache_size)

    def load(self, rules: Sequence[Rule], grants: Sequence[Grant]) -> None:
        """Replace the whole policy; the new state is complete before anyone can see it."""
        with self._loading:
            self._current = _Snapshot(rules, grants, self._cache_size)

    def _state(self) -> _Snapshot:
        return self._current

    def decide(
        self,
        subject: str,
        obj: str,
        action: str,
        *,
        args: Mapping[str, Any] | None = None,
        agent: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Allowed or not, naming the deciding rule (None: no rule applied, default deny).

        ``args`` are the call's arguments and ``agent`` the caller (``id``, ``name``,
        ``attributes``), read only by rules with conditions; absent, such rules see every
        path missing. Reasons: "" (allowed), "explicit deny", "condition not met" (an allow
        matched but its condition was false, and nothing else applied), "no rule matched".
        """
        return self._current.decide(
            subject,
            obj,
            action,
            _EMPTY if args is None else args,
            _EMPTY if agent is None else agent,
        )

    def explain(
        self,
        subject: str,
        obj: str,
        action: str,
        *,
        args: Mapping[str, Any] | None = None,
        agent: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The decision and every rule that matched (allow and deny), as plain JSON-able data.

        ``matched`` lists, in load order, each rule whose action, object and subject match,
        with ``applies`` (its condition is absent or true), ``condition_met`` (None without a
        condition), ``checks`` (each comparison of the condition with its value) and
        ``decided`` (it is the deciding rule).
        """
        state = self._current
        call_args = _EMPTY if args is None else args
        caller = _EMPTY if agent is None else agent
        found = state.candidates(subject, obj, action)
        decision = _judge(found, call_args, caller)
        return {
            "subject": subject,
            "object": obj,
            "action": action,
            "roles": list(state.roles.get(subject, ())),
            "allowed": decision.allowed,
            "rule": decision.rule,
            "reason": decision.reason,
            "matched": [_explain_entry(e, call_args, caller, decision) for e in found],
        }

    def oracle_decide(
        self,
        subject: str,
        obj: str,
        action: str,
        *,
        args: Mapping[str, Any] | None = None,
        agent: Mapping[str, Any] | None = None,
    ) -> Decision:
        """The same decision computed by casbin's enforcer (slow; for tests and checks)."""
        state = self._current
        ctx = (_EMPTY if args is None else args, _EMPTY if agent is None else agent)
        with _ENFORCE_LOCK:
            allowed, matched = state.enforcer.enforce_ex(subject, obj, action, ctx)
        # enforce_ex names the last matching rule; with this effect it stops at the first
        # matching deny, so a refusal names that deny, and an empty list means no match.
        if allowed:
            if not matched:
                return _NO_MATCH  # fail closed
            return Decision(True, str(matched[4]))
        if matched and matched[3] == "deny":
            return Decision(False, str(matched[4]), reason="explicit deny")
        deny = _find_deny(state, subject, obj, action, ctx)
        if deny is not None:
            return Decision(False, deny.id, reason="explicit deny")
        return _NO_MATCH

    def roles_of(self, subject: str) -> list[str]:
        """Every role the subject holds, inherited ones included, as role:<name>."""
        return list(self._current.roles.get(subject, ()))

    def rules(self) -> list[Rule]:
        """The rules being enforced, the built-in ones included."""
        return list(self._current.rules)

    def grants(self) -> list[Grant]:
        return list(self._current.grants)

    def builtin_rules(self) -> list[Rule]:
        """The rules that hold from the first start, whatever load() is given."""
        return builtin_rules()

    def make_rule(
        self, subject: str, obj: str, action: str, effect: str, condition: str | None
    ) -> Rule:
        """A validated rule with its derived id (source "api"); raises Unprocessable."""
        return validate_rule(subject, obj, action, effect, condition)

    def lint(
        self,
        capabilities: Mapping[str, Collection[str]],
        *,
        allow_wildcard: bool | Collection[str] = False,
    ) -> list[LintIssue]:
        """``lint()`` of the rules being enforced."""
        return lint(self.rules(), capabilities, allow_wildcard=allow_wildcard)

    def parse(self, text: str) -> tuple[list[Rule], list[Grant]]:
        """``parse_policy_csv`` with its errors as Unprocessable (for the API)."""
        try:
            return parse_policy_csv(text)
        except ValueError as exc:
            raise Unprocessable(str(exc)) from None

    def review(
        self,
        rules: Sequence[Rule],
        capabilities: Mapping[str, Collection[str]],
        *,
        allow_wildcard: bool = False,
    ) -> list[dict[str, str]]:
        """``lint()`` of the given rules, as plain data."""
        issues = lint(rules, capabilities, allow_wildcard=allow_wildcard)
        return [{"level": i.level, "rule_id": i.rule_id, "message": i.message} for i in issues]

    def simulate(self, rules: Sequence[Rule], grants: Sequence[Grant]) -> CasbinPolicy:
        """A separate engine holding these rules and grants (the live one is untouched)."""
        return CasbinPolicy(rules, grants, cache_size=self._cache_size)


def _explain_entry(
    entry: _Entry, args: Mapping[str, Any], agent: Mapping[str, Any], decision: Decision
) -> dict[str, Any]:
    rule, condition = entry.rule, entry.condition
    met = None if condition is None else condition.evaluate(args, agent)
    described: dict[str, Any] = {
        "id": rule.id,
        "subject": rule.subject,
        "object": rule.object,
        "action": rule.action,
        "effect": rule.effect,
        "source": rule.source,
        "condition": rule.condition,
        "condition_met": met,
        "checks": [] if condition is None else condition.explain(args, agent),
        "applies": met is not False,
        "decided": rule.id == decision.rule,
    }
    if entry.note:
        described["note"] = entry.note
    return described


def _find_deny(
    state: _Snapshot, subject: str, obj: str, action: str, ctx: tuple[Any, Any]
) -> Rule | None:
    """An applying deny rule, should casbin refuse without naming it (kept for safety)."""
    subjects = {subject, *state.enforcer.get_implicit_roles_for_user(subject)}
    for entry in state.entries:
        rule = entry.rule
        if (
            entry.deny
            and rule.action == action
            and rule.subject in subjects
            and _cap_match(obj, rule.object)
            and (entry.condition is None or entry.condition.evaluate(*ctx))
        ):
            return rule
    return None
