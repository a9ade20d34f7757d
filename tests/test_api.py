"""The admin side of the v1 contract: agents, tokens, roles, policies, capabilities, health."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.devserver import DevVault
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream
from tests.test_invoke import echo_manifest, invoke

REPO = Path(__file__).resolve().parent.parent


def test_health_docs_and_error_envelopes(running_broker: RunningBroker) -> None:
    http = running_broker.http()
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "vault": True}
    assert "/v1/capabilities/{name}/invoke" in http.get("/openapi.json").json()["paths"]
    assert http.get("/docs").status_code == 200
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = http.patch("/v1/agents")
    assert wrong.status_code == 405 and "error" in wrong.json()
    long = http.get("/v1/" + "x" * 5000, headers={"Authorization": "Bearer not-a-token"})
    assert long.status_code == 404
    # Routing refusals are audited like every other refusal; the client's path is bounded.
    refused = running_broker.audit(kind="admin.rejected")
    reasons = [(e["reason"], e["detail"]["path"]) for e in refused]
    assert ("not_found", "/v1/nothing-here") in reasons
    assert ("method_not_allowed", "/v1/agents") in reasons
    assert ("not_found", ("/v1/" + "x" * 5000)[:512]) in reasons


def test_agents_and_tokens(running_broker: RunningBroker) -> None:
    rb = running_broker
    admin = rb.http(rb.admin_token)
    r = admin.post("/v1/agents", json={"name": "alice", "roles": [], "attributes": {"team": "a"}})
    assert r.status_code == 201
    created = r.json()
    assert set(created) >= {"id", "name", "token", "token_id"} and created["id"] == "alice"
    assert created["token"].startswith("cbk_") and len(created["token"]) > 40
    listed = admin.get("/v1/agents").json()["agents"]
    assert [a["id"] for a in listed] == ["admin", "alice"]
    assert created["token"] not in str(listed)  # shown once, never again
    assert admin.post("/v1/agents", json={"name": "alice"}).status_code == 409
    assert admin.post("/v1/agents", json={"name": "admin"}).status_code == 409
    bad = admin.post("/v1/agents", json={"name": "Not Valid!"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    second = admin.post("/v1/agents/alice/tokens").json()
    assert second["token"] != created["token"]
    agent = admin.get("/v1/agents/alice").json()
    assert {t["id"] for t in agent["tokens"]} == {created["token_id"], second["token_id"]}
    assert admin.delete(f"/v1/agents/alice/tokens/{second['token_id']}").status_code == 204
    assert admin.delete(f"/v1/agents/alice/tokens/{second['token_id']}").status_code == 404
    assert admin.get("/v1/agents/nobody").status_code == 404
    disabled = admin.post("/v1/agents/alice/disable").json()
    assert disabled["disabled"] is True
    assert all(t["revoked_at"] for t in disabled["tokens"])
    kinds = [e["kind"] for e in rb.audit() if e["kind"].startswith("admin.")]
    assert kinds.count("admin.agent.create") == 1 and "admin.agent.disable" in kinds
    assert "admin.token.revoke" in kinds and "admin.rejected" in kinds


def test_roles_and_policies(running_broker: RunningBroker) -> None:
    rb = running_broker
    admin = rb.http(rb.admin_token)
    rb.agent("bob")
    rule = admin.post(
        "/v1/policies",
        json={
            "subject": "role:ops",
            "object": "ops.*",
            "action": "invoke",
            "effect": "allow",
            "condition": None,
        },
    )
    assert rule.status_code == 201 and rule.json()["id"].startswith("pol_")
    again = admin.post("/v1/policies", json={"subject": "role:ops", "object": "ops.*"})
    assert again.json()["id"] == rule.json()["id"]  # same rule, same id: no duplicate
    check = {"agent": "bob", "object": "ops.restart", "action": "invoke"}
    explained = admin.post("/v1/policies/check", json=check).json()
    assert explained["allowed"] is False and explained["rule"] is None
    assert explained["reason"] == "no rule matched" and explained["matched"] == []
    assert admin.put("/v1/agents/bob/roles/ops").json()["roles"] == ["ops"]
    out = admin.post("/v1/policies/check", json=check).json()
    assert out["allowed"] is True and out["rule"] == rule.json()["id"]
    roles = {r["name"]: r for r in admin.get("/v1/roles").json()["roles"]}
    assert roles["ops"]["members"] == ["agent:bob"] and "admin" in roles
    ids = [p["id"] for p in admin.get("/v1/policies").json()["policies"]]
    assert rule.json()["id"] in ids and "builtin:admin:agents.write" in ids
    assert admin.delete("/v1/policies/builtin:admin:agents.write").status_code == 404
    assert admin.delete(f"/v1/policies/{rule.json()['id']}").status_code == 204
    assert admin.post("/v1/policies/check", json=check).json()["allowed"] is False
    for bad in (
        {"subject": "bob", "object": "x"},
        {"subject": "role:a", "object": "x", "action": "fly"},
        {"subject": "role:a", "object": "x", "condition": "args.a =="},
    ):
        r = admin.post("/v1/policies", json=bad)
        assert r.status_code in (400, 422) and "error" in r.json()


def test_capability_versions_and_delete(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    admin = running_broker.http(running_broker.admin_token)
    m = echo_manifest(upstream.url)
    assert admin.put("/v1/capabilities/test.echo", json=m).json()["version"] == 1
    assert admin.put("/v1/capabilities/test.echo", json=m).json()["version"] == 1  # unchanged
    m["description"] = "changed"
    assert admin.put("/v1/capabilities/test.echo", json=m).json()["version"] == 2
    full = admin.get("/v1/capabilities/test.echo").json()
    assert full["description"] == "changed" and full["secrets"]["tok"]["path"] == "tests/echo"
    mismatch = admin.put("/v1/capabilities/other.name", json=m)
    assert mismatch.status_code == 422 and mismatch.json()["error"]["code"] == "invalid_manifest"
    assert admin.delete("/v1/capabilities/test.echo").status_code == 204
    assert admin.delete("/v1/capabilities/test.echo").status_code == 404
    versions = [e["capability_version"] for e in running_broker.audit(kind="admin.capability.put")]
    assert versions == [1, 1, 2]


def test_secret_path_from_agent_attributes(
    running_broker: RunningBroker, upstream: RunningUpstream
) -> None:
    rb = running_broker
    m = echo_manifest(upstream.url, "test.team")
    m["secrets"] = {"tok": {"path": "teams/{agent.attributes.team}/echo", "key": "token"}}
    rb.admin.put_capability(m)
    rb.admin.add_policy("role:tester", "test.*")
    rb.secret("teams/red/echo", {"token": "red-team-credential"})
    red = rb.agent("rhea", ["tester"], {"team": "red"})
    sneaky = rb.agent("sly", ["tester"], {"team": "../red"})
    assert invoke(rb, red, {"message": "m"}, name="test.team").status_code == 200
    assert invoke(rb, sneaky, {"message": "m"}, name="test.team").status_code == 503
    assert [r.header("authorization") for r in upstream.requests] == ["Bearer red-team-credential"]


def test_bootstrap_token_is_replaced_on_restart(
    openbao: DevVault, database_url: str, tmp_path: Path
) -> None:
    first = start_broker(openbao, database_url, tmp_path)
    old = first.admin_token
    first.close()
    second = start_broker(openbao, database_url, tmp_path)
    try:
        assert second.http(old).get("/v1/agents").status_code == 401
        assert second.http(second.admin_token).get("/v1/agents").status_code == 200
    finally:
        second.close()


def test_start_applies_policy_and_capability_dirs(
    openbao: DevVault, database_url: str, tmp_path: Path, upstream: RunningUpstream
) -> None:
    import yaml

    caps = tmp_path / "caps"
    caps.mkdir()
    m: dict[str, Any] = echo_manifest(upstream.url, "demo.echo")
    (caps / "echo.yaml").write_text(yaml.safe_dump(m))
    rb = start_broker(
        openbao, database_url, tmp_path, capabilities_dir=caps, policies_dir=REPO / "policies"
    )
    try:
        rb.secret("tests/echo", {"token": "t0k3n-value"})
        token = rb.agent("rory", ["reader"])
        assert invoke(rb, token, {"message": "m"}, name="demo.echo").status_code == 200
        roles = {r["name"] for r in rb.admin.list_roles()}
        assert {"admin", "reader", "writer"} <= roles
    finally:
        rb.close()


@pytest.mark.parametrize("bad", [{"since": "2026-01-01T00:00:00Z", "until": "2020-01-01"}])
def test_audit_time_range(running_broker: RunningBroker, bad: dict[str, str]) -> None:
    rb = running_broker
    rb.agent("tess")
    events = rb.audit()
    assert events and all(e["time"].endswith("Z") for e in events)
    first = events[0]["time"]
    assert rb.audit(since=first)[0]["seq"] == events[0]["seq"]
    assert rb.audit(until=first) == []
    assert rb.admin.audit(**bad)["events"] == []
