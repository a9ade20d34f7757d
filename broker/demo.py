"""The local environments behind ``broker dev`` and ``broker demo``, and what they share.

- ``demo_upstream``: a plain ASGI app (no framework) standing in for a real API on loopback:
  ``/echo`` (what it received), ``/weather?city=`` (fixed data), ``/status``.
- ``run_server``: uvicorn serving the broker in the foreground (``broker serve``).
- ``ServerThread``: uvicorn serving one ASGI app in a background thread.
- ``run_dev``: the development broker (embedded OpenBao, SQLite and an admin token under
  ``./.broker/``, the example capabilities and policies, the demo upstream on port 8099).
- ``run_demo``: the scripted tour (starts everything on free loopback ports, talks to the
  broker through ``BrokerClient`` only, prints what happens, stops everything).

The demo upstream and the tour listen on 127.0.0.1 only; the dev broker on BROKER_HOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs

import uvicorn
from pydantic import SecretStr

from broker.client import BrokerClient
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Lifespan = Literal["auto", "on", "off"]

Say = Callable[[str], None]

LOOPBACK = "127.0.0.1"
MAX_BODY = 1_048_576  # the demo upstream refuses bigger request bodies
START_TIMEOUT = 15.0


class DemoError(RuntimeError):
    """The tour saw something it must not (e.g. a secret in an answer)."""


# --- the demo upstream ---------------------------------------------------------------------


async def demo_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """The demo upstream: /echo, /weather?city=..., /status (plain ASGI)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    if body is None:
        await _send_json(send, 413, {"error": "request body too large"})
        return
    query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    path = scope["path"]
    if path == "/echo":
        await _send_json(send, 200, _echo(scope, query, body))
    elif path == "/weather":
        await _weather(send, query)
    elif path == "/status":
        await _send_json(send, 200, {"status": "ok"})
    else:
        await _send_json(send, 404, {"error": "not found", "path": path})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _echo(scope: Scope, query: dict[str, str], body: bytes) -> dict[str, Any]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    out: dict[str, Any] = {
        "method": scope["method"],
        "path": scope["path"],
        "query": query,
        "headers": headers,
        "json": None,
    }
    if body:
        try:
            out["json"] = json.loads(body)
        except ValueError:
            out["text"] = body.decode("utf-8", "replace")
    return out


async def _weather(send: Send, query: dict[str, str]) -> None:
    city = query.get("city", "").strip()
    if not city:
        await _send_json(send, 400, {"error": "the query parameter city is required"})
        return
    await _send_json(
        send,
        200,
        {
            "city": city,
            "temperature_c": 21,
            "conditions": "sunny",
            "source": "capbroker demo upstream (fixed data)",
        },
    )


async def _send_json(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- serving an ASGI app -------------------------------------------------------------------

# How uvicorn runs every app here. No proxy headers: the broker decides nothing by client
# address, so X-Forwarded-For/-Proto (which uvicorn trusts from loopback by default) would only
# let a local caller change what the access log says; and the middleware that reads them cost
# ~1.7% of the broker's samples at c=1 (py-spy). No Server header: nothing names the software.
SERVER_OPTIONS: dict[str, Any] = {"proxy_headers": False, "server_header": False}


def run_server(app: ASGIApp, *, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` in the foreground until a signal stops it (``broker serve``)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, **SERVER_OPTIONS)


class ServerThread:
    """Serves one ASGI app with uvicorn in a daemon thread.

    The socket is bound in the constructor, so a busy port fails right there (OSError) and
    port 0 gives a free port known before the server starts.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        lifespan: Lifespan = "off",
        log_level: str = "warning",
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets `broker dev` restart at once while old connections sit in TIME_WAIT.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            lifespan=lifespan,
            log_level=log_level,
            timeout_graceful_shutdown=2,
            **SERVER_OPTIONS,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"asgi-{self.port}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ServerThread:
        """Start serving; returns once the server accepts connections (lifespan done)."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive():
                self._sock.close()
                raise RuntimeError(f"the server on {self.url} failed to start (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start in time")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        """Block until the server thread ends (Ctrl-C raises KeyboardInterrupt here)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        """Ask uvicorn to shut down (lifespan shutdown runs) and wait for it. Idempotent."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- secrets for the dev OpenBao (dev and demo) --------------------------------------------


def write_secrets(vault_addr: str, vault_token: str, items: dict[str, dict[str, str]]) -> None:
    """Write KV v2 secrets (mount ``secret``) through the broker's own Vault adapter."""
    from broker.vault import VaultSecretStore

    store = VaultSecretStore(url=vault_addr, token=vault_token, cache_ttl=0)
    try:
        for path, data in items.items():
            store.write("secret", path, data)
    finally:
        asyncio.run(store.close())


# --- broker dev ----------------------------------------------------------------------------

DEV_UPSTREAM_PORT = 8099
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 (a file name, not a password)


def dev_secrets() -> dict[str, dict[str, str]]:
    """The secrets the example capabilities read (KV v2 mount ``secret``).

    The dev OpenBao keeps nothing across restarts, so these are written at every start. The
    third-party ones are placeholders: real calls need real values (``bao kv put ...``).
    """
    return {
        "demo": {"token": "demo-" + secrets.token_hex(16)},
        "github": {"token": "ghp_placeholder_replace_me"},
        "slack": {"token": "xoxb-placeholder-replace-me"},
        "openai": {"key": "sk-placeholder-replace-me"},
    }


def dev_admin_token(data_dir: Path) -> str:
    """The token stored in ``<data_dir>/admin-token`` (mode 0600), created on first use."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / ADMIN_TOKEN_FILE
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            path.chmod(0o600)  # tighten a file someone loosened or copied in
            return token
    token = "adm_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    path.chmod(0o600)
    return token


def check_manifests(directory: Path | None) -> int:
    """Parse every manifest before the broker starts, so a typo names its file (not a trace)."""
    from broker.capabilities import load_manifest_files, parse_manifest
    from broker.errors import InvalidManifest

    if directory is None:
        return 0
    found = load_manifest_files(directory)
    for file, data in found:
        try:
            parse_manifest(data)
        except InvalidManifest as exc:
            raise InvalidManifest(f"{file}: {exc.message}") from None
    return len(found)


def run_dev(say: Say) -> None:
    """``broker dev``: serve a development broker until Ctrl-C, then stop everything."""
    from broker.config import Settings
    from broker.devserver import DevVault

    base = Settings()
    caps_dir = base.capabilities_dir or _existing_dir(Path("capabilities"))
    policies_dir = base.policies_dir or _existing_dir(Path("policies"))
    manifests = check_manifests(caps_dir)
    admin_token = dev_admin_token(base.data_dir)
    with contextlib.ExitStack() as stack:
        vault = stack.enter_context(DevVault())
        write_secrets(vault.addr, vault.root_token, dev_secrets())
        upstream = _dev_upstream(say)
        if upstream is not None:
            stack.enter_context(upstream)
        settings = Settings(
            vault_addr=vault.addr,
            vault_token=SecretStr(vault.root_token),
            bootstrap_admin_token=SecretStr(admin_token),
            # dev only: let the example capabilities reach the demo upstream on loopback
            egress_allow=[*base.egress_allow, "127.0.0.1/32"],
            capabilities_dir=caps_dir,
            policies_dir=policies_dir,
        )
        server = stack.enter_context(_dev_server(settings))
        say(
            dev_banner(
                DevInfo(
                    server.url,
                    vault.addr,
                    vault.root_token,
                    admin_token,
                    settings,
                    manifests,
                    upstream.url if upstream else None,
                )
            )
        )
        try:
            _stop_on_sigterm()
            server.wait()
        except KeyboardInterrupt:
            say("\nstopping the broker, the demo upstream and OpenBao ...")
    say("stopped.")


def _stop_on_sigterm() -> None:
    """Make `kill` (SIGTERM) stop as cleanly as Ctrl-C: OpenBao must not outlive the broker."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def configure_logging(level: str) -> None:
    """The broker's own loggers at ``level``; libraries (alembic, ...) at warning."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("broker").setLevel(level.upper())


def _existing_dir(path: Path) -> Path | None:
    return path if path.is_dir() else None


def _dev_upstream(say: Say) -> ServerThread | None:
    try:
        return ServerThread(demo_upstream, port=DEV_UPSTREAM_PORT)
    except OSError as exc:
        # The broker is still useful without it; only the demo.* capabilities will fail.
        say(
            f"warning: cannot serve the demo upstream on {LOOPBACK}:{DEV_UPSTREAM_PORT} ({exc}); "
            "the demo.* capabilities will answer upstream_error"
        )
        return None


def _dev_server(settings: Settings) -> ServerThread:
    from broker.api import create_app
    from broker.bootstrap import build_broker

    configure_logging(settings.log_level)
    app = create_app(build_broker(settings), max_request_bytes=settings.max_request_bytes)
    try:
        return ServerThread(
            app, host=settings.host, port=settings.port, lifespan="on", log_level=settings.log_level
        )
    except OSError as exc:
        raise RuntimeError(
            f"cannot listen on {settings.host}:{settings.port}: {exc} "
            "(set BROKER_PORT to use another port)"
        ) from None


@dataclass(frozen=True)
class DevInfo:
    broker_url: str
    vault_addr: str
    vault_token: str
    admin_token: str
    settings: Settings
    manifests: int
    upstream_url: str | None


def dev_banner(info: DevInfo) -> str:
    """What ``broker dev`` prints once everything is up: addresses, tokens, a paste-able try."""
    s = info.settings
    url = info.broker_url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
    agent = "try-" + secrets.token_hex(2)  # a fresh name each start: the db outlives restarts
    applied = [
        f"{s.capabilities_dir}/ ({info.manifests} manifests)" if s.capabilities_dir else "",
        f"{s.policies_dir}/policy.csv" if s.policies_dir else "",
    ]
    return "\n".join(
        [
            "",
            "capbroker dev server is running (Ctrl-C to stop)",
            "",
            f"  broker    {url}   data in {s.data_dir}/ ({s.resolved_database_url()})",
            f"  OpenBao   {info.vault_addr}   in-memory dev server; example secrets rewritten",
            f"  upstream  {info.upstream_url or '(not running)'}   demo upstream for demo.*",
            f"  applied   {', '.join(a for a in applied if a) or 'nothing'}",
            "",
            f"Admin token (also in {s.data_dir / ADMIN_TOKEN_FILE}): {info.admin_token}",
            "",
            "In another terminal:",
            "",
            f"  export BROKER_URL={url} BROKER_TOKEN={info.admin_token}",
            f"  export BAO_ADDR={info.vault_addr} BAO_TOKEN={info.vault_token}"
            "   # optional, for: bao kv put secret/github token=...",
            "",
            "Try it (create an agent, grant a role, invoke a demo capability with curl):",
            "",
            f"  AGENT_TOKEN=$(broker agent create {agent} --quiet)",
            f"  broker role grant {agent} reader",
            '  curl -s -X POST "$BROKER_URL/v1/capabilities/demo.echo/invoke" \\',
            '    -H "Authorization: Bearer $AGENT_TOKEN" -H "Content-Type: application/json" \\',
            """    -d '{"args": {"message": "hi"}}'""",
            "  broker audit tail",
            "",
        ]
    )


# --- the tour ------------------------------------------------------------------------------

AuditTable = Callable[[list[dict[str, Any]]], str]
DEMO_ROLE = "demo-reader"
DEMO_AGENT = "demo-agent"


def run_demo(say: Say, audit_table: AuditTable) -> None:
    """The scripted tour of ``broker demo``: runs to the end, then stops everything."""
    say("capbroker demo: a scripted tour on 127.0.0.1 (everything is thrown away at the end)\n")
    with _demo_stack(say) as (broker_url, admin_token, upstream_url, secret):
        with BrokerClient(broker_url, admin_token) as admin:
            _register(say, admin, upstream_url)
            agent_token = _enroll(say, admin)
            with BrokerClient(broker_url, agent_token) as agent:
                _allowed_call(say, agent, secret)
                _refused_calls(say, agent)
            _show_audit(say, admin, audit_table)
        say("\n[9/9] stopping the broker, the demo upstream and OpenBao")
    say("done.")


@contextlib.contextmanager
def _demo_stack(say: Say) -> Iterator[tuple[str, str, str, str]]:
    """OpenBao, the demo upstream and the broker, started in order and stopped in reverse."""
    from broker.devserver import DevVault

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="broker-demo-")))
        vault = stack.enter_context(DevVault())
        secret = "demo-" + secrets.token_hex(16)
        write_secrets(vault.addr, vault.root_token, {"demo/upstream": {"token": secret}})
        say(f"[1/9] OpenBao dev server at {vault.addr}; wrote the secret secret/demo/upstream")
        upstream = stack.enter_context(ServerThread(demo_upstream))
        say(f"[2/9] demo upstream at {upstream.url} (/echo, /weather, /status)")
        admin_token = "adm_" + secrets.token_urlsafe(24)
        server = stack.enter_context(_broker_server(tmp, vault.addr, vault.root_token, admin_token))
        say(f"[3/9] broker at {server.url} (SQLite in {tmp}, admin token bootstrapped)")
        yield server.url, admin_token, upstream.url, secret


def _broker_server(
    data_dir: Path, vault_addr: str, vault_token: str, admin_token: str
) -> ServerThread:
    from broker.api import create_app
    from broker.bootstrap import build_broker
    from broker.config import Settings

    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'broker.db'}",
        vault_addr=vault_addr,
        vault_token=SecretStr(vault_token),
        bootstrap_admin_token=SecretStr(admin_token),
        egress_allow=["127.0.0.1/32"],  # the demo upstream is on loopback
        capabilities_dir=None,
        policies_dir=None,
    )
    app = create_app(build_broker(settings), max_request_bytes=settings.max_request_bytes)
    return ServerThread(app, lifespan="on")


def demo_manifests(upstream_url: str) -> list[dict[str, Any]]:
    """Two capabilities on the demo upstream; the demo role covers only the first."""
    echo = {
        "name": "demo.echo",
        "version": 1,
        "effect": "read",
        "description": "Send a message to the demo upstream, which echoes the request back.",
        "input": {
            "type": "object",
            "required": ["message"],
            "additionalProperties": False,
            "properties": {"message": {"type": "string", "maxLength": 1000}},
        },
        "secrets": {"token": {"path": "demo/upstream", "key": "token"}},
        "http": {
            "method": "POST",
            "url": f"{upstream_url}/echo",
            "headers": {"Authorization": "Bearer {secrets.token}"},
            "json": {"message": "{args.message}"},
            "timeout": "5s",
        },
    }
    weather = {
        "name": "demo.weather",
        "version": 1,
        "effect": "read",
        "description": "Today's weather for a city (fixed demo data).",
        "input": {
            "type": "object",
            "required": ["city"],
            "additionalProperties": False,
            "properties": {"city": {"type": "string", "maxLength": 64}},
        },
        "http": {"method": "GET", "url": f"{upstream_url}/weather?city={{args.city}}"},
        "result": {"fields": ["city", "temperature_c", "conditions"]},
    }
    return [echo, weather]


def _register(say: Say, admin: BrokerClient, upstream_url: str) -> None:
    say("[4/9] registered capabilities:")
    for manifest in demo_manifests(upstream_url):
        cap = admin.put_capability(manifest)
        say(
            f"      {cap['name']} v{cap['version']}: "
            f"{manifest['http']['method']} {manifest['http']['url']}"
        )
    say("      (demo.echo sends secret/demo/upstream as `Authorization: Bearer {secrets.token}`)")


def _enroll(say: Say, admin: BrokerClient) -> str:
    rule = admin.add_policy(f"role:{DEMO_ROLE}", "demo.echo", "invoke", "allow")
    say(f"[5/9] policy {rule['id']}: role:{DEMO_ROLE} may invoke demo.echo (and nothing else)")
    created = admin.create_agent(DEMO_AGENT)
    agent = admin.grant_role(created["id"], DEMO_ROLE)
    say(
        f"      created agent {created['id']} (token {created['token_id']}); "
        f"roles: {', '.join(agent['roles'])}"
    )
    token: str = created["token"]
    return token


def _allowed_call(say: Say, agent: BrokerClient, secret: str) -> None:
    args = {"message": "hello from the demo"}
    say(f"\n[6/9] allowed call: demo.echo {json.dumps(args)}")
    out = agent.invoke("demo.echo", args)
    say(
        f"      -> {out['status']}, upstream status {out['upstream_status']}, "
        f"call_id {out['call_id']}"
    )
    say("      result (what the agent gets back):")
    say("\n".join("        " + line for line in json.dumps(out["result"], indent=2).splitlines()))
    if secret in json.dumps(out):
        raise DemoError("the secret value came back in the answer")
    say(
        "      the upstream received the real token; in the answer the echoed Authorization\n"
        "      header is redacted and the secret value appears nowhere"
    )


def _refused_calls(say: Say, agent: BrokerClient) -> None:
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("[7/9] denied call (the role does not cover it)", "demo.weather", {"city": "Paris"}),
        ("      invalid arguments (refused before anything runs)", "demo.echo", {"message": 42}),
    ]
    for title, capability, args in attempts:
        say(f"\n{title}: {capability} {json.dumps(args)}")
        try:
            agent.invoke(capability, args)
        except BrokerError as exc:
            say(f"      -> HTTP {exc.http_status} {exc.code}: {exc.message}")
        else:
            raise DemoError(f"{capability} {args} was expected to be refused")


def _show_audit(say: Say, admin: BrokerClient, audit_table: AuditTable) -> None:
    events: list[dict[str, Any]] = admin.audit(limit=1000)["events"]
    say(f"\n[8/9] the audit log ({len(events)} records):")
    say(audit_table(events))
    verdict = admin.verify_audit()
    if not verdict["ok"]:
        raise DemoError(f"the audit log does not verify: {verdict}")
    say(
        f"\naudit verify: ok, {verdict['checked']} records chained and "
        f"{sum(c['checkpoints'] for c in verdict['chains'])} signed checkpoint(s) checked"
    )
