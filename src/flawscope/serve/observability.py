"""ASGI middleware: a request id for every request, its JSON log line and its metrics.

The id (32 hex digits) is set before anything else runs, returned as ``X-Request-ID``, stored
with the records of the request and written on every log line about it. The log line names
the key's owner (never the key) when API keys are in use.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flawscope.station.logs import access_log, request_id_var
from flawscope.station.metrics import ServiceMetrics


def route_of(scope: dict[str, Any]) -> str:
    """The route template (``/v1/inspections/{record_id}``), not the raw path: bounded
    metric labels."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class RequestContext:
    """Outermost middleware: request id, access log, request metrics."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            route = route_of(scope)
            self.metrics.requests.labels(scope.get("method", "?"), route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client")
            access_log.info(
                "%s %s %d", scope.get("method"), scope.get("path"), status,
                extra={"event": "request", "method": scope.get("method"),
                       "path": scope.get("path"), "route": route, "status": status,
                       "duration_ms": round(seconds * 1000, 2),
                       "client": client[0] if client else None,
                       "key": state.get("key_name")})
            request_id_var.reset(token)
