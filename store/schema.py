"""What both backends agree on: payload layout, filter keys, vector checks and spec comparison.

Keeping this in one place is what makes the embedded engine and a server interchangeable: the same
point carries the same payload and the same query is refused for the same reason in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from store.base import CollectionSpec, DocumentPoint, Hit, StoreError
from store.sparse import Bm25Spec

# Payload keys fetched when only the content hashes are needed (no text, no vectors).
HASH_FIELDS = ["doc_id", "content_hash"]
METADATA_KEY = "metadata"
FIELD_LISTS = ("keyword_fields", "integer_fields", "date_fields")
# Reciprocal rank fusion: the constant of Cormack et al. (2009), and how deep each list is read.
RRF_K = 60
HYBRID_PREFETCH = 100


def metadata_path(key: str) -> str:
    return f"{METADATA_KEY}.{key}"


def payload_of(point: DocumentPoint) -> dict[str, Any]:
    return {
        "doc_id": point.doc_id,
        "title": point.title,
        "text": point.text,
        METADATA_KEY: point.metadata,
        "content_hash": point.content_hash,
    }


def hit_of(payload: Mapping[str, Any] | None, score: float) -> Hit:
    if payload is None or "doc_id" not in payload:
        raise StoreError("stored point has no medsearch payload (written by another tool?)")
    return Hit(
        doc_id=payload["doc_id"],
        score=float(score),
        title=payload.get("title", ""),
        text=payload.get("text", ""),
        metadata=payload.get(METADATA_KEY) or {},
    )


def hashes_of(payloads: Sequence[Mapping[str, Any] | None]) -> dict[str, str]:
    return {
        p["doc_id"]: p["content_hash"]
        for p in payloads
        if p is not None and "doc_id" in p and "content_hash" in p
    }


def query_vector(spec: CollectionSpec, vector: np.ndarray) -> list[float]:
    flat = np.asarray(vector, dtype=np.float32).reshape(-1)
    if flat.shape[0] != spec.dim:
        raise StoreError(f"query vector has {flat.shape[0]} dimensions; the collection holds {spec.dim}")
    if not np.all(np.isfinite(flat)):
        raise StoreError("query vector contains NaN or infinity")
    return [float(x) for x in flat]


def check_points(spec: CollectionSpec, points: Sequence[DocumentPoint]) -> None:
    for p in points:
        if len(p.vector) != spec.dim:
            raise StoreError(
                f"document {p.doc_id!r} has a {len(p.vector)}-d vector; the collection holds {spec.dim}-d"
            )
        if not np.all(np.isfinite(p.vector)):
            raise StoreError(f"document {p.doc_id!r} has NaN or infinity in its vector")
        if (p.sparse is None) != (spec.sparse is None):
            wanted = "needs a BM25 vector" if spec.sparse is not None else "holds no BM25 vectors"
            raise StoreError(f"document {p.doc_id!r}: the collection {wanted}")


def check_hybrid(spec: CollectionSpec) -> Bm25Spec:
    if spec.sparse is None:
        raise StoreError(
            "hybrid search needs BM25 vectors; this collection has none (index it with --sparse bm25)"
        )
    return spec.sparse


def prefetch_depth(top_k: int) -> int:
    """Candidates each side of a hybrid search contributes before fusion."""
    return max(HYBRID_PREFETCH, top_k)


def check_top_k(top_k: int) -> None:
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")


def spec_difference(stored: CollectionSpec, requested: CollectionSpec) -> str | None:
    """Human-readable difference between two specs, None when they describe the same collection.

    Field lists compare as sets: their order does not change what is indexed.
    """
    old = stored.model_dump()
    new = requested.model_dump()
    for key in FIELD_LISTS:
        old[key] = sorted(set(old[key]))
        new[key] = sorted(set(new[key]))
    diffs = [f"{key}: stored {old[key]!r}, requested {new[key]!r}" for key in old if old[key] != new[key]]
    return "; ".join(diffs) or None


def mismatch_error(name: str, stored: CollectionSpec, requested: CollectionSpec) -> StoreError | None:
    difference = spec_difference(stored, requested)
    if difference is None:
        return None
    return StoreError(f"collection {name!r} already exists with a different spec ({difference})")
