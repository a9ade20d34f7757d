"""The ``broker`` CLI against a real running broker; ``broker demo`` and ``broker dev`` end to end.

Client commands run in-process with click's CliRunner, talking HTTP to a real broker (uvicorn,
OpenBao dev server, SQLite/PostgreSQL) and a real upstream on loopback.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from broker.cli import cli, table
from broker.client import BrokerClient
from broker.demo import ServerThread, demo_upstream, dev_admin_token
from broker.devserver import DevVault, free_port
from broker.errors import Unauthenticated
from tests.support.brokers import RunningBroker
from tests.support.upstreams import RunningUpstream

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-cli-value-0123456789"


def run(rb: RunningBroker, *args: str, token: str | None = None) -> Result:
    env = {"BROKER_URL": rb.url, "BROKER_TOKEN": token if token is not None else rb.admin_token}
    result = CliRunner().invoke(cli, list(args), env=env)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def manifest(name: str, url: str, *, secret_path: str | None = None) -> str:
    secret = f"secrets:\n  token: {{path: {secret_path}, key: token}}\n" if secret_path else ""
    header = "  headers: {Authorization: 'Bearer {secrets.token}'}\n" if secret_path else ""
    return (
        f"name: {name}\nversion: 1\ndescription: test capability {name}\neffect: read\n"
        "input:\n  type: object\n  additionalProperties: false\n"
        "  properties: {message: {type: string}}\n"
        f"{secret}http:\n  method: POST\n  url: {url}/echo\n{header}"
        "  json: {message: '{args.message}'}\n"
    )


@pytest.fixture
def echo_setup(
    running_broker: RunningBroker, upstream: RunningUpstream, tmp_path: Path
) -> RunningBroker:
    """cli.echo (secret injected) and cli.other on the upstream; role cli-reader covers cli.echo."""
    running_broker.secret("cli/echo", {"token": SECRET})
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "echo.yaml").write_text(manifest("cli.echo", upstream.url, secret_path="cli/echo"))
    (caps / "other.yaml").write_text(manifest("cli.other", upstream.url))
    assert run(running_broker, "capability", "apply", "-f", str(caps)).exit_code == 0
    assert run(running_broker, "policy", "add", "role:cli-reader", "cli.echo").exit_code == 0
    return running_broker


def token_from(output: str) -> str:
    match = re.search(r"^token:\s+(\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


# --- capabilities -------------------------------------------------------------------------


def test_capability_apply_directory_of_two(
    running_broker: RunningBroker, upstream: RunningUpstream, tmp_path: Path
) -> None:
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "a.yaml").write_text(manifest("cli.a", upstream.url))
    (caps / "b.yml").write_text(manifest("cli.b", upstream.url))
    result = run(running_broker, "capability", "apply", "-f", str(caps))
    assert result.exit_code == 0, result.output
    assert "cli.a  version 1" in result.stdout
    assert "cli.b  version 1" in result.stdout
    listed = run(running_broker, "capability", "list", "--all")
    assert "cli.a" in listed.stdout and "cli.b" in listed.stdout
    shown = run(running_broker, "capability", "get", "cli.a")
    assert json.loads(shown.stdout)["http"]["url"] == f"{upstream.url}/echo"


def test_capability_apply_broken_manifest_names_the_file(
    running_broker: RunningBroker, upstream: RunningUpstream, tmp_path: Path
) -> None:
    (tmp_path / "good.yaml").write_text(manifest("cli.good", upstream.url))
    broken = manifest("cli.broken", upstream.url).replace(
        f"{upstream.url}/echo", "http://{args.message}/x"
    )
    (tmp_path / "broken.yaml").write_text(broken)
    result = run(running_broker, "capability", "apply", "-f", str(tmp_path))
    assert result.exit_code == 1
    assert "error: invalid_manifest" in result.stderr
    assert "broken.yaml" in result.stderr
    assert "cli.good  version 1" in result.stdout


def test_capability_apply_invalid_yaml(running_broker: RunningBroker, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    result = run(running_broker, "capability", "apply", "-f", str(tmp_path / "bad.yaml"))
    assert result.exit_code == 1
    assert "error: invalid_manifest" in result.stderr and "bad.yaml" in result.stderr


def test_capability_delete(echo_setup: RunningBroker) -> None:
    assert run(echo_setup, "capability", "delete", "cli.other").exit_code == 0
    result = run(echo_setup, "capability", "get", "cli.other")
    assert result.exit_code == 1
    assert "error: capability_not_found" in result.stderr


# --- agents, roles, calls -----------------------------------------------------------------


def test_agent_create_prints_a_token_that_authenticates(running_broker: RunningBroker) -> None:
    result = run(running_broker, "agent", "create", "bob", "--attr", "team=ops")
    assert result.exit_code == 0, result.output
    assert "shown only this once" in result.stderr
    token = token_from(result.stdout)
    with BrokerClient(running_broker.url, token) as client:
        assert client.list_capabilities() == []
    quiet = run(running_broker, "agent", "create", "bob2", "--quiet")
    assert quiet.stdout.count("\n") == 1
    with BrokerClient(running_broker.url, quiet.stdout.strip()) as client:
        assert client.list_capabilities() == []


def test_role_grant_then_invoke_succeeds(
    echo_setup: RunningBroker, upstream: RunningUpstream
) -> None:
    token = echo_setup.agent("carol")
    denied = run(echo_setup, "invoke", "cli.echo", "--args", '{"message": "hi"}', token=token)
    assert denied.exit_code == 1
    assert "error: policy_denied" in denied.stderr
    granted = run(echo_setup, "role", "grant", "carol", "cli-reader")
    assert granted.exit_code == 0 and "cli-reader" in granted.stdout
    result = run(echo_setup, "invoke", "cli.echo", "--args", '{"message": "hi"}', token=token)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["status"] == "succeeded"
    assert answer["result"]["json"] == {"message": "hi"}
    assert SECRET not in result.output
    assert upstream.requests[-1].header("authorization") == f"Bearer {SECRET}"


def test_policy_check_output(echo_setup: RunningBroker) -> None:
    echo_setup.agent("dave", ["cli-reader"])
    allowed = run(echo_setup, "policy", "check", "dave", "cli.echo")
    assert allowed.exit_code == 0
    assert allowed.stdout.startswith("allowed: dave invoke cli.echo")
    assert "rule: none" not in allowed.stdout
    denied = run(echo_setup, "policy", "check", "dave", "cli.other")
    assert denied.stdout.startswith("denied: dave invoke cli.other")
    by_role = run(echo_setup, "policy", "check", "role:cli-reader", "cli.echo")
    assert by_role.stdout.startswith("allowed:")


def test_policy_list_and_delete(echo_setup: RunningBroker) -> None:
    added = run(echo_setup, "policy", "add", "agent:erin", "cli.other", "--effect", "deny")
    rule_id = added.stdout.split()[0]
    assert rule_id in run(echo_setup, "policy", "list").stdout
    assert run(echo_setup, "policy", "delete", rule_id).exit_code == 0
    assert rule_id not in run(echo_setup, "policy", "list").stdout


def test_audit_query_table_contains_the_calls(echo_setup: RunningBroker) -> None:
    token = echo_setup.agent("frank", ["cli-reader"])
    run(echo_setup, "invoke", "cli.echo", "--args", '{"message": "hi"}', token=token)
    run(echo_setup, "invoke", "cli.other", "--args", '{"message": "hi"}', token=token)
    result = run(echo_setup, "audit", "query", "--agent", "frank")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "seq",
        "time",
        "kind",
        "agent",
        "capability",
        "decision",
        "reason/status",
    ]
    assert any("call.finished" in line and "cli.echo" in line for line in lines)
    assert any("call.denied" in line and "policy_denied" in line for line in lines)
    events = json.loads(run(echo_setup, "audit", "query", "--agent", "frank", "--json").stdout)
    assert {e["kind"] for e in events} >= {"call.started", "call.finished", "call.denied"}
    two = run(echo_setup, "audit", "query", "--limit", "2", "--json")
    assert len(json.loads(two.stdout)) == 2


def test_audit_tail_prints_the_latest(echo_setup: RunningBroker) -> None:
    result = run(echo_setup, "audit", "tail", "-n", "1")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2  # header + one event


def test_agent_lifecycle(running_broker: RunningBroker) -> None:
    run(running_broker, "agent", "create", "gina")
    assert "gina" in run(running_broker, "agent", "list").stdout
    issued = run(running_broker, "agent", "token", "gina")
    token_id = re.search(r"^token_id:\s+(\S+)$", issued.stdout, re.MULTILINE)
    assert token_id and token_from(issued.stdout)
    assert token_id.group(1) in run(running_broker, "agent", "get", "gina").stdout
    revoked = run(running_broker, "agent", "revoke-token", "gina", token_id.group(1))
    assert revoked.exit_code == 0
    assert run(running_broker, "agent", "disable", "gina").exit_code == 0
    with (
        BrokerClient(running_broker.url, token_from(issued.stdout)) as client,
        pytest.raises(Unauthenticated),
    ):
        client.list_capabilities()


def test_role_list_and_revoke(echo_setup: RunningBroker) -> None:
    echo_setup.agent("hank", ["cli-reader"])
    listed = run(echo_setup, "role", "list")
    assert any(
        line.startswith("cli-reader") and "agent:hank" in line
        for line in listed.stdout.splitlines()
    )
    assert run(echo_setup, "role", "revoke", "hank", "cli-reader").exit_code == 0


# --- errors -------------------------------------------------------------------------------


def test_errors_print_code_and_message_without_traceback(echo_setup: RunningBroker) -> None:
    token = echo_setup.agent("ivan")
    denied = run(echo_setup, "invoke", "cli.echo", "--args", '{"message": "x"}', token=token)
    assert denied.exit_code == 1
    assert denied.stderr.startswith("error: policy_denied: ")
    assert denied.stdout == ""
    bad_token = run(echo_setup, "capability", "list", token="not-a-token")
    assert bad_token.exit_code == 1 and "error: unauthenticated" in bad_token.stderr
    missing = run(echo_setup, "invoke", "nope.nothing", token=token)
    assert missing.exit_code == 1 and "error: capability_not_found" in missing.stderr
    not_admin = run(echo_setup, "agent", "list", token=token)
    assert not_admin.exit_code == 1 and "error: policy_denied" in not_admin.stderr


def test_invalid_arguments_are_reported(echo_setup: RunningBroker) -> None:
    token = echo_setup.agent("judy", ["cli-reader"])
    result = run(echo_setup, "invoke", "cli.echo", "--args", '{"message": 42}', token=token)
    assert result.exit_code == 1 and "error: invalid_arguments" in result.stderr
    not_json = run(echo_setup, "invoke", "cli.echo", "--args", "{nope", token=token)
    assert not_json.exit_code == 2 and "not JSON" in not_json.output


def test_unreachable_broker() -> None:
    port = free_port()  # nothing listens there
    env = {"BROKER_URL": f"http://127.0.0.1:{port}", "BROKER_TOKEN": "x"}
    result = CliRunner().invoke(cli, ["capability", "list"], env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unreachable: ")
    assert "Traceback" not in result.output


def test_table_aligns_columns() -> None:
    out = table(("a", "long header"), [["xxxx", None], [1, ["r1", "r2"]]])
    assert out.splitlines() == ["a     long header", "xxxx  -", "1     r1,r2"]


# --- the demo upstream and dev helpers ----------------------------------------------------


def test_demo_upstream_routes() -> None:
    with ServerThread(demo_upstream) as server, httpx.Client(base_url=server.url) as http:
        echoed = http.post("/echo?x=1", json={"a": 1}, headers={"X-Test": "yes"}).json()
        assert echoed["method"] == "POST" and echoed["path"] == "/echo"
        assert echoed["query"] == {"x": "1"} and echoed["json"] == {"a": 1}
        assert echoed["headers"]["x-test"] == "yes"
        assert http.get("/status").json() == {"status": "ok"}
        assert http.get("/weather", params={"city": "Lyon"}).json()["city"] == "Lyon"
        assert http.get("/weather").status_code == 400
        assert http.get("/missing").status_code == 404


def test_dev_admin_token_is_private_and_reused(tmp_path: Path) -> None:
    data = tmp_path / ".broker"
    first = dev_admin_token(data)
    assert stat.S_IMODE((data / "admin-token").stat().st_mode) == 0o600
    assert dev_admin_token(data) == first
    (data / "admin-token").chmod(0o644)
    assert dev_admin_token(data) == first
    assert stat.S_IMODE((data / "admin-token").stat().st_mode) == 0o600


# --- broker demo / broker dev end to end (subprocesses; a few seconds each) ---------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_broker_demo_runs_to_the_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "seq" in proc.stdout and "reason/status" in proc.stdout
    assert "call.finished" in proc.stdout and "call.denied" in proc.stdout
    assert "policy_denied" in proc.stdout and "invalid_arguments" in proc.stdout
    assert "Bearer [REDACTED]" in proc.stdout
    assert proc.stdout.rstrip().endswith("done.")


class _Lines:
    """Collects a subprocess's output lines in a thread, so reads can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("the process ended:\n" + "".join(self.seen))
            self.seen.append(line)

    def rest(self) -> str:
        self._thread.join(timeout=30)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], _Lines, int, Path]]:
    for folder in ("capabilities", "policies"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "dev"],
        cwd=tmp_path,
        env=_env(BROKER_PORT=str(port)),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines = _Lines(proc)
    try:
        yield proc, lines, port, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        lines.rest()
        assert proc.stdout is not None
        proc.stdout.close()


def test_broker_dev_serves_the_examples_and_stops_on_ctrl_c(
    dev_process: tuple[subprocess.Popen[str], _Lines, int, Path],
) -> None:
    proc, lines, port, workdir = dev_process
    lines.until("Ctrl-C to stop")
    admin_token = (workdir / ".broker" / "admin-token").read_text().strip()
    assert stat.S_IMODE((workdir / ".broker" / "admin-token").stat().st_mode) == 0o600
    assert (workdir / ".broker" / "broker.db").exists()
    lines.until("AGENT_TOKEN=")
    banner = "".join(lines.seen)
    assert f"BROKER_URL=http://127.0.0.1:{port} BROKER_TOKEN={admin_token}" in banner
    with BrokerClient(f"http://127.0.0.1:{port}", admin_token) as admin:
        names = {c["name"] for c in admin.list_capabilities(all=True)}
        assert {"demo.echo", "demo.status", "github.issues.create", "http.get"} <= names
        token = admin.create_agent("dev-test", ["reader"])["token"]
    if "demo upstream for demo.*" in banner and "(not running)" not in banner:
        with BrokerClient(f"http://127.0.0.1:{port}", token) as agent:
            answer = agent.invoke("demo.echo", {"message": "hi"})
            assert answer["result"]["headers"]["authorization"] == "Bearer [REDACTED]"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, lines.rest()
    assert "stopped." in lines.rest()


def test_broker_serve_trusts_no_forwarded_header_and_names_no_server(
    openbao: DevVault, tmp_path: Path
) -> None:
    """A caller on loopback cannot make the access log name another client address, and no
    answer says what software serves it."""
    port = free_port()
    env = _env(
        BROKER_PORT=str(port),
        BROKER_DATA_DIR=str(tmp_path / "data"),
        BROKER_VAULT_ADDR=openbao.addr,
        BROKER_VAULT_TOKEN=openbao.root_token,
        BROKER_LOG_LEVEL="info",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines = _Lines(proc)
    try:
        lines.until("Uvicorn running")
        forged = {"X-Forwarded-For": "10.9.9.9", "X-Forwarded-Proto": "https"}
        url = f"http://127.0.0.1:{port}"
        answers = [
            httpx.get(f"{url}/healthz", headers=forged, timeout=10),
            httpx.post(f"{url}/v1/capabilities/x.y/invoke", json={"args": {}}, headers=forged),
        ]
        assert [r.status_code for r in answers] == [200, 401]
        assert all("server" not in r.headers for r in answers)
        lines.until('"GET /healthz HTTP/1.1" 200')
        lines.until('"POST /v1/capabilities/x.y/invoke HTTP/1.1" 401')
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        output = lines.rest()
        assert proc.stdout is not None
        proc.stdout.close()
    access = [line for line in output.splitlines() if "HTTP/1.1" in line]
    assert len(access) == 2 and all("127.0.0.1:" in line for line in access), output
    assert "10.9.9.9" not in output
