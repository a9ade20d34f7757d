"""Shared fixtures live in tests/support/*; each module there is a pytest plugin."""

from __future__ import annotations

pytest_plugins = [
    "tests.support.network",
    "tests.support.openbao",
    "tests.support.upstreams",
    "tests.support.brokers",
]
