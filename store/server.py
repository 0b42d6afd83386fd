"""The server backend: a Qdrant server over REST through qdrant-client (or its ':memory:' local mode).

The CollectionSpec lives in the collection's own metadata (``config.metadata["medsearch"]``), so it
travels with the collection through snapshots and cannot drift from it. Collection metadata needs
Qdrant >= 1.16; an older server silently drops it, which ``create_collection`` detects by reading the
spec back and refusing.

Errors: a server that cannot be reached, times out, or answers 408/429/5xx raises StoreUnavailable;
any other refusal (4xx, malformed answer, unknown collection) raises StoreError.

Thread safety: the remote client is one httpx connection pool, safe to share between threads. The
':memory:' local mode is plain Python over numpy arrays with no locking of its own, so its calls are
serialized here.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import cast

import httpx
import numpy as np
from pydantic import ValidationError
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ApiException, ResponseHandlingException, UnexpectedResponse

from store import schema
from store.base import CollectionSpec, DocumentPoint, Hit, StoreError, StoreUnavailable, point_id
from store.filters import Condition, Filter, FilterLike, checked_filter, field_kinds, parse_date
from store.sparse import BM25_VECTOR, SparseVector

MEMORY = ":memory:"
SPEC_KEY = "medsearch"
# Requests stay well under the server's default 32 MiB body limit even with 4k-d vectors and long texts.
UPSERT_BATCH = 256
# Answers worth retrying: the server is overloaded, restarting, or behind a failing proxy.
_RETRYABLE_STATUS = {408, 429}
# HNSW candidate list per search (see store/edge.py for the measurement behind the value).
DEFAULT_HNSW_EF = 256


def store_error(action: str, exc: Exception) -> StoreError:
    """Map a qdrant-client / transport exception onto the store's two error kinds."""
    cause: BaseException = exc.source if isinstance(exc, ResponseHandlingException) else exc
    if isinstance(cause, httpx.TransportError | OSError):
        return StoreUnavailable(f"{action}: Qdrant unreachable ({type(cause).__name__}: {cause})")
    if isinstance(cause, UnexpectedResponse):
        status = cause.status_code or 0
        message = f"{action}: Qdrant answered {status} {cause.reason_phrase}: {cause.content[:300]!r}"
        if status in _RETRYABLE_STATUS or status >= 500:
            return StoreUnavailable(message)
        return StoreError(message)
    return StoreError(f"{action}: {type(cause).__name__}: {cause}")


# What qdrant-client raises when the call, not the caller, failed: transport/HTTP errors, response
# parsing errors, local mode's ValueError (unknown collection, bad argument), and the RuntimeError
# both modes raise once the client is closed.
_CLIENT_ERRORS = (ApiException, httpx.HTTPError, OSError, ValueError, RuntimeError)


_INDEX_TYPES = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "date": models.PayloadSchemaType.DATETIME,
}


def _client_condition(condition: Condition, kind: str) -> models.FieldCondition:
    key = schema.metadata_path(condition.key)
    if condition.match is not None:
        return models.FieldCondition(key=key, match=models.MatchValue(value=condition.match))
    if condition.any is not None:
        return models.FieldCondition(key=key, match=models.MatchAny(any=cast(list[str], list(condition.any))))
    assert condition.range is not None
    bounds = condition.range.bounds()
    if kind == "date":
        return models.FieldCondition(
            key=key, range=models.DatetimeRange(**{k: parse_date(v) for k, v in bounds.items()})
        )
    return models.FieldCondition(key=key, range=models.Range(**{k: float(v) for k, v in bounds.items()}))


def _vectors(point: DocumentPoint) -> models.VectorStruct:
    if point.sparse is None:
        return list(point.vector)
    return {"": list(point.vector), BM25_VECTOR: _client_sparse(point.sparse)}


def _client_sparse(vector: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=vector.indices, values=vector.values)


def _client_filter(spec: CollectionSpec, where: Filter | None) -> models.Filter | None:
    if where is None:
        return None
    kinds = field_kinds(spec)

    def conditions(clause: list[Condition]) -> list[models.Condition] | None:
        return [_client_condition(c, kinds[c.key]) for c in clause] or None

    return models.Filter(
        must=conditions(where.must), should=conditions(where.should), must_not=conditions(where.must_not)
    )


class ServerStore:
    """VectorStore over a Qdrant server (``url``) or qdrant-client's in-process ':memory:' mode."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        hnsw_ef: int = DEFAULT_HNSW_EF,
    ) -> None:
        if url == MEMORY:
            self._client = QdrantClient(location=MEMORY)
        else:
            # No compatibility check: it is a request at construction time that only warns. The
            # metadata read-back in create_collection catches the incompatibility that matters.
            self._client = QdrantClient(
                url=url, api_key=api_key, timeout=max(1, math.ceil(timeout_s)), check_compatibility=False
            )
        self._serial = threading.Lock() if url == MEMORY else None
        # Local mode is brute force already and warns on every search that sets parameters. The
        # server uses max(hnsw_ef, limit) candidates, so a fixed ef also covers large top_k.
        self._params = None if url == MEMORY else models.SearchParams(hnsw_ef=hnsw_ef)
        self._specs: dict[str, CollectionSpec] = {}
        self._specs_lock = threading.Lock()

    @contextlib.contextmanager
    def _call(self, action: str) -> Iterator[None]:
        try:
            if self._serial is None:
                yield
            else:
                with self._serial:
                    yield
        except _CLIENT_ERRORS as exc:
            raise store_error(action, exc) from exc

    def ping(self) -> None:
        with self._call("ping"):
            self._client.get_collections()

    def get_collection(self, name: str) -> CollectionSpec | None:
        spec = self._fetch_spec(name)
        with self._specs_lock:
            if spec is None:
                self._specs.pop(name, None)
            else:
                self._specs[name] = spec
        return spec

    def create_collection(self, name: str, spec: CollectionSpec) -> None:
        stored = self.get_collection(name)
        if stored is None:
            sparse = (
                {BM25_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)}
                if spec.sparse
                else None
            )
            with self._call(f"create collection {name!r}"):
                self._client.create_collection(
                    name,
                    vectors_config=models.VectorParams(size=spec.dim, distance=models.Distance.COSINE),
                    sparse_vectors_config=sparse,
                    metadata={SPEC_KEY: spec.model_dump(mode="json")},
                )
            stored = self.get_collection(name)
            if stored is None:
                raise StoreError(f"collection {name!r} vanished right after creation")
        error = schema.mismatch_error(name, stored, spec)
        if error is not None:
            raise error
        # Also on an existing collection: completes one whose creation was interrupted before its indexes.
        self._ensure_indexes(name, spec)

    def count(self, name: str) -> int:
        self._spec(name)
        with self._call(f"count {name!r}"):
            return self._client.count(name, exact=True).count

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        if not doc_ids:
            return {}
        self._spec(name)
        ids: list[int | str] = [point_id(d) for d in dict.fromkeys(doc_ids)]
        with self._call(f"retrieve from {name!r}"):
            records = self._client.retrieve(name, ids, with_payload=schema.HASH_FIELDS, with_vectors=False)
        return schema.hashes_of([r.payload for r in records])

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        if not points:
            return
        schema.check_points(self._spec(name), points)
        for start in range(0, len(points), UPSERT_BATCH):
            batch = [
                models.PointStruct(id=point_id(p.doc_id), vector=_vectors(p), payload=schema.payload_of(p))
                for p in points[start : start + UPSERT_BATCH]
            ]
            with self._call(f"upsert into {name!r}"):
                self._client.upsert(name, points=batch, wait=True)

    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int,
        filters: FilterLike | None = None,
        score_threshold: float | None = None,
        sparse: SparseVector | None = None,
    ) -> list[Hit]:
        schema.check_top_k(top_k)
        spec = self._spec(name)
        query = schema.query_vector(spec, vector)
        where = _client_filter(spec, checked_filter(spec, filters))
        if sparse is not None:
            schema.check_hybrid(spec)
        with self._call(f"search {name!r}"):
            if sparse is None:
                response = self._client.query_points(
                    name,
                    query=query,
                    query_filter=where,
                    limit=top_k,
                    with_payload=True,
                    with_vectors=False,
                    score_threshold=score_threshold,
                    search_params=self._params,
                )
            else:
                depth = schema.prefetch_depth(top_k)
                response = self._client.query_points(
                    name,
                    prefetch=[
                        models.Prefetch(
                            query=query,
                            filter=where,
                            limit=depth,
                            score_threshold=score_threshold,
                            params=self._params,
                        ),
                        models.Prefetch(
                            query=_client_sparse(sparse), using=BM25_VECTOR, filter=where, limit=depth
                        ),
                    ],
                    query=models.RrfQuery(rrf=models.Rrf(k=schema.RRF_K)),
                    limit=top_k,
                    with_payload=True,
                    with_vectors=False,
                )
        return [schema.hit_of(p.payload, p.score) for p in response.points]

    def optimize(self, name: str) -> None:
        # The server's own optimizer indexes segments in the background; nothing to trigger.
        self._spec(name)

    def close(self) -> None:
        with self._call("close"):
            self._client.close()

    def _spec(self, name: str) -> CollectionSpec:
        # Cached: the spec of a collection never changes (a different one is a different collection),
        # and a search should cost one request, not two.
        with self._specs_lock:
            cached = self._specs.get(name)
        if cached is not None:
            return cached
        spec = self.get_collection(name)
        if spec is None:
            raise StoreError(f"collection {name!r} does not exist")
        return spec

    def _fetch_spec(self, name: str) -> CollectionSpec | None:
        with self._call(f"read collection {name!r}"):
            if not self._client.collection_exists(name):
                return None
            info = self._client.get_collection(name)
        raw = (info.config.metadata or {}).get(SPEC_KEY)
        if raw is None:
            raise StoreError(
                f"collection {name!r} records no medsearch spec in its metadata: it was created by another "
                "tool, or the server is older than Qdrant 1.16 and drops collection metadata"
            )
        try:
            return CollectionSpec.model_validate(raw)
        except ValidationError as exc:
            raise StoreError(f"collection {name!r} has an invalid medsearch spec: {exc}") from exc

    def _ensure_indexes(self, name: str, spec: CollectionSpec) -> None:
        with self._call(f"read payload indexes of {name!r}"):
            present = set(self._client.get_collection(name).payload_schema)
        for key, kind in field_kinds(spec).items():
            path = schema.metadata_path(key)
            if path in present:
                continue
            with self._call(f"create payload index {path!r} on {name!r}"):
                self._client.create_payload_index(name, path, field_schema=_INDEX_TYPES[kind], wait=True)
