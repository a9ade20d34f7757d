"""capbroker: a secrets and capability broker for agent tools.

This package's top level is the SDK surface only (no server imports): ``BrokerClient``, the
wire models and the error classes. The server lives in the submodules (``broker.api``, ...).
"""

from __future__ import annotations

from broker import models
from broker.client import AsyncBrokerClient, BrokerClient, new_idempotency_key
from broker.errors import (
    AssertionInvalid,
    AssertionRequired,
    AuditUnavailable,
    BrokerError,
    BudgetExhausted,
    CapabilityNotFound,
    Conflict,
    CredentialRequired,
    DelegationRequired,
    EgressDenied,
    Forbidden,
    InvalidArguments,
    InvalidManifest,
    InvalidRequest,
    NotFound,
    PolicyDenied,
    RateLimited,
    RequestTooLarge,
    SecretUnavailable,
    StorageUnavailable,
    Unauthenticated,
    Unavailable,
    Unprocessable,
    UpstreamError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)

__all__ = [
    "AssertionInvalid",
    "AssertionRequired",
    "AsyncBrokerClient",
    "AuditUnavailable",
    "BrokerClient",
    "BrokerError",
    "BudgetExhausted",
    "CapabilityNotFound",
    "Conflict",
    "CredentialRequired",
    "DelegationRequired",
    "EgressDenied",
    "Forbidden",
    "InvalidArguments",
    "InvalidManifest",
    "InvalidRequest",
    "NotFound",
    "PolicyDenied",
    "RateLimited",
    "RequestTooLarge",
    "SecretUnavailable",
    "StorageUnavailable",
    "Unauthenticated",
    "Unavailable",
    "Unprocessable",
    "UpstreamError",
    "UpstreamResponseTooLarge",
    "UpstreamTimeout",
    "models",
    "new_idempotency_key",
]
__version__ = "0.1.0"
