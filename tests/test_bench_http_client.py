"""The load generator's HTTP/1.1 client against small asyncio servers: keep-alive reuse, a server
that closes after each response, a server that never answers, and bytes that are not HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from bench.http_client import HttpConnection, ResponseError
from bench.machine import process_cpu_s

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """``handler`` on a loopback port; yields the URL and a list that gets one entry per connection."""
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """(request line, body) of the next request, None when the client closed."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return lines[0], await reader.readexactly(length)


def response(status: int, body: bytes, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), connection, body)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool) -> None:
    """Answers each request with its request line and JSON body, a 404 for any path but /search."""
    while True:
        try:
            request = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if request is None:
            return
        line, body = request
        status = 200 if line.startswith(b"POST /search ") else 404
        writer.write(
            response(status, json.dumps({"line": line.decode(), "body": json.loads(body)}).encode(), close)
        )
        await writer.drain()
        if close:
            return


async def test_requests_share_one_keep_alive_connection() -> None:
    async with serving(lambda r, w: echo(r, w, close=False)) as (url, connections):
        client = HttpConnection(url, timeout_s=5)
        answers = [await client.post_json("/search", {"query": f"头痛 {i}"}) for i in range(5)]
        status, _ = await client.post_json("/other", {})
        client.close()
    assert [s for s, _ in answers] == [200] * 5 and status == 404
    assert [json.loads(b)["body"]["query"] for _, b in answers] == [f"头痛 {i}" for i in range(5)]
    assert json.loads(answers[0][1])["line"] == "POST /search HTTP/1.1"
    assert len(connections) == 1


async def test_a_server_that_closes_gets_a_new_connection_per_request() -> None:
    async with serving(lambda r, w: echo(r, w, close=True)) as (url, connections):
        client = HttpConnection(url, timeout_s=5)
        statuses = [(await client.post_json("/search", {"query": "q"}))[0] for _ in range(3)]
        client.close()
    assert statuses == [200, 200, 200]
    assert len(connections) == 3


async def test_timeout_drops_the_connection_and_the_next_request_reconnects() -> None:
    calls = 0

    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(5)  # never answers in time
            return
        await echo(reader, writer, close=False)

    async with serving(slow_first) as (url, connections):
        client = HttpConnection(url, timeout_s=0.2)
        with pytest.raises(TimeoutError):
            await client.post_json("/search", {"query": "q"})
        status, _ = await client.post_json("/search", {"query": "q"})
        client.close()
    assert status == 200
    assert len(connections) == 2


async def test_bytes_that_are_not_http_and_early_closes_are_response_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()

    for handler in (garbage, half):
        async with serving(handler) as (url, _):
            client = HttpConnection(url, timeout_s=5)
            with pytest.raises(ResponseError):
                await client.post_json("/search", {"query": "q"})
            client.close()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="only http"):
        HttpConnection("https://127.0.0.1:8000", timeout_s=1)


def test_process_cpu_time_comes_from_proc() -> None:
    before = process_cpu_s("self")
    sum(i * i for i in range(2_000_000))
    after = process_cpu_s("self")
    assert before is not None and after is not None and after > before
    assert process_cpu_s(2**22 + 12345) is None  # above pid_max: no such process
