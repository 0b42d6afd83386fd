"""The server backend: a Qdrant server over REST through qdrant-client (or its ':memory:' local mode).

The CollectionSpec lives in the collection's own metadata (``config.metadata["medsearch"]``), so it
travels with the collection through snapshots and cannot drift from it. Collection metadata needs
Qdrant >= 1.16; an older server silently drops it, which ``create_collection`` detects by reading the
spec back and refusing. The spec's ``storage`` (int8 quantization, vectors on disk) becomes the
collection's own config at creation, and every search takes its quantization parameters from it.

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
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx
import numpy as np
from pydantic import ValidationError
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ApiException, ResponseHandlingException, UnexpectedResponse

from store import schema
from store.base import DocumentPoint, Hit, point_id
from store.errors import StoreError, StoreUnavailable
from store.filters import FilterLike, Scalar, checked_filter
from store.qdrant import (
    DEFAULT_HNSW_EF,
    HNSW_M,
    INT8_OVERSAMPLING,
    INT8_QUANTILE,
    QdrantModels,
    Vectors,
    dense_vectors,
)
from store.sparse import BM25_VECTOR, SparseVector
from store.spec import CollectionSpec, VectorStorage

MEMORY = ":memory:"
SPEC_KEY = "medsearch"
# Requests stay well under the server's default 32 MiB body limit even with 4k-d vectors and long texts.
UPSERT_BATCH = 256
# Answers worth retrying: the server is overloaded, restarting, or behind a failing proxy.
_RETRYABLE_STATUS = {408, 429}


def store_error(action: str, exc: Exception) -> StoreError:
    """Map a qdrant-client / transport exception onto the store's two error kinds."""
    cause: BaseException = exc.source if isinstance(exc, ResponseHandlingException) else exc
    if isinstance(cause, httpx.TransportError | OSError):
        return StoreUnavailable(f"{action}: Qdrant unreachable ({type(cause).__name__}: {cause})")
    if isinstance(cause, UnexpectedResponse):
        status = cause.status_code or 0
        message = f"{action}: Qdrant answered {status} {cause.reason_phrase}: {cause.content[:300]!r}"
        if status in _RETRYABLE_STATUS or status >= 500:
            return StoreUnavailable(message, status)
        return StoreError(message, status)
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


class _ClientModels(QdrantModels[models.Condition, models.Filter, models.SparseVector, models.PointStruct]):
    """qdrant-client's classes for the mapping in store/qdrant.py."""

    def match(self, key: str, value: Scalar) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchValue(value=value))

    def match_any(self, key: str, values: list[str]) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchAny(any=values))

    def number_range(self, key: str, bounds: Mapping[str, float]) -> models.Condition:
        return models.FieldCondition(key=key, range=models.Range(**bounds))

    def date_range(self, key: str, bounds: Mapping[str, datetime]) -> models.Condition:
        return models.FieldCondition(key=key, range=models.DatetimeRange(**bounds))

    def filter(
        self,
        must: list[models.Condition] | None = None,
        should: list[models.Condition] | None = None,
        must_not: list[models.Condition] | None = None,
    ) -> models.Filter:
        return models.Filter(must=must, should=should, must_not=must_not)

    def sparse(self, vector: SparseVector) -> models.SparseVector:
        return models.SparseVector(indices=vector.indices, values=vector.values)

    def point(
        self, id: str, vectors: Vectors[models.SparseVector], payload: dict[str, Any]
    ) -> models.PointStruct:
        return models.PointStruct(id=id, vector=vectors, payload=payload)  # type: ignore[arg-type]  # the stub's dict is invariant


CLIENT = _ClientModels()


def search_params(hnsw_ef: int, storage: VectorStorage) -> models.SearchParams:
    """HNSW depth, and for quantized vectors a rescoring of the oversampled candidates with the
    originals (store/qdrant.py): built from the spec, so the caller never needs to know."""
    quantization = (
        models.QuantizationSearchParams(rescore=True, oversampling=INT8_OVERSAMPLING)
        if storage.quantization is not None
        else None
    )
    return models.SearchParams(hnsw_ef=hnsw_ef, quantization=quantization)


def storage_config(storage: VectorStorage) -> dict[str, Any]:
    """create_collection arguments for ``storage``. The legacy flags (``on_disk``, ``always_ram``),
    not Qdrant 1.19's ``memory`` tiers: deploy/ pins Qdrant 1.16, which knows only these."""
    quantization = (
        models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(
                type=models.ScalarType.INT8, quantile=INT8_QUANTILE, always_ram=True
            )
        )
        if storage.quantization is not None
        else None
    )
    return {"on_disk": True if storage.on_disk else None, "quantization_config": quantization}


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
        self._hnsw_ef = None if url == MEMORY else hnsw_ef
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

    def create_collection(self, name: str, spec: CollectionSpec, bulk: bool = False) -> None:
        """``bulk``: a collection about to be loaded whole and served only afterwards; the server
        builds no HNSW graph while points arrive (m 0), ``optimize`` builds it once at the end."""
        stored = self.get_collection(name)
        if stored is None:
            sparse = (
                {BM25_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)}
                if spec.sparse
                else None
            )
            storage = storage_config(spec.storage)
            with self._call(f"create collection {name!r}"):
                self._client.create_collection(
                    name,
                    vectors_config=models.VectorParams(
                        size=spec.dim, distance=models.Distance.COSINE, on_disk=storage["on_disk"]
                    ),
                    sparse_vectors_config=sparse,
                    hnsw_config=models.HnswConfigDiff(m=0) if bulk else None,
                    quantization_config=storage["quantization_config"],
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
        if self._spec(name).chunking is not None:
            return schema.chunked_hashes(
                lambda ids: self._payloads(name, ids, schema.CHUNK_HASH_FIELDS), doc_ids
            )
        return schema.hashes_of(
            self._payloads(name, [point_id(d) for d in dict.fromkeys(doc_ids)], schema.HASH_FIELDS)
        )

    def _payloads(self, name: str, ids: list[str], fields: list[str]) -> list[dict[str, Any] | None]:
        point_ids: list[int | str] = list(ids)
        with self._call(f"retrieve from {name!r}"):
            records = self._client.retrieve(name, point_ids, with_payload=fields, with_vectors=False)
        return [r.payload for r in records]

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        if not points:
            return
        schema.check_points(self._spec(name), points)
        for count, doc_ids in schema.stale_chunks(points).items():
            with self._call(f"delete stale chunks from {name!r}"):
                self._client.delete(name, points_selector=CLIENT.chunks_from(doc_ids, count), wait=True)
        for start in range(0, len(points), UPSERT_BATCH):
            batch = CLIENT.points(points[start : start + UPSERT_BATCH])
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
        where = CLIENT.query_filter(spec, checked_filter(spec, filters))
        if sparse is not None:
            schema.check_hybrid(spec)
        params = None if self._hnsw_ef is None else search_params(self._hnsw_ef, spec.storage)
        if spec.chunking is None:
            ranking = self._ranking(query, sparse, where, score_threshold, top_k, params)
            with self._call(f"search {name!r}"):
                response = self._client.query_points(
                    name, limit=top_k, with_payload=True, with_vectors=False, **ranking
                )
            return [schema.hit_of(p.payload, p.score) for p in response.points]
        # A chunked collection: Qdrant groups the chunks by their document and keeps each document's
        # best one. The hybrid candidate lists are as deep as the embedded backend's first
        # over-fetch (store/schema.py), so both fuse the same candidates.
        depth = top_k * schema.CHUNK_OVERFETCH
        ranking = self._ranking(query, sparse, where, score_threshold, depth, params)
        with self._call(f"search {name!r}"):
            result = self._client.query_points_groups(
                name,
                group_by=schema.DOC_ID_KEY,
                group_size=1,
                limit=top_k,
                with_payload=True,
                with_vectors=False,
                **ranking,
            )
        return [schema.hit_of(g.hits[0].payload, g.hits[0].score) for g in result.groups if g.hits]

    def _ranking(
        self,
        query: list[float],
        sparse: SparseVector | None,
        where: models.Filter | None,
        score_threshold: float | None,
        depth_for: int,
        params: models.SearchParams | None,
    ) -> dict[str, Any]:
        """What ranks the points, as query_points(_groups) arguments: the dense query, or the dense and
        BM25 candidate lists for ``depth_for`` results fused by RRF. ``params``: the dense search's."""
        if sparse is None:
            return {
                "query": query,
                "query_filter": where,
                "score_threshold": score_threshold,
                "search_params": params,
            }
        return {
            "prefetch": self._hybrid_prefetch(query, sparse, where, score_threshold, depth_for, params),
            "query": models.RrfQuery(rrf=models.Rrf(k=schema.RRF_K)),
        }

    def _hybrid_prefetch(
        self,
        query: list[float],
        sparse: SparseVector,
        where: models.Filter | None,
        score_threshold: float | None,
        top_k: int,
        params: models.SearchParams | None,
    ) -> list[models.Prefetch]:
        depth = schema.prefetch_depth(top_k)
        return [
            models.Prefetch(
                query=query, filter=where, limit=depth, score_threshold=score_threshold, params=params
            ),
            models.Prefetch(query=CLIENT.sparse(sparse), using=BM25_VECTOR, filter=where, limit=depth),
        ]

    def optimize(self, name: str, timeout_s: float = 3600.0) -> None:
        """Build the HNSW graph of a bulk-loaded collection and wait until the server reports it
        indexed (status green), so a collection is only validated and served once it is complete."""
        self._spec(name)
        with self._call(f"read collection {name!r}"):
            info = self._client.get_collection(name)
        if info.config.hnsw_config.m == 0:
            with self._call(f"enable indexing of {name!r}"):
                self._client.update_collection(name, hnsw_config=models.HnswConfigDiff(m=HNSW_M))
            with self._call(f"read collection {name!r}"):
                info = self._client.get_collection(name)  # the status the update brought
        deadline = time.monotonic() + timeout_s
        while info.status != models.CollectionStatus.GREEN:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"collection {name!r} still {info.status} after {timeout_s:.0f} s")
            time.sleep(1.0)
            with self._call(f"read collection {name!r}"):
                info = self._client.get_collection(name)

    def list_collections(self) -> list[str]:
        with self._call("list collections"):
            names = [c.name for c in self._client.get_collections().collections]
        return sorted(names)

    def delete_collection(self, name: str) -> None:
        holders = sorted(alias for alias, target in self.aliases().items() if target == name)
        if holders:
            raise StoreError(f"collection {name!r} is served through alias {holders[0]!r}; not deleted")
        with self._call(f"delete collection {name!r}"):
            self._client.delete_collection(name)
        with self._specs_lock:
            self._specs.pop(name, None)

    def release(self, name: str) -> None:
        """Nothing is held per collection: the server serves it to every client at once."""

    def aliases(self) -> dict[str, str]:
        with self._call("list aliases"):
            found = self._client.get_aliases().aliases
        return {a.alias_name: a.collection_name for a in found}

    def switch_alias(self, alias: str, collection: str) -> None:
        # One request: the server applies the delete and the create atomically, so a reader of the
        # alias sees the old collection or the new one, never neither.
        operations: list[models.AliasOperations] = []
        if alias in self.aliases():
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        with self._call(f"switch alias {alias!r} to {collection!r}"):
            self._client.update_collection_aliases(change_aliases_operations=operations)
        with self._specs_lock:
            self._specs.pop(alias, None)

    def document_ids(self, name: str) -> Iterator[str]:
        self._spec(name)
        offset: models.ExtendedPointId | None = None
        while True:
            with self._call(f"scroll {name!r}"):
                records, next_offset = self._client.scroll(
                    name,
                    limit=1024,
                    offset=offset,
                    with_payload=[schema.DOC_ID_KEY, schema.CHUNK_KEY],
                    with_vectors=False,
                )
            for record in records:
                if (doc_id := schema.head_doc_id(record.payload)) is not None:
                    yield doc_id
            if next_offset is None:
                return
            offset = next_offset

    def delete_documents(self, name: str, doc_ids: Sequence[str]) -> None:
        if not doc_ids:
            return
        self._spec(name)
        unique = list(dict.fromkeys(doc_ids))
        selector: models.PointsSelector
        if self._spec(name).chunking is not None:  # every chunk of each document
            selector = models.FilterSelector(filter=CLIENT.documents(unique))
        else:
            selector = models.PointIdsList(points=[point_id(d) for d in unique])
        with self._call(f"delete from {name!r}"):
            self._client.delete(name, points_selector=selector, wait=True)

    def vectors(self, name: str, doc_ids: Sequence[str]) -> dict[str, list[float]]:
        if not doc_ids:
            return {}
        ids: list[int | str] = list(schema.head_point_ids(self._spec(name), doc_ids))
        with self._call(f"retrieve from {name!r}"):
            records = self._client.retrieve(name, ids, with_payload=["doc_id"], with_vectors=True)
        return dense_vectors((r.payload, r.vector) for r in records)

    def close(self) -> None:
        with self._call("close"):
            self._client.close()

    def _spec(self, name: str) -> CollectionSpec:
        # Cached: the spec of a collection never changes (a different one is a different collection),
        # and a search should cost one request, not two. An alias' entry follows a switch when
        # get_collection re-reads it (the service does every MEDSEARCH_SPEC_REFRESH_S).
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
        for path, kind in schema.index_paths(spec).items():
            if path in present:
                continue
            with self._call(f"create payload index {path!r} on {name!r}"):
                self._client.create_payload_index(name, path, field_schema=_INDEX_TYPES[kind], wait=True)
