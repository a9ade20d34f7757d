"""Policy decision latency: the fast path beside plain pycasbin enforce, in the same run.

For 100, 1,000 and 10,000 rules over 1,000 agents, builds a synthetic policy (roles that
inherit roles, exact names and globs, direct agent rules, denies, conditional rules) and times
single decisions (perf_counter_ns around each call, GC on):

* fast, cold: ``CasbinPolicy.decide`` on (agent, capability) pairs not asked before in this
  snapshot: the index, no cache entry (conditional ones evaluate their conditions);
* fast, warm: the same pairs asked again: the per-snapshot decision cache;
* pycasbin: ``Enforcer.enforce`` of the real casbin enforcer over the same rules and grants
  (the oracle's; the condition is one more matcher term), on fewer pairs at large sizes.

The fast path is timed ``--repeats`` times per size (sizes interleaved, each run on a freshly
loaded snapshot, so the cache starts empty) and each percentile reported is the median over
the runs: a shared machine's noise moves single runs by several microseconds. Prints a table
and one JSON line. Numbers, not a test.

    python bench/policy.py [--decisions 20000] [--seed 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from broker.policy import CasbinPolicy, validate_rule
from broker.ports import Grant, Rule

AGENTS = 1_000
SIZES = (100, 1_000, 10_000)
CASBIN_DECISIONS = {100: 2_000, 1_000: 400, 10_000: 40}
RESOURCES = ("issues", "repos")
VERBS = ("get", "list", "create")
CONDITIONS = ("args.owner == 'acme'", "args.amount <= 100", "args.channel in ['#ops', '#a']")


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Workload:
    """A synthetic policy of ``size`` rules: services, roles over them, agents holding roles."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.rng = rng
        services = [f"svc{i}" for i in range(max(10, size // 20))]
        self.names = [f"{s}.{r}.{v}" for s in services for r in RESOURCES for v in VERBS]
        self.roles = [f"role:g{i}" for i in range(max(10, size // 25))]
        self.agents = [f"agent:u{i}" for i in range(AGENTS)]
        self.rules = [self.rule() for _ in range(size)]
        self.grants = [Grant(a, rng.choice(self.roles)) for a in self.agents for _ in range(2)]
        # A fifth of the roles inherit another role, some of those again (multi-level).
        self.grants += [
            Grant(role, rng.choice(self.roles)) for role in self.roles if rng.random() < 0.2
        ]

    def rule(self) -> Rule:
        rng = self.rng
        kind = rng.random()
        subject = rng.choice(self.agents) if kind < 0.1 else rng.choice(self.roles)
        effect = "deny" if 0.1 <= kind < 0.2 else "allow"
        condition = rng.choice(CONDITIONS) if 0.2 <= kind < 0.3 else None
        return validate_rule(subject, self.pattern(), "invoke", effect, condition)

    def pattern(self) -> str:
        service, resource, verb = self.rng.choice(self.names).split(".")
        shape = self.rng.random()
        if shape < 0.55:
            return f"{service}.{resource}.{verb}"
        if shape < 0.8:
            return f"{service}.*"
        if shape < 0.97:
            return f"{service}.{resource}.*"
        if shape < 0.99:
            return f"{service}.?????.{verb}"
        return f"*.{verb}"

    def requests(self, n: int) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for _ in range(n):
            args = {"owner": self.rng.choice(["acme", "x"]), "amount": self.rng.randrange(200)}
            out.append((self.rng.choice(self.agents), self.rng.choice(self.names), args))
        return out


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1000


class Bench:
    """One policy size: the workload, the engine, and the pairs asked."""

    def __init__(self, size: int, decisions: int, seed: int) -> None:
        self.size = size
        self.work = Workload(size, random.Random(seed))
        self.policy = CasbinPolicy()
        start = time.perf_counter()
        self.policy.load(self.work.rules, self.work.grants)
        self.load_ms = (time.perf_counter() - start) * 1000
        pairs = ((s, o) for s, o, _ in self.work.requests(decisions * 2))
        self.asked = list(dict.fromkeys(pairs))[:decisions]

    def fast(self) -> tuple[list[float], list[float]]:
        """(cold, warm) latencies on a freshly loaded snapshot (an empty cache)."""
        self.policy.load(self.work.rules, self.work.grants)
        policy, args, agent = self.policy, ARGS, AGENT
        gc.collect()
        cold = [
            timed(partial(policy.decide, s, o, "invoke", args=args, agent=agent))
            for s, o in self.asked
        ]
        warm = [
            timed(partial(policy.decide, s, o, "invoke", args=args, agent=agent))
            for s, o in self.asked
        ]
        return cold, warm

    def casbin(self) -> list[float]:
        enforcer, ctx = self.policy._state().enforcer, (ARGS, AGENT)
        gc.collect()
        return [
            timed(partial(enforcer.enforce, s, o, "invoke", ctx))
            for s, o in self.asked[: CASBIN_DECISIONS[self.size]]
        ]

    def allowed_share(self) -> float:
        decide = self.policy.decide
        allowed = sum(decide(s, o, "invoke", args=ARGS, agent=AGENT).allowed for s, o in self.asked)
        return round(allowed / len(self.asked), 3)


ARGS = {"owner": "acme", "amount": 50, "channel": "#ops"}
AGENT = {"id": "u1"}


def measure(decisions: int, seed: int, repeats: int) -> list[dict[str, Any]]:
    """Per size: the median over ``repeats`` runs (sizes interleaved) of each percentile."""
    benches = [Bench(size, decisions, seed) for size in SIZES]
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in SIZES}
    for _ in range(repeats):
        for bench in benches:
            cold, warm = bench.fast()
            runs[bench.size].append({**stats("fast_cold", cold), **stats("fast_warm", warm)})
    results = []
    for bench in benches:
        slow = bench.casbin()
        medians = {
            k: statistics.median(r[k] for r in runs[bench.size]) for k in runs[bench.size][0]
        }
        results.append(
            {
                "rules": bench.size,
                "agents": AGENTS,
                "roles": len(bench.work.roles),
                "load_ms": round(bench.load_ms, 1),
                "decisions": len(bench.asked),
                "repeats": repeats,
                "allowed_share": bench.allowed_share(),
                **medians,
                "casbin_decisions": len(slow),
                **stats("casbin", slow),
            }
        )
    return results


def stats(name: str, samples: list[float]) -> dict[str, float]:
    return {
        f"{name}_p50_us": round(percentile(samples, 50), 2),
        f"{name}_p99_us": round(percentile(samples, 99), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    results = measure(options.decisions, options.seed, options.repeats)
    base = results[0]["fast_cold_p99_us"]
    header = (
        f"{'rules':>6} {'load ms':>8} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} "
        f"{'warm p99':>9} {'casbin p50':>11} {'casbin p99':>11} {'p99/100r':>9}"
    )
    print(
        f"policy decisions, {AGENTS} agents, latency in microseconds "
        f"(fast: median of {options.repeats} runs)"
    )
    print(header)
    for r in results:
        print(
            f"{r['rules']:>6} {r['load_ms']:>8.1f} {r['fast_cold_p50_us']:>9.2f} "
            f"{r['fast_cold_p99_us']:>9.2f} {r['fast_warm_p50_us']:>9.2f} "
            f"{r['fast_warm_p99_us']:>9.2f} {r['casbin_p50_us']:>11.1f} "
            f"{r['casbin_p99_us']:>11.1f} {r['fast_cold_p99_us'] / base:>9.2f}"
        )
    print(json.dumps({"bench": "policy", "seed": options.seed, "results": results}))


if __name__ == "__main__":
    main()
