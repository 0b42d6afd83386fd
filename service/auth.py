"""API keys: ``Authorization: Bearer <key>``, each key with a scope.

Keys come from ``MEDSEARCH_API_KEYS`` (comma-separated ``scope:key``) and/or the file named by
``MEDSEARCH_API_KEYS_FILE`` (one ``scope:key`` a line, ``#`` comments), so a secret manager can mount
them. Scopes: ``search`` (search endpoints and /info) and ``admin`` (everything, /metrics included when
it is protected). No keys configured: the API is open, and the service says so once at start-up.
Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Request

from service.errors import Forbidden, Unauthorized
from service.state import StartupError

Scope = Literal["search", "admin"]
SCOPES: tuple[Scope, ...] = ("search", "admin")


class ApiKeyError(StartupError):
    """The configured keys cannot be used; the message names the source and line, never the key."""


def _digest(key: str) -> bytes:
    # Fixed-length digests make every comparison take the same time whatever the key's length.
    return hashlib.sha256(key.encode()).digest()


def parse_entries(lines: list[str], where: Callable[[int], str]) -> list[tuple[Scope, bytes]]:
    """``(scope, key digest)`` per ``scope:key`` line; errors say ``where(line number)``, never the key."""
    entries: list[tuple[Scope, bytes]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        scope, sep, key = line.partition(":")
        if not sep or scope not in SCOPES:
            raise ApiKeyError(f"{where(number)}: expected 'scope:key' with scope one of {list(SCOPES)}")
        if len(key) < 16:
            raise ApiKeyError(f"{where(number)}: key shorter than 16 characters")
        entries.append((scope, _digest(key)))
    return entries


@dataclass(frozen=True)
class ApiKeys:
    entries: tuple[tuple[Scope, bytes], ...] = ()
    protect_metrics: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @classmethod
    def load(cls, inline: str | None, file: Path | None, protect_metrics: bool = False) -> ApiKeys:
        entries: list[tuple[Scope, bytes]] = []
        if inline:
            entries += parse_entries(inline.split(","), lambda n: f"MEDSEARCH_API_KEYS entry {n}")
        if file is not None:
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ApiKeyError(f"{file}: cannot read the API key file: {exc.strerror or exc}") from exc
            entries += parse_entries(lines, lambda n: f"{file}:{n}")
        if protect_metrics and not entries:
            raise ApiKeyError("MEDSEARCH_PROTECT_METRICS is on but no API key is configured")
        return cls(tuple(entries), protect_metrics)

    def scope_of(self, key: str) -> Scope | None:
        """The key's scope, or None. Every entry is compared, so timing says nothing about which."""
        wanted = _digest(key)
        found: Scope | None = None
        for scope, digest in self.entries:
            if hmac.compare_digest(wanted, digest) and found is None:
                found = scope
        return found

    def check(self, authorization: str | None, needed: Scope) -> None:
        if not self.enabled:
            return
        kind, _, key = (authorization or "").partition(" ")
        if kind.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scope = self.scope_of(key.strip())
        if scope is None:
            raise Unauthorized("invalid API key")
        if needed == "admin" and scope != "admin":
            raise Forbidden(f"this key's scope '{scope}' does not allow this endpoint (needs '{needed}')")


def require(needed: Scope) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """A route dependency: the request's key must hold ``needed`` (``admin`` holds every scope)."""

    async def dependency(request: Request) -> None:
        keys: ApiKeys = request.app.state.api_keys
        keys.check(request.headers.get("authorization"), needed)

    return dependency


async def metrics_guard(request: Request) -> None:
    keys: ApiKeys = request.app.state.api_keys
    if keys.protect_metrics:
        keys.check(request.headers.get("authorization"), "admin")
