"""Store doubles for tests: a real store with some calls replaced."""

from __future__ import annotations

from typing import Any

from store.base import VectorStore


class DelegatingStore:
    """Every call goes to ``inner`` unless a subclass defines it (to fail, drop or count it)."""

    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
