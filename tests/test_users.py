"""Acting on behalf of users, end to end: verified assertions, delegation, per-user credentials.

Real broker (uvicorn thread), real OpenBao, real SQLite/PostgreSQL, a real recording upstream,
and real JWKS endpoints on loopback (a small ASGI app serving public keys; tokens are signed in
the test with keys generated here). The identity provider is the tests' own because signing
tokens needs its private keys; nothing of the broker is faked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker import chain
from broker.demo import ServerThread
from broker.devserver import DevVault, free_port
from tests.support.brokers import RunningBroker, start_broker
from tests.support.upstreams import RunningUpstream

ISSUER = "https://idp.test"
AUDIENCE = "capbroker-test"
HEADER = "X-Broker-User-Assertion"
DOWN_ISSUER = "https://down.test"
ALICE_TOKEN = "alice-gh-Q7/x+Z=1&k"
BOB_TOKEN = "bob-gh-W3/y+Q=9&p"


# --- the identity provider: keys, a JWKS endpoint, tokens ------------------------------------


@dataclass
class Idp:
    """A JWKS endpoint (ASGI) whose published keys the test can change, counting fetches."""

    issuer: str
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key
    published: list[str] = field(default_factory=list)  # kids served
    fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_key(self, kid: str, *, publish: bool = True, kind: str = "rsa") -> None:
        if kind == "rsa":
            self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        if publish:
            self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in self.published:
            public = self.keys[kid].public_key()
            if isinstance(public, rsa.RSAPublicKey):
                jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
            else:
                jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.fetches += 1
        body = json.dumps(self.jwks()).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def token(
        self, sub: str, *, kid: str | None = None, alg: str | None = None, **claims: Any
    ) -> str:
        kid = kid or self.published[0]
        key = self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        now = int(time.time())
        body = {"iss": self.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A JWT built by hand (PyJWT refuses to make the forged ones)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = sign(head.encode()) if sign else b""
    return head + "." + _b64(signature)


@pytest.fixture
def idp() -> Iterator[tuple[Idp, str]]:
    provider = Idp(ISSUER)
    provider.new_key("k1")
    with ServerThread(provider) as server:
        yield provider, f"{server.url}/jwks.json"


@pytest.fixture
def slow_idp() -> Iterator[tuple[Idp, str]]:
    """A second issuer whose keys may be refetched at most once an hour."""
    provider = Idp("https://slow.test")
    provider.new_key("s1")
    with ServerThread(provider) as server:
        yield provider, f"{server.url}/jwks.json"


def echo_manifest(url: str, name: str = "test.echo", per_user: bool = True) -> dict[str, Any]:
    path = "users/{user.id}/github" if per_user else "tests/shared"
    return {
        "name": name,
        "description": "echo for tests",
        "input": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"message": {"type": "string", "maxLength": 100}},
        },
        "secrets": {"tok": {"path": path, "key": "token"}},
        "http": {
            "method": "POST",
            "url": f"{url}/echo",
            "headers": {"Authorization": "Bearer {secrets.tok}"},
            "json": {"message": "{args.message}"},
            "timeout": "5s",
        },
        "result": {"fields": ["method"]},
    }


@dataclass
class World:
    rb: RunningBroker
    idp: Idp
    slow: Idp
    upstream: RunningUpstream
    agent: str  # the assistant agent's token

    def call(
        self,
        assertion: str | None,
        name: str = "test.echo",
        message: str = "hi",
        token: str | None = None,
        **headers: str,
    ) -> httpx.Response:
        extra = {HEADER: assertion} if assertion is not None else {}
        extra.update(headers)
        return self.rb.http(token or self.agent).post(
            f"/v1/capabilities/{name}/invoke", json={"args": {"message": message}}, headers=extra
        )

    def delegate(self, user: str, patterns: list[str] | None = None) -> None:
        self.rb.admin.delegate(user, "assistant", patterns or ["test.*"], "2099-01-01T00:00:00Z")


@pytest.fixture
def world(
    openbao: DevVault,
    database_url: str,
    tmp_path: Path,
    upstream: RunningUpstream,
    idp: tuple[Idp, str],
    slow_idp: tuple[Idp, str],
) -> Iterator[World]:
    issuers = [
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp[1], "jwks_refresh_seconds": 0},
        {"issuer": slow_idp[0].issuer, "audience": AUDIENCE, "jwks_url": slow_idp[1],
         "jwks_refresh_seconds": 3600},
        # Nothing listens there: its keys cannot be fetched.
        {"issuer": DOWN_ISSUER, "audience": AUDIENCE, "jwks_url": f"http://127.0.0.1:{free_port()}/",
         "timeout": 2},
    ]  # fmt: skip
    rb = start_broker(openbao, database_url, tmp_path / "data", user_issuers=issuers)
    rb.admin.put_capability(echo_manifest(upstream.url))
    rb.admin.put_capability(echo_manifest(upstream.url, "test.shared", per_user=False))
    rb.admin.put_capability(echo_manifest(upstream.url, "other.echo"))
    rb.secret("tests/shared", {"token": "shared-token"})
    rb.admin.add_policy("role:assistant", "test.*")
    rb.admin.add_policy("role:customer", "test.*")
    token = rb.agent("assistant", ["assistant"])
    for user in ("alice", "bob"):
        rb.admin.grant_user_role(user, "customer")
    yield World(rb, idp[0], slow_idp[0], upstream, token)
    rb.close()


def connect(w: World, user: str, value: str) -> dict[str, Any]:
    return w.rb.admin.put_user_credential(user, "github", {"token": value})


def bearer_seen(w: World) -> list[str | None]:
    return [r.header("authorization") for r in w.upstream.requests]


# --- verified assertions ----------------------------------------------------------------------


def test_a_verified_user_call_uses_that_users_credential_and_is_audited_with_the_user(
    world: World,
) -> None:
    w = world
    connect(w, "alice", ALICE_TOKEN)
    w.delegate("alice")
    r = w.call(w.idp.token("alice"))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    assert bearer_seen(w) == [f"Bearer {ALICE_TOKEN}"]
    call_id = r.json()["call_id"]
    records = w.rb.audit(call_id=call_id)
    assert [e["kind"] for e in records] == ["call.started", "call.finished"]
    assert {e["user_id"] for e in records} == {"alice"}
    finished = records[-1]
    assert finished["secrets"][0]["path"] == "users/alice/github"
    # The audit filter by user, and the chain (user_id is hashed) still verifies.
    by_user = w.rb.audit(user="alice")
    assert {e["call_id"] for e in by_user if e["kind"].startswith("call.")} == {call_id}
    assert [e for e in w.rb.audit(user="bob") if e["kind"].startswith("call.")] == []
    assert w.rb.admin.verify_audit()["ok"] is True


def _forged_assertions(w: World) -> list[tuple[str, str, str]]:
    """(case, assertion, expected code): each must be refused with 401 and that code."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300}
    rsa_public = w.idp.keys["k1"].public_key()
    pem = rsa_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    w.idp.new_key("rogue", publish=False)
    rogue_with_real_kid = jwt.encode(
        claims, w.idp.keys["rogue"], algorithm="RS256", headers={"kid": "k1"}
    )
    return [
        ("expired", w.idp.token("alice", exp=now - 3600, iat=now - 7200), "assertion_expired"),
        ("not yet valid", w.idp.token("alice", nbf=now + 3600), "assertion_not_yet_valid"),
        ("wrong audience", w.idp.token("alice", aud="someone-else"),
         "assertion_audience_mismatch"),
        ("wrong issuer", w.idp.token("alice", iss="https://evil.test"),
         "assertion_issuer_unknown"),
        ("bad signature", rogue_with_real_kid, "assertion_invalid"),
        ("unknown kid", w.idp.token("alice", kid="rogue"), "assertion_key_unknown"),
        ("alg none", unsigned_token({"alg": "none", "typ": "JWT"}, claims), "assertion_invalid"),
        ("HS256 keyed with the public key", unsigned_token(
            {"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims,
            lambda m: hmac.new(pem, m, hashlib.sha256).digest()), "assertion_invalid"),
        ("not a JWT", "not-a-jwt", "assertion_invalid"),
        ("no exp", w.idp.token("alice", exp=None), "assertion_invalid"),
        ("unusable subject", w.idp.token("../bob"), "assertion_invalid"),
    ]  # fmt: skip


def test_unverifiable_assertions_are_401_with_a_precise_code_audited_and_nothing_runs(
    world: World,
) -> None:
    w = world
    connect(w, "alice", ALICE_TOKEN)
    w.delegate("alice")
    for case, assertion, code in _forged_assertions(w):
        r = w.call(assertion)
        assert r.status_code == 401, (case, r.text)
        error = r.json()["error"]
        assert error["code"] == code, (case, error)
        [record] = w.rb.audit(call_id=error["call_id"])
        assert (record["kind"], record["reason"], record["user_id"]) == (
            "call.rejected", code, None,
        ), case  # fmt: skip
    assert w.upstream.requests == []
    assert not [e for e in w.rb.audit(kind="call.started")]


def test_rotated_keys_are_fetched_on_an_unknown_kid_and_refetching_is_rate_limited(
    world: World,
) -> None:
    w = world
    connect(w, "alice", ALICE_TOKEN)
    w.delegate("alice")
    assert w.call(w.idp.token("alice")).status_code == 200
    fetched = w.idp.fetches
    # The issuer rotates: k1 is retired, k2 published. A k2 token makes the broker refetch.
    w.idp.new_key("k2", publish=False)
    w.idp.published = ["k2"]
    r = w.call(w.idp.token("alice", kid="k2"))
    assert r.status_code == 200, r.text
    assert w.idp.fetches == fetched + 1
    # A second issuer that allows one fetch an hour: unknown kids do not make it refetch.
    w.delegate("carol")
    w.rb.admin.grant_user_role("carol", "customer")
    w.slow.new_key("s2", kind="ec", publish=False)
    assert w.call(w.slow.token("carol"), "test.shared").status_code == 200
    assert w.slow.fetches == 1
    for _ in range(3):
        r = w.call(w.slow.token("carol", kid="s2"), "test.shared")
        assert r.json()["error"]["code"] == "assertion_key_unknown"
    assert w.slow.fetches == 1


def test_an_issuer_whose_keys_cannot_be_fetched_is_503_and_nothing_runs(world: World) -> None:
    w = world
    w.delegate("alice")
    connect(w, "alice", ALICE_TOKEN)
    r = w.call(w.idp.token("alice", iss=DOWN_ISSUER))
    assert (r.status_code, r.json()["error"]["code"]) == (503, "issuer_unavailable")
    [record] = w.rb.audit(call_id=r.json()["error"]["call_id"])
    assert (record["kind"], record["reason"]) == ("call.rejected", "issuer_unavailable")
    # Until a refetch is due the answer stays 503 (the issuer is not asked on every call).
    r = w.call(w.idp.token("alice", iss=DOWN_ISSUER))
    assert (r.status_code, r.json()["error"]["code"]) == (503, "issuer_unavailable")
    assert w.upstream.requests == []


def test_keys_from_a_jwks_file_and_ec_signatures(tmp_path: Path) -> None:
    from broker.assertions import JwtAssertions, parse_issuers
    from broker.errors import AssertionAudienceMismatch, AssertionInvalid

    provider = Idp("https://file.test")
    provider.new_key("e1", kind="ec")
    (tmp_path / "jwks.json").write_text(json.dumps(provider.jwks()))
    config = {"issuer": provider.issuer, "audience": AUDIENCE,
              "jwks_file": str(tmp_path / "jwks.json")}  # fmt: skip
    verifier = JwtAssertions(parse_issuers([config]))
    user = asyncio.run(verifier.verify(provider.token("erin", scope="a broker:self")))
    assert (user.id, user.issuer, user.scopes) == ("erin", provider.issuer, {"a", "broker:self"})
    with pytest.raises(AssertionAudienceMismatch):
        asyncio.run(verifier.verify(provider.token("erin", aud=["other", "more"])))
    # A key that declares its algorithm accepts no other (RS256 key, PS256 token).
    rsa_idp = Idp("https://alg.test")
    rsa_idp.new_key("r1")
    declared = {"keys": [{**rsa_idp.jwks()["keys"][0], "alg": "RS256"}]}
    (tmp_path / "rsa.json").write_text(json.dumps(declared))
    strict = JwtAssertions(parse_issuers([{"issuer": rsa_idp.issuer, "audience": AUDIENCE,
                                           "jwks_file": str(tmp_path / "rsa.json")}]))  # fmt: skip
    assert asyncio.run(strict.verify(rsa_idp.token("rob"))).id == "rob"
    with pytest.raises(AssertionInvalid, match="declares"):
        asyncio.run(strict.verify(rsa_idp.token("rob", alg="PS256")))
    for bad in ([{"issuer": "x", "audience": "y"}],
                [{**config, "jwks_url": "http://127.0.0.1:1/"}],
                [config, config]):  # fmt: skip
        with pytest.raises(ValueError):
            parse_issuers(bad)


def test_no_bare_user_header_is_accepted(world: World) -> None:
    w = world
    connect(w, "alice", ALICE_TOKEN)
    w.delegate("alice")
    spoof = {"X-Broker-User": "alice", "X-Broker-User-Id": "alice", "X-User": "alice"}
    # A per-user capability needs a verified user: the headers are not one.
    r = w.call(None, **spoof)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "assertion_required"
    # Neither does a user id in place of the assertion.
    r = w.call("alice")
    assert (r.status_code, r.json()["error"]["code"]) == (401, "assertion_invalid")
    # An agent-only capability runs as the agent, for no user.
    r = w.call(None, "test.shared", **spoof)
    assert r.status_code == 200
    assert {e["user_id"] for e in w.rb.audit(call_id=r.json()["call_id"])} == {None}
    assert bearer_seen(w) == ["Bearer shared-token"]


# --- delegation and the intersection of permissions -------------------------------------------


def test_a_call_needs_the_agent_and_the_user_and_explain_names_the_side(world: World) -> None:
    w = world
    connect(w, "alice", ALICE_TOKEN)
    w.delegate("alice", ["test.*", "other.*"])
    alice = w.idp.token("alice")
    # other.echo: the user may (rule below), the agent may not.
    w.rb.admin.add_policy("user:alice", "other.echo")
    r = w.call(alice, "other.echo")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "policy_denied")
    assert "agent:assistant" in r.json()["error"]["message"]
    check = w.rb.admin.check_policy("other.echo", agent="assistant", user="alice")
    assert (check["allowed"], check["denied_by"]) == (False, "agent")
    # test.echo for a user without the customer role: the agent may, the user may not.
    w.rb.admin.revoke_user_role("alice", "customer")
    r = w.call(alice)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "policy_denied")
    assert r.json()["error"]["denied_by"] == "user"
    check = w.rb.admin.check_policy("test.echo", agent="assistant", user="alice")
    assert (check["allowed"], check["denied_by"]) == (False, "user")
    assert check["user"]["subject"] == "user:alice"
    [record] = w.rb.audit(call_id=r.json()["error"]["call_id"])
    assert (record["kind"], record["user_id"], record["rule"]) == ("call.denied", "alice", None)
    # An explicit deny on the user's side beats the role's allow.
    w.rb.admin.grant_user_role("alice", "customer")
    assert w.call(alice).status_code == 200
    deny = w.rb.admin.add_policy("user:alice", "test.echo", effect="deny")
    r = w.call(alice)
    assert r.json()["error"]["denied_by"] == "user"
    assert w.rb.audit(call_id=r.json()["error"]["call_id"])[0]["rule"] == deny["id"]
    assert w.upstream.requests and len(w.upstream.requests) == 1
    # Replaying the log under a policy that allows alice flips exactly her two user-side
    # denials; the agent-side denial of other.echo stays denied.
    proposed = "p, role:assistant, test.*, invoke, allow\np, user:alice, test.echo, invoke, allow\n"
    flips = w.rb.admin.replay_policy(proposed)["flips"]
    assert [(f["user_id"], f["capability"], f["before"], f["after"]) for f in flips] == [
        ("alice", "test.echo", "deny", "allow")
    ] * 2


def test_listing_for_a_user_is_the_intersection(world: World) -> None:
    w = world
    w.rb.admin.add_policy("role:assistant", "other.*")
    w.delegate("alice", ["test.echo", "other.*"])
    alice = w.idp.token("alice")
    agent_only = {c["name"] for c in w.rb.sdk(w.agent).list_capabilities()}
    assert agent_only == {"test.echo", "test.shared", "other.echo"}
    # The user may test.* (customer), delegated test.echo and other.*: only test.echo is both.
    for_alice = {c["name"] for c in w.rb.sdk(w.agent).list_capabilities(user_assertion=alice)}
    assert for_alice == {"test.echo"}
    tools = w.rb.sdk(w.agent).tools("openai", user_assertion=alice)
    assert set(tools["names"].values()) == {"test.echo"}
    # A bad assertion is refused, not ignored.
    r = w.rb.http(w.agent).get("/v1/capabilities", headers={HEADER: "nope"})
    assert r.status_code == 401

    from tests.test_mcp import _with_client

    async def names(client: Any) -> set[str]:
        return {t.name for t in (await client.list_tools()).tools}

    seen = asyncio.run(_with_client(w.rb, w.agent, "auto", names, {HEADER: alice}))
    assert seen == {"test.echo"}
    # tools/call over MCP acts for the user of the header too.
    connect(w, "alice", ALICE_TOKEN)

    async def call(client: Any) -> Any:
        return await client.call_tool("test.echo", {"message": "mcp"})

    result = asyncio.run(_with_client(w.rb, w.agent, "auto", call, {HEADER: alice}))
    assert result.is_error is False, result
    assert bearer_seen(w) == [f"Bearer {ALICE_TOKEN}"]
    result = asyncio.run(_with_client(w.rb, w.agent, "auto", call))
    assert result.is_error is True
    assert result.structured_content["error"]["code"] == "assertion_required"


def test_missing_expired_and_revoked_delegations_refuse_the_call(world: World) -> None:
    w = world
    connect(w, "alice", ALICE_TOKEN)
    alice = w.idp.token("alice")
    r = w.call(alice)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "delegation_required")
    check = w.rb.admin.check_policy("test.echo", agent="assistant", user="alice")
    assert check["denied_by"] == "delegation"
    # A delegation of other capabilities does not cover this one.
    w.delegate("alice", ["other.*"])
    assert w.call(alice).json()["error"]["code"] == "delegation_required"
    w.delegate("alice", ["test.echo"])  # replaces the first one
    assert w.call(alice).status_code == 200
    # Expired: the API refuses a past expiry, so the row is aged in the database itself.
    bad = w.rb.http(w.rb.admin_token).put(
        "/v1/users/alice/delegations/assistant",
        json={"capabilities": ["test.*"], "expires_at": "2001-01-01T00:00:00Z"},
    )
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_request")
    engine = sa.create_engine(w.rb.settings.resolved_database_url())
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE delegations SET expires_at = '2001-01-01T00:00:00.000000Z'"))
    engine.dispose()
    r = w.call(alice)
    assert r.json()["error"]["code"] == "delegation_required"
    assert "expired" in r.json()["error"]["message"]
    assert w.rb.admin.list_delegations("alice")[0]["expired"] is True
    # Revoked: effective on the very next call.
    w.delegate("alice", ["test.echo"])
    assert w.call(alice).status_code == 200
    w.rb.admin.revoke_delegation("alice", "assistant")
    r = w.call(alice)
    assert r.json()["error"]["code"] == "delegation_required"
    assert len(w.upstream.requests) == 2
    kinds = [e["kind"] for e in w.rb.audit(user="alice") if e["kind"].startswith("admin.user")]
    assert "admin.user.delegate" in kinds and "admin.user.revoke" in kinds


# --- per-user credentials ---------------------------------------------------------------------


def test_credentials_are_written_replaced_and_deleted_but_never_readable(world: World) -> None:
    w = world
    w.delegate("alice")
    alice = w.idp.token("alice")
    http = w.rb.http(w.rb.admin_token)
    seen: list[str] = []
    r = http.put("/v1/users/alice/credentials/github", json={"data": {"token": "first-v1"}})
    seen.append(r.text)
    # OpenBao is shared by the session's tests: versions are compared, not assumed.
    assert r.status_code == 200 and r.json()["exists"] is True
    first = r.json()["version"]
    assert w.call(alice).status_code == 200
    r = http.put("/v1/users/alice/credentials/github", json={"data": {"token": ALICE_TOKEN}})
    seen.append(r.text)
    assert r.json()["version"] == first + 1
    assert w.call(alice).status_code == 200
    assert bearer_seen(w) == ["Bearer first-v1", f"Bearer {ALICE_TOKEN}"]
    r = http.get("/v1/users/alice/credentials/github")
    seen.append(r.text)
    assert set(r.json()) == {"user_id", "name", "exists", "version", "updated"}
    assert r.json()["exists"] is True and r.json()["version"] == first + 1
    seen += [http.get("/v1/users/alice/delegations").text, http.get("/v1/audit").text]
    seen.append("\n".join(w.rb.admin.export_audit()))
    for text in seen:
        assert ALICE_TOKEN not in text and "first-v1" not in text
    # Deleted: gone for good, and the next call asks for it (428) without reaching upstream.
    assert http.delete("/v1/users/alice/credentials/github").status_code == 204
    assert http.get("/v1/users/alice/credentials/github").json()["exists"] is False
    assert http.delete("/v1/users/alice/credentials/github").status_code == 404
    r = w.call(alice)
    assert r.status_code == 428
    error = r.json()["error"]
    assert (error["code"], error["credential"], error["user_id"]) == (
        "credential_required", "github", "alice",
    )  # fmt: skip
    assert "github" in error["message"]
    assert len(w.upstream.requests) == 2
    finished = w.rb.audit(call_id=error["call_id"], kind="call.finished")
    assert [(e["reason"], e["user_id"]) for e in finished] == [("credential_required", "alice")]
    # Malformed writes are refused.
    bad = http.put("/v1/users/alice/credentials/github", json={"data": {"token": 7}})
    assert bad.status_code == 400
    bad = http.put("/v1/users/al..ice/credentials/git hub", json={"data": {"token": "x"}})
    assert bad.status_code == 400


def test_a_never_connected_credential_is_428_naming_it(world: World) -> None:
    w = world
    user = f"dave-{uuid.uuid4().hex[:8]}"  # OpenBao is shared by the session: a fresh user
    w.rb.admin.grant_user_role(user, "customer")
    w.delegate(user)
    r = w.call(w.idp.token(user))
    assert r.status_code == 428
    assert r.json()["error"]["credential"] == "github"
    assert w.upstream.requests == []


def test_users_manage_their_own_things_only_with_the_self_scope(world: World) -> None:
    w = world
    anon = w.rb.http()
    own = {HEADER: w.idp.token("alice", scope="openid broker:self")}
    r = anon.put("/v1/users/alice/credentials/github", json={"data": {"token": ALICE_TOKEN}},
                 headers=own)  # fmt: skip
    assert r.status_code == 200, r.text
    r = anon.put("/v1/users/alice/delegations/assistant",
                 json={"capabilities": ["test.echo"], "expires_at": "2099-01-01T00:00:00Z"},
                 headers=own)  # fmt: skip
    assert r.status_code == 200 and r.json()["created_by"] == "user:alice"
    assert w.call(w.idp.token("alice")).status_code == 200
    # Without the scope (an assertion handed to an agent for calls), or for someone else: no.
    plain = {HEADER: w.idp.token("alice")}
    r = anon.put("/v1/users/alice/delegations/assistant",
                 json={"capabilities": ["*"], "expires_at": "2099-01-01T00:00:00Z"},
                 headers=plain)  # fmt: skip
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    r = anon.put("/v1/users/bob/credentials/github", json={"data": {"token": "x"}}, headers=own)
    assert r.status_code == 403
    assert anon.put("/v1/users/alice/roles/admin", headers=own).status_code == 401
    assert anon.get("/v1/users/alice/credentials/github").status_code == 401
    # An agent token without users.write is not an operator.
    r = w.rb.http(w.agent).put("/v1/users/alice/credentials/github", json={"data": {"token": "x"}})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "policy_denied")
    refusals = [e for e in w.rb.audit(decision="deny") if e["kind"].startswith("admin.")]
    assert len(refusals) >= 4


def test_two_users_interleaved_calls_each_reach_upstream_with_their_own_credential(
    world: World,
) -> None:
    w = world
    users = {"alice": ALICE_TOKEN, "bob": BOB_TOKEN}
    for user, value in users.items():
        connect(w, user, value)
        w.delegate(user)
    assertions = {user: w.idp.token(user) for user in users}
    order = ["alice", "bob"] * 15

    def one(n: int) -> tuple[str, int]:
        user = order[n]
        with httpx.Client(base_url=w.rb.url, timeout=30, trust_env=False) as http:
            r = http.post(
                "/v1/capabilities/test.echo/invoke",
                json={"args": {"message": f"{user}-{n}"}},
                headers={"Authorization": f"Bearer {w.agent}", HEADER: assertions[user]},
            )
        return user, r.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(len(order))))
    assert all(status == 200 for _, status in results), results
    requests = w.upstream.requests
    assert len(requests) == len(order)
    for req in requests:
        user = json.loads(req.body)["message"].split("-")[0]
        assert req.header("authorization") == f"Bearer {users[user]}", user
    # One user's idempotent answer is never replayed to the other user of the same agent.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = w.call(assertions["alice"], message="same", **key)
    again = w.call(assertions["bob"], message="same", **key)
    assert first.status_code == 200
    assert (again.status_code, again.json()["error"]["code"]) == (422, "idempotency_key_reused")


# --- the audit chain with the user column -----------------------------------------------------


def test_records_without_a_user_hash_as_before_and_the_user_is_covered() -> None:
    base = [f"v{i}" for i in range(chain.BASE_FIELDS)]
    base[chain.PREV_HASH] = chain.GENESIS
    assert chain.values_hash([*base, None]) == chain.values_hash(base)
    assert chain.values_hash([*base, "alice"]) != chain.values_hash(base)
    assert chain.values_hash([*base, "alice"]) != chain.values_hash([*base, "bob"])


# --- the CLI ----------------------------------------------------------------------------------


def test_the_cli_connects_delegates_explains_and_revokes(world: World) -> None:
    from click.testing import CliRunner

    from broker.cli import cli

    w = world
    env = {"BROKER_URL": w.rb.url, "BROKER_TOKEN": w.rb.admin_token}

    def run(*args: str, stdin: str | None = None, token: str | None = None) -> Any:
        result = CliRunner().invoke(
            cli, list(args), input=stdin, env={**env, "BROKER_TOKEN": token or env["BROKER_TOKEN"]}
        )
        assert "Traceback" not in result.output
        return result

    # The value comes from stdin, never argv, and is never printed back.
    r = run("user", "credential", "set", "alice", "github", stdin=ALICE_TOKEN)
    assert r.exit_code == 0, r.output
    assert ALICE_TOKEN not in r.output
    r = run("user", "credential", "show", "alice", "github")
    assert json.loads(r.output)["exists"] is True and ALICE_TOKEN not in r.output
    r = run("policy", "check", "assistant", "test.echo", "--user", "alice")
    assert "denied by the delegation side" in r.output
    r = run("user", "delegate", "alice", "assistant", "--capability", "test.*",
            "--expires", "2099-01-01T00:00:00Z")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "assistant" in run("user", "delegations", "alice").output
    r = run("invoke", "test.echo", "--args", '{"message": "cli"}',
            "--user-assertion", w.idp.token("alice"), token=w.agent)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["status"] == "succeeded"
    assert run("user", "revoke", "alice", "assistant").exit_code == 0
    r = run("invoke", "test.echo", "--user-assertion", w.idp.token("alice"), token=w.agent)
    assert r.exit_code == 1 and "delegation_required" in r.output
    r = run("audit", "query", "--user", "alice", "--json")
    assert {e["user_id"] for e in json.loads(r.output)} == {"alice"}
    assert run("user", "credential", "delete", "alice", "github").exit_code == 0


def test_deferred_calls_keep_their_user_and_recheck_the_delegation(world: World) -> None:
    """An asynchronous job runs with the user it was accepted for (and that user's credential);
    an approval-bound call whose delegation was revoked meanwhile is refused when approved."""
    w = world
    connect(w, "alice", ALICE_TOKEN)
    connect(w, "bob", BOB_TOKEN)
    w.delegate("alice")
    w.delegate("bob")
    job = w.call(w.idp.token("alice"), Prefer="respond-async")
    assert job.status_code == 202, job.text
    done = w.rb.sdk(w.agent).wait_call(job.json()["call_id"], timeout=20)
    assert done["state"] == "succeeded", done
    assert bearer_seen(w) == [f"Bearer {ALICE_TOKEN}"]
    held = echo_manifest(w.upstream.url, "test.held")
    held["approval"] = "required"
    w.rb.admin.put_capability(held)
    pending = w.call(w.idp.token("bob"), "test.held")
    assert pending.status_code == 202, pending.text
    approval_id = pending.json()["approval_id"]
    # Another user of the same agent cannot present bob's approval.
    stolen = w.call(w.idp.token("alice"), "test.held", **{"X-Broker-Approval": approval_id})
    assert (stolen.status_code, stolen.json()["error"]["code"]) == (403, "approval_mismatch")
    w.rb.admin.revoke_delegation("bob", "assistant")
    w.rb.admin.approve(approval_id)
    ended = w.rb.sdk(w.agent).wait_call(pending.json()["call_id"], timeout=20)
    assert ended["state"] == "failed"
    assert ended["response"]["error"]["code"] == "delegation_required"
    assert bearer_seen(w) == [f"Bearer {ALICE_TOKEN}"]  # bob's call never went out
    records = w.rb.audit(call_id=pending.json()["call_id"])
    assert {e["user_id"] for e in records if e["kind"].startswith("call.")} == {"bob"}
