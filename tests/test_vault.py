"""VaultSecretStore and DevVault against a real OpenBao dev server (no mocks).

Invariant 2 (fail closed on secrets) and 3 (secrets never leave the broker) at the adapter:
every way Vault can fail ends in SecretUnavailable with a message that names the secret's
location and a reason, never its value nor the token.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest
import requests.exceptions
from prometheus_client.parser import text_string_to_metric_families

from broker.devserver import DevVault, DevVaultError, find_bao
from broker.errors import SecretUnavailable
from broker.metrics import PrometheusMetrics
from broker.ports import SecretStore, SecretValue
from broker.vault import VaultSecretStore, translate
from tests.support.openbao import MOUNT, PutSecret, unique_path, write_secret

VALUE = "s3cr3t-value-do-not-leak"


class CountingStore(VaultSecretStore):
    """Counts real Vault reads; ``delay`` holds each read open so concurrent misses overlap."""

    def __init__(self, *, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay
        self.reads = 0
        self._lock = threading.Lock()

    def _vault_read(self, mount: str, path: str) -> tuple[dict[str, Any], int | None]:
        with self._lock:
            self.reads += 1
        answer = super()._vault_read(mount, path)
        time.sleep(self.delay)  # after the read: the answer is already "old" while it waits
        return answer


def make_store(vault: DevVault, **kwargs: Any) -> VaultSecretStore:
    kwargs.setdefault("token", vault.root_token)
    return VaultSecretStore(url=vault.addr, **kwargs)


@pytest.fixture
def stores() -> Iterator[list[VaultSecretStore]]:
    """Stores a test builds itself; closed at teardown."""
    made: list[VaultSecretStore] = []
    yield made
    for store in made:
        asyncio.run(store.close())


def read(store: VaultSecretStore, path: str, key: str = "token") -> SecretValue:
    return asyncio.run(store.read(MOUNT, path, key))


def refused(store: VaultSecretStore, path: str, key: str = "token") -> SecretUnavailable:
    with pytest.raises(SecretUnavailable) as info:
        read(store, path, key)
    return info.value


def assert_clean(exc: SecretUnavailable, *secret: str) -> None:
    """Nothing secret anywhere a client or a log could see it."""
    shown = [str(exc), repr(exc), json.dumps(exc.to_dict())]
    for text in shown:
        for s in secret:
            assert s not in text
    # hvac exception texts carry whole Vault answers: the cause is not chained.
    assert exc.__cause__ is None
    assert exc.__suppress_context__ or exc.__context__ is None
    assert exc.status == 503 and exc.code == "secret_unavailable"


# --- reading ------------------------------------------------------------------------------


def test_store_satisfies_the_port(vault_store: VaultSecretStore) -> None:
    store: SecretStore = vault_store
    assert store is vault_store


def test_read_returns_value_and_version(
    vault_store: VaultSecretStore, put_secret: PutSecret
) -> None:
    path, version = put_secret({"token": VALUE, "other": "x"})
    got = read(vault_store, path)
    assert got == SecretValue(MOUNT, path, "token", VALUE, version)
    assert version == 1
    assert VALUE not in json.dumps(got.reference())


def test_new_version_is_read_after_invalidate_and_after_ttl(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": "v1"})
    cached = make_store(openbao, cache_ttl=60)
    short = make_store(openbao, cache_ttl=0.3)
    stores += [cached, short]
    assert read(cached, path).value == "v1"
    assert read(short, path).value == "v1"

    put_secret({"token": "v2"}, path=path)
    assert read(cached, path).value == "v1"  # within the TTL: the cached read
    cached.invalidate(MOUNT, path)
    got = read(cached, path)
    assert (got.value, got.version) == ("v2", 2)

    time.sleep(0.4)
    assert (read(short, path).value, read(short, path).version) == ("v2", 2)


def test_write_through_the_store_invalidates_its_cache(
    openbao: DevVault, stores: list[VaultSecretStore], request: pytest.FixtureRequest
) -> None:
    store = make_store(openbao, cache_ttl=60)
    stores.append(store)
    path = unique_path(request)
    assert store.write(MOUNT, path, {"token": "a"}) == 1
    assert read(store, path).value == "a"
    assert store.write(MOUNT, path, {"token": "b"}) == 2
    assert read(store, path).value == "b"


def test_cache_hit_does_not_touch_vault(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": VALUE, "user": "bot"})
    store = CountingStore(url=openbao.addr, token=openbao.root_token, cache_ttl=60)
    stores.append(store)
    for key in ("token", "user", "token"):
        read(store, path, key)
    assert store.reads == 1
    store.invalidate()
    read(store, path)
    assert store.reads == 2


def test_cache_serves_within_ttl_while_vault_hangs_then_fails_after(
    fresh_openbao: DevVault, stores: list[VaultSecretStore]
) -> None:
    path = "cache/hang"
    write_secret(fresh_openbao, path, {"token": VALUE})
    store = make_store(fresh_openbao, cache_ttl=1.0, timeout=1.0)
    stores.append(store)
    assert read(store, path).value == VALUE
    fresh_openbao.pause()
    try:
        assert read(store, path).value == VALUE  # from the cache: Vault is not asked
        time.sleep(1.1)
        err = refused(store, path)  # expired: never served stale when Vault fails
    finally:
        fresh_openbao.resume()
    assert "vault timed out" in str(err)
    assert_clean(err, VALUE, fresh_openbao.root_token)


def test_concurrent_misses_share_one_vault_read(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": VALUE, "user": "bot"})
    other, _ = put_secret({"token": "other"})
    store = CountingStore(url=openbao.addr, token=openbao.root_token, cache_ttl=60, delay=0.2)
    stores.append(store)

    async def many() -> list[SecretValue]:
        same = [store.read(MOUNT, path, ("token", "user")[i % 2]) for i in range(20)]
        return await asyncio.gather(*same, store.read(MOUNT, other, "token"))

    got = asyncio.run(many())
    assert store.reads == 2  # one per (mount, path), not one per caller
    assert {g.value for g in got[:20]} == {VALUE, "bot"}
    assert got[20].value == "other"


def test_concurrent_misses_share_one_read_without_cache(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": VALUE})
    store = CountingStore(url=openbao.addr, token=openbao.root_token, cache_ttl=0, delay=0.2)
    stores.append(store)

    async def many() -> list[SecretValue]:
        return await asyncio.gather(*(store.read(MOUNT, path, "token") for _ in range(10)))

    assert [g.value for g in asyncio.run(many())] == [VALUE] * 10
    assert store.reads == 1
    read(store, path)
    assert store.reads == 2  # cache_ttl=0: nothing kept afterwards


def test_shared_read_failure_reaches_every_waiter(
    openbao: DevVault, stores: list[VaultSecretStore], request: pytest.FixtureRequest
) -> None:
    store = CountingStore(url=openbao.addr, token=openbao.root_token, cache_ttl=60, delay=0.2)
    stores.append(store)
    path = unique_path(request)

    async def many() -> list[BaseException | SecretValue]:
        calls = (store.read(MOUNT, path, k) for k in ("a", "b", "c"))
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(many())
    assert store.reads == 1
    assert all(isinstance(r, SecretUnavailable) for r in results)
    assert "key='b'" in str(results[1])


def test_a_waiter_giving_up_does_not_cancel_the_shared_read(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": VALUE})
    store = CountingStore(url=openbao.addr, token=openbao.root_token, cache_ttl=60, delay=0.3)
    stores.append(store)

    async def impatient_and_patient() -> SecretValue:
        impatient = asyncio.wait_for(store.read(MOUNT, path, "token"), 0.05)
        patient = asyncio.create_task(store.read(MOUNT, path, "token"))
        with pytest.raises(TimeoutError):
            await impatient
        return await patient

    assert asyncio.run(impatient_and_patient()).value == VALUE
    assert store.reads == 1


def test_read_in_flight_during_invalidate_is_not_cached(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": "v1"})
    store = CountingStore(url=openbao.addr, token=openbao.root_token, cache_ttl=60, delay=0.3)
    stores.append(store)

    async def read_while_writing() -> SecretValue:
        slow = asyncio.create_task(store.read(MOUNT, path, "token"))
        await asyncio.sleep(0.1)  # the read has its answer (v1) and is still in flight
        await asyncio.to_thread(store.write, MOUNT, path, {"token": "v2"})
        return await slow

    assert asyncio.run(read_while_writing()).value == "v1"
    store.delay = 0
    assert read(store, path).value == "v2"  # v1 was not cached over the invalidation
    assert store.reads == 2


def test_failed_read_is_not_cached(
    openbao: DevVault, stores: list[VaultSecretStore], request: pytest.FixtureRequest
) -> None:
    store = make_store(openbao, cache_ttl=60)
    stores.append(store)
    path = unique_path(request)
    assert "secret not found" in str(refused(store, path))
    write_secret(openbao, path, {"token": VALUE})
    assert read(store, path).value == VALUE


# --- refusals: the secret ------------------------------------------------------------------


def test_missing_path(vault_store: VaultSecretStore, request: pytest.FixtureRequest) -> None:
    path = unique_path(request)
    err = refused(vault_store, path)
    assert "secret not found" in str(err)
    assert f"path={path!r}" in str(err) and "mount='secret'" in str(err)


def test_missing_mount(vault_store: VaultSecretStore) -> None:
    with pytest.raises(SecretUnavailable, match="secrets engine not mounted"):
        asyncio.run(vault_store.read("no-such-mount", "x", "token"))


def test_missing_key(vault_store: VaultSecretStore, put_secret: PutSecret) -> None:
    path, _ = put_secret({"token": VALUE})
    err = refused(vault_store, path, key="password")
    assert "key missing" in str(err) and "key='password'" in str(err)
    assert_clean(err, VALUE)


def test_non_string_and_empty_values_are_refused(
    openbao: DevVault, vault_store: VaultSecretStore, request: pytest.FixtureRequest
) -> None:
    path = unique_path(request)
    data = {"number": 918273645, "empty": "", "nested": {"inner": VALUE}, "null": None}
    openbao.request("POST", f"/v1/secret/data/{path}", {"data": data})
    for key in ("number", "nested", "null"):
        err = refused(vault_store, path, key)
        assert "value is not a string" in str(err)
        assert_clean(err, VALUE, "918273645")
    assert "value is empty" in str(refused(vault_store, path, "empty"))


def test_soft_deleted_latest_version(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": "old"})
    put_secret({"token": VALUE}, path=path)
    store = make_store(openbao, cache_ttl=60)
    stores.append(store)
    assert read(store, path).version == 2
    store.delete_latest(MOUNT, path)  # also drops the cached version
    err = refused(store, path)
    assert "secret deleted" in str(err)
    assert_clean(err, VALUE, "old")


def test_destroyed_version(
    openbao: DevVault, vault_store: VaultSecretStore, put_secret: PutSecret
) -> None:
    path, version = put_secret({"token": VALUE})
    openbao.request("PUT", f"/v1/secret/destroy/{path}", {"versions": [version]})
    err = refused(vault_store, path)
    assert "secret destroyed" in str(err)
    assert_clean(err, VALUE)


def test_deleted_metadata(
    openbao: DevVault, vault_store: VaultSecretStore, put_secret: PutSecret
) -> None:
    path, _ = put_secret({"token": VALUE})
    openbao.request("DELETE", f"/v1/secret/metadata/{path}")
    assert "secret not found" in str(refused(vault_store, path))


@pytest.mark.parametrize(
    ("mount", "path"),
    [
        ("secret", "../sys/seal"),
        ("secret", "a/../../sys/health"),
        ("secret", "/abs"),
        ("secret", "a//b"),
        ("secret", ""),
        ("", "x"),
        ("secret", "a\nb"),
        ("sys/..", "x"),
    ],
)
def test_malformed_locations_are_refused_before_vault(
    openbao: DevVault, stores: list[VaultSecretStore], mount: str, path: str
) -> None:
    store = CountingStore(url=openbao.addr, token=openbao.root_token)
    stores.append(store)
    with pytest.raises(SecretUnavailable, match="invalid secret location"):
        asyncio.run(store.read(mount, path, "token"))
    assert store.reads == 0


# --- refusals: Vault itself ------------------------------------------------------------------


def test_vault_stopped(fresh_openbao: DevVault, stores: list[VaultSecretStore]) -> None:
    write_secret(fresh_openbao, "down/x", {"token": VALUE})
    store = make_store(fresh_openbao, cache_ttl=0, timeout=2.0)
    stores.append(store)
    assert read(store, "down/x").value == VALUE
    fresh_openbao.stop()
    err = refused(store, "down/x")
    assert "vault unreachable" in str(err)
    assert_clean(err, VALUE, fresh_openbao.root_token)
    assert asyncio.run(store.ready()) is False


def test_vault_sealed_then_unsealed(
    fresh_openbao: DevVault, stores: list[VaultSecretStore]
) -> None:
    write_secret(fresh_openbao, "sealed/x", {"token": VALUE})
    store = make_store(fresh_openbao, cache_ttl=0)
    stores.append(store)
    assert asyncio.run(store.ready()) is True
    fresh_openbao.seal()
    err = refused(store, "sealed/x")
    assert "vault sealed" in str(err)
    assert_clean(err, VALUE, fresh_openbao.root_token)
    assert asyncio.run(store.ready()) is False
    fresh_openbao.unseal()
    assert asyncio.run(store.ready()) is True
    assert read(store, "sealed/x").value == VALUE


def test_vault_hung_fails_within_the_deadline(
    fresh_openbao: DevVault, stores: list[VaultSecretStore]
) -> None:
    write_secret(fresh_openbao, "slow/x", {"token": VALUE})
    store = make_store(fresh_openbao, cache_ttl=0, timeout=1.0)
    stores.append(store)
    fresh_openbao.pause()
    try:
        started = time.monotonic()
        err = refused(store, "slow/x")
        took = time.monotonic() - started
        ready_started = time.monotonic()
        assert asyncio.run(store.ready()) is False
        ready_took = time.monotonic() - ready_started
    finally:
        fresh_openbao.resume()
    assert "vault timed out" in str(err)
    assert took < 5.0 and ready_took < 5.0  # bounds, not performance figures
    assert_clean(err, VALUE, fresh_openbao.root_token)
    assert read(store, "slow/x").value == VALUE  # and it recovers


def test_wrong_token(
    openbao: DevVault, put_secret: PutSecret, stores: list[VaultSecretStore]
) -> None:
    path, _ = put_secret({"token": VALUE})
    wrong = "wrong-token-that-must-not-leak"
    store = make_store(openbao, token=wrong)
    stores.append(store)
    err = refused(store, path)
    assert "permission denied" in str(err)
    assert_clean(err, VALUE, wrong, openbao.root_token)


def test_environment_and_token_file_are_never_used(
    openbao: DevVault,
    put_secret: PutSecret,
    stores: list[VaultSecretStore],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    path, _ = put_secret({"token": VALUE})
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    monkeypatch.setenv("VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".vault-token").write_text(openbao.root_token)
    store = make_store(openbao, token="not-the-root-token")
    stores.append(store)
    assert "permission denied" in str(refused(store, path))


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        VaultSecretStore(url="http://127.0.0.1:1", token="")


def test_closed_store_refuses(openbao: DevVault, put_secret: PutSecret) -> None:
    path, _ = put_secret({"token": VALUE})
    store = make_store(openbao, cache_ttl=60)
    assert read(store, path).value == VALUE
    asyncio.run(store.close())
    assert "closed" in str(refused(store, path))
    assert asyncio.run(store.ready()) is False


def test_ready_on_a_healthy_vault(vault_store: VaultSecretStore) -> None:
    assert asyncio.run(vault_store.ready()) is True


def test_repr_never_shows_the_token(openbao: DevVault, vault_store: VaultSecretStore) -> None:
    assert openbao.root_token not in repr(vault_store)
    assert openbao.root_token not in repr(openbao)


# --- translate ---------------------------------------------------------------------------------


def _instances(module: Any, base: type[BaseException]) -> Iterator[BaseException]:
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, base) and issubclass(cls, Exception):
            try:
                yield cls()
            except TypeError:  # e.g. requests' JSONDecodeError needs (msg, doc, pos)
                yield cls("boom", VALUE, 0)


def test_translate_is_total() -> None:
    foreign = [
        *_instances(hvac.exceptions, Exception),
        *_instances(requests.exceptions, requests.exceptions.RequestException),
        TimeoutError(),
        ValueError(VALUE),
        KeyError(VALUE),
        RuntimeError(),
        KeyboardInterrupt(),
        hvac.exceptions.InvalidPath(json="not a mapping"),
        hvac.exceptions.InvalidPath(json={"data": {"metadata": "odd"}}),
        hvac.exceptions.VaultDown(errors=None),
    ]
    assert len(foreign) > 30
    for exc in foreign:
        out = translate(exc, mount="secret", path="p", key="k")
        assert isinstance(out, SecretUnavailable), exc
        assert VALUE not in str(out)
        assert "mount='secret', path='p', key='k'" in str(out)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (hvac.exceptions.VaultDown(errors=["Vault is sealed"]), "vault sealed"),
        (hvac.exceptions.VaultDown(errors=["standby"]), "vault unavailable"),
        (hvac.exceptions.Forbidden(errors=["permission denied"]), "permission denied"),
        (hvac.exceptions.Unauthorized(), "permission denied"),
        (hvac.exceptions.InvalidPath(errors=[]), "secret not found"),
        (hvac.exceptions.VaultNotInitialized(), "vault not initialized"),
        (hvac.exceptions.RateLimitExceeded(), "vault rate limited"),
        (hvac.exceptions.InternalServerError(), "vault error"),
        (requests.exceptions.ConnectTimeout(), "vault timed out"),
        (requests.exceptions.ReadTimeout(), "vault timed out"),
        (requests.exceptions.ConnectionError(), "vault unreachable"),
        (TimeoutError(), "vault timed out"),
        (ZeroDivisionError(), "internal error"),
    ],
)
def test_translate_reasons(exc: BaseException, reason: str) -> None:
    assert reason in str(translate(exc))


def test_translate_keeps_a_secret_unavailable() -> None:
    original = SecretUnavailable("already translated")
    assert translate(original) is original


# --- ensure_kv2 and the dev server ---------------------------------------------------------------


def test_ensure_kv2(fresh_openbao: DevVault, stores: list[VaultSecretStore]) -> None:
    store = make_store(fresh_openbao, cache_ttl=0)
    stores.append(store)
    store.ensure_kv2()  # the dev server's secret/ already is KV v2
    store.ensure_kv2("team-kv")
    store.ensure_kv2("team-kv")  # idempotent
    assert store.write("team-kv", "app/db", {"password": VALUE}) == 1
    got = asyncio.run(store.read("team-kv", "app/db", "password"))
    assert (got.value, got.version) == (VALUE, 1)
    fresh_openbao.request(
        "POST", "/v1/sys/mounts/kv-one", {"type": "kv", "options": {"version": "1"}}
    )
    with pytest.raises(ValueError, match="not a KV v2"):
        store.ensure_kv2("kv-one")


def test_dev_server_ignores_the_callers_vault_environment(
    monkeypatch: pytest.MonkeyPatch, stores: list[VaultSecretStore]
) -> None:
    for name in ("VAULT_ADDR", "BAO_ADDR"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")
    for name in ("VAULT_TOKEN", "BAO_TOKEN", "BAO_DEV_ROOT_TOKEN_ID", "VAULT_DEV_ROOT_TOKEN_ID"):
        monkeypatch.setenv(name, "token-from-the-environment")
    monkeypatch.setenv("BAO_DEV_LISTEN_ADDRESS", "127.0.0.1:1")
    with DevVault(root_token="chosen-root-token") as vault:
        assert vault.root_token == "chosen-root-token"
        assert vault.addr != "http://127.0.0.1:1"
        store = make_store(vault)
        stores.append(store)
        assert store.write(MOUNT, "env/x", {"token": VALUE}) == 1
        assert read(store, "env/x").value == VALUE
        outsider = make_store(vault, token="token-from-the-environment")
        stores.append(outsider)
        assert "permission denied" in str(refused(outsider, "env/x"))


def test_dev_server_lifecycle() -> None:
    vault = DevVault()
    assert vault.pid is None and not vault.running
    vault.start()
    try:
        assert vault.running and vault.pid is not None
        assert vault.request("GET", "/v1/sys/health", token=False)["sealed"] is False
        vault.pause()
    finally:
        vault.stop()  # also ends a paused server
    assert not vault.running and vault.pid is None
    vault.stop()  # idempotent


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_pause_returns_only_once_every_server_thread_is_stopped() -> None:
    # kill(SIGSTOP) only queues the signal: under CPU load another server thread answered a
    # request after pause() had returned (34 of 200 tries with 4 busy loops on 2 cores).
    with DevVault() as vault:
        for _ in range(20):
            vault.pause()
            states = [
                t.read_text().rsplit(")", 1)[1].split()[0]
                for t in Path(f"/proc/{vault.pid}/task").glob("*/stat")
            ]
            assert states and set(states) <= {"T", "t"}
            with pytest.raises(DevVaultError, match="timed out"):
                vault.request("GET", "/v1/sys/health", token=False, timeout=0.2)
            vault.resume()
        assert vault.request("GET", "/v1/sys/health", token=False)["sealed"] is False


def test_find_bao_explains_a_missing_binary(tmp_path: Any) -> None:
    assert find_bao()  # the venv's
    with pytest.raises(DevVaultError, match="not found"):
        find_bao(str(tmp_path / "no-bao"))


def test_dev_server_start_failure_is_reported_without_secrets() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        vault = DevVault(root_token="root-token-not-in-errors", port=busy.getsockname()[1])
        with pytest.raises(DevVaultError) as info:
            vault.start(timeout=10)
    assert "root-token-not-in-errors" not in str(info.value)
    assert not vault.running


def cache_lookups(metrics: PrometheusMetrics) -> dict[str, float]:
    """The secret cache's lookup counters by result, as /metrics shows them."""
    return {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(metrics.exposition()[0].decode())
        for s in f.samples
        if s.name == "broker_secret_cache_lookups_total"
    }


def test_a_hit_late_in_the_ttl_refreshes_ahead_of_expiry(
    openbao: DevVault, stores: list[VaultSecretStore]
) -> None:
    """Steady traffic never waits for Vault: past 80% of the TTL a hit also starts one
    background read, so the entry is renewed (with the newest version) before it expires."""
    path = unique_path()
    write_secret(openbao, path, {"token": "v1"})
    metrics = PrometheusMetrics()
    store = CountingStore(
        url=openbao.addr, token=openbao.root_token, cache_ttl=1.0, metrics=metrics
    )
    stores.append(store)

    async def scenario() -> list[tuple[str, int]]:
        seen = []
        start = 0.0
        for at in (0.0, 0.3, 0.85, 0.95, 1.15):  # seconds after the first read
            if at:
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            value = await store.read(MOUNT, path, "token")
            start = start or time.monotonic()
            seen.append((value.value, store.reads))
            if at == 0.3:
                # Behind the cache's back (write_secret runs its own event loop: a thread).
                await asyncio.to_thread(write_secret, openbao, path, {"token": "v2"})
        return seen

    seen = asyncio.run(scenario())
    # t=0: miss. t=0.3: hit. t=0.85: hit (old value) that starts the refresh. t=0.95: the
    # refreshed entry, before the first one expired. t=1.15: still the refreshed entry.
    assert [v for v, _ in seen] == ["v1", "v1", "v1", "v2", "v2"]
    assert [n for _, n in seen] == [1, 1, 1, 2, 2]
    # The metric tells the background read from a miss: Vault requests = miss + refresh, and
    # only the miss made a call wait (bench/gateway.py reports the two apart).
    lookups = cache_lookups(metrics)
    assert lookups == {"miss": 1.0, "refresh": 1.0, "hit": 3.0, "shared": 0.0}


def test_hits_while_a_refresh_is_in_flight_count_as_hits(
    openbao: DevVault, stores: list[VaultSecretStore]
) -> None:
    """One background read however many late hits arrive while it runs: the first late hit
    counts as the refresh, the others as hits, and Vault sees two reads in all."""
    path = unique_path()
    write_secret(openbao, path, {"token": "v1"})
    metrics = PrometheusMetrics()
    store = CountingStore(
        url=openbao.addr, token=openbao.root_token, cache_ttl=1.0, delay=0.3, metrics=metrics
    )
    stores.append(store)

    async def scenario() -> int:
        await store.read(MOUNT, path, "token")  # miss; the entry's life starts as it returns
        await asyncio.sleep(0.88)  # past the refresh point (0.8 s), before expiry (1 s)
        late = await asyncio.gather(*(store.read(MOUNT, path, "token") for _ in range(3)))
        assert [s.value for s in late] == ["v1"] * 3  # answered from the cache, not waited for
        await asyncio.sleep(0.4)  # the refresh (held 0.3 s) lands
        return store.reads

    assert asyncio.run(scenario()) == 2
    lookups = cache_lookups(metrics)
    assert lookups == {"miss": 1.0, "refresh": 1.0, "hit": 2.0, "shared": 0.0}
