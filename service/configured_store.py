"""The vector store the settings name: one place maps settings to ``store.factory.open_store``.

It lives here, not in ``store``, because the store layer sits below settings and takes plain
arguments; the service and the CLI (both above settings and store) open their store through it.
"""

from __future__ import annotations

from settings import Settings
from store.base import VectorStore
from store.factory import open_store


def open_configured_store(settings: Settings) -> VectorStore:
    """The embedded store in ``settings.store_path``, or the Qdrant server at ``settings.qdrant_url``."""
    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    return open_store(
        settings.qdrant_url,
        settings.store_path,
        api_key,
        settings.qdrant_timeout_s,
        settings.hnsw_ef,
        search_threads=settings.search_threads or None,
    )
