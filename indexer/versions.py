"""Blue/green collections behind an alias: naming, resuming, validating, switching, pruning, rollback.

A full build writes a new collection ``<alias>--v<ordinal>-<identity>`` and the service reads the
alias. ``identity`` is a digest of what the build is made of (the collection spec and the bytes of
every input), so a rerun of the same build, whether after a crash, on another worker of a sharded
build or after a rollback, lands in the same collection and continues it (the content hashes skip
what is already there) instead of starting another. ``ordinal`` orders builds for rollback and
pruning.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.manifest import sha256_file
from store.base import VectorStore
from store.errors import StoreError
from store.spec import CollectionSpec

_VERSION = re.compile(r"^(?P<alias>.+)--v(?P<ordinal>\d{4,})-(?P<identity>[0-9a-f]{8})$")
IDENTITY_CHARS = 8
SAMPLE_TOP_K = 10
# A sample document counts as found when its own vector is in the top hits, or when the top hit is
# an exact copy of it (a duplicate text can tie with, and outrank, its twin).
SAME_VECTOR = 0.9999


class VersionError(RuntimeError):
    """The alias cannot be built, switched or rolled back as asked; the message says why."""


@dataclass(frozen=True, order=True)
class Version:
    ordinal: int
    name: str = field(compare=False)
    identity: str = field(compare=False)

    @classmethod
    def parse(cls, alias: str, name: str) -> Version | None:
        found = _VERSION.match(name)
        if found is None or found["alias"] != alias:
            return None
        return cls(int(found["ordinal"]), name, found["identity"])


def version_name(alias: str, ordinal: int, identity: str) -> str:
    return f"{alias}--v{ordinal:04d}-{identity[:IDENTITY_CHARS]}"


def versions(store: VectorStore, alias: str) -> list[Version]:
    """The versioned collections of ``alias``, oldest first."""
    found = (Version.parse(alias, name) for name in store.list_collections())
    return sorted(v for v in found if v is not None)


def build_identity(spec: CollectionSpec, inputs: Sequence[Path]) -> str:
    """What a build is made of: the same spec over the same input bytes is the same build."""
    digest = hashlib.sha256(spec.identity_json().encode())
    for path in inputs:
        digest.update(f"\0{sha256_file(path)}".encode())
    return digest.hexdigest()


def served(store: VectorStore, alias: str) -> str | None:
    """The collection ``alias`` points at, None when it points nowhere yet."""
    return store.aliases().get(alias)


def check_alias_name(store: VectorStore, alias: str) -> None:
    if alias in store.list_collections():
        raise VersionError(
            f"{alias!r} is a plain collection (indexed before versioned builds), so it cannot become an "
            "alias: update it in place with --incremental, or build under another name "
            "(--collection NAME, then point MEDSEARCH_COLLECTION at it)"
        )


def version_for(store: VectorStore, alias: str, identity: str) -> tuple[str, bool]:
    """The collection this build writes to, and whether it already exists (a resumed build)."""
    existing = versions(store, alias)
    for version in existing:
        if version.identity == identity[:IDENTITY_CHARS]:
            return version.name, True
    ordinal = existing[-1].ordinal + 1 if existing else 1
    return version_name(alias, ordinal, identity), False


@dataclass
class Validation:
    collection: str
    expected: int | None
    count: int = 0
    sample: int = 0
    sample_found: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(store: VectorStore, name: str, expected: int | None, sample_ids: Sequence[str]) -> Validation:
    """Check a loaded collection before it is served: it holds exactly the accepted documents
    (``expected``; None when no input says how many), and searching with a sample of them finds
    each (vectors stored intact, search index usable)."""
    result = Validation(collection=name, expected=expected)
    result.count = documents_in(store, name)
    if expected is not None and result.count != expected:
        result.problems.append(f"{name} holds {result.count} documents; the input has {expected}")
    stored = store.vectors(name, sample_ids)
    result.sample = len(sample_ids)
    missing = [doc_id for doc_id in sample_ids if doc_id not in stored]
    for doc_id, vector in stored.items():
        hits = store.search(name, np.asarray(vector, dtype=np.float32), SAMPLE_TOP_K)
        if any(h.doc_id == doc_id for h in hits) or (hits and hits[0].score >= SAME_VECTOR):
            result.sample_found += 1
        else:
            missing.append(doc_id)
    if missing:
        result.problems.append(
            f"{len(missing)} of {len(sample_ids)} sample documents not found by searching their own "
            f"vectors (e.g. {missing[0]!r})"
        )
    return result


def switch(store: VectorStore, alias: str, name: str, *, allow_space_change: bool = False) -> str | None:
    """Point ``alias`` at ``name``; returns the collection it pointed at before.

    A switch into another vector space would leave every running service with a query encoder of
    the old space (it answers 503 until redeployed): refused unless asked for."""
    before = served(store, alias)
    if before is not None and before != name and not allow_space_change:
        old, new = store.get_collection(before), store.get_collection(name)
        if old is not None and new is not None and (old.space, old.dim) != (new.space, new.dim):
            raise VersionError(
                f"{name} holds space {new.space!r} (dim {new.dim}); {alias!r} serves {old.space!r} "
                f"(dim {old.dim}): query encoders of the old space could not search it. Deploy a query "
                "encoder of the new space with the switch (--allow-space-change)"
            )
    store.release(name)  # the embedded engine: a service must be able to open it the moment it switches
    store.switch_alias(alias, name)
    return before


def prune(store: VectorStore, alias: str, keep: int) -> list[str]:
    """Delete versions older than the ``keep`` newest up to the served one.

    Versions newer than the served one are never deleted: a build may be writing them, or they are
    what a rollback stepped back from."""
    current = served(store, alias)
    if keep < 1:
        raise ValueError("keep must be at least 1 (the served version)")
    all_versions = versions(store, alias)
    serving = next((v for v in all_versions if v.name == current), None)
    if serving is None:
        return []
    older = [v for v in all_versions if v < serving]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for version in doomed:
        try:
            store.delete_collection(version.name)
        except StoreError as exc:  # another alias serves it: keep it, say so
            raise VersionError(f"cannot delete old version {version.name}: {exc}") from exc
    return [v.name for v in doomed]


def rollback(store: VectorStore, alias: str) -> tuple[str, str]:
    """Point ``alias`` back at the newest version older than the one it serves: (from, to).

    A version that fails the sample check (e.g. an abandoned partial build) is skipped."""
    current = served(store, alias)
    if current is None:
        raise VersionError(f"alias {alias!r} does not exist: nothing to roll back")
    serving = Version.parse(alias, current)
    if serving is None:
        raise VersionError(f"alias {alias!r} serves {current}, which is not one of its versions")
    candidates = [v for v in versions(store, alias) if v < serving]
    for version in reversed(candidates):
        ids = _sample_ids(store, version.name)
        if ids and validate(store, version.name, None, ids).ok:
            switch(store, alias, version.name)
            return current, version.name
    raise VersionError(f"alias {alias!r} serves {current}; no older complete version is kept")


def documents_in(store: VectorStore, name: str) -> int:
    """Documents in a collection: its points, or in a chunked one, the documents they belong to."""
    spec = store.get_collection(name)
    if spec is not None and spec.chunking is not None:
        return sum(1 for _ in store.document_ids(name))
    return store.count(name)


def _sample_ids(store: VectorStore, name: str, size: int = 16) -> list[str]:
    ids: list[str] = []
    for doc_id in store.document_ids(name):
        ids.append(doc_id)
        if len(ids) >= size:
            break
    return ids
