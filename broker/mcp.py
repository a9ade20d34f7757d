"""The MCP front door: ``/mcp`` speaks MCP (streamable HTTP) over the same Broker as the API.

Agents authenticate with their broker token (``Authorization: Bearer``) on every MCP HTTP
request; without a valid one the request is refused before the MCP SDK sees it, and the
API's one BrokerError handler renders (and audits) the 401 envelope. Each request is served
on its own (stateless, JSON responses), so nothing about a caller outlives its request:

- ``tools/list`` is ``Admin.list_capabilities`` with the caller's token, computed per request,
  so a policy or role change shows in the next listing;
- an ``X-Broker-User-Assertion`` header on the MCP HTTP request makes the request act for
  that (verified) user: ``tools/list`` is then the intersection with what the user may use
  and delegated, and ``tools/call`` runs on the user's behalf;
- ``tools/call`` is ``Broker.invoke`` with ``{"args": arguments}``, the same pipeline as
  ``POST /v1/capabilities/{name}/invoke`` (policy, guards, secrets, audit, redaction).
  A refusal or failure is a tool error (``isError``) carrying the broker's code, message
  and call id, so the model can read it. A call stored for a human approval (or as a job)
  is a normal result saying so, with its call id.

This is the only module that imports the ``mcp`` SDK.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from starlette.routing import Route

from broker import errors
from broker.errors import BrokerError
from broker.service import Broker, InvokeRequest

log = logging.getLogger("broker.mcp")

PATH = "/mcp"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Context = ServerRequestContext[Any, Any]

INSTRUCTIONS = (
    "Each tool is a capability of the capbroker secrets broker. The broker holds the "
    "credentials and performs the call; you never see a secret. A refused or failed call is "
    "a tool error starting with the broker's code (e.g. policy_denied, invalid_arguments, "
    "rate_limited) and names its call_id."
)


class McpEndpoint:
    """The ASGI app served at ``/mcp``: a bearer-token gate in front of the MCP SDK.

    ``running()`` must be entered for the app's lifetime (``create_app``'s lifespan); it
    starts a fresh SDK session manager each time, so an app can be started more than once.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.server: Server[Any] = Server(
            "capbroker",
            version=_version(),
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self._manager: StreamableHTTPSessionManager | None = None

    def route(self) -> Route:
        """The route to add to the app (exactly ``/mcp``, every method, not in OpenAPI)."""
        return Route(PATH, endpoint=self, include_in_schema=False)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        manager = StreamableHTTPSessionManager(self.server, stateless=True, json_response=True)
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _bearer(_scope_header(scope, "authorization"))
        try:
            await self.broker.authenticate(token)
        except errors.Unauthenticated as exc:
            exc.headers = {**exc.headers, "WWW-Authenticate": 'Bearer realm="capbroker"'}
            raise  # rendered and audited by the API's BrokerError handler
        if self._manager is None:
            raise errors.Unavailable("the MCP endpoint is not running")
        await self._manager.handle_request(scope, receive, send)

    # -- MCP handlers: parse, call one Broker method, render ---------------------------------

    async def _list_tools(
        self, ctx: Context, _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        try:
            caps = await self.broker.admin.list_capabilities(
                _token(ctx), user_assertion=_request_header(ctx, "x-broker-user-assertion")
            )
        except Exception as exc:
            raise _protocol_error(_broker_error(exc, "tools/list")) from None
        # Per caller and per policy: never to be shared or reused by a client cache.
        return types.ListToolsResult(
            tools=[_tool(cap) for cap in caps], ttl_ms=0, cache_scope="private"
        )

    async def _call_tool(
        self, ctx: Context, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        request = InvokeRequest(
            token=_token(ctx),
            capability=params.name,
            body=json.dumps({"args": params.arguments or {}}).encode(),
            task_id=_request_header(ctx, "x-broker-task"),
            user_assertion=_request_header(ctx, "x-broker-user-assertion"),
        )
        try:
            result = await self.broker.invoke(request)
        except Exception as exc:
            return _tool_error(_broker_error(exc, "tools/call"))
        out = result.to_dict()
        text = json.dumps(out, ensure_ascii=False) if result.http_status == 200 else _later(out)
        return types.CallToolResult(content=[types.TextContent(text=text)], structured_content=out)


# -- rendering ---------------------------------------------------------------------------------


def _tool(cap: Mapping[str, Any]) -> types.Tool:
    effect = cap.get("effect")
    return types.Tool(
        name=cap["name"],
        description=cap.get("description") or None,
        input_schema=cap["input"],
        annotations=types.ToolAnnotations(
            read_only_hint=effect == "read",
            destructive_hint=effect == "destructive",
            idempotent_hint=bool(cap.get("idempotent")),
            open_world_hint=True,
        ),
    )


def _later(out: Mapping[str, Any]) -> str:
    """A 202 (stored for a human approval, or as a job): not an error, a note for the model."""
    if out["status"] == "approval_pending":
        what = "waits for a human approval (approval_id " + str(out.get("approval_id")) + ")"
    else:
        what = "was queued and runs in the background"
    return (
        f"{out['status']}: the call {what}; call_id {out['call_id']}. "
        "Its outcome is at GET /v1/calls/{call_id}."
    )


def _tool_error(exc: BrokerError) -> types.CallToolResult:
    text = f"{exc.code}: {exc.message}"
    if exc.call_id:
        text += f" (call_id {exc.call_id})"
    if "Retry-After" in exc.headers:
        text += f" (retry after {exc.headers['Retry-After']}s)"
    return types.CallToolResult(
        content=[types.TextContent(text=text)], structured_content=exc.to_dict(), is_error=True
    )


def _protocol_error(exc: BrokerError) -> MCPError:
    code = types.INVALID_REQUEST if exc.status < 500 else types.INTERNAL_ERROR
    return MCPError(code, f"{exc.code}: {exc.message}", data=exc.to_dict()["error"])


def _broker_error(exc: Exception, what: str) -> BrokerError:
    if isinstance(exc, BrokerError):
        return exc
    # The frames help whoever fixes the bug; the message is left out, it may hold a value.
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unexpected error %s in MCP %s at\n%s", type(exc).__name__, what, frames)
    return BrokerError()


# -- request details ---------------------------------------------------------------------------


def _bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (the same rule as ``api.bearer``)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _scope_header(scope: Scope, name: str) -> str | None:
    wanted = name.encode("latin-1")
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return str(value.decode("latin-1"))
    return None


def _request_header(ctx: Context, name: str) -> str | None:
    """A header of the HTTP request this MCP message came in (the SDK attaches it)."""
    headers = getattr(ctx.request, "headers", None)
    value = headers.get(name) if headers is not None else None
    return value if isinstance(value, str) else None


def _token(ctx: Context) -> str | None:
    return _bearer(_request_header(ctx, "authorization"))


def _version() -> str:
    try:
        return metadata.version("capbroker")
    except metadata.PackageNotFoundError:
        return "0"
