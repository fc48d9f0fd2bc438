"""The request pipeline every front end calls.

    pipeline.py  Gateway: authenticate -> route -> cache -> admission -> attempts -> observers
    attempts.py  the attempt loop: a plan's targets tried with failover, retries, a cascade
    answers.py   Served / Completed / Streaming: who served a call, and its reply or stream
    context.py   Context: what a front end says of a request besides its body
    cached.py    the response cache's lookups and recordings (failures are misses)
    relay.py     relay(): a committed stream's frames -> typed events; Cut (shutdown grace)
    events.py    Relayed / Ended / Failed: what Streaming.events yields, in that order
    outcome.py   Outcome: what one request came to, for observers (metrics, request logs)
    status.py    the model list, the status and readiness documents (pure); GatewayState
    verdict.py   the final error of a call that no target answered (pure)

The surface front ends use (and nothing else of the :class:`Gateway`):

* calls: :attr:`~Gateway.auth` (whether keys are needed), :meth:`~Gateway.authenticate`
  (key -> identity, before the body is read), :meth:`~Gateway.deadline` (client timeout ->
  loop-time deadline), then :meth:`~Gateway.complete` (-> :class:`Completed`) or
  :meth:`~Gateway.stream` (-> :class:`Streaming`, whose ``events`` the front end renders:
  HTTP as SSE, gRPC as chunk messages and the call's status);
* documents: :meth:`~Gateway.models` (id, owned_by), :meth:`~Gateway.count_tokens` (an
  estimate of a call's prompt), :meth:`~Gateway.status`,
  :meth:`~Gateway.readiness`, :meth:`~Gateway.budgets` (JSON bytes, redacted);
* scrape-time state: :meth:`~Gateway.state` (a :class:`GatewayState`: circuits, local
  models, host pressure and snapshot, configured targets; not redacted) and
  :attr:`~Gateway.redact` (the redactor, for what a collector renders of it);
* lifecycle: :class:`Current` (the gateway new requests go to; a config reload swaps it:
  front ends read it once per request), :attr:`~Gateway.config`,
  :attr:`~Gateway.in_flight` / :meth:`~Gateway.until_idle`, :meth:`~Gateway.start`,
  :meth:`~Gateway.drain` / :attr:`~Gateway.draining`,
  :meth:`~Gateway.cut` / :attr:`~Gateway.is_cut` / :meth:`~Gateway.until_cut` (the end of
  the shutdown grace: non-stream calls still running answer :func:`shut_down`),
  :meth:`~Gateway.aclose`;
* :func:`error_body`: OpenAI's error envelope of a :class:`~sidecar.errors.SidecarError`.

Every error raised to a front end is a redacted :class:`~sidecar.errors.SidecarError`;
a stream's failure after it committed comes as :class:`Failed` instead.
"""

from sidecar.gateway.answers import Completed, Served, Streaming
from sidecar.gateway.context import Context
from sidecar.gateway.events import Ended, Failed, Relayed, StreamEvent
from sidecar.gateway.outcome import Observer, Outcome
from sidecar.gateway.pipeline import (
    Current,
    Gateway,
    error_body,
)
from sidecar.gateway.relay import shut_down
from sidecar.gateway.status import GatewayState

__all__ = [
    "Completed",
    "Context",
    "Current",
    "Ended",
    "Failed",
    "Gateway",
    "GatewayState",
    "Observer",
    "Outcome",
    "Relayed",
    "Served",
    "StreamEvent",
    "Streaming",
    "error_body",
    "shut_down",
]
