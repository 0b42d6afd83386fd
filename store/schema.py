"""What both backends agree on: payload layout, filter keys, vector checks and spec comparison.

Keeping this in one place is what makes the embedded engine and a server interchangeable: the same
point carries the same payload and the same query is refused for the same reason in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from store.base import DocumentPoint, Hit, point_id
from store.errors import StoreError
from store.filters import FieldKind, field_kinds
from store.sparse import Bm25Spec
from store.spec import CollectionSpec

# Payload keys fetched when only the content hashes are needed (no text, no vectors).
HASH_FIELDS = ["doc_id", "content_hash"]
METADATA_KEY = "metadata"
FIELD_LISTS = ("keyword_fields", "integer_fields", "date_fields")
# Reciprocal rank fusion: the constant of Cormack et al. (2009), and how deep each list is read.
RRF_K = 60
HYBRID_PREFETCH = 100


# Chunked collections (spec.chunking): each point is one chunk of a document; its payload holds the
# parent's doc_id, title and metadata, the chunk's text, its number and the document's chunk count.
# Searches group by the parent's doc_id, which needs a keyword index on it.
DOC_ID_KEY = "doc_id"
CHUNK_KEY = "chunk"
CHUNKS_KEY = "chunks"
CHUNK_HASH_FIELDS = [*HASH_FIELDS, CHUNKS_KEY]
# Chunks fetched per document wanted, first try, by a backend that groups by over-fetching, until
# its searches have shown how many chunks a document takes among the hits (ChunkRate).
CHUNK_OVERFETCH = 4


def metadata_path(key: str) -> str:
    return f"{METADATA_KEY}.{key}"


def payload_of(point: DocumentPoint) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "doc_id": point.doc_id,
        "title": point.title,
        "text": point.text,
        METADATA_KEY: point.metadata,
        "content_hash": point.content_hash,
    }
    if point.chunk is not None:
        payload[CHUNK_KEY] = point.chunk
        payload[CHUNKS_KEY] = point.chunks
    return payload


def hit_of(payload: Mapping[str, Any] | None, score: float) -> Hit:
    if payload is None or "doc_id" not in payload:
        raise StoreError("stored point has no medsearch payload (written by another tool?)")
    return Hit(
        doc_id=payload["doc_id"],
        score=float(score),
        title=payload.get("title", ""),
        text=payload.get("text", ""),
        metadata=payload.get(METADATA_KEY) or {},
        chunk=payload.get(CHUNK_KEY),
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
    return flat.tolist()  # float32 -> Python floats, in C


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
        if (p.chunk is None) != (spec.chunking is None):
            wanted = "holds chunks: give chunk and chunks" if spec.chunking else "holds whole documents"
            raise StoreError(f"document {p.doc_id!r}: the collection {wanted}")


def index_paths(spec: CollectionSpec) -> dict[str, FieldKind]:
    """Payload path -> index kind ("keyword", "integer", "date") of every index the collection needs:
    its declared metadata fields, and the parent's doc_id when chunked (grouping needs it)."""
    paths: dict[str, FieldKind] = {metadata_path(key): kind for key, kind in field_kinds(spec).items()}
    if spec.chunking is not None:
        paths[DOC_ID_KEY] = "keyword"
    return paths


def stale_chunks(points: Sequence[DocumentPoint]) -> dict[int, list[str]]:
    """Chunk count -> the documents written with that many chunks: their chunks numbered from the
    count on are left over from a longer version and must go."""
    counts: dict[str, int] = {}
    for p in points:
        if p.chunks is not None:
            counts[p.doc_id] = p.chunks
    by_count: dict[int, list[str]] = {}
    for doc_id, n in counts.items():
        by_count.setdefault(n, []).append(doc_id)
    return by_count


Retrieve = Callable[[list[str]], Sequence[Mapping[str, Any] | None]]


def chunked_hashes(retrieve: Retrieve, doc_ids: Sequence[str]) -> dict[str, str]:
    """``content_hashes`` of a chunked collection, given a lookup of payloads (``CHUNK_HASH_FIELDS``)
    by point id. A document counts as stored when its first and its last chunk carry the same hash:
    chunks are written in order after the stale ones are removed, so an interrupted write shows as a
    mismatch or a missing last chunk, and the document is written again."""
    firsts = hashes_and_counts(retrieve([point_id(d, 0) for d in dict.fromkeys(doc_ids)]))
    lasts = hashes_and_counts(
        retrieve([point_id(d, n - 1) for d, (_, n) in firsts.items() if n > 1]) if firsts else []
    )
    return {d: h for d, (h, n) in firsts.items() if n == 1 or (d in lasts and lasts[d] == (h, n))}


def hashes_and_counts(payloads: Sequence[Mapping[str, Any] | None]) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for p in payloads:
        if p is not None and "doc_id" in p and "content_hash" in p and isinstance(p.get(CHUNKS_KEY), int):
            found[p["doc_id"]] = (p["content_hash"], p[CHUNKS_KEY])
    return found


# A ranked point as an engine returns it: (payload, score).
Scored = tuple[Mapping[str, Any] | None, float]


def best_per_document(points: Sequence[Scored], top_k: int) -> list[Hit]:
    """The first (best-ranked) point of each document as a hit, in rank order, at most ``top_k``."""
    seen: set[str] = set()
    best: list[Hit] = []
    for payload, score in points:
        doc_id = payload.get("doc_id") if payload is not None else None
        if doc_id in seen:
            continue
        hit = hit_of(payload, score)  # refuses a point without a medsearch payload
        seen.add(hit.doc_id)
        best.append(hit)
        if len(best) == top_k:
            break
    return best


class ChunkRate:
    """How many ranked chunks a collection's searches see per distinct document, as a moving average.

    It sizes the first fetch of a grouped search: a collection whose documents are mostly one chunk
    long fetches about ``top_k`` points instead of ``top_k x CHUNK_OVERFETCH``, which costs the
    engine's payload reads and their conversion to Python (0.56 -> 0.39 ms a search of the demo
    collection, docs/results.md). It only sizes the first try: grouped_by_overfetch still fetches
    deeper until it has ``top_k`` documents, so results never depend on it. Updates from concurrent
    searches may interleave; a lost update only delays the average.
    """

    WEIGHT = 0.1  # of the newest search
    MARGIN = 1.25  # head room over the average before a second fetch is needed

    def __init__(self, start: float = CHUNK_OVERFETCH) -> None:
        self.chunks_per_document = start

    def first_limit(self, top_k: int) -> int:
        return min(top_k * CHUNK_OVERFETCH, math.ceil(top_k * self.chunks_per_document * self.MARGIN))

    def observe(self, points: int, documents: int) -> None:
        if documents:
            rate = points / documents
            self.chunks_per_document += self.WEIGHT * (rate - self.chunks_per_document)


def grouped_by_overfetch(
    fetch: Callable[[int], list[Scored]], top_k: int, rate: ChunkRate | None = None
) -> list[Hit]:
    """The ``top_k`` best documents of a chunked collection from a ranked chunk search, ``fetch(limit)``.

    For an engine without grouping: qdrant-edge (0.9) has no group_by, so the chunks are over-fetched
    (``rate``'s first limit, else ``CHUNK_OVERFETCH`` per document wanted) and kept best-first per
    document; when that yields fewer than ``top_k`` documents and the engine had more to give, the
    search runs again twice as deep, until it has ``top_k`` documents or the engine runs out. Exact
    either way: a document outside the fetched points ranks below every document inside them. A
    Qdrant server groups itself.
    """
    limit = rate.first_limit(top_k) if rate is not None else top_k * CHUNK_OVERFETCH
    while True:
        points = fetch(limit)
        best = best_per_document(points, top_k)
        if len(best) == top_k or len(points) < limit:
            if rate is not None:
                rate.observe(len(points), len({p.get("doc_id") for p, _ in points if p is not None}))
            return best
        limit *= 2


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
    message = f"collection {name!r} already exists with a different spec ({difference})"
    if stored.storage != requested.storage:
        # The engine built its segments for the stored choice: it cannot change in place.
        message += ". How a collection stores its vectors is fixed when it is created: a full build "
        message += "(without --incremental) makes a new version with the new storage"
    return StoreError(message)


def head_point_ids(spec: CollectionSpec, doc_ids: Sequence[str]) -> list[str]:
    """The point standing for each document: the whole document, or its chunk 0."""
    chunk = 0 if spec.chunking is not None else None
    return [point_id(d, chunk) for d in dict.fromkeys(doc_ids)]


def head_doc_id(payload: Mapping[str, Any] | None) -> str | None:
    """The document id of a point that stands for its document (whole, or chunk 0), else None."""
    if payload is None or DOC_ID_KEY not in payload or payload.get(CHUNK_KEY) not in (None, 0):
        return None
    return str(payload[DOC_ID_KEY])
