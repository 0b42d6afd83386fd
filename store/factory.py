"""Pick the backend from settings: no URL means the embedded engine, anything else a Qdrant server."""

from __future__ import annotations

from pathlib import Path

from store.base import VectorStore
from store.edge import EdgeStore
from store.qdrant import DEFAULT_HNSW_EF
from store.server import MEMORY, ServerStore


def open_store(
    url: str | None,
    path: Path,
    api_key: str | None = None,
    timeout_s: float = 5.0,
    hnsw_ef: int | None = None,
    search_threads: int | None = None,
) -> VectorStore:
    """``url`` None: embedded store in ``path``; ':memory:' or http(s)://...: a Qdrant server.
    ``hnsw_ef`` None: the measured default (store/qdrant.py). ``search_threads``: the embedded
    engine's search pool per collection (None: the engine's default); a server sizes its own."""
    if hnsw_ef is None:
        hnsw_ef = DEFAULT_HNSW_EF
    if url is None:
        return EdgeStore(path, hnsw_ef=hnsw_ef, search_threads=search_threads)
    if url == MEMORY or url.startswith(("http://", "https://")):
        return ServerStore(url, api_key=api_key, timeout_s=timeout_s, hnsw_ef=hnsw_ef)
    raise ValueError(f"unsupported Qdrant URL {url!r}: expected http(s)://host:port or ':memory:'")
