"""User assertions: verifying the JWT that names the end user a call acts for.

The only module that imports PyJWT. It owns the trusted issuers (``BROKER_USER_ISSUERS``), each
issuer's key set (JWKS, fetched from a URL or read from a file, cached, refreshed when a token
names an unknown ``kid`` at most once per ``jwks_refresh_seconds``), and the checks: an
asymmetric algorithm (never ``none`` or HMAC: a public key must not double as a shared secret),
the signature, ``iss``, ``aud``, ``exp`` and ``nbf`` (with a small leeway) and a subject that
is usable as a user id (one policy-subject and secret-path segment). Every failure is one
precise ``AssertionInvalid`` subclass (401); an issuer whose keys cannot be fetched is
``IssuerUnavailable`` (503). Messages name the check that failed, never the token.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from broker import errors
from broker.onbehalf import USER_ID
from broker.ports import VerifiedUser

HEADER = "X-Broker-User-Assertion"
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
LEEWAY_SECONDS = 30  # clock skew tolerated on exp and nbf
MAX_ASSERTION_BYTES = 16_384
MAX_JWKS_BYTES = 1_048_576


@dataclass
class Issuer:
    """One trusted issuer and its cached keys."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    timeout: float = 5.0
    refresh_seconds: float = 60.0  # the least time between two key fetches on unknown kids
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    algs: dict[str, str] = field(default_factory=dict)  # kid -> the alg its JWK declares
    fetched_at: float | None = None  # time.monotonic() of the last fetch attempt
    failed: bool = False  # the last fetch failed: until the next one may run, that is the answer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def parse_issuers(raw: Sequence[Mapping[str, Any]]) -> list[Issuer]:
    """Issuers from the setting; ValueError naming what is wrong."""
    out: list[Issuer] = []
    for n, item in enumerate(raw):
        issuer, audience = item.get("issuer"), item.get("audience")
        url, file = item.get("jwks_url"), item.get("jwks_file")
        if not isinstance(issuer, str) or not issuer or not isinstance(audience, str):
            raise ValueError(f"BROKER_USER_ISSUERS[{n}] needs an issuer and an audience")
        if (url is None) == (file is None):
            raise ValueError(f"BROKER_USER_ISSUERS[{n}] needs exactly one of jwks_url, jwks_file")
        if url is not None and not str(url).startswith(("https://", "http://")):
            raise ValueError(f"BROKER_USER_ISSUERS[{n}].jwks_url must be an http(s) URL")
        out.append(
            Issuer(
                issuer=issuer,
                audience=audience,
                jwks_url=str(url) if url is not None else None,
                jwks_file=Path(file) if file is not None else None,
                timeout=float(item.get("timeout", 5.0)),
                refresh_seconds=float(item.get("jwks_refresh_seconds", 60.0)),
            )
        )
    if len({i.issuer for i in out}) != len(out):
        raise ValueError("BROKER_USER_ISSUERS names an issuer twice")
    return out


class JwtAssertions:
    """The UserAssertions port over PyJWT and the configured issuers."""

    def __init__(self, issuers: Sequence[Issuer]) -> None:
        self._issuers = {i.issuer: i for i in issuers}

    async def verify(self, assertion: str) -> VerifiedUser:
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise errors.AssertionInvalid("the user assertion is empty or too large")
        alg, kid, claimed_issuer = _peek(assertion)
        issuer = self._issuers.get(claimed_issuer)
        if issuer is None:
            raise errors.AssertionIssuerUnknown(
                f"the user assertion's issuer {claimed_issuer[:200]!r} is not trusted"
            )
        kid, key = await self._key(issuer, kid)
        declared = issuer.algs.get(kid)
        if declared is not None and declared != alg:
            raise errors.AssertionInvalid(
                f"the user assertion's algorithm {alg} is not the one its key declares ({declared})"
            )
        claims = _decode(assertion, key, alg, issuer)
        return _user(claims, issuer.issuer)

    async def _key(self, issuer: Issuer, kid: str | None) -> tuple[str, jwt.PyJWK]:
        """The issuer's key named kid; refetch the set (rate-limited) when it is unknown."""
        found = _pick_key(issuer.keys, kid)
        if found is not None:
            return found
        async with issuer.lock:
            found = _pick_key(issuer.keys, kid)  # another call may have refreshed meanwhile
            if found is None and _may_fetch(issuer):
                # Failures count too: an issuer that is down is not asked again on every call.
                issuer.fetched_at, issuer.failed = time.monotonic(), True
                issuer.keys, issuer.algs = await _fetch(issuer)
                issuer.failed = False
                found = _pick_key(issuer.keys, kid)
        if found is None and issuer.failed:
            raise errors.IssuerUnavailable(
                f"the keys of issuer {issuer.issuer!r} could not be fetched; retrying later"
            )
        if found is None:
            raise errors.AssertionKeyUnknown(
                f"issuer {issuer.issuer!r} publishes no key {kid!r}"
                if kid
                else f"the user assertion names no key (kid) and {issuer.issuer!r} has several"
            )
        return found


def _peek(assertion: str) -> tuple[str, str | None, str]:
    """(alg, kid, iss) read before any key is known; only to choose the key and issuer."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise errors.AssertionInvalid("the user assertion is not a well-formed JWT") from None
    alg, kid, iss = header.get("alg"), header.get("kid"), claims.get("iss")
    if alg not in ALLOWED_ALGORITHMS:
        raise errors.AssertionInvalid(
            f"the user assertion's algorithm {str(alg)[:20]!r} is not allowed "
            "(asymmetric signatures only: RS*, PS*, ES*, EdDSA)"
        )
    if kid is not None and not isinstance(kid, str):
        raise errors.AssertionInvalid("the user assertion's kid is not a string")
    if not isinstance(iss, str):
        raise errors.AssertionIssuerUnknown("the user assertion names no issuer (iss)")
    return str(alg), kid, iss


def _decode(assertion: str, key: jwt.PyJWK, alg: str, issuer: Issuer) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            key=key.key,
            algorithms=[alg],
            audience=issuer.audience,
            issuer=issuer.issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise errors.AssertionExpired() from None
    except jwt.ImmatureSignatureError:
        raise errors.AssertionNotYetValid() from None
    except jwt.InvalidAudienceError:
        raise errors.AssertionAudienceMismatch(
            f"the user assertion's audience is not {issuer.audience!r}"
        ) from None
    except jwt.InvalidIssuerError:
        raise errors.AssertionIssuerUnknown() from None
    except jwt.InvalidSignatureError:
        raise errors.AssertionInvalid("the user assertion's signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise errors.AssertionInvalid(f"the user assertion lacks the {exc.claim} claim") from None
    except jwt.PyJWTError as exc:
        # e.g. a key of the wrong type for the algorithm, a malformed claim
        raise errors.AssertionInvalid(
            f"the user assertion is not valid ({type(exc).__name__})"
        ) from None
    return claims


def _user(claims: Mapping[str, Any], issuer: str) -> VerifiedUser:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID.match(sub) or sub in (".", ".."):
        raise errors.AssertionInvalid(
            "the user assertion's subject is not usable as a user id "
            "(1-128 characters of [A-Za-z0-9_.@-], starting with a letter or digit)"
        )
    scope = claims.get("scope", claims.get("scp", ""))
    scopes = scope.split() if isinstance(scope, str) else [str(s) for s in scope or []]
    exp = claims.get("exp")
    return VerifiedUser(
        id=sub,
        issuer=issuer,
        scopes=frozenset(scopes),
        expires_at=int(exp) if isinstance(exp, int | float) else None,
    )


def _pick_key(keys: Mapping[str, jwt.PyJWK], kid: str | None) -> tuple[str, jwt.PyJWK] | None:
    """(kid, key) of the named key; without a kid, the issuer's only key (if it has one)."""
    if kid is not None:
        key = keys.get(kid)
        return (kid, key) if key is not None else None
    return next(iter(keys.items())) if len(keys) == 1 else None


def _may_fetch(issuer: Issuer) -> bool:
    """Unknown kids must not let anyone make the broker hammer the issuer."""
    if issuer.fetched_at is None:
        return True
    return time.monotonic() - issuer.fetched_at >= issuer.refresh_seconds


async def _fetch(issuer: Issuer) -> tuple[dict[str, jwt.PyJWK], dict[str, str]]:
    try:
        raw = await asyncio.wait_for(asyncio.to_thread(_read_jwks, issuer), issuer.timeout + 1)
        data = json.loads(raw)
    except (OSError, TimeoutError, ValueError) as exc:
        raise errors.IssuerUnavailable(
            f"the keys of issuer {issuer.issuer!r} cannot be fetched ({type(exc).__name__})"
        ) from None
    return _parse_jwks(data, issuer.issuer)


def _read_jwks(issuer: Issuer) -> bytes:
    if issuer.jwks_file is not None:
        return issuer.jwks_file.read_bytes()[:MAX_JWKS_BYTES]
    assert issuer.jwks_url is not None
    # No proxies from the environment; the URL is operator configuration.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(issuer.jwks_url, headers={"Accept": "application/json"})  # noqa: S310
    with opener.open(request, timeout=issuer.timeout) as response:
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError("the JWKS document is too large")
    return body


def _parse_jwks(data: Any, issuer: str) -> tuple[dict[str, jwt.PyJWK], dict[str, str]]:
    """(kid -> key, kid -> declared alg) for every usable signing key; symmetric keys and
    keys declaring a disallowed algorithm are ignored."""
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise errors.IssuerUnavailable(f"issuer {issuer!r} published no JWKS key list")
    keys: dict[str, jwt.PyJWK] = {}
    algs: dict[str, str] = {}
    for n, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, Mapping) or jwk.get("kty") == "oct" or jwk.get("use") == "enc":
            continue
        declared = jwk.get("alg")
        if declared is not None and declared not in ALLOWED_ALGORITHMS:
            continue
        try:
            key = jwt.PyJWK(dict(jwk))
        except jwt.PyJWTError:
            continue  # an unusable entry does not spoil the others
        kid = str(jwk.get("kid", f"#{n}"))
        keys[kid] = key
        if declared is not None:
            algs[kid] = str(declared)
    return keys, algs
