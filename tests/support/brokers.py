"""A real broker for tests: uvicorn in a thread, real OpenBao, real SQLite file or PostgreSQL.

The ``database_url`` fixture runs every broker test on SQLite, and again on PostgreSQL when
BROKER_TEST_POSTGRES_URL is set (CI sets it).
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from broker.api import create_app
from broker.bootstrap import build_broker
from broker.client import BrokerClient
from broker.config import Settings
from broker.devserver import DevVault
from broker.service import Broker
from tests.support.openbao import write_secret
from tests.support.upstreams import ServerThread

POSTGRES_URL = os.environ.get("BROKER_TEST_POSTGRES_URL")


@functools.cache
def postgres_url() -> str:
    """The PostgreSQL URL for this test process. Under pytest-xdist each worker gets its own
    database (``<name>_<worker>``, created on first use), so workers never drop each other's
    tables."""
    assert POSTGRES_URL
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return POSTGRES_URL
    url = sa.engine.make_url(POSTGRES_URL)
    name = f"{url.database}_{worker}"
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
        if found.first() is None:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def reset_postgres(url: str) -> None:
    """Drop every table (new tables included) so each test starts from an empty database."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = sa.inspect(conn).get_table_names()
        for table in names:
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    if not POSTGRES_URL:
        pytest.skip("BROKER_TEST_POSTGRES_URL is not set")
    reset_postgres(postgres_url())
    return postgres_url()


@dataclass
class RunningBroker:
    url: str
    admin_token: str
    settings: Settings
    broker: Broker
    vault: DevVault
    server: ServerThread
    _clients: list[Any] = field(default_factory=list)

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30, trust_env=False)
        self._clients.append(client)
        return client

    def sdk(self, token: str | None = None) -> BrokerClient:
        client = BrokerClient(self.url, token if token is not None else self.admin_token)
        self._clients.append(client)
        return client

    @property
    def admin(self) -> BrokerClient:
        return self.sdk(self.admin_token)

    def agent(
        self, name: str, roles: list[str] | None = None, attributes: dict[str, str] | None = None
    ) -> str:
        """Create an agent and return its token."""
        token: str = self.admin.create_agent(name, roles or [], attributes or {})["token"]
        return token

    def secret(self, path: str, data: dict[str, str]) -> int:
        return write_secret(self.vault, path, data)

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.admin.audit(limit=1000, **filters)["events"]
        return events

    def raw_audit_rows(self) -> list[dict[str, Any]]:
        engine = sa.create_engine(self.settings.resolved_database_url())
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM audit_events")]
        engine.dispose()
        return rows

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.stop()


def start_broker(
    vault: DevVault, database_url: str, data_dir: Path, **overrides: Any
) -> RunningBroker:
    admin_token = "adm_" + secrets.token_urlsafe(24)
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "vault_addr": vault.addr,
        "vault_token": vault.root_token,
        "bootstrap_admin_token": admin_token,
        "egress_allow": "127.0.0.1/32",
        "secret_cache_ttl": 0,
        "vault_timeout": 2.0,
        "audit_timeout": 2.0,
    }
    values.update(overrides)
    settings = Settings(**values)
    broker = build_broker(settings)
    app = create_app(broker, max_request_bytes=settings.max_request_bytes)
    server = ServerThread(app, lifespan="on").start()
    return RunningBroker(server.url, admin_token, settings, broker, vault, server)


@pytest.fixture
def running_broker(openbao: DevVault, database_url: str, tmp_path: Path) -> Iterator[RunningBroker]:
    rb = start_broker(openbao, database_url, tmp_path / "data")
    yield rb
    rb.close()
