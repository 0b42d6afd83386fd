"""Helpers every CLI subcommand shares (the main CLI and the evaluation/benchmark subcommands)."""

from __future__ import annotations

import sys
from pathlib import Path

from settings import Settings
from store.base import VectorStore


def fail(message: str) -> int:
    """Print a CLI error and return the exit code for bad input or a missing prerequisite."""
    print(f"medsearch: error: {message}", file=sys.stderr)
    return 2


def model_dir(settings: Settings, name: str) -> Path:
    """A model given by name lives in the models directory (a name never leads outside it); an
    explicit path to an existing directory is taken as is."""
    from models.manifest import named_model_dir

    path = Path(name)
    if path.is_dir() and ("/" in name or name.startswith(".")):
        return path
    return named_model_dir(settings.models_path, name)


def open_configured_store(settings: Settings) -> VectorStore:
    from store.factory import open_store

    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    return open_store(
        settings.qdrant_url, settings.store_path, api_key, settings.qdrant_timeout_s, settings.hnsw_ef
    )
