"""ASGI middleware: request body size and body time limits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from flawscope.serve.errors import error_response, mebibytes


class BodySizeLimit:
    """ASGI middleware: requests with a body over ``limit`` bytes get 413, read or not.

    A declared ``Content-Length`` over the limit is refused before reading; a chunked body is
    counted as it arrives and cut off once it passes the limit.
    """

    def __init__(self, app: Any, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    def _reply(self):
        return error_response(
            413, f"upload too large: more than {mebibytes(self.limit)} in one request "
            f"(limit {self.limit} bytes); send fewer or smaller images")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reply()(scope, receive, send)
            return
        received = 0
        exceeded = False
        too_slow = False
        started = False
        deadline = None if self.timeout is None else time.monotonic() + self.timeout

        async def limited_receive() -> dict:
            nonlocal received, exceeded, too_slow
            if exceeded or too_slow:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(
                    receive(), None if deadline is None else max(deadline - time.monotonic(), 0))
            except TimeoutError:  # a client sending its body too slowly
                too_slow = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if exceeded or too_slow:
                return  # the app's reaction to the cut-off body is replaced by 413 / 408
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (exceeded or too_slow):
                raise
        if exceeded and not started:
            await self._reply()(scope, receive, send)
        elif too_slow and not started:
            await error_response(408, f"request body not received within {self.timeout:g} s; "
                         "send it faster or in smaller requests")(scope, receive, send)

