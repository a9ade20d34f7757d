"""The HTTP API: ``create_app(broker)`` builds the FastAPI app; routes are thin.

Each route parses input, calls one Broker method and renders the result. One handler renders
every BrokerError as ``{"error": {"code", "message", "call_id"}}``; refusals raised before the
Broker saw the request (body too large, malformed input) are audited by that handler.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive
from starlette.types import Scope as AsgiScope
from starlette.types import Send as AsgiSend

from broker import errors, models
from broker.errors import BrokerError
from broker.invocation import (
    INVOKE_PATH,
    answer,
    audit_rejection,
    bearer,
    invoke_request,
    serve_invoke,
)
from broker.mcp import McpEndpoint
from broker.ports import AgentRecord, AuditQuery
from broker.service import Broker
from broker.tools import Format as ToolFormat
from broker.tools import as_tools

log = logging.getLogger("broker.api")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": models.ErrorEnvelope} for code in (400, 401, 403, 404, 409, 413, 422, 428, 503)
}


Token = Annotated[str | None, Header(alias="Authorization", include_in_schema=False)]
# The end user a call acts for: a JWT from a trusted issuer (never a bare user id).
UserAssertion = Annotated[str | None, Header(alias="X-Broker-User-Assertion")]


def create_app(broker: Broker, *, max_request_bytes: int = 1_048_576) -> FastAPI:
    mcp = McpEndpoint(broker)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        try:
            async with mcp.running():
                yield
        finally:
            await broker.close()

    app = _App(title="capbroker", version="1", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.hot = BodyLimit(app, broker=broker, limit=max_request_bytes)
    # No 307 to the slashless path: a redirect would carry no error envelope, and its Location
    # would be built from the client's Host header.
    app.router.redirect_slashes = False
    _install_error_handlers(app, broker)
    app.add_middleware(BodyLimit, broker=broker, limit=max_request_bytes)
    _health_routes(app, broker)
    _capability_routes(app, broker)
    _agent_routes(app, broker)
    _policy_routes(app, broker)
    _audit_routes(app, broker)
    _deferred_routes(app, broker)
    _user_routes(app, broker)
    _budget_routes(app, broker, "agent", "/v1/agents/{subject}/budget")
    _budget_routes(app, broker, "task", "/v1/tasks/{subject:path}/budget")  # task ids may hold '/'
    app.router.routes.append(mcp.route())  # /mcp: MCP (streamable HTTP) over the same Broker
    return app


# -- errors ------------------------------------------------------------------------------------


def render_error(exc: BrokerError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI, broker: Broker) -> None:
    async def on_broker_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BrokerError)
        if exc.status < 500 or isinstance(exc, errors.RequestTooLarge):
            await audit_rejection(
                broker, request.url.path, bearer(request.headers.get("authorization")), exc
            )
        return render_error(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        err = errors.InvalidRequest(f"{where}: {first.get('msg', 'invalid')}")
        return await on_broker_error(request, err)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        known = {404: errors.NotFound, 405: errors.MethodNotAllowed}
        cls: type[BrokerError] = known.get(exc.status_code, errors.InvalidRequest)
        return await on_broker_error(request, cls(str(exc.detail)))  # audited like any refusal

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The frames help whoever fixes the bug; the message is left out, it may hold a value.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unexpected error %s at\n%s", type(exc).__name__, frames)
        return render_error(BrokerError())

    app.add_exception_handler(BrokerError, on_broker_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def _json_holds_nul(body: bytes) -> bool:
    """Does a JSON body hold a NUL in a key or string (an escaped ``\\u0000``)? The admin
    API's names, ids and subjects are text columns, and PostgreSQL refuses a NUL in text."""
    # A UTF-16 or UTF-32 body (json.loads detects them, as the routes' parser does) is full of
    # zero bytes and spells the escape in them: parse those too.
    if b"\\u0000" not in body and b"\x00" not in body:
        return False
    try:
        return _holds_nul(json.loads(body))
    except (ValueError, RecursionError):
        return False  # not JSON: the route's own validation answers


def _holds_nul(node: Any) -> bool:
    if isinstance(node, str):
        return "\x00" in node
    if isinstance(node, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_holds_nul(item) for item in node)
    return False


class _App(FastAPI):
    """FastAPI, except that an invoke goes straight to ``BodyLimit`` (which serves it as
    plain ASGI): Starlette's middleware stack cost ~6% of the broker's CPU per call there."""

    hot: BodyLimit

    async def __call__(self, scope: AsgiScope, receive: Receive, send: AsgiSend) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and INVOKE_PATH.match(scope["path"]) is not None
        ):
            await self.hot(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class _ClientGone(Exception):
    """The client disconnected before it finished sending the request body."""


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes, by Content-Length and by bytes streamed.

    The body is buffered (it is at most ``limit`` bytes) and replayed to the app, so an
    oversize request is refused before any route or the Broker sees it.
    """

    def __init__(self, app: ASGIApp, *, broker: Broker, limit: int) -> None:
        self.app, self.broker, self.limit = app, broker, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await self._read(headers, receive)
        except _ClientGone:
            return  # the client left before its body was complete: nothing to run or answer
        if body is None:
            exc = errors.RequestTooLarge(f"the request body exceeds {self.limit} bytes")
            await audit_rejection(
                self.broker, scope["path"], bearer(headers.get("authorization")), exc
            )
            await render_error(exc)(scope, receive, send)
            return
        invoke = INVOKE_PATH.match(scope["path"]) if scope["method"] == "POST" else None
        if invoke is not None:
            # The hot path: every agent call, answered without FastAPI's routing.
            await serve_invoke(self.broker, invoke[1], headers, body, send)
            return
        if (
            "\x00" in scope["path"]
            or b"%00" in scope.get("query_string", b"")
            or (scope["path"].startswith("/v1/") and _json_holds_nul(body))
        ):
            # No id or name holds a NUL, and PostgreSQL refuses one in text (a 503 otherwise).
            nul = errors.InvalidRequest("the path, query or body holds a NUL character")
            await audit_rejection(
                self.broker, scope["path"], bearer(headers.get("authorization")), nul
            )
            await render_error(nul)(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            message: Message = await receive()
            return message

        await self.app(scope, replay, send)

    async def _read(self, headers: dict[str, str], receive: Any) -> bytes | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                # A partial body must never be taken for the whole request.
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


# -- routes ------------------------------------------------------------------------------------


def _health_routes(app: FastAPI, broker: Broker) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        checks = await broker.ready()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition; unauthenticated, like /healthz (no secret or value in it)."""
        body, content_type = broker.metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})


def _capability_routes(app: FastAPI, broker: Broker) -> None:
    admin = broker.admin

    @app.get("/v1/capabilities", tags=["capabilities"])
    async def list_capabilities(
        authorization: Token = None,
        all: bool = False,
        format: ToolFormat | None = None,
        user_assertion: UserAssertion = None,
    ) -> Any:
        """What the caller may invoke (acting for a user: what both may, as delegated);
        ``format=openai|anthropic`` gives tool definitions."""
        caps = await admin.list_capabilities(
            bearer(authorization), all_=all, user_assertion=user_assertion
        )
        return {"capabilities": caps} if format is None else as_tools(caps, format)

    @app.put("/v1/capabilities/{name}", tags=["capabilities"])
    async def put_capability(
        name: str, manifest: Annotated[dict[str, Any], Body()], authorization: Token = None
    ) -> Any:
        cap = await admin.put_capability(bearer(authorization), name, manifest)
        return cap.model_dump(mode="json", by_alias=True)

    @app.get("/v1/capabilities/{name}", tags=["capabilities"])
    async def get_capability(name: str, authorization: Token = None) -> Any:
        return await admin.get_capability(bearer(authorization), name)

    @app.delete("/v1/capabilities/{name}", tags=["capabilities"], status_code=204)
    async def delete_capability(name: str, authorization: Token = None) -> None:
        await admin.delete_capability(bearer(authorization), name)

    @app.post(
        "/v1/capabilities/{name}/invoke",
        tags=["calls"],
        response_model=models.InvokeOut,
        response_model_exclude_unset=True,
        responses={202: {"model": models.InvokeAccepted}},
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": models.InvokeIn.model_json_schema()}}
            }
        },
    )
    async def invoke(
        name: str,
        request: Request,
        authorization: Token = None,
        idempotency_key: Annotated[str | None, Header()] = None,
        x_broker_task: Annotated[str | None, Header()] = None,
        traceparent: Annotated[str | None, Header()] = None,
        prefer: Annotated[str | None, Header()] = None,
        x_broker_approval: Annotated[str | None, Header()] = None,
        user_assertion: UserAssertion = None,
    ) -> Any:
        # Requests reach this route only when BodyLimit did not serve them (invocation.py);
        # the parameters above document the headers in the OpenAPI schema.
        req = invoke_request(name, request.headers, await request.body())
        result = await broker.invoke(req)
        status, headers, body = answer(result, respond_async=req.respond_async)
        return JSONResponse(body, status_code=status, headers=headers)


def _agent_out(a: AgentRecord) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "roles": list(a.roles),
        "attributes": dict(a.attributes),
        "disabled": a.disabled,
        "created_at": a.created_at,
        "tokens": list(a.tokens),
    }


def _agent_routes(app: FastAPI, broker: Broker) -> None:
    admin = broker.admin

    @app.post("/v1/agents", tags=["agents"], status_code=201, response_model=models.AgentCreated)
    async def create_agent(body: models.AgentCreate, authorization: Token = None) -> Any:
        rec, token, token_id = await admin.create_agent(
            bearer(authorization), body.name, body.roles, body.attributes
        )
        return {
            "id": rec.id,
            "name": rec.name,
            "token": token,
            "token_id": token_id,
            "roles": list(rec.roles),
        }

    @app.get("/v1/agents", tags=["agents"], response_model=models.AgentList)
    async def list_agents(authorization: Token = None) -> Any:
        return {"agents": [_agent_out(a) for a in await admin.list_agents(bearer(authorization))]}

    @app.get("/v1/agents/{agent_id}", tags=["agents"], response_model=models.Agent)
    async def get_agent(agent_id: str, authorization: Token = None) -> Any:
        return _agent_out(await admin.get_agent(bearer(authorization), agent_id))

    @app.post(
        "/v1/agents/{agent_id}/tokens",
        tags=["agents"],
        status_code=201,
        response_model=models.TokenCreated,
    )
    async def issue_token(agent_id: str, authorization: Token = None) -> Any:
        token_id, token = await admin.issue_token(bearer(authorization), agent_id)
        return {"agent_id": agent_id, "token": token, "token_id": token_id}

    @app.delete("/v1/agents/{agent_id}/tokens/{token_id}", tags=["agents"], status_code=204)
    async def revoke_token(agent_id: str, token_id: str, authorization: Token = None) -> None:
        await admin.revoke_token(bearer(authorization), agent_id, token_id)

    @app.post("/v1/agents/{agent_id}/disable", tags=["agents"], response_model=models.Agent)
    async def disable_agent(agent_id: str, authorization: Token = None) -> Any:
        return _agent_out(await admin.disable_agent(bearer(authorization), agent_id))

    @app.put("/v1/agents/{agent_id}/roles/{role}", tags=["roles"], response_model=models.Agent)
    async def grant_role(agent_id: str, role: str, authorization: Token = None) -> Any:
        return _agent_out(await admin.grant_role(bearer(authorization), agent_id, role))

    @app.delete("/v1/agents/{agent_id}/roles/{role}", tags=["roles"], response_model=models.Agent)
    async def revoke_role(agent_id: str, role: str, authorization: Token = None) -> Any:
        return _agent_out(await admin.revoke_role(bearer(authorization), agent_id, role))

    @app.get("/v1/roles", tags=["roles"], response_model=models.RoleList)
    async def list_roles(authorization: Token = None) -> Any:
        return {"roles": await admin.list_roles(bearer(authorization))}


def _policy_routes(app: FastAPI, broker: Broker) -> None:
    policies = broker.admin.policies

    @app.get("/v1/policies", tags=["policies"], response_model=models.PolicyList)
    async def list_policies(authorization: Token = None) -> Any:
        return {"policies": await policies.rules(bearer(authorization))}

    @app.post("/v1/policies", tags=["policies"], status_code=201, response_model=models.PolicyRule)
    async def add_policy(body: models.PolicyIn, authorization: Token = None) -> Any:
        data = body.model_dump(exclude={"allow_wildcard"})
        return await policies.add(bearer(authorization), data, allow_wildcard=body.allow_wildcard)

    @app.delete("/v1/policies/{rule_id}", tags=["policies"], status_code=204)
    async def delete_policy(rule_id: str, authorization: Token = None) -> None:
        await policies.delete(bearer(authorization), rule_id)

    @app.post("/v1/policies/check", tags=["policies"], response_model=models.PolicyCheckOut)
    async def check_policy(body: models.PolicyCheckIn, authorization: Token = None) -> Any:
        return await policies.check(
            bearer(authorization), subject=body.subject, agent=body.agent, obj=body.object,
            action=body.action, args=body.args, user=body.user,
        )  # fmt: skip

    @app.post("/v1/policies/apply", tags=["policies"], response_model=models.PolicyDiff)
    async def apply_policy(body: models.PolicyApplyIn, authorization: Token = None) -> Any:
        return await policies.apply(bearer(authorization), body.policy, dry_run=body.dry_run,
                                    allow_wildcard=body.allow_wildcard)  # fmt: skip

    @app.post("/v1/policies/replay", tags=["policies"], response_model=models.PolicyReplay)
    async def replay_policy(body: models.PolicyReplayIn, authorization: Token = None) -> Any:
        return await policies.replay(bearer(authorization), body.policy, since=body.since,
                                     until=body.until)  # fmt: skip


def _budget_routes(app: FastAPI, broker: Broker, scope: str, path: str) -> None:
    """``PUT|GET|DELETE`` the budget of one agent or task: ``{"limit", "period"}``."""
    admin = broker.admin

    @app.put(path, tags=["budgets"], response_model=models.BudgetOut, name=f"put_{scope}_budget")
    async def put_budget(
        subject: str, budget: Annotated[dict[str, Any], Body()], authorization: Token = None
    ) -> Any:
        return (await admin.put_budget(bearer(authorization), scope, subject, budget)).to_dict()

    @app.get(path, tags=["budgets"], response_model=models.BudgetOut, name=f"get_{scope}_budget")
    async def get_budget(subject: str, authorization: Token = None) -> Any:
        return (await admin.get_budget(bearer(authorization), scope, subject)).to_dict()

    @app.delete(path, tags=["budgets"], status_code=204, name=f"delete_{scope}_budget")
    async def delete_budget(subject: str, authorization: Token = None) -> None:
        await admin.delete_budget(bearer(authorization), scope, subject)


def _audit_routes(app: FastAPI, broker: Broker) -> None:
    admin = broker.admin

    @app.get("/v1/audit", tags=["audit"], response_model=models.AuditPage)
    async def query_audit(
        authorization: Token = None,
        agent: str | None = None,
        capability: str | None = None,
        kind: str | None = None,
        decision: str | None = None,
        since: str | None = None,
        until: str | None = None,
        call_id: str | None = None,
        task: str | None = None,
        trace_id: str | None = None,
        chain_id: str | None = None,
        contains: str | None = None,
        user: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> Any:
        q = AuditQuery(
            agent=agent,
            capability=capability,
            kind=kind,
            decision=decision,
            since=since,
            until=until,
            call_id=call_id,
            task_id=task,
            trace_id=trace_id,
            chain_id=chain_id,
            contains=contains,
            user=user,
            limit=limit,
            cursor=cursor,
        )
        events, next_cursor = await admin.query_audit(bearer(authorization), q)
        return {"events": events, "next_cursor": next_cursor}

    @app.get("/v1/audit/verify", tags=["audit"], response_model=models.AuditVerify)
    async def verify_audit(authorization: Token = None) -> Any:
        return await admin.verify_audit(bearer(authorization))

    @app.get("/v1/audit/export", tags=["audit"], response_class=StreamingResponse)
    async def export_audit(authorization: Token = None) -> StreamingResponse:
        lines = await admin.export_audit(bearer(authorization))

        def body() -> Iterator[bytes]:
            for obj in lines:
                yield (json.dumps(obj, sort_keys=True) + "\n").encode()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/v1/audit/hash", tags=["audit"])
    async def hash_value(body: models.HashIn, authorization: Token = None) -> Any:
        return {"hashes": await admin.hash_value(bearer(authorization), body.value)}

    @app.post("/v1/audit/hmac-keys/rotate", tags=["audit"])
    async def rotate_hmac_key(authorization: Token = None) -> Any:
        return {"key_id": await admin.rotate_hmac_key(bearer(authorization))}


def _deferred_routes(app: FastAPI, broker: Broker) -> None:
    deferred = broker.deferred

    @app.get("/v1/approvals", tags=["approvals"], response_model=models.ApprovalList)
    async def list_approvals(
        authorization: Token = None, status: models.ApprovalStatus | None = None
    ) -> Any:
        return {"approvals": await deferred.list_approvals(bearer(authorization), status)}

    @app.post(
        "/v1/approvals/{approval_id}/approve", tags=["approvals"], response_model=models.Approval
    )
    async def approve(
        approval_id: str, authorization: Token = None, body: models.ApprovalDecideIn | None = None
    ) -> Any:
        reason = body.reason if body else None
        return await deferred.decide(bearer(authorization), approval_id, True, reason)

    @app.post(
        "/v1/approvals/{approval_id}/deny", tags=["approvals"], response_model=models.Approval
    )
    async def deny(
        approval_id: str, authorization: Token = None, body: models.ApprovalDecideIn | None = None
    ) -> Any:
        reason = body.reason if body else None
        return await deferred.decide(bearer(authorization), approval_id, False, reason)

    @app.get("/v1/calls/{call_id}", tags=["calls"], response_model=models.CallState)
    async def get_call(call_id: str, authorization: Token = None) -> Any:
        return await deferred.get_call(bearer(authorization), call_id)


def _user_routes(app: FastAPI, broker: Broker) -> None:
    """Per-user credentials, delegations and roles: an operator's token, or (credentials and
    delegations) the user's own assertion with the ``broker:self`` scope."""
    users = broker.admin.users

    @app.put("/v1/users/{user_id}/credentials/{name}", tags=["users"],
             response_model=models.Credential)  # fmt: skip
    async def put_credential(
        user_id: str,
        name: str,
        body: models.CredentialIn,
        authorization: Token = None,
        user_assertion: UserAssertion = None,
    ) -> Any:
        return await users.put_credential(
            bearer(authorization), user_assertion, user_id, name, body.data
        )

    @app.get("/v1/users/{user_id}/credentials/{name}", tags=["users"],
             response_model=models.Credential)  # fmt: skip
    async def get_credential(
        user_id: str, name: str, authorization: Token = None, user_assertion: UserAssertion = None
    ) -> Any:
        """Metadata only (exists, version, updated): a credential is never readable back."""
        return await users.get_credential(bearer(authorization), user_assertion, user_id, name)

    @app.delete("/v1/users/{user_id}/credentials/{name}", tags=["users"], status_code=204)
    async def delete_credential(
        user_id: str, name: str, authorization: Token = None, user_assertion: UserAssertion = None
    ) -> None:
        await users.delete_credential(bearer(authorization), user_assertion, user_id, name)

    @app.put("/v1/users/{user_id}/delegations/{agent_id}", tags=["users"],
             response_model=models.DelegationOut)  # fmt: skip
    async def put_delegation(
        user_id: str,
        agent_id: str,
        body: models.DelegationIn,
        authorization: Token = None,
        user_assertion: UserAssertion = None,
    ) -> Any:
        return await users.put_delegation(bearer(authorization), user_assertion, user_id,
                                          agent_id, body.capabilities, body.expires_at)  # fmt: skip

    @app.get("/v1/users/{user_id}/delegations", tags=["users"],
             response_model=models.DelegationList)  # fmt: skip
    async def list_delegations(
        user_id: str, authorization: Token = None, user_assertion: UserAssertion = None
    ) -> Any:
        found = await users.list_delegations(bearer(authorization), user_assertion, user_id)
        return {"delegations": found}

    @app.delete("/v1/users/{user_id}/delegations/{agent_id}", tags=["users"], status_code=204)
    async def delete_delegation(
        user_id: str, agent_id: str, authorization: Token = None,
        user_assertion: UserAssertion = None,
    ) -> None:  # fmt: skip
        await users.delete_delegation(bearer(authorization), user_assertion, user_id, agent_id)

    @app.put("/v1/users/{user_id}/roles/{role}", tags=["users"], response_model=models.UserRoles)
    async def grant_user_role(user_id: str, role: str, authorization: Token = None) -> Any:
        return await users.grant_role(bearer(authorization), user_id, role)

    @app.delete("/v1/users/{user_id}/roles/{role}", tags=["users"],
                response_model=models.UserRoles)  # fmt: skip
    async def revoke_user_role(user_id: str, role: str, authorization: Token = None) -> Any:
        return await users.revoke_role(bearer(authorization), user_id, role)
