"""The SecretStore adapter for Vault / OpenBao KV v2: the only module that imports hvac.

It owns: talking to Vault (through hvac, off the event loop), the per-(mount, path) cache with
its TTL and in-flight read sharing, and the translation of every hvac / requests failure into
``SecretUnavailable`` (one function, ``translate``). It fails closed: whatever goes wrong, the
caller gets ``SecretUnavailable`` naming mount/path/key and a reason category, never a value,
never the token, never an empty credential.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import requests.adapters

from broker.errors import SecretUnavailable
from broker.ports import Metrics, NoMetrics, SecretValue

T = TypeVar("T")

# Reason categories (the end of every SecretUnavailable message).
VAULT_UNREACHABLE = "vault unreachable"
VAULT_TIMEOUT = "vault timed out"
VAULT_SEALED = "vault sealed"
VAULT_UNAVAILABLE = "vault unavailable"
VAULT_UNINITIALIZED = "vault not initialized"
VAULT_RATE_LIMITED = "vault rate limited"
VAULT_ERROR = "vault error"
PERMISSION_DENIED = "permission denied"
NOT_FOUND = "secret not found"
NOT_MOUNTED = "secrets engine not mounted"
DELETED = "secret deleted"
DESTROYED = "secret destroyed"
NO_DATA = "secret has no data"
KEY_MISSING = "key missing"
NOT_A_STRING = "value is not a string"
EMPTY_VALUE = "value is empty"
BAD_RESPONSE = "unexpected response from vault"
BAD_LOCATION = "invalid secret location"
STORE_CLOSED = "secret store closed"
INTERNAL = "internal error"

# hvac's status-code classes -> reason. InvalidPath and VaultDown need a look at the body
# (deleted vs missing, sealed vs other 503) and are handled in _vault_error_reason.
_HVAC_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (hvac.exceptions.Forbidden, PERMISSION_DENIED),
    (hvac.exceptions.Unauthorized, PERMISSION_DENIED),
    (hvac.exceptions.VaultNotInitialized, VAULT_UNINITIALIZED),
    (hvac.exceptions.RateLimitExceeded, VAULT_RATE_LIMITED),
    (hvac.exceptions.BadGateway, VAULT_UNREACHABLE),
)

_POOL_SIZE = 16  # threads (and pooled connections) that may wait on Vault at once
REFRESH_AT = 0.8  # share of the cache TTL after which a hit also refreshes the entry


class _Unusable(Exception):
    """Vault answered, but not with a usable secret; ``reason`` is a category, never data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- translation --------------------------------------------------------------------------


def translate(
    exc: BaseException,
    *,
    mount: str | None = None,
    path: str | None = None,
    key: str | None = None,
) -> SecretUnavailable:
    """Map any failure to SecretUnavailable: the one place foreign errors are translated.

    The message names where (mount/path/key) and a reason category. It never includes the
    foreign exception's text: hvac puts whole response bodies there.
    """
    if isinstance(exc, SecretUnavailable):
        return exc
    try:
        reason = _reason(exc)
    except Exception:  # a malformed foreign exception must not escape translation
        reason = INTERNAL
    if not isinstance(exc, _Unusable):
        reason = f"{reason} ({type(exc).__name__})"
    where = ", ".join(
        f"{name}={value!r}"
        for name, value in (("mount", mount), ("path", path), ("key", key))
        if value is not None
    )
    return SecretUnavailable(
        f"secret unavailable ({where}): {reason}" if where else f"secret unavailable: {reason}"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Unusable):
        return exc.reason
    # requests' ConnectTimeout is both a Timeout and a ConnectionError: call it a timeout.
    if isinstance(exc, TimeoutError | requests.exceptions.Timeout):
        return VAULT_TIMEOUT
    if isinstance(exc, requests.exceptions.RequestException):
        return VAULT_UNREACHABLE
    if isinstance(exc, hvac.exceptions.VaultError):
        return _vault_error_reason(exc)
    return INTERNAL


def _vault_error_reason(exc: hvac.exceptions.VaultError) -> str:
    errors = " ".join(str(e) for e in (getattr(exc, "errors", None) or [])).lower()
    if isinstance(exc, hvac.exceptions.InvalidPath):
        if "no handler for route" in errors:
            return NOT_MOUNTED
        return _deleted_reason(getattr(exc, "json", None)) or NOT_FOUND
    if isinstance(exc, hvac.exceptions.VaultDown):
        return VAULT_SEALED if "sealed" in errors else VAULT_UNAVAILABLE
    for cls, reason in _HVAC_REASONS:
        if isinstance(exc, cls):
            return reason
    return VAULT_ERROR


def _deleted_reason(body: object) -> str | None:
    """KV v2 answers 404 with the version's metadata when that version is deleted/destroyed."""
    if not isinstance(body, Mapping):
        return None
    data = body.get("data")
    meta = data.get("metadata") if isinstance(data, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    if meta.get("destroyed") is True:
        return DESTROYED
    if meta.get("deletion_time"):
        return DELETED
    return None


# --- parsing Vault's answers ----------------------------------------------------------------


def _as_mapping(value: object) -> Mapping[str, Any]:
    # hvac returns a requests.Response instead of a dict for any non-200 success (204, 3xx).
    if not isinstance(value, Mapping):
        raise _Unusable(BAD_RESPONSE)
    return value


def _parse_kv2(answer: object) -> tuple[dict[str, Any], int | None]:
    """A KV v2 read answer -> (data, version); deleted/destroyed/empty versions refused."""
    body = _as_mapping(_as_mapping(answer).get("data"))
    meta = body.get("metadata")
    reason = _deleted_reason({"data": body})
    if reason:
        raise _Unusable(reason)
    data = body.get("data")
    if data is None:
        raise _Unusable(NO_DATA)
    version = meta.get("version") if isinstance(meta, Mapping) else None
    return dict(_as_mapping(data)), version if isinstance(version, int) else None


def _pick(data: Mapping[str, Any], key: str) -> str:
    """The credential under ``key``: a non-empty string, or a refusal."""
    if key not in data:
        raise _Unusable(KEY_MISSING)
    value = data[key]
    if not isinstance(value, str):
        raise _Unusable(NOT_A_STRING)
    if not value:
        raise _Unusable(EMPTY_VALUE)
    return value


def _check_location(*parts: str) -> None:
    """Refuse mount/path shapes that could address something else than the named secret."""
    for part in parts:
        if not isinstance(part, str) or not part:
            raise _Unusable(BAD_LOCATION)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise _Unusable(BAD_LOCATION)
        if any(seg in ("", ".", "..") for seg in part.split("/")):
            raise _Unusable(BAD_LOCATION)


# --- the hvac boundary ----------------------------------------------------------------------


class _Hvac:
    """Typed, minimal wrapper over the hvac client: every hvac call the store makes."""

    def __init__(self, *, url: str, token: str, timeout: float, verify: bool | str) -> None:
        session = requests.Session()
        # No proxies, netrc or CA bundle from the environment: the token goes straight to `url`.
        session.trust_env = False
        session.verify = verify
        pool = requests.adapters.HTTPAdapter(
            pool_maxsize=_POOL_SIZE, max_retries=0, pool_block=False
        )
        session.mount("http://", pool)
        session.mount("https://", pool)
        # url and token always explicit: with token=None hvac would read VAULT_TOKEN or
        # ~/.vault-token. No redirects: X-Vault-Token is a custom header requests would carry
        # along to whatever host a redirect names.
        self._client = hvac.Client(
            url=url,
            token=token,
            verify=verify,
            timeout=timeout,
            session=session,
            allow_redirects=False,
        )

    def read(self, mount: str, path: str) -> object:
        answer: object = self._client.secrets.kv.v2.read_secret_version(
            path=path, mount_point=mount, raise_on_deleted_version=True
        )
        return answer

    def write(self, mount: str, path: str, data: dict[str, str]) -> object:
        answer: object = self._client.secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point=mount
        )
        return answer

    def delete_latest(self, mount: str, path: str) -> None:
        self._client.secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point=mount)

    def metadata(self, mount: str, path: str) -> object:
        answer: object = self._client.secrets.kv.v2.read_secret_metadata(
            path=path, mount_point=mount
        )
        return answer

    def delete_all(self, mount: str, path: str) -> None:
        self._client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=mount)

    def kv_config(self, mount: str) -> None:
        self._client.secrets.kv.v2.read_configuration(mount_point=mount)

    def mounts(self) -> Mapping[str, Any]:
        answer = _as_mapping(self._client.sys.list_mounted_secrets_engines())
        # hvac returns the mounts both at top level and under "data"; prefer "data".
        data = answer.get("data")
        return data if isinstance(data, Mapping) else answer

    def enable_kv2(self, mount: str) -> None:
        self._client.sys.enable_secrets_engine(
            backend_type="kv", path=mount, options={"version": "2"}
        )

    def health(self) -> object:
        # standby_ok: a standby forwards reads to the active node, so it counts as ready.
        answer: object = self._client.sys.read_health_status(method="GET", standby_ok=True)
        return answer

    def close(self) -> None:
        self._client.adapter.close()


# --- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    data: dict[str, Any]
    version: int | None
    expires: float  # time.monotonic() deadline
    refresh: float  # from here on, a read also starts a background refresh


class VaultSecretStore:
    """SecretStore over Vault/OpenBao KV v2 with token auth, a short cache and a hard deadline.

    ``timeout`` bounds one read end to end (hvac's socket timeout and an overall deadline);
    ``cache_ttl`` is how long a (mount, path) read is reused (0 disables the cache).
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        timeout: float = 5.0,
        cache_ttl: float = 30.0,
        verify: bool | str = True,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError(
                "a Vault token is required (an empty one would fall back to VAULT_TOKEN)"
            )
        if not url:
            raise ValueError("a Vault URL is required")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if cache_ttl < 0:
            raise ValueError("cache_ttl must not be negative")
        self._url = url
        self._timeout = timeout
        self._ttl = cache_ttl
        self._hvac = _Hvac(url=url, token=token, timeout=timeout, verify=verify)
        # Our own threads: a hung Vault occupies these, not the loop's default executor.
        self._pool = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="vault")
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[_Entry]] = {}
        self._generation = 0  # bumped by invalidate(): reads begun before it are not cached
        self._closed = False
        self._metrics: Metrics = metrics or NoMetrics()  # cache hits and misses

    def __repr__(self) -> str:  # never the token
        return f"VaultSecretStore(url={self._url!r}, cache_ttl={self._ttl})"

    # --- SecretStore ----------------------------------------------------------------------

    async def read(self, mount: str, path: str, key: str) -> SecretValue:
        """The current value of ``key`` at mount/path; raises SecretUnavailable otherwise."""
        try:
            if self._closed:
                raise _Unusable(STORE_CLOSED)
            entry = await self._entry(mount, path)
            value = _pick(entry.data, key)
        except Exception as exc:
            # from None: the foreign exception's text can hold a whole Vault response body.
            raise translate(exc, mount=mount, path=path, key=key) from None
        return SecretValue(mount=mount, path=path, key=key, value=value, version=entry.version)

    async def ready(self) -> bool:
        """Vault reachable, initialized and unsealed. Never raises."""
        if self._closed:
            return False
        try:
            answer = await self._run(self._hvac.health)
        except Exception:
            return False
        return (
            isinstance(answer, Mapping)
            and answer.get("initialized") is True
            and answer.get("sealed") is False
        )

    async def close(self) -> None:
        """Drop cached secrets and release the connection pool and threads."""
        self._closed = True
        self._cache.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._hvac.close()

    def invalidate(self, mount: str | None = None, path: str | None = None) -> None:
        """Forget cached reads matching mount and/or path (all of them when both are None)."""
        self._generation += 1
        for table in (self._cache, self._inflight):
            for cached in [k for k in table if _matches(k, mount, path)]:
                # An in-flight read stays with its waiters; later readers start a fresh one.
                del table[cached]

    # --- CredentialStore: per-user credentials, written but never read back ---------------

    async def put_credential(
        self, mount: str, path: str, data: Mapping[str, str]
    ) -> dict[str, Any]:
        """Write a new version; its metadata (never the value) comes back."""
        await self._guarded(mount, path, lambda: self.write(mount, path, dict(data)))
        meta = await self.credential_metadata(mount, path)
        if meta is None:  # written, yet gone: someone deleted it in between
            raise translate(_Unusable(NOT_FOUND), mount=mount, path=path)
        return meta

    async def delete_credential(self, mount: str, path: str) -> bool:
        """Delete every version and the metadata: nothing is left to undelete."""
        existed = await self.credential_metadata(mount, path) is not None
        await self._guarded(mount, path, lambda: self._delete_all(mount, path))
        return existed

    async def credential_metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        """``{"exists", "version", "updated"}`` of the current version, or None."""
        try:
            _check_location(mount, path)
            answer = await self._run(lambda: self._hvac.metadata(mount, path))
        except hvac.exceptions.InvalidPath as exc:
            if _vault_error_reason(exc) == NOT_MOUNTED:
                raise translate(exc, mount=mount, path=path) from None
            return None
        except Exception as exc:
            raise translate(exc, mount=mount, path=path) from None
        return _current_metadata(answer)

    async def _guarded(self, mount: str, path: str, fn: Callable[[], object]) -> None:
        if self._closed:
            raise translate(_Unusable(STORE_CLOSED), mount=mount, path=path)
        try:
            await self._run(fn)
        except Exception as exc:
            raise translate(exc, mount=mount, path=path) from None

    def _delete_all(self, mount: str, path: str) -> None:
        try:
            _check_location(mount, path)
            self._hvac.delete_all(mount, path)
        finally:
            self.invalidate(mount, path)

    # --- dev tooling and tests (synchronous) ------------------------------------------------

    def write(self, mount: str, path: str, data: dict[str, str]) -> int:
        """Write a new version of the secret; returns its version number."""
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError("secret data must map strings to strings")
        try:
            _check_location(mount, path)
            answer = self._hvac.write(mount, path, dict(data))
            version = _as_mapping(_as_mapping(answer).get("data")).get("version")
            if not isinstance(version, int):
                raise _Unusable(BAD_RESPONSE)
        except Exception as exc:
            raise translate(exc, mount=mount, path=path) from None
        finally:
            self.invalidate(mount, path)
        return version

    def delete_latest(self, mount: str, path: str) -> None:
        """Soft-delete the latest version (it can be undeleted; reads of it fail)."""
        try:
            _check_location(mount, path)
            self._hvac.delete_latest(mount, path)
        except Exception as exc:
            raise translate(exc, mount=mount, path=path) from None
        finally:
            self.invalidate(mount, path)

    def ensure_kv2(self, mount: str = "secret") -> None:
        """Make sure a KV v2 engine is mounted at ``mount`` (enable it if nothing is there)."""
        try:
            _check_location(mount)
            current = self._hvac.mounts().get(f"{mount}/")
        except Exception as exc:
            raise translate(exc, mount=mount) from None
        if current is not None and not _is_kv2(current):
            # Not upgraded in place: that would rewrite the layout of someone else's data.
            raise ValueError(f"mount {mount!r} exists but is not a KV v2 engine")
        try:
            if current is None:
                self._hvac.enable_kv2(mount)
            self._wait_kv2(mount)
        except Exception as exc:
            raise translate(exc, mount=mount) from None

    # --- internals ------------------------------------------------------------------------

    def _vault_read(self, mount: str, path: str) -> tuple[dict[str, Any], int | None]:
        """One KV v2 read, in a worker thread (the seam tests use to count Vault reads)."""
        return _parse_kv2(self._hvac.read(mount, path))

    async def _entry(self, mount: str, path: str) -> _Entry:
        """The cached entry if fresh, else the result of the (shared) read in flight."""
        slot = (mount, path)
        cached = self._cache.get(slot)
        now = time.monotonic()
        if cached is not None and cached.expires > now:
            refreshing = False
            if cached.refresh <= now:
                # Refresh ahead of expiry so steady traffic never waits for Vault.
                refreshing = self._start_load(mount, path)[1]
            # "refresh": a hit that also started the one background read (a Vault request
            # that no call waits for); the metric tells those apart from misses.
            self._metrics.secret_cache("refresh" if refreshing else "hit")
            return cached
        # Checked on a miss only: whatever is cached was read from a location that passed.
        _check_location(mount, path)
        pending, started = self._start_load(mount, path)
        self._metrics.secret_cache("miss" if started else "shared")
        # shield: one caller giving up must not cancel the read the others are waiting on.
        return await asyncio.shield(pending)

    def _start_load(self, mount: str, path: str) -> tuple[asyncio.Future[_Entry], bool]:
        """The read in flight for this slot, started if there is none (one read per key)."""
        slot = (mount, path)
        loop = asyncio.get_running_loop()
        pending = self._inflight.get(slot)
        if pending is not None and pending.get_loop() is loop:
            return pending, False
        pending = loop.create_task(self._load(mount, path))
        self._inflight[slot] = pending
        pending.add_done_callback(lambda done: self._forget(slot, done))
        return pending, True

    async def _load(self, mount: str, path: str) -> _Entry:
        generation = self._generation
        try:
            data, version = await self._run(lambda: self._vault_read(mount, path))
        except BaseException:
            # Never serve a stale entry after a failure, and do not keep it in memory.
            self._cache.pop((mount, path), None)
            raise
        now = time.monotonic()
        entry = _Entry(data, version, now + self._ttl, now + self._ttl * REFRESH_AT)
        if self._ttl > 0 and generation == self._generation:
            self._cache[(mount, path)] = entry
        return entry

    async def _run(self, fn: Callable[[], T]) -> T:
        """fn() in our thread pool (hvac blocks), under the total deadline."""
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._pool, fn), self._timeout)

    def _forget(self, slot: tuple[str, str], done: asyncio.Future[_Entry]) -> None:
        if self._inflight.get(slot) is done:
            del self._inflight[slot]
        # Retrieve the outcome so a read nobody awaits anymore is not reported as unhandled.
        if not done.cancelled():
            done.exception()

    def _wait_kv2(self, mount: str) -> None:
        # A fresh KV v2 mount upgrades its storage first; its config answers once usable.
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                self._hvac.kv_config(mount)
                return
            except hvac.exceptions.VaultError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)


def _current_metadata(answer: object) -> dict[str, Any] | None:
    """The current version's metadata from a KV v2 metadata answer; None if it is unusable."""
    data = _as_mapping(_as_mapping(answer).get("data"))
    version = data.get("current_version")
    versions = data.get("versions")
    current = versions.get(str(version)) if isinstance(versions, Mapping) else None
    if not isinstance(version, int) or version < 1 or not isinstance(current, Mapping):
        return None
    if current.get("destroyed") is True or current.get("deletion_time"):
        return None
    return {"exists": True, "version": version, "updated": current.get("created_time")}


def _matches(slot: tuple[str, str], mount: str | None, path: str | None) -> bool:
    return (mount is None or slot[0] == mount) and (path is None or slot[1] == path)


def _is_kv2(mount_info: object) -> bool:
    if not isinstance(mount_info, Mapping) or mount_info.get("type") != "kv":
        return False
    options = mount_info.get("options")
    return isinstance(options, Mapping) and str(options.get("version")) == "2"
