"""The fast decision path (index + cache) agrees with pycasbin and stays right under loads.

The oracle is pycasbin itself: ``CasbinPolicy.oracle_decide`` runs a real casbin Enforcer over
the same rules and grants, with the model ``ORACLE_MODEL_TEXT``, which is ``MODEL_TEXT`` with
one more request field carrying the call (args, agent) and one more matcher term,
``cond(p.id, r.ctx)``: a custom function registered on the enforcer that looks the rule's
compiled condition up by rule id (true for a rule without one). Role inheritance (casbin's role
manager), glob matching (``capMatch``), the effect (default deny, deny beats allow) and the
rule casbin names (``enforce_ex``) are therefore all pycasbin's; what both paths share is only
the evaluation of one condition's expression, which ``test_conditions.py`` holds to an
independent reference implementation of the documented semantics.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker.policy
from broker.policy import CasbinPolicy, rule_id, validate_rule
from broker.ports import Decision, Grant, Rule

ROLES = [f"role:r{i}" for i in range(5)]
AGENTS = [f"agent:a{i}" for i in range(4)]
SUBJECTS = AGENTS + ROLES
NAMES = [
    "gh.issues.create",
    "gh.issues.list",
    "gh.repo.delete",
    "sl.post",
    "sl.read",
    "demo.a",
    "demo.b",
    "demo.ab",
    "x",
    "x.y.z",
]
GLOBS = [
    "*",
    "gh.*",
    "gh.issues.*",
    "*.create",
    "demo.?",
    "demo.[ab]",
    "demo.[!a]",
    "?",
    "sl.p*",
    "*.*",
    "gh.*.list",
    "*o*",
    "demo.??",
    "[gx]*",
    "x.*.z",
    "x*",
    "gh*",
    "demo.a*",
    "sl.post*",
]
CONDITIONS = [
    "args.owner == 'acme'",
    "args.amount <= 100",
    "args.channel in ['#ops', '#alerts']",
    "args.path startswith agent.attributes.home",
    "not (args.owner == 'evil')",
    "args.tags contains 'x'",
    "args.name matches '[a-z]+'",
    "agent.id == 'a1'",
    "args.owner == 'acme' or args.amount > 5",
    "owner == 'acme'",  # does not parse: a stored rule like this loads fail-closed
]
ACTIONS = ["invoke", "invoke", "audit.read"]


@st.composite
def globs(draw: st.DrawFn) -> str:
    """A listed glob, or a capability name cut at a `*`, or with a char made `*`, `?`, `[..]`."""
    if draw(st.booleans()):
        return draw(st.sampled_from(GLOBS))
    name = draw(st.sampled_from(NAMES))
    i = draw(st.integers(0, len(name) - 1))
    if draw(st.booleans()):
        return name[: i + 1] + "*"
    swap = draw(st.sampled_from(["*", "?", f"[{name[i]}z]", f"[!{name[i]}]"]))
    return name[:i] + swap + name[i + 1 :]


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    subject = draw(st.sampled_from(SUBJECTS))
    obj = draw(st.one_of(st.sampled_from(NAMES), globs()))
    action = draw(st.sampled_from(ACTIONS))
    effect = draw(st.sampled_from(["allow", "allow", "deny"]))
    condition = draw(st.one_of(st.none(), st.none(), st.sampled_from(CONDITIONS)))
    ident = rule_id(subject, obj, action, effect, condition)
    return Rule(ident, subject, obj, action, effect, condition)


grants = st.lists(
    st.builds(
        Grant,
        st.sampled_from(SUBJECTS),
        st.one_of(st.sampled_from(ROLES), st.sampled_from(ROLES).map(lambda r: r[5:])),
    ),
    max_size=10,
)
call_args = st.fixed_dictionaries(
    {},
    optional={
        "owner": st.sampled_from(["acme", "evil", 1, None]),
        "amount": st.sampled_from([5, 100, 101, 100.5, "100", True]),
        "channel": st.sampled_from(["#ops", "#dev"]),
        "path": st.sampled_from(["/h/a1/x", "/h/a2/y"]),
        "tags": st.sampled_from([["x"], ["y"], "x"]),
        "name": st.sampled_from(["abc", "ab1", ""]),
    },
)
agents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["a1", "a2"]),
        "attributes": st.fixed_dictionaries(
            {}, optional={"home": st.sampled_from(["/h/a1/", "/h/a2/"])}
        ),
    },
)
requests = st.tuples(
    st.sampled_from([*SUBJECTS, "agent:stranger"]),
    st.sampled_from([*NAMES, "nomatch", "gh"]),
    st.sampled_from(ACTIONS),
    st.one_of(st.none(), call_args),
    st.one_of(st.none(), agents),
)


def same_decision(fast: Decision, oracle: Decision) -> bool:
    """Same verdict and rule; the fast path says why an allow did not apply, casbin cannot."""
    reason = "no rule matched" if fast.reason == "condition not met" else fast.reason
    return (fast.allowed, fast.rule, reason) == (oracle.allowed, oracle.rule, oracle.reason)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(rules(), max_size=4),
    policy_rules=st.lists(rules(), max_size=14),
    policy_grants=grants,
    asked=st.lists(requests, min_size=1, max_size=12),
)
def test_fast_path_agrees_with_pycasbin(
    before: list[Rule],
    policy_rules: list[Rule],
    policy_grants: list[Grant],
    asked: list[tuple[str, str, str, Any, Any]],
) -> None:
    policy = CasbinPolicy(before, policy_grants[:2])
    policy.decide("agent:a0", "gh.issues.create", "invoke")  # warm a cache load() must drop
    policy.load(policy_rules, policy_grants)
    for subject, obj, action, args, agent in asked:
        fast = policy.decide(subject, obj, action, args=args, agent=agent)
        oracle = policy.oracle_decide(subject, obj, action, args=args, agent=agent)
        assert same_decision(fast, oracle), (subject, obj, action, args, agent)
        assert policy.decide(subject, obj, action, args=args, agent=agent) == fast  # cached
        out = policy.explain(subject, obj, action, args=args, agent=agent)
        assert Decision(out["allowed"], out["rule"], out["reason"]) == fast
        casbin_roles = policy._state().enforcer.get_implicit_roles_for_user(subject)
        assert set(policy.roles_of(subject)) == set(casbin_roles)


@pytest.mark.parametrize("merge_budget", [200_000, 0])
def test_fast_path_agrees_with_pycasbin_on_a_larger_policy(
    merge_budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hundreds of rules over many roles: the index groups globs by literal prefix and merges
    # the rules of each role set, which small generated policies exercise only lightly. With
    # no merge budget left, role buckets are read one by one instead.
    monkeypatch.setattr(broker.policy, "_MERGE_BUDGET", merge_budget)
    rng = random.Random(20240601)
    services = [f"s{i}" for i in range(12)]
    names = [f"{s}.{r}.{v}" for s in services for r in ("a", "b", "cc") for v in ("get", "put")]
    roles = [f"role:g{i}" for i in range(30)]
    agents_ = [f"agent:u{i}" for i in range(40)]

    def pattern() -> str:
        name = rng.choice(names)
        parts = name.split(".")
        kind = rng.randrange(5)
        if kind == 0:
            return name
        if kind == 1:
            return parts[0] + ".*"
        if kind == 2:
            return parts[0] + "." + parts[1] + ".?et"
        if kind == 3:
            return "*." + parts[2]
        return parts[0][:1] + "[0-9]*"

    made = []
    for _ in range(600):
        condition = rng.choice([None, None, None, "args.n < 5", "agent.id == 'u1'"])
        made.append(
            validate_rule(
                rng.choice(roles + agents_[:5]),
                pattern(),
                "invoke",
                rng.choice(["allow", "allow", "allow", "deny"]),
                condition,
            )
        )
    held = [Grant(a, rng.choice(roles)) for a in agents_ for _ in range(2)]
    held += [Grant(rng.choice(roles), rng.choice(roles)) for _ in range(25)]
    policy = CasbinPolicy(made, held)
    for _ in range(400):
        subject, obj = rng.choice(agents_ + roles), rng.choice([*names, "zz.q"])
        args = {"n": rng.randrange(10)}
        agent = {"id": rng.choice(["u1", "u2"])}
        fast = policy.decide(subject, obj, "invoke", args=args, agent=agent)
        oracle = policy.oracle_decide(subject, obj, "invoke", args=args, agent=agent)
        assert same_decision(fast, oracle), (subject, obj, args, agent)


# --- concurrency --------------------------------------------------------------------------

WRITER = validate_rule("role:writer", "gh.*", "invoke", "allow")
POSTER = validate_rule("role:writer", "sl.post", "invoke", "allow", "args.channel == '#ops'")
FILLER = [validate_rule(f"role:f{i}", f"svc{i}.*", "invoke", "allow") for i in range(300)]
GRANTED = Grant("agent:c", "role:writer")


def revocations() -> dict[str, tuple[list[Rule], list[Grant]]]:
    """Ways to take agent:c's rights away: the grant, the rules, or a deny on top."""
    both = [WRITER, POSTER, *FILLER]
    deny_all = [
        validate_rule("agent:c", "gh.*", "invoke", "deny"),
        validate_rule("agent:c", "sl.*", "invoke", "deny"),
    ]
    return {
        "grant revoked": (both, []),
        "rules deleted": (FILLER, [GRANTED]),
        "deny added": ([*both, *deny_all], [GRANTED]),
    }


def test_no_allow_after_a_revoke_returned() -> None:
    """Deciders hammer the engine (cached, uncached and conditional decisions) while the
    loader revokes; every decision that started after the revoke's load() returned must
    refuse. Repeated for each way of revoking, several rounds each."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch often, so decisions land in the middle of loads
    try:
        for name, revoked in revocations().items():
            for _ in range(4):
                stats = _race(revoked)
                assert stats["errors"] == [], name
                assert stats["final"].allowed is False, name
                assert stats["allowed_before"] > 0 and stats["after"] > 0, (name, stats)
    finally:
        sys.setswitchinterval(interval)


def _race(revoked: tuple[list[Rule], list[Grant]]) -> dict[str, Any]:
    policy = CasbinPolicy([WRITER, POSTER, *FILLER], [GRANTED])
    revoke_returned = threading.Event()
    stop = threading.Event()
    stats: dict[str, Any] = {"errors": [], "allowed_before": 0, "after": 0}
    lock = threading.Lock()
    start = threading.Barrier(7)
    progress = [0] * 6  # decisions made by each decider

    def decider(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        allowed_before = after = 0
        while not stop.is_set():
            progress[seed] += 1
            obj, args = rng.choice(
                [("gh.x", None), (f"gh.n{rng.randrange(40)}", None), ("sl.post", OPS)]
            )
            late = revoke_returned.is_set()  # read before the decision starts
            decision = policy.decide("agent:c", obj, "invoke", args=args)
            if late:
                after += 1
                if decision.allowed:
                    with lock:
                        stats["errors"].append(f"allowed after the revoke: {obj} {decision}")
            elif decision.allowed:
                allowed_before += 1
        with lock:
            stats["allowed_before"] += allowed_before
            stats["after"] += after

    threads = [threading.Thread(target=decider, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    start.wait()
    _wait_for(progress, 3_000)  # let the deciders fill the cache with allows
    policy.load(*revoked)
    revoke_returned.set()
    _wait_for(progress, sum(progress) + 3_000)
    stop.set()
    for thread in threads:
        thread.join()
    stats["final"] = policy.decide("agent:c", "gh.x", "invoke")
    return stats


OPS = {"channel": "#ops"}


def _wait_for(progress: list[int], decisions: int) -> None:
    deadline = time.monotonic() + 30
    while sum(progress) < decisions and time.monotonic() < deadline:
        time.sleep(0.001)


def test_concurrent_loads_and_decisions_always_see_one_whole_policy() -> None:
    # Each state answers a pair of questions differently; a decision mixing two states (an
    # index of one, a cache or grants of the other) would give a pair no state gives.
    state_a = ([WRITER, POSTER], [GRANTED])
    state_b: tuple[list[Rule], list[Grant]] = (
        [validate_rule("agent:c", "sl.post", "invoke", "allow")],
        [],
    )
    valid = {
        "gh.x": {Decision(True, WRITER.id), Decision(False, None, reason="no rule matched")},
        "sl.post": {Decision(True, POSTER.id), Decision(True, state_b[0][0].id)},
    }
    policy = CasbinPolicy(*state_a)
    errors: list[str] = []
    stop = threading.Event()

    def decider() -> None:
        while not stop.is_set():
            for obj in ("gh.x", "sl.post"):
                decision = policy.decide("agent:c", obj, "invoke", args=OPS)
                if decision not in valid[obj]:
                    errors.append(f"{obj}: {decision}")

    threads = [threading.Thread(target=decider) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for _ in range(300):
            policy.load(*state_b)
            policy.load(*state_a)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(interval)
    assert errors == []
