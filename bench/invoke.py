"""Added latency of one broker call over calling the upstream directly (concurrency 1).

Starts, on loopback: OpenBao (dev), the demo upstream, and the broker (SQLite, audit durable
before each reply). Alternates direct and brokered calls so both see the same machine state,
then prints p50/p99 for each and the broker's added latency. Numbers, not a test.

    python bench/invoke.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from broker.api import create_app
from broker.bootstrap import build_broker
from broker.client import BrokerClient
from broker.config import Settings
from broker.demo import ServerThread, demo_upstream, write_secrets
from broker.devserver import DevVault


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    calls = parser.parse_args().calls
    with (
        tempfile.TemporaryDirectory() as tmp,
        DevVault() as vault,
        ServerThread(demo_upstream) as upstream,
    ):
        write_secrets(vault.addr, vault.root_token, {"bench": {"token": "bench-secret"}})
        admin = "adm_" + secrets.token_urlsafe(16)
        settings = Settings(
            data_dir=Path(tmp),
            vault_addr=vault.addr,
            vault_token=SecretStr(vault.root_token),
            bootstrap_admin_token=SecretStr(admin),
            egress_allow=["127.0.0.1/32"],
        )
        app = create_app(build_broker(settings))
        with ServerThread(app, lifespan="on") as server, BrokerClient(server.url, admin) as a:
            a.put_capability(
                {
                    "name": "bench.echo",
                    "secrets": {"t": {"path": "bench", "key": "token"}},
                    "http": {
                        "method": "GET",
                        "url": f"{upstream.url}/status",
                        "headers": {"Authorization": "Bearer {secrets.t}"},
                    },
                }
            )
            a.add_policy("role:bench", "bench.*")
            token = a.create_agent("bench", ["bench"])["token"]
            with (
                httpx.Client() as direct,
                httpx.Client(
                    base_url=server.url, headers={"Authorization": f"Bearer {token}"}
                ) as brokered,
            ):

                def call_direct() -> None:
                    direct.get(f"{upstream.url}/status").raise_for_status()

                def call_broker() -> None:
                    brokered.post(
                        "/v1/capabilities/bench.echo/invoke", json={"args": {}}
                    ).raise_for_status()

                timed(call_direct, 20)
                timed(call_broker, 20)  # warm up
                d, b = [], []
                for _ in range(calls // 50):
                    d += timed(call_direct, 50)
                    b += timed(call_broker, 50)
    report = {
        "calls": len(b),
        "direct_p50_ms": statistics.median(d),
        "direct_p99_ms": percentile(d, 99),
        "broker_p50_ms": statistics.median(b),
        "broker_p99_ms": percentile(b, 99),
    }
    report["added_p50_ms"] = report["broker_p50_ms"] - report["direct_p50_ms"]
    report["added_p99_ms"] = report["broker_p99_ms"] - report["direct_p99_ms"]
    for key, value in report.items():
        print(f"{key:16} {value:10.3f}" if isinstance(value, float) else f"{key:16} {value:10}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
