"""Real servers for tests, on loopback: an app served by uvicorn in a thread (free ports and
waiting for a spawned `medsearch serve` are bench.spawn's, shared with the benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import uvicorn
from starlette.types import ASGIApp

from bench.spawn import free_port

__all__ = ["free_port", "uvicorn_thread"]


@contextmanager
def uvicorn_thread(
    app: ASGIApp, lifespan: Literal["auto", "on", "off"] = "auto", port: int | None = None
) -> Iterator[str]:
    """``app`` served by uvicorn until the block ends (on ``port``, default a free one); yields its
    base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
