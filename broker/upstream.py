"""The outgoing HTTP call: egress rules, no redirects, one total deadline, a response size cap.

This is the only module that imports aiohttp. It owns Invariant 5 on the network side (the
destination address is checked, then pinned, so DNS cannot be rebound between check and
connect) and Invariant 8 for upstream calls (deadline and size). Every aiohttp or socket
failure becomes a BrokerError in ``translate``; its messages name the host, never the path,
query or headers, which may carry secrets.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from broker.errors import (
    BrokerError,
    EgressDenied,
    UpstreamError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)
from broker.ports import NoTracer, OutgoingRequest, Tracer, UpstreamResponse

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CHUNK_SIZE = 64 * 1024
LITERAL_CACHE_SIZE = 4096
# Shared address space (RFC 6598): carrier NAT, often reaches internal infrastructure.
CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
# Well-known NAT64 prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Encodings aiohttp decodes itself; the body we return is then no longer encoded.
DECODED_ENCODINGS = {"gzip", "deflate", "br", "zstd"}
# W3C trace context: only the broker sets these (its own span), never the manifest or agent.
TRACE_HEADERS = {"traceparent", "tracestate"}


@dataclass(frozen=True)
class _Pinned:
    """The addresses send() checked for one host; the only ones the connector may use."""

    host: str
    addresses: tuple[IPAddress, ...]


_PINNED: contextvars.ContextVar[_Pinned | None] = contextvars.ContextVar(
    "broker_upstream_pinned", default=None
)


class _PinnedResolver(AbstractResolver):
    """Hands aiohttp the checked addresses instead of asking DNS a second time."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pinned = _PINNED.get()
        if pinned is None or _normalise_host(host) != pinned.host:
            # Fail closed: an address nobody checked is never connected to.
            raise OSError(f"no checked address for {host}")
        results = [
            _resolve_result(host, addr, port)
            for addr in pinned.addresses
            if family in (socket.AF_UNSPEC, _family(addr))
        ]
        if not results:
            raise OSError(f"no checked address of the requested family for {host}")
        return results

    async def close(self) -> None:
        return None


def _resolve_result(host: str, addr: IPAddress, port: int) -> ResolveResult:
    return ResolveResult(
        hostname=host,
        host=str(addr),
        port=port,
        family=_family(addr),
        proto=socket.IPPROTO_TCP,
        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    )


def _family(addr: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _normalise_host(host: str) -> str:
    return host.rstrip(".").lower()


class HttpUpstream:
    """Upstream port over aiohttp: one pooled session per broker, created in the running loop."""

    def __init__(
        self,
        *,
        egress_allow: Sequence[str] = (),
        pool_size: int = 100,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer: Tracer = tracer or NoTracer()
        self._allow: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr.strip(), strict=False) for cidr in egress_allow
        )
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resolver = _PinnedResolver()
        # An address literal's verdict never changes (the allow list is fixed): checked once.
        self._literals: dict[str, _Pinned] = {}

    async def send(
        self, request: OutgoingRequest, *, timeout: float, max_bytes: int
    ) -> UpstreamResponse:
        """Send once, follow no redirect; raises EgressDenied, UpstreamTimeout, UpstreamError."""
        host = ""
        try:
            # encoded=True: the path is sent exactly as rendered, never re-encoded or normalised.
            url = URL(request.url, encoded=True)
            host = url.raw_host or ""
            async with asyncio.timeout(timeout):
                pinned = await self._check_destination(url)
                token = _PINNED.set(pinned)
                try:
                    return await self._exchange(request, url, max_bytes)
                finally:
                    _PINNED.reset(token)
        except BrokerError:
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # OSError covers TimeoutError (ours and aiohttp's) and raw socket/TLS errors.
            raise translate(exc, host) from None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- egress ---------------------------------------------------------------------------

    async def _check_destination(self, url: URL) -> _Pinned:
        host = _normalise_host(url.raw_host or "")
        if not host or url.port is None:
            raise UpstreamError("the upstream URL has no host or port")
        pinned = self._literals.get(host)
        if pinned is not None:
            return pinned
        addresses = _ip_literal(host)
        literal = addresses is not None
        if addresses is None:
            addresses = await _lookup(host, url.port)  # every call: DNS answers change
        for addr in addresses:
            reason = self._refusal(addr)
            if reason:
                raise EgressDenied(f"egress to upstream {host} denied: {addr} is {reason} address")
        pinned = _Pinned(host, addresses)
        if literal and len(self._literals) < LITERAL_CACHE_SIZE:
            self._literals[host] = pinned
        return pinned

    def _refusal(self, addr: IPAddress) -> str | None:
        """Why this address may not be reached, or None when it may."""
        effective = _unmapped(addr)
        if any(effective in net for net in self._allow if net.version == effective.version):
            return None
        return non_public_reason(effective)

    # --- the exchange ---------------------------------------------------------------------

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is not loop and not self._session.closed:
            # aiohttp sessions cannot cross event loops; fail loudly rather than hang.
            raise RuntimeError("HttpUpstream is bound to the event loop that first used it")
        if self._session is None or self._session.closed:
            self._loop = loop
            connector = aiohttp.TCPConnector(
                limit=self._pool_size,
                use_dns_cache=False,
                ttl_dns_cache=0,
                resolver=self._resolver,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # upstream cookies must not leak across agents
                trust_env=False,  # a proxy from the environment would move the destination
                auto_decompress=True,
            )
        return self._session

    async def _exchange(
        self, request: OutgoingRequest, url: URL, max_bytes: int
    ) -> UpstreamResponse:
        session = self._session_for_loop()
        async with session.request(
            request.method,
            url,
            headers=self._headers(request),
            data=request.body,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None),  # the caller's asyncio.timeout rules
        ) as resp:
            decoded = resp.headers.get("Content-Encoding", "").strip().lower() in DECODED_ENCODINGS
            if not decoded and request.method != "HEAD":
                _refuse_declared_length(resp, url, max_bytes)
            body = await _read_capped(resp, url, max_bytes)
            return UpstreamResponse(
                status=resp.status, headers=_response_headers(resp, decoded), body=body
            )

    def _headers(self, request: OutgoingRequest) -> list[tuple[str, str]]:
        """The rendered headers plus the ``traceparent`` of the current (upstream) span."""
        headers = [(k, v) for k, v in request.headers if k.lower() not in TRACE_HEADERS]
        trace: dict[str, str] = {}
        self._tracer.inject(trace)
        return headers + list(trace.items())


def _refuse_declared_length(resp: aiohttp.ClientResponse, url: URL, max_bytes: int) -> None:
    length = resp.content_length
    if length is not None and length > max_bytes:
        resp.close()
        raise UpstreamResponseTooLarge(
            f"upstream {url.raw_host} announced {length} bytes (limit {max_bytes})"
        )


async def _read_capped(resp: aiohttp.ClientResponse, url: URL, max_bytes: int) -> bytes:
    # Read at most one byte past the cap: enough to know it is too large, never more.
    chunks: list[bytes] = []
    total = 0
    while chunk := await resp.content.read(min(CHUNK_SIZE, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            resp.close()
            raise UpstreamResponseTooLarge(
                f"upstream {url.raw_host} sent more than {max_bytes} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _response_headers(resp: aiohttp.ClientResponse, decoded: bool) -> tuple[tuple[str, str], ...]:
    # Once aiohttp has decoded the body, its encoding and length headers describe other bytes.
    dropped = {"content-encoding", "content-length"} if decoded else set()
    return tuple((k, v) for k, v in resp.headers.items() if k.lower() not in dropped)


# --- addresses ----------------------------------------------------------------------------


def _ip_literal(host: str) -> tuple[IPAddress, ...] | None:
    try:
        return (ipaddress.ip_address(host.strip("[]")),)
    except ValueError:
        return None


async def _lookup(host: str, port: int) -> tuple[IPAddress, ...]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UpstreamError(f"could not resolve upstream host {host}") from None
    addresses: dict[IPAddress, None] = {}
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            addresses[ipaddress.ip_address(sockaddr[0])] = None
    if not addresses:
        raise UpstreamError(f"could not resolve upstream host {host}")
    return tuple(addresses)


def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a transition mechanism (6to4, Teredo, NAT64) would deliver to."""
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def non_public_reason(addr: IPAddress) -> str | None:
    """A word for why an address is not on the public internet, or None when it is."""
    addr = _unmapped(addr)
    checks = (
        ("an unspecified", addr.is_unspecified),
        ("a loopback", addr.is_loopback),
        ("a link-local", addr.is_link_local),
        ("a multicast", addr.is_multicast),
        ("a private", addr.is_private),
        ("a shared (CGNAT)", isinstance(addr, ipaddress.IPv4Address) and addr in CGNAT),
        ("a reserved", addr.is_reserved or not addr.is_global),
    )
    for word, hit in checks:
        if hit:
            return word
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None and non_public_reason(inner):
            return "a tunnelled non-public"
    return None


# --- errors -------------------------------------------------------------------------------

_TLS_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientSSLError,
    aiohttp.ServerFingerprintMismatch,
    ssl.SSLError,
    ssl.CertificateError,
)
# First match wins; ClientError at the end makes the table total over aiohttp's exceptions.
_TRANSLATIONS: tuple[tuple[tuple[type[BaseException], ...], type[BrokerError], str], ...] = (
    ((TimeoutError,), UpstreamTimeout, "upstream {host} did not answer within the deadline"),
    (_TLS_ERRORS, UpstreamError, "TLS with upstream {host} failed"),
    ((aiohttp.ClientConnectorDNSError,), UpstreamError, "could not resolve upstream host {host}"),
    ((aiohttp.ClientConnectorError,), UpstreamError, "could not connect to upstream {host}"),
    ((aiohttp.ServerDisconnectedError,), UpstreamError, "upstream {host} closed the connection"),
    (
        (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError),
        UpstreamError,
        "the URL for upstream {host} is not valid",
    ),
    (
        (aiohttp.ClientPayloadError, aiohttp.ClientResponseError),
        UpstreamError,
        "upstream {host} sent an invalid response",
    ),
    (
        (aiohttp.ClientConnectionError, OSError),
        UpstreamError,
        "the connection to upstream {host} failed",
    ),
    ((aiohttp.ClientError,), UpstreamError, "the call to upstream {host} failed"),
)


def translate(exc: BaseException, host: str | None = None) -> BrokerError:
    """The BrokerError for a failed upstream call.

    Never uses the exception's own text: aiohttp puts the full URL (path and query, which may
    hold secrets) into many of its messages.
    """
    if isinstance(exc, BrokerError):
        return exc
    where = host or "(unknown host)"
    for classes, error, message in _TRANSLATIONS:
        if isinstance(exc, classes):
            err = error(message.format(host=where))
            err.transient = _transient(exc)
            return err
    return UpstreamError(f"the call to upstream {where} failed")


def _transient(exc: BaseException) -> bool:
    """A refused, reset or dropped connection or a timeout may pass on another try; a TLS
    failure, a bad URL or a malformed answer will not."""
    connection = isinstance(exc, aiohttp.ClientConnectionError | OSError)
    return connection and not isinstance(exc, _TLS_ERRORS)
