"""The request pipeline every front end calls (see :mod:`sidecar.gateway.pipeline`)."""

from sidecar.gateway.pipeline import (
    Completed,
    Context,
    Gateway,
    Served,
    Streaming,
    error_body,
    shut_down,
)

__all__ = ["Completed", "Context", "Gateway", "Served", "Streaming", "error_body", "shut_down"]
