"""A lean HTTP/1.1 client for the load generator: one keep-alive connection, one request at a time.

The load generator shares the machine's cores with the service it measures, so every millisecond
of CPU it spends per request is taken from the service: httpx costs about 1 ms of CPU per request
on these machines, this about 0.1 ms (bench/service_load.py's module docstring has the figures).
The response is parsed by httptools (llhttp, the parser uvicorn uses); requests are a fixed header
block and a JSON body, so writing them needs no library.
"""

from __future__ import annotations

import asyncio
import json
from typing import cast
from urllib.parse import urlsplit

import httptools


class ResponseError(ConnectionError):
    """The server's bytes were not an HTTP/1.1 response, or the connection closed mid-response."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport, so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseError(f"not an HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ResponseError("connection closed before the response ended"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        self.keep_alive = self.parser.should_keep_alive()
        if self.response is not None and not self.response.done():
            self.response.set_result((self.parser.get_status_code(), body))

    def _fail(self, exc: Exception) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_exception(exc)


class HttpConnection:
    """POSTs JSON to one server over one keep-alive connection, opened on first use and reopened
    after a failure, a timeout or a response that closes it."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"{url}: only http://host:port URLs")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = f"{host_header}:{self.port}".encode()
        self._protocol: _Protocol | None = None

    async def post_json(self, path: str, payload: object) -> tuple[int, bytes]:
        """(status, body) of POST ``path`` with ``payload`` as JSON. Raises OSError (refused, reset),
        ResponseError, or TimeoutError after ``timeout_s``; the connection is then dropped."""
        body = json.dumps(payload, ensure_ascii=False).encode()
        head = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), self._host_header, len(body))
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                protocol = await self._connected()
                protocol.response = asyncio.get_running_loop().create_future()
                assert protocol.transport is not None
                protocol.transport.write(head + body)
                status, answer = await protocol.response
        except BaseException:
            self.close()
            raise
        if not protocol.keep_alive:
            self.close()
        return status, answer

    async def _connected(self) -> _Protocol:
        if self._protocol is None or self._protocol.transport is None:
            _, self._protocol = await asyncio.get_running_loop().create_connection(
                _Protocol, self.host, self.port
            )
        return self._protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
