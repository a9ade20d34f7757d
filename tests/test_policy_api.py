"""Policy through the API: conditions, explain, lint, policy files with a diff, and replay."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from broker.cli import cli
from tests.support.brokers import RunningBroker
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import echo_manifest, invoke


@pytest.fixture
def rb(running_broker: RunningBroker, upstream: RunningUpstream) -> RunningBroker:
    running_broker.secret("tests/echo", {"token": "policy-test-credential"})
    running_broker.admin.put_capability(echo_manifest(upstream.url))
    return running_broker


def test_conditions_narrow_an_allow(rb: RunningBroker, upstream: RunningUpstream) -> None:
    rule = rb.admin.add_policy("role:tester", "test.echo", condition='args.message startswith "ok"')
    token = rb.agent("ann", ["tester"])
    assert invoke(rb, token, {"message": "ok-1"}).status_code == 200
    r = invoke(rb, token, {"message": "drop tables"})
    assert r.status_code == 403 and r.json()["error"]["rule"] is None
    assert "condition not met" in r.json()["error"]["message"]
    assert len(upstream.requests) == 1
    explained = rb.admin.check_policy("test.echo", agent="ann", args={"message": "nope"})
    assert explained["allowed"] is False and explained["reason"] == "condition not met"
    [m] = explained["matched"]
    assert m["id"] == rule["id"] and m["condition_met"] is False and m["checks"]
    # The capability is still listed: whether a call is allowed depends on its arguments.
    listed = rb.http(token).get("/v1/capabilities").json()["capabilities"]
    assert [c["name"] for c in listed] == ["test.echo"]


def test_conditions_on_agent_attributes(rb: RunningBroker) -> None:
    rb.admin.add_policy(
        "role:tester", "test.echo", condition="args.message startswith agent.attributes.home"
    )
    token = rb.agent("bea", ["tester"], {"home": "/home/bea/"})
    assert invoke(rb, token, {"message": "/home/bea/notes"}).status_code == 200
    assert invoke(rb, token, {"message": "/home/cal/notes"}).status_code == 403
    homeless = rb.agent("cal", ["tester"])
    assert invoke(rb, homeless, {"message": "/home/cal/x"}).status_code == 403  # missing: closed


def test_conditional_deny_beats_allow(rb: RunningBroker) -> None:
    rb.admin.add_policy("role:tester", "test.*")
    deny = rb.admin.add_policy(
        "role:tester", "test.echo", effect="deny", condition="args.count > 10"
    )
    token = rb.agent("dot", ["tester"])
    assert invoke(rb, token, {"message": "m", "count": 3}).status_code == 200
    r = invoke(rb, token, {"message": "m", "count": 11})
    assert r.status_code == 403 and r.json()["error"]["rule"] == deny["id"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"subject": "role:t", "object": "test.echo", "condition": "args.message =="}, "position"),
        ({"subject": "role:t", "object": "test.echo", "condition": "__import__('os')"}, ""),
        ({"subject": "role:t", "object": "*"}, "*"),
        ({"subject": "agent:x", "object": "*"}, "*"),
        ({"subject": "role:t", "object": "test.echo", "condition": "args.nope == 1"}, "nope"),
    ],
)
def test_surprising_rules_are_refused(rb: RunningBroker, body: dict[str, Any], needle: str) -> None:
    r = rb.http(rb.admin_token).post("/v1/policies", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unprocessable"
    assert needle in r.json()["error"]["message"]


def test_wildcard_needs_an_explicit_flag_and_unknown_capability_warns(rb: RunningBroker) -> None:
    ok = rb.http(rb.admin_token).post(
        "/v1/policies", json={"subject": "role:ops", "object": "*", "allow_wildcard": True}
    )
    assert ok.status_code == 201
    warned = rb.admin.add_policy("role:ops", "nothing.here")
    assert any("nothing.here" in w for w in warned["warnings"])


POLICY_V1 = """
p, role:tester, test.*, invoke, allow
p, role:tester, test.echo, invoke, deny, "args.message == 'forbidden'"
g, role:senior, role:tester
"""

POLICY_V2 = """
# testers lose test.*, seniors get it back explicitly
p, role:senior, test.echo, invoke, allow
g, role:senior, role:tester
g, role:lead, role:senior
"""


def test_apply_shows_the_diff_then_makes_the_policy_equal(rb: RunningBroker) -> None:
    extra = rb.admin.add_policy("role:other", "test.echo")  # made by hand; not in the file
    dry = rb.admin.apply_policy(POLICY_V1, dry_run=True)
    assert dry["dry_run"] is True and len(dry["add"]) == 2
    assert [r["id"] for r in dry["remove"]] == [extra["id"]]
    assert dry["grant"] == [{"subject": "role:senior", "role": "role:tester"}]
    assert {r["id"] for r in rb.admin.list_policies()} >= {extra["id"]}  # nothing changed yet
    done = rb.admin.apply_policy(POLICY_V1)
    assert done["add"] == dry["add"] and done["remove"] == dry["remove"]
    stored = {r["id"] for r in rb.admin.list_policies() if r["source"] != "builtin"}
    assert stored == {r["id"] for r in done["add"]}
    again = rb.admin.apply_policy(POLICY_V1, dry_run=True)
    assert again["add"] == again["remove"] == again["grant"] == again["revoke"] == []
    senior = rb.agent("sue", ["senior"])  # inherits tester through the file's hierarchy
    assert invoke(rb, senior, {"message": "fine"}).status_code == 200
    assert invoke(rb, senior, {"message": "forbidden"}).status_code == 403
    v2 = rb.admin.apply_policy(POLICY_V2)
    assert len(v2["remove"]) == 2 and len(v2["add"]) == 1
    assert v2["grant"] == [{"subject": "role:lead", "role": "role:senior"}]
    applied = rb.audit(kind="admin.policy.apply")
    assert len(applied) == 2


def test_apply_refuses_a_file_with_surprising_rules(rb: RunningBroker) -> None:
    r = rb.http(rb.admin_token).post(
        "/v1/policies/apply", json={"policy": "p, role:x, *, invoke, allow\n"}
    )
    assert r.status_code == 422 and "*" in r.json()["error"]["message"]
    bad = rb.http(rb.admin_token).post(
        "/v1/policies/apply", json={"policy": "p, role:x, test.echo, fly, allow\n"}
    )
    assert bad.status_code == 422 and "line 1" in bad.json()["error"]["message"]
    assert rb.admin.list_policies() == [
        r for r in rb.admin.list_policies() if r["source"] == "builtin"
    ]


def test_replay_lists_exactly_the_decisions_that_would_flip(rb: RunningBroker) -> None:
    rb.admin.apply_policy(POLICY_V1)
    tester, senior = rb.agent("tom", ["tester"]), rb.agent("sam", ["senior"])
    outcomes = {
        ("tom", "a"): invoke(rb, tester, {"message": "a"}).status_code,  # allow -> deny
        ("tom", "forbidden"): invoke(rb, tester, {"message": "forbidden"}).status_code,  # deny
        ("sam", "b"): invoke(rb, senior, {"message": "b"}).status_code,  # allow -> allow
        ("sam", "forbidden"): invoke(rb, senior, {"message": "forbidden"}).status_code,  # flips
    }
    assert outcomes == {
        ("tom", "a"): 200,
        ("tom", "forbidden"): 403,
        ("sam", "b"): 200,
        ("sam", "forbidden"): 403,
    }
    out = rb.admin.replay_policy(POLICY_V2)
    assert out["checked"] == 4
    flips = {(f["agent_id"], f["before"], f["after"]) for f in out["flips"]}
    assert flips == {("tom", "allow", "deny"), ("sam", "deny", "allow")}
    assert all(f["uncertain"] is False for f in out["flips"])
    # Replay changes nothing: the live policy still decides as before.
    assert invoke(rb, tester, {"message": "a"}).status_code == 200


def test_cli_policy_apply_check_and_replay(rb: RunningBroker, tmp_path: Any) -> None:
    env = {"BROKER_URL": rb.url, "BROKER_TOKEN": rb.admin_token}
    (tmp_path / "policy.csv").write_text(POLICY_V1)
    dry = CliRunner().invoke(cli, ["policy", "apply", "-f", str(tmp_path), "--dry-run"], env=env)
    assert dry.exit_code == 0 and dry.output.count("\n+ ") + dry.output.startswith("+ ") >= 2
    assert "would change 3 entries" in dry.output
    assert "applied" not in dry.output
    done = CliRunner().invoke(cli, ["policy", "apply", "-f", str(tmp_path)], env=env)
    assert done.exit_code == 0 and "changed 3 entries" in done.output
    rb.agent("uma", ["tester"])
    check = CliRunner().invoke(
        cli, ["policy", "check", "uma", "test.echo", "--args", '{"message": "forbidden"}'], env=env
    )
    assert check.exit_code == 0 and check.output.startswith("denied")
    assert "<- decided" in check.output and "explicit deny" in check.output
    (tmp_path / "v2.csv").write_text(POLICY_V2)
    replay = CliRunner().invoke(
        cli, ["policy", "replay", "-f", str(tmp_path / "v2.csv"), "--since", "1d"], env=env
    )
    assert replay.exit_code == 0 and "would flip" in replay.output
