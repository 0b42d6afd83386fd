"""Real servers for tests, on loopback: an app served by uvicorn in a thread, and a home directory
`medsearch serve` can serve (free ports and waiting for a spawned `medsearch serve` are
bench.spawn's, shared with the benchmarks)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import uvicorn
from starlette.types import ASGIApp

from bench.spawn import free_port

__all__ = ["free_port", "query_model_home", "served_home", "uvicorn_thread"]


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


def query_model_home(home: Path, query_model: Path) -> Path:
    """``home`` as MEDSEARCH_HOME with the ONNX ``query_model`` as MEDSEARCH_QUERY_MODEL=query."""
    (home / "models").mkdir(parents=True)
    shutil.copytree(query_model, home / "models" / "query")
    return home


def served_home(
    home: Path,
    rows: Sequence[dict[str, str]],
    document_model: Path,
    query_model: Path,
    collection: str = "medsearch",
) -> Path:
    """``home`` as MEDSEARCH_HOME for `medsearch serve` with MEDSEARCH_QUERY_MODEL=query: the ONNX
    ``query_model`` in models/query, and ``rows`` ({"id", "text"}) indexed with ``document_model``
    into ``collection`` of the embedded store."""
    from indexer.pipeline import index_files  # torch: only for the tests that serve
    from models.loading import load_encoder
    from store.factory import open_store

    query_model_home(home, query_model)
    corpus = home / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    store = open_store(None, home / "qdrant")
    try:
        assert index_files([corpus], load_encoder(document_model), store, collection).ok
    finally:
        store.close()
    return home
