"""Reject request bodies over a byte limit, or slower than a deadline, before anything parses them.

Content-Length is checked first, but it can be absent (chunked) or lie, so the bytes actually
received are counted too. Bodies under the limit are buffered (the limit is small) and replayed.
A body that has not fully arrived within the deadline gets 408: a client trickling bytes (or
stalled) would otherwise hold a connection and a request slot for as long as it likes.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTimeout, BodyTooLarge, ServiceError, error_response
from service.metrics import ServiceMetrics


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServiceMetrics, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def _reject(self, error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(error, self.metrics)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(BodyTooLarge(self.max_bytes), scope, receive, send)
            return
        body: bytes | None = None
        with anyio.move_on_after(self.timeout_s):
            body = await self._read(receive)
            if body is None:  # the client went away
                return
        if body is None:
            await self._reject(BodyTimeout(self.timeout_s), scope, receive, send)
            return
        if len(body) > self.max_bytes:
            await self._reject(BodyTooLarge(self.max_bytes), scope, receive, send)
            return

        buffered: Message | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or as soon as it passes the limit what came so far; None on disconnect."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if size > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)
