"""kill -9 during calls: nothing answered is lost, nothing open stays open, nothing runs twice."""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.client import BrokerClient
from broker.demo import ServerThread
from broker.devserver import DevVault, free_port
from tests.support.openbao import write_secret
from tests.test_invoke import echo_manifest

ROUNDS = 4


class SlowRecorder:
    """An upstream that takes 0-30 ms and remembers every message it received."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        with self._lock:
            self.messages.append(json.loads(body)["message"])
        await asyncio.sleep(random.uniform(0, 0.03))
        out = b'{"ok": true}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": out})


class BrokerProcess:
    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.url = env, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("broker did not become ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def broker_process(
    openbao: DevVault, database_url: str, tmp_path: Path
) -> tuple[BrokerProcess, str]:
    """A broker process (not started) on a free port, and its admin token."""
    port, admin = free_port(), "adm_" + secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "BROKER_PORT": str(port),
        "BROKER_DATA_DIR": str(tmp_path / "data"),
        "BROKER_DATABASE_URL": database_url,
        "BROKER_VAULT_ADDR": openbao.addr,
        "BROKER_VAULT_TOKEN": openbao.root_token,
        "BROKER_BOOTSTRAP_ADMIN_TOKEN": admin,
        "BROKER_EGRESS_ALLOW": "127.0.0.1/32",
        "BROKER_LOG_LEVEL": "warning",
    }
    return BrokerProcess(env, port), admin


def hammer(
    url: str, token: str, stop: threading.Event, answered: dict[str, str], sent: list[str], n: int
) -> None:
    with httpx.Client(
        base_url=url, timeout=10, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        i = 0
        while not stop.is_set():
            message = f"w{n}-{i}-{secrets.token_hex(4)}"
            sent.append(message)
            i += 1
            try:
                r = http.post(
                    "/v1/capabilities/test.echo/invoke", json={"args": {"message": message}}
                )
            except httpx.HTTPError:
                return  # the broker died under us
            if r.status_code == 200:
                answered[r.json()["call_id"]] = message


def test_sigkill_during_calls(openbao: DevVault, database_url: str, tmp_path: Path) -> None:
    recorder = SlowRecorder()
    broker, admin = broker_process(openbao, database_url, tmp_path)
    write_secret(openbao, "tests/echo", {"token": "crash-test-credential"})
    answered: dict[str, str] = {}
    abandoned = 0
    with ServerThread(recorder) as upstream:
        broker.start()
        with BrokerClient(broker.url, admin) as client:
            client.put_capability(echo_manifest(upstream.url))
            client.add_policy("role:tester", "test.*")
            token = client.create_agent("crash", ["tester"])["token"]
        try:
            for round_ in range(ROUNDS):
                stop, sent = threading.Event(), []
                workers = [
                    threading.Thread(
                        target=hammer, args=(broker.url, token, stop, answered, sent, n)
                    )
                    for n in range(6)
                ]
                for w in workers:
                    w.start()
                time.sleep(0.3 + 0.25 * round_ + random.uniform(0, 0.2))  # varied points
                broker.kill()
                stop.set()
                for w in workers:
                    w.join(15)
                broker.start()
                abandoned = check(broker.url, admin, answered, recorder)
        finally:
            broker.stop()
    assert len(answered) > 20  # the test really made calls between the kills
    assert abandoned >= 1  # and killed some of them mid-flight


def check(url: str, admin: str, answered: dict[str, str], recorder: SlowRecorder) -> int:
    """Check the invariants after a restart; return how many calls are abandoned so far."""
    with BrokerClient(url, admin) as client:
        events = []
        cursor = None
        while True:
            page = client.audit(limit=1000, cursor=cursor, agent="crash")
            events += page["events"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        kinds: dict[str, set[str]] = {}
        for e in events:
            kinds.setdefault(e["call_id"], set()).add(e["kind"])
        # Every call the agent saw answered has its call.finished.
        assert all("call.finished" in kinds.get(c, set()) for c in answered)
        # Every started call has an end: finished, or abandoned by the restart.
        open_calls = [
            c
            for c, k in kinds.items()
            if "call.started" in k and not k & {"call.finished", "call.abandoned"}
        ]
        assert open_calls == []
        # No upstream call was made twice (the broker never replays a call).
        assert [m for m, n in Counter(recorder.messages).items() if n > 1] == []
        report = client.verify_audit()
        assert report["ok"] is True, report
        return sum("call.abandoned" in k for k in kinds.values())


@pytest.mark.parametrize("_", [0])
def test_abandoned_calls_are_queryable(_: int) -> None:
    """call.abandoned is a kind the query filter and the CLI table understand."""
    from broker.cli import audit_row

    row = audit_row(
        {
            "id": 1,
            "seq": 3,
            "time": "t",
            "kind": "call.abandoned",
            "agent_id": "a",
            "capability": "c",
            "decision": None,
            "reason": "outcome_unknown",
            "status": None,
            "upstream_status": None,
        }
    )
    assert "call.abandoned" in row and "outcome_unknown" in " ".join(map(str, row))
