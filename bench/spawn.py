"""Run `medsearch serve` as a subprocess on a free loopback port for the length of a benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
STOP_GRACE_S = 15.0
LOG_TAIL_CHARS = 2000


class SpawnError(RuntimeError):
    """The spawned service exited or did not become ready in time; the message has its log tail."""


@dataclass(frozen=True)
class SpawnedService:
    url: str
    pid: int


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    """Poll /readyz until it answers 200; SpawnError when the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SpawnError(f"`medsearch serve` exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
    raise SpawnError(f"`medsearch serve` was not ready after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown, which also closes the store
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def spawned_service(ready_timeout_s: float = 120.0) -> Iterator[SpawnedService]:
    """`medsearch serve` with this process's environment (so the same MEDSEARCH_* settings), on a
    free loopback port; stopped (SIGINT, then kill) on exit. Query logging is forced off, and so is
    the query-vector cache: the benchmark cycles through a few dozen questions, which a cache would
    answer without encoding after the first round, measuring the cache instead of the service."""
    port = free_port()
    env = {**os.environ, "MEDSEARCH_LOG_QUERIES": "false", "MEDSEARCH_QUERY_CACHE_SIZE": "0"}
    command = [sys.executable, "-m", "medsearch.cli", "serve", "--host", HOST, "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="medsearch-bench-") as tmp:
        log = Path(tmp) / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://{HOST}:{port}"
            wait_ready(url, proc, ready_timeout_s, log)
            yield SpawnedService(url=url, pid=proc.pid)
        finally:
            _stop(proc)
