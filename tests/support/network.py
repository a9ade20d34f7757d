"""The whole suite talks to loopback only: any connect() elsewhere is refused and fails the test.

Autouse for every test (registered in tests/conftest.py). Unix sockets are local and allowed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Refuse and record every connect() to a non-loopback address made during the test."""
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def allowed(address: Any) -> bool:
        if isinstance(address, str | bytes):
            return True  # AF_UNIX
        host = address[0] if isinstance(address, tuple) else None
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed(address):
            attempts.append(address)
            raise ConnectionRefusedError("test guard: non-loopback connect refused")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed(address):
            attempts.append(address)
            return 111
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert attempts == [], f"non-loopback connection attempted: {attempts}"
