"""The embedded store's aliases (Qdrant's, for a store without a server): alias -> collection in one
JSON file, ``<root>/aliases.json``.

A reindex switches what is served by rewriting the file in one atomic rename; readers stat it on
every call (about a microsecond) and re-read it only when it changed. Edits take an exclusive flock
on ``<root>/.aliases.lock``, so processes sharing the data directory never lose each other's edits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from store.durable import write_atomic
from store.errors import StoreError, StoreUnavailable

ALIASES_FILE = "aliases.json"
ALIASES_LOCK = ".aliases.lock"


class AliasCatalog:
    """The alias file of the store in ``root``. Not thread-safe: its one user (EdgeStore) serializes."""

    def __init__(self, root: Path) -> None:
        self._path = root / ALIASES_FILE
        self._lock_path = root / ALIASES_LOCK
        # The file as last read, keyed by its (mtime_ns, size, inode) so a stat tells if it moved.
        self._aliases: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None

    def read(self) -> tuple[dict[str, str], set[str]]:
        """alias -> collection, and the collections that lost their last alias since the last read."""
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._aliases, self._stamp = {}, None
            return self._aliases, set()
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {self._path}: {exc}") from exc
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self._aliases, set()
        try:
            loaded = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self._path} is unreadable: {exc}") from exc
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise StoreError(f"{self._path} is not an alias -> collection object")
        retired = set(self._aliases.values()) - set(loaded.values())
        self._aliases, self._stamp = loaded, stamp
        return self._aliases, retired

    def write(self, aliases: Mapping[str, str]) -> None:
        """Replace the whole catalog (call inside ``locked``, with what ``read`` gave there)."""
        write_atomic(self._path, json.dumps(dict(aliases), indent=2, sort_keys=True) + "\n")
        self._stamp = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serializes alias edits and deletions between processes sharing the data directory."""
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
