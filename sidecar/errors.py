"""One error hierarchy for the whole gateway.

Every error a client can see is a :class:`SidecarError`. Each class knows its HTTP status,
its gRPC status code (by name, so this module does not import grpc), the OpenAI error
``type``/``code`` it is reported as, and whether the routing loop may try another target::

    SidecarError
    ├── InvalidRequest          400  INVALID_ARGUMENT   (malformed JSON, wrong types, bad values)
    ├── Unauthenticated         401  UNAUTHENTICATED
    ├── ModelNotFound           404  NOT_FOUND
    ├── PayloadTooLarge         413  INVALID_ARGUMENT
    ├── RateLimited             429  RESOURCE_EXHAUSTED (retry_after_s when known)
    ├── Unavailable             503  UNAVAILABLE        (overloaded, draining, no healthy target)
    ├── DeadlineExceeded        504  DEADLINE_EXCEEDED
    ├── AllTargetsFailed        502  UNAVAILABLE        (wraps the last upstream failure)
    └── UpstreamError                                   (raised by providers, translated once
        │                                                where the HTTP response arrives)
        ├── UpstreamUnreachable 502  retryable  connect refused/reset, protocol errors
        ├── UpstreamTimeout     504  retryable  no answer within the attempt's time
        │   └── CutAttempt      504  retryable  no answer within its share of the deadline
        ├── UpstreamRateLimited 429  retryable  carries Retry-After
        ├── UpstreamServerError 502  retryable  5xx
        ├── UpstreamMalformed   502  retryable  a body that is not the promised wire format
        ├── UpstreamAuthFailed  502  retryable  the provider refused the sidecar's own
        │                                        credentials (401/403): the gateway's fault,
        │                                        a health failure, never retried on it
        ├── UpstreamRejected    4xx  final      the provider refused the request itself
        │                                        (400/404/422...): returned to the client
        ├── UpstreamUnsupported 400  next target  this provider cannot express the request
        │                                        (e.g. audio parts for Anthropic); not a
        │                                        health failure; 400 if no target can
        ├── UpstreamOverloaded  503  next target  a local model's queue is full; not a
        │                                        health failure; carries Retry-After
        │   └── LocalTooSlow    503  next target  its queue and speed miss the deadline
        ├── TargetLimited       429  next target  our own outbound limit for the provider
        │   └── RetryAfterHeld  429  next target  an earlier 429's Retry-After still holds it
        ├── BudgetExhausted     429  next target  a budget cannot pay for a paid target
        │                                        (on_exhausted = "local"); free ones serve
        └── LedgerDown          503  next target  the ledger is unreachable (fail closed)

Messages never contain secrets or stack traces: they are written for the client.

``should_retry`` says whether the client may usefully send the same request again; it is
sent as ``x-should-retry`` (which the OpenAI and Anthropic SDKs obey instead of their own
status rules) on every error response, and as gRPC trailing metadata. Retrying helps when
the condition passes (rate limits, overload, draining, open circuits);
it cannot when the request is bad, or the sidecar already tried every target within the
client's deadline (502, 504): the SDK's retries would only stretch the deadline.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error a client can receive."""

    status: int = 500
    grpc_code: str = "INTERNAL"
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False
    should_retry: bool = False
    """Whether the client may usefully retry (``x-should-retry``); see the module doc."""

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class InvalidRequest(SidecarError):
    status = 400
    grpc_code = "INVALID_ARGUMENT"
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthenticated(SidecarError):
    status = 401
    grpc_code = "UNAUTHENTICATED"
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(SidecarError):
    status = 404
    grpc_code = "NOT_FOUND"
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(SidecarError):
    status = 413
    grpc_code = "INVALID_ARGUMENT"
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(SidecarError):
    status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    should_retry = True


class BudgetRejected(RateLimited):
    """A budget with ``on_exhausted = "reject"`` is used up."""

    type = "insufficient_quota"
    code = "budget_exhausted"
    should_retry = False  # not before the window resets, which may be hours away


class Unavailable(SidecarError):
    status = 503
    grpc_code = "UNAVAILABLE"
    type = "server_error"
    code = "unavailable"
    should_retry = True


class DeadlineExceeded(SidecarError):
    status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    type = "timeout_error"
    code = "deadline_exceeded"


class AllTargetsFailed(SidecarError):
    status = 502
    grpc_code = "UNAVAILABLE"
    type = "upstream_error"
    code = "all_targets_failed"


class UpstreamError(SidecarError):
    """A failure of one provider call. ``target`` names the provider/model that failed.

    ``counts_against_health`` False: the target was skipped for a reason that says nothing
    about its health (nothing was sent, or it is only busy): the next target is tried at
    once, without retries or a circuit verdict."""

    type = "upstream_error"
    status = 502
    grpc_code = "UNAVAILABLE"
    counts_against_health = True
    route_reason = "upstream_error"
    """What ``x-sidecar-route-reason`` says when this failure moved a request on
    (``fallback:<route_reason>``)."""
    retry_same_target = True
    """Whether a retry on the same target (backoff, route ``retries``) may help."""

    def __init__(
        self,
        message: str,
        *,
        target: str = "",
        status: int | None = None,
        retry_after_s: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, retry_after_s=retry_after_s)
        self.target = target
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class UpstreamUnreachable(UpstreamError):
    retryable = True
    code = "upstream_unreachable"
    route_reason = "unreachable"


class UpstreamTimeout(UpstreamError):
    retryable = True
    status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    code = "upstream_timeout"
    route_reason = "timeout"


class CutAttempt(UpstreamTimeout):
    """An attempt abandoned at the end of its share of the request deadline (other targets
    were left to try): a health failure of its target, not retried on it."""

    retry_same_target = False


class UpstreamRateLimited(UpstreamError):
    retryable = True
    status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    type = "rate_limit_error"
    code = "upstream_rate_limited"
    route_reason = "upstream_429"
    should_retry = True


class UpstreamServerError(UpstreamError):
    retryable = True
    code = "upstream_5xx"
    route_reason = "upstream_5xx"


class UpstreamMalformed(UpstreamError):
    retryable = True
    code = "upstream_malformed"
    route_reason = "malformed"


class UpstreamAuthFailed(UpstreamError):
    """The provider refused the sidecar's credentials (401/403: a revoked or mistyped
    provider key). The client's request and key are not at fault: it counts against the
    target, the next target is tried (never this one again for the request), and it reaches
    the client as a 502 naming the provider, never as ``invalid_api_key``."""

    retryable = True
    retry_same_target = False
    code = "upstream_auth_failed"
    route_reason = "upstream_auth"


class UpstreamRejected(UpstreamError):
    """The provider refused the request itself; retrying elsewhere would not help."""

    retryable = False
    type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"


class UpstreamUnsupported(UpstreamError):
    """The adapter cannot translate the request for this provider; another target may.

    Raised before anything is sent, so it says nothing about the provider's health.
    """

    retryable = True
    counts_against_health = False
    status = 400
    type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"
    code = "unsupported_by_target"
    route_reason = "unsupported"


class UpstreamOverloaded(UpstreamError):
    """The target is healthy but has no room now (a local model's queue is full)."""

    retryable = True
    counts_against_health = False
    status = 503
    code = "overloaded"
    route_reason = "overloaded"
    should_retry = True


class LocalTooSlow(UpstreamOverloaded):
    """A local model's queue and measured speed say it cannot answer before the request's
    deadline; it is skipped rather than tried (503 when no target is left)."""

    code = "local_too_slow"
    route_reason = "deadline"


class TargetLimited(UpstreamRateLimited):
    """The sidecar's own outbound limit for this provider is reached (configured rpm/tpm,
    or the provider said so earlier); nothing was sent."""

    counts_against_health = False
    code = "target_rate_limited"
    route_reason = "rate_limit"


class RetryAfterHeld(TargetLimited):
    """An earlier 429's Retry-After still holds this target (its circuit may be closed);
    nothing was sent. 429 with the wait when it is the only reason nothing served."""

    code = "upstream_rate_limited"
    route_reason = "upstream_429"


class BudgetExhausted(UpstreamError):
    """A budget with ``on_exhausted = "local"`` cannot pay for this paid target; free and
    local targets still serve. 429 with the window's reset time when none is left."""

    retryable = True
    counts_against_health = False
    status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    type = "insufficient_quota"
    code = "budget_exhausted"
    route_reason = "budget"


class LedgerDown(UpstreamError):
    """The budget ledger cannot be reached and budgets fail closed: paid targets are
    skipped (free and local ones still serve); 503 when none is left."""

    retryable = True
    counts_against_health = False
    status = 503
    code = "ledger_unavailable"
    route_reason = "ledger"
    should_retry = True


_GRPC_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
}


def rejected(status: int, message: str, *, target: str, code: str | None = None,
             param: str | None = None) -> UpstreamRejected:
    """Build the error for a provider's 4xx answer, keeping its status for the client."""
    err = UpstreamRejected(message, target=target, status=status, code=code, param=param)
    err.grpc_code = _GRPC_BY_STATUS.get(status, "FAILED_PRECONDITION")
    return err
