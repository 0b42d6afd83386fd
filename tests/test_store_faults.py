"""The store going away and coming back, under the real service (`medsearch serve` in a subprocess,
a real ONNX query encoder, settings from the environment): searches get 503 and /readyz says not
ready meanwhile, /healthz stays up (no restart by the orchestrator), and both recover by themselves.

Server backend: a dead port, then a Qdrant REST stand-in listening there (tests/qdrant_shim.py),
then dead again. Embedded backend: the data directory moved away while serving, and back (a
collection missing at start-up is a start-up error naming `medsearch index`: tests/test_service.py).
A shard locked by another process: ``test_readyz_opens_the_collection_so_a_locked_shard_is_not_ready``
in tests/test_service.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from store.server import MEMORY, ServerStore
from tests.qdrant_shim import qdrant_rest_app
from tests.servers import free_port, query_model_home, served_home, uvicorn_thread

COLLECTION = "medsearch"
QUERY = "高血压能吃党参吗"
# Spec refresh and the searches' back-off (0.5 -> 5 s) bound recovery; this leaves room on a busy
# CI machine.
RECOVERY_BOUND_S = 20.0


ROWS = [{"id": "hit", "text": QUERY}] + [{"id": f"d{i}", "text": f"第{i}篇：糖尿病饮食"} for i in range(20)]


@contextmanager
def _serve(home: Path, tmp_path: Path, **env: str) -> Iterator[httpx.Client]:
    """`medsearch serve` until the block ends, once it is live (not necessarily ready)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEARCH_")}
    environ.update(
        MEDSEARCH_HOME=str(home),
        MEDSEARCH_QUERY_MODEL="query",
        MEDSEARCH_PORT=str(port),
        MEDSEARCH_SPEC_REFRESH_S="1",
        **env,
    )
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "medsearch.cli", "serve"],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as client:
            _until(lambda: _live(client, server), 60, lambda: log.read_text(errors="replace")[-3000:])
            yield client
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    logged = log.read_text(encoding="utf-8", errors="replace")
    assert QUERY not in logged  # never logged by default
    for key in ("MEDSEARCH_QDRANT_API_KEY", "MEDSEARCH_API_KEYS"):
        assert key not in env or env[key] not in logged, f"{key} reached the log"


def _live(client: httpx.Client, server: subprocess.Popen[bytes]) -> bool:
    assert server.poll() is None, f"`medsearch serve` exited with {server.returncode}"
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _until(condition: Callable[[], bool], timeout_s: float, why: Callable[[], str] = lambda: "") -> float:
    """Seconds until ``condition`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s {why()}"
        time.sleep(0.1)
    return time.monotonic() - started


def _answers(client: httpx.Client) -> bool:
    response = client.post("/v1/search", json={"query": QUERY, "top_k": 3})
    return response.status_code == 200 and response.json()["hits"][0]["id"] == "hit"


def _assert_unavailable(client: httpx.Client) -> None:
    search = client.post("/v1/search", json={"query": QUERY})
    assert search.status_code == 503, search.text
    assert search.json()["error"] in {"store_unavailable", "not_ready"}
    assert QUERY not in search.text
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200  # alive: waiting is right, a restart is not


def test_server_backend_dead_port_then_back_then_dead_again(
    tmp_path: Path, tiny_bert: Path, tiny_onnx: Path
) -> None:
    from indexer.pipeline import index_files
    from models.loading import load_encoder

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    local = ServerStore(MEMORY)
    assert index_files([corpus], load_encoder(tiny_bert), local, COLLECTION).ok
    qdrant_port = free_port()
    home = query_model_home(tmp_path / "home", tiny_onnx)
    url = f"http://127.0.0.1:{qdrant_port}"
    secret = "qdrant-key-7f3a9c"  # sent to Qdrant on every request, never written to the log
    with _serve(
        home,
        tmp_path,
        MEDSEARCH_QDRANT_URL=url,
        MEDSEARCH_QDRANT_TIMEOUT_S="1",
        MEDSEARCH_QDRANT_API_KEY=secret,
    ) as client:
        _assert_unavailable(client)  # nothing listens yet
        assert client.get("/readyz").json()["reasons"] == ["vector store unreachable"]

        with uvicorn_thread(qdrant_rest_app(local._client, api_key=secret), port=qdrant_port):
            first = _until(lambda: _answers(client), RECOVERY_BOUND_S)
            assert client.get("/readyz").json() == {"ready": True, "reasons": []}
        _until(lambda: client.post("/v1/search", json={"query": QUERY}).status_code == 503, RECOVERY_BOUND_S)
        _assert_unavailable(client)

        with uvicorn_thread(qdrant_rest_app(local._client, api_key=secret), port=qdrant_port):
            second = _until(lambda: _answers(client), RECOVERY_BOUND_S)
        print(f"store faults: server back -> answering in {first:.1f} s, then {second:.1f} s")


def test_embedded_data_directory_moved_away_and_back(
    tmp_path: Path, tiny_bert: Path, tiny_onnx: Path
) -> None:
    home = served_home(tmp_path / "home", ROWS, tiny_bert, tiny_onnx, COLLECTION)
    data = home / "qdrant"
    with _serve(home, tmp_path) as client:
        assert _answers(client)
        # The volume goes away under the running service (unmounted, moved): not ready, and no
        # answers from files nobody can see any more.
        moved = home / "qdrant.away"
        data.rename(moved)
        gone = _until(lambda: client.get("/readyz").status_code == 503, RECOVERY_BOUND_S)
        _assert_unavailable(client)
        moved.rename(data)
        back = _until(lambda: _answers(client), RECOVERY_BOUND_S)
        assert client.get("/readyz").json() == {"ready": True, "reasons": []}
        print(f"store faults: embedded directory gone -> not ready in {gone:.1f} s; back in {back:.1f} s")


@pytest.fixture(autouse=True)
def _quiet_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback only: a proxy in the environment must not capture the test's own requests.
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
