"""The store's two errors: a refusal, and a store that cannot be reached (worth retrying)."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The store answered, but refused the operation (bad schema, missing collection...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        # The server's HTTP status, when it answered with one: safe to log, unlike the message, which
        # quotes Qdrant's answer (it can echo filter values).
        self.status = status


class StoreUnavailable(StoreError):
    """The store could not be reached or timed out; callers may retry later."""
