"""Pytest plugin: real OpenBao dev servers and a VaultSecretStore against them.

- ``openbao``: one dev server for the whole session (do not stop, seal or pause it).
- ``fresh_openbao``: a dev server of the test's own, for tests that break Vault on purpose.
- ``vault_store``: a VaultSecretStore on ``openbao`` with the cache off (cache_ttl=0).
- ``put_secret``: write a secret at a path unique to the test; returns (path, version).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from broker.devserver import DevVault
from broker.vault import VaultSecretStore

MOUNT = "secret"

PutSecret = Callable[..., tuple[str, int]]


def unique_path(request: pytest.FixtureRequest | None = None, prefix: str = "test") -> str:
    """A KV path no other test uses: <prefix>/<test name>/<random>."""
    name = request.node.name if request is not None else "any"
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60] or "t"
    return f"{prefix}/{slug}/{uuid.uuid4().hex[:12]}"


def write_secret(vault: DevVault, path: str, data: dict[str, str], mount: str = MOUNT) -> int:
    """Write one KV v2 version through a short-lived store (root token); returns the version."""
    store = VaultSecretStore(url=vault.addr, token=vault.root_token, cache_ttl=0)
    try:
        return store.write(mount, path, data)
    finally:
        asyncio.run(store.close())


@pytest.fixture(scope="session")
def openbao() -> Iterator[DevVault]:
    vault = DevVault()
    vault.start()
    try:
        yield vault
    finally:
        vault.stop()


@pytest.fixture
def fresh_openbao() -> Iterator[DevVault]:
    vault = DevVault()
    vault.start()
    try:
        yield vault
    finally:
        vault.stop()


@pytest.fixture
def vault_store(openbao: DevVault) -> Iterator[VaultSecretStore]:
    store = VaultSecretStore(url=openbao.addr, token=openbao.root_token, cache_ttl=0)
    try:
        yield store
    finally:
        asyncio.run(store.close())


@pytest.fixture
def put_secret(openbao: DevVault, request: pytest.FixtureRequest) -> PutSecret:
    """put_secret({"token": "..."}, path=None, vault=None) -> (path, version)."""

    def put(
        data: dict[str, str], path: str | None = None, vault: DevVault | None = None
    ) -> tuple[str, int]:
        where = path or unique_path(request)
        return where, write_secret(vault or openbao, where, data)

    return put
