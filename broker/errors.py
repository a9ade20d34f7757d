"""The whole BrokerError tree: one class per machine code, each with its HTTP status.

Every refusal the broker makes is one of these, rendered by one handler as
``{"error": {"code", "message", "call_id"}}``; the SDK maps the code back to the class.
Foreign exceptions (hvac, SQLAlchemy, aiohttp, casbin) are translated once, at their adapter.

    BrokerError (500 internal_error)
    ├── InvalidRequest (400 invalid_request)
    │   └── InvalidIdempotencyKey (400 invalid_idempotency_key)
    ├── Unauthenticated (401 unauthenticated)
    │   ├── AssertionRequired (401 assertion_required)
    │   └── AssertionInvalid (401 assertion_invalid)
    │       ├── AssertionExpired (401 assertion_expired)
    │       ├── AssertionNotYetValid (401 assertion_not_yet_valid)
    │       ├── AssertionIssuerUnknown (401 assertion_issuer_unknown)
    │       ├── AssertionAudienceMismatch (401 assertion_audience_mismatch)
    │       └── AssertionKeyUnknown (401 assertion_key_unknown)
    ├── BudgetExhausted (402 budget_exhausted)
    ├── Forbidden (403 forbidden)
    │   ├── PolicyDenied (403 policy_denied)
    │   │   └── DelegationRequired (403 delegation_required)
    │   ├── EgressDenied (403 egress_denied)
    │   └── ApprovalMismatch (403 approval_mismatch)
    ├── NotFound (404 not_found)
    │   ├── CapabilityNotFound (404 capability_not_found)
    │   ├── ApprovalNotFound (404 approval_not_found)
    │   └── CallNotFound (404 call_not_found)
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── Conflict (409 conflict)
    │   ├── IdempotencyInFlight (409 idempotency_in_flight)
    │   ├── ApprovalUsed (409 approval_used)
    │   ├── ApprovalDenied (409 approval_denied)
    │   ├── ApprovalExpired (409 approval_expired)
    │   ├── CapabilityChanged (409 capability_changed)
    │   └── CallCancelled (409 call_cancelled)
    ├── RequestTooLarge (413 request_too_large)
    ├── Unprocessable (422 unprocessable)
    │   ├── InvalidArguments (422 invalid_arguments)
    │   ├── InvalidManifest (422 invalid_manifest)
    │   └── IdempotencyKeyReused (422 idempotency_key_reused)
    ├── CredentialRequired (428 credential_required)
    ├── RateLimited (429 rate_limited)
    ├── UpstreamError (502 upstream_error)
    │   ├── UpstreamResponseTooLarge (502 upstream_response_too_large)
    │   └── OutcomeUnknown (502 outcome_unknown)
    ├── Unavailable (503 unavailable)
    │   ├── AuditUnavailable (503 audit_unavailable)
    │   ├── IssuerUnavailable (503 issuer_unavailable)
    │   ├── SecretUnavailable (503 secret_unavailable)
    │   ├── StorageUnavailable (503 storage_unavailable)
    │   └── UpstreamUnavailable (503 upstream_unavailable)
    └── UpstreamTimeout (504 upstream_timeout)
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    """Base of every error the broker reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal error"
    # May pass if tried again (a dropped connection, a timeout): retries.py and breaker.py
    # read it; upstream.translate sets it on connection failures.
    transient: bool = False

    def __init__(
        self,
        message: str | None = None,
        *,
        call_id: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.call_id = call_id
        self.headers = headers or {}
        self.details = details or {}
        self.audited = False  # set once the refusal is in the audit log
        self.http_status = self.status  # what the server answered (the SDK sets it)
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "call_id": self.call_id}
        body.update(self.details)
        return {"error": body}


class InvalidRequest(BrokerError):
    status, code, default_message = 400, "invalid_request", "the request is malformed"


class InvalidIdempotencyKey(InvalidRequest):
    code, default_message = "invalid_idempotency_key", "the Idempotency-Key header is malformed"


class Unauthenticated(BrokerError):
    status, code, default_message = 401, "unauthenticated", "a valid broker token is required"


class AssertionRequired(Unauthenticated):
    code = "assertion_required"
    default_message = "this capability acts for a user: send X-Broker-User-Assertion"


class AssertionInvalid(Unauthenticated):
    """The user assertion (X-Broker-User-Assertion) could not be verified."""

    code, default_message = "assertion_invalid", "the user assertion is not valid"


class AssertionExpired(AssertionInvalid):
    code, default_message = "assertion_expired", "the user assertion has expired"


class AssertionNotYetValid(AssertionInvalid):
    code, default_message = "assertion_not_yet_valid", "the user assertion is not valid yet"


class AssertionIssuerUnknown(AssertionInvalid):
    code, default_message = "assertion_issuer_unknown", "the user assertion's issuer is not trusted"


class AssertionAudienceMismatch(AssertionInvalid):
    code = "assertion_audience_mismatch"
    default_message = "the user assertion is not meant for this broker"


class AssertionKeyUnknown(AssertionInvalid):
    code = "assertion_key_unknown"
    default_message = "the user assertion is signed with a key its issuer does not publish"


class BudgetExhausted(BrokerError):
    status, code, default_message = 402, "budget_exhausted", "the budget is exhausted"


class Forbidden(BrokerError):
    status, code, default_message = 403, "forbidden", "not allowed"


class PolicyDenied(Forbidden):
    code, default_message = "policy_denied", "the policy does not allow this call"


class DelegationRequired(PolicyDenied):
    code = "delegation_required"
    default_message = "the user has not delegated this capability to this agent"


class EgressDenied(Forbidden):
    code, default_message = "egress_denied", "the upstream address is not allowed"


class ApprovalMismatch(Forbidden):
    code = "approval_mismatch"
    default_message = "the approval was given for another agent, capability or arguments"


class NotFound(BrokerError):
    status, code, default_message = 404, "not_found", "not found"


class CapabilityNotFound(NotFound):
    code, default_message = "capability_not_found", "no such capability"


class ApprovalNotFound(NotFound):
    code, default_message = "approval_not_found", "no such approval"


class CallNotFound(NotFound):
    code, default_message = "call_not_found", "no such call"


class MethodNotAllowed(BrokerError):
    status, code, default_message = 405, "method_not_allowed", "method not allowed here"


class Conflict(BrokerError):
    status, code, default_message = 409, "conflict", "conflict with the current state"


class IdempotencyInFlight(Conflict):
    code = "idempotency_in_flight"
    default_message = "a call with this Idempotency-Key is still in flight"


class ApprovalUsed(Conflict):
    code, default_message = "approval_used", "the approval was already given and used"


class ApprovalDenied(Conflict):
    code, default_message = "approval_denied", "the approval was denied or cancelled"


class ApprovalExpired(Conflict):
    code, default_message = "approval_expired", "the approval expired before a decision"


class CapabilityChanged(Conflict):
    code = "capability_changed"
    default_message = "the capability changed since the call was accepted; nothing executed"


class CallCancelled(Conflict):
    code, default_message = "call_cancelled", "the call was cancelled (its agent was disabled)"


class RequestTooLarge(BrokerError):
    status, code, default_message = 413, "request_too_large", "the request body is too large"


class Unprocessable(BrokerError):
    status, code, default_message = 422, "unprocessable", "the request cannot be processed"


class InvalidArguments(Unprocessable):
    code, default_message = "invalid_arguments", "the arguments do not match the capability"


class InvalidManifest(Unprocessable):
    code, default_message = "invalid_manifest", "the capability manifest is invalid"


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency_key_reused"
    default_message = "this Idempotency-Key was used with other arguments"


class CredentialRequired(BrokerError):
    """A per-user credential the capability needs is not connected (the agent can ask for it)."""

    status, code = 428, "credential_required"
    default_message = "the user has not connected a credential this capability needs"


class RateLimited(BrokerError):
    status, code, default_message = 429, "rate_limited", "too many calls"


class UpstreamError(BrokerError):
    status, code, default_message = 502, "upstream_error", "the upstream call failed"


class UpstreamResponseTooLarge(UpstreamError):
    code, default_message = "upstream_response_too_large", "the upstream response is too large"


class OutcomeUnknown(UpstreamError):
    code = "outcome_unknown"
    default_message = "the call was interrupted; whether the upstream acted is unknown"


class Unavailable(BrokerError):
    status, code, default_message = 503, "unavailable", "temporarily unavailable"


class AuditUnavailable(Unavailable):
    code, default_message = "audit_unavailable", "the audit log cannot be written; nothing executed"


class IssuerUnavailable(Unavailable):
    code = "issuer_unavailable"
    default_message = "the user assertion's issuer keys cannot be fetched"


class SecretUnavailable(Unavailable):
    code, default_message = "secret_unavailable", "a required secret is unavailable"


class StorageUnavailable(Unavailable):
    code, default_message = "storage_unavailable", "the broker's storage is unavailable"


class UpstreamUnavailable(Unavailable):
    code = "upstream_unavailable"
    default_message = "the upstream is failing; its circuit breaker is open"


class UpstreamTimeout(BrokerError):
    status, code, default_message = 504, "upstream_timeout", "the upstream call hit its deadline"
    transient = True


def all_error_classes() -> list[type[BrokerError]]:
    """Every class of the tree, the base included (for the SDK's code table and tests)."""
    seen: list[type[BrokerError]] = []
    stack: list[type[BrokerError]] = [BrokerError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def error_class_for(code: str) -> type[BrokerError]:
    """Map a machine code back to its class (unknown codes map to the base)."""
    for cls in all_error_classes():
        if cls.code == code:
            return cls
    return BrokerError
