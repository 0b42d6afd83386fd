"""Pick the backend from settings: no URL means the embedded engine, anything else a Qdrant server."""

from __future__ import annotations

from pathlib import Path

from store.base import VectorStore
from store.edge import DEFAULT_HNSW_EF, EdgeStore
from store.server import MEMORY, ServerStore


def open_store(
    url: str | None,
    path: Path,
    api_key: str | None = None,
    timeout_s: float = 5.0,
    hnsw_ef: int = DEFAULT_HNSW_EF,
) -> VectorStore:
    """``url`` None: embedded store in ``path``; ':memory:' or http(s)://...: a Qdrant server."""
    if url is None:
        return EdgeStore(path, hnsw_ef=hnsw_ef)
    if url == MEMORY or url.startswith(("http://", "https://")):
        return ServerStore(url, api_key=api_key, timeout_s=timeout_s, hnsw_ef=hnsw_ef)
    raise ValueError(f"unsupported Qdrant URL {url!r}: expected http(s)://host:port or ':memory:'")
