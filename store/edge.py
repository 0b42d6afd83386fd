"""The embedded backend: Qdrant's own engine in-process (qdrant-edge), one shard per collection.

Layout under the data directory::

    <root>/<collection>/collection.json   the CollectionSpec
    <root>/<collection>/shard/            the EdgeShard (segments, WAL)
    <root>/aliases.json                   alias -> collection (store/aliases.py)

Aliases are how a reindex switches what is served without a restart: the indexer builds a new
collection and then points the alias at it; every call resolves the alias afresh, while searches
already running finish on the collection they started on.

A collection is built in ``<root>/.creating-<collection>/`` and renamed into place once its shard,
payload indexes and spec are on disk, so a crash mid-creation never leaves a half-made collection
behind (the staging directory is discarded on the next attempt).

Searches use HNSW with a fixed candidate list (``hnsw_ef``). The edge engine builds the graph only
when ``optimize()`` runs, which the indexer calls once a run has written its points; until then (and
for segments under the full-scan threshold) the engine scans, which is exact. Exact search is not the
default because the engine holds the GIL for the whole query: an 18 ms scan of the 7,244-document
corpus stalled every other thread of the service (probes, the encoder's batcher) for its duration,
where an HNSW search takes well under a millisecond with the same top 10. That was measured once, by
hand (recall against exact search: store/qdrant.py and docs/results.md); no benchmark repeats it.

The spec's ``storage`` is applied when the shard is created (int8 quantization pinned in RAM, the
original vectors memory-mapped when on disk) and persisted by the engine in the shard's
``edge_config.json``; every search builds its parameters from the spec (``search_params``), so a
quantized collection is always searched with rescoring. Figures: docs/capacity.md.

The engine searches a shard's segments on a thread pool of its own, sized by the CPU count unless
told otherwise. ``search_threads`` sizes it when a shard is opened (passed with the shard's own
config, which the engine checks against the segments and writes back): the service opens with 1,
because a one-segment collection gains nothing from the pool and pays for its threads (docs/results.md).

Thread safety: EdgeShard methods take ``&self`` and lock inside the engine, so concurrent searches
and upserts need no Python lock (tests/test_store.py hammers one shard from several threads). The
lock here only guards which shards are open. The WAL lock makes a shard usable by one process at a
time; a second process gets StoreUnavailable until the first closes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe
from pydantic import ValidationError

from store import schema
from store.aliases import AliasCatalog
from store.base import DocumentPoint, Hit, point_id
from store.durable import fsync_dir, write_atomic
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

SPEC_FILE = "collection.json"
DELETING_PREFIX = ".deleting-"
SHARD_DIR = "shard"
STAGING_PREFIX = ".creating-"
# Collection names become directory names: no separators, no dot-files, no "..".
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise StoreError(f"invalid collection name {name!r}: use letters, digits, '_' and '-' (max 128)")


def _engine_error(action: str, exc: Exception) -> StoreError:
    # The engine raises plain Exception; a held WAL lock is the one case worth retrying.
    message = f"{action}: {exc}"
    if "WouldBlock" in str(exc):
        return StoreUnavailable(f"{message} (the data directory is in use by another process)")
    return StoreError(message)


_INDEX_TYPES = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "date": qe.PayloadSchemaType.Datetime,
}


class _EngineModels(QdrantModels[qe.FieldCondition, qe.Filter, qe.SparseVector, qe.Point]):
    """qdrant-edge's classes for the mapping in store/qdrant.py."""

    def match(self, key: str, value: Scalar) -> qe.FieldCondition:
        return qe.FieldCondition(key=key, match=qe.MatchValue(value))

    def match_any(self, key: str, values: list[str]) -> qe.FieldCondition:
        return qe.FieldCondition(key=key, match=qe.MatchAny(values))

    def number_range(self, key: str, bounds: Mapping[str, float]) -> qe.FieldCondition:
        return qe.FieldCondition(key=key, range=qe.RangeFloat(**bounds))

    def date_range(self, key: str, bounds: Mapping[str, datetime]) -> qe.FieldCondition:
        return qe.FieldCondition(
            key=key, range=qe.RangeDateTime(**{k: v.isoformat() for k, v in bounds.items()})
        )

    def filter(
        self,
        must: list[qe.FieldCondition] | None = None,
        should: list[qe.FieldCondition] | None = None,
        must_not: list[qe.FieldCondition] | None = None,
    ) -> qe.Filter:
        # Copied into lists of the stub's wider condition type (lists are invariant).
        return qe.Filter(
            must=[*must] if must else None,
            should=[*should] if should else None,
            must_not=[*must_not] if must_not else None,
        )

    def sparse(self, vector: SparseVector) -> qe.SparseVector:
        return qe.SparseVector(vector.indices, vector.values)

    def point(self, id: str, vectors: Vectors[qe.SparseVector], payload: dict[str, Any]) -> qe.Point:
        return qe.Point(id, vectors, payload)  # type: ignore[arg-type]  # the stub's dict is invariant


ENGINE = _EngineModels()


@dataclass(frozen=True)
class _OpenCollection:
    """A collection this process has open: the engine's shard, the spec read beside it and the search
    parameters that spec calls for."""

    shard: qe.EdgeShard
    spec: CollectionSpec
    params: qe.SearchParams
    chunk_rate: schema.ChunkRate = field(default_factory=schema.ChunkRate)


def search_params(hnsw_ef: int, storage: VectorStorage) -> qe.SearchParams:
    """HNSW depth, and for quantized vectors a rescoring of the oversampled candidates with the
    originals (store/qdrant.py): built from the spec, so whatever the collection holds is searched
    the way it was built for, without the caller knowing."""
    if storage.quantization is None:
        return qe.SearchParams(hnsw_ef=hnsw_ef)
    return qe.SearchParams(
        hnsw_ef=hnsw_ef,
        quantization=qe.QuantizationSearchParams(rescore=True, oversampling=INT8_OVERSAMPLING),
    )


def _vector_params(spec: CollectionSpec) -> qe.EdgeVectorParams:
    # Memory.Cold: memory-mapped, read on demand. None keeps the engine's default (Cached: mapped and
    # warmed into the page cache at load), which every collection before VectorStorage has.
    memory = qe.Memory.Cold if spec.storage.on_disk else None
    return qe.EdgeVectorParams(size=spec.dim, distance=qe.Distance.Cosine, memory=memory)


def _quantization(storage: VectorStorage) -> qe.ScalarQuantizationConfig | None:
    if storage.quantization is None:
        return None
    # Pinned: on the heap, never evicted (what a server's always_ram means).
    return qe.ScalarQuantizationConfig(
        type=qe.ScalarType.Int8, quantile=INT8_QUANTILE, memory=qe.Memory.Pinned
    )


def _edge_config(spec: CollectionSpec, search_threads: int | None = None) -> qe.EdgeConfig:
    """The shard config ``spec`` calls for: what a shard is created with, and what it is opened with
    when the search pool is sized (the engine refuses a config its segments do not match)."""
    return qe.EdgeConfig(
        vectors=_vector_params(spec),
        sparse_vectors=(
            {BM25_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if spec.sparse else None
        ),
        hnsw_config=HNSW,
        quantization_config=_quantization(spec.storage),
        max_search_threads=search_threads,
    )


def _retrieve(
    coll: _OpenCollection,
    name: str,
    ids: Sequence[qe.PointId],
    fields: list[str],
    with_vector: bool | list[str] = False,
) -> list[qe.Record]:
    try:
        return coll.shard.retrieve(
            list(ids), with_payload=qe.PayloadSelector.Include(fields), with_vector=with_vector
        )
    except Exception as exc:
        raise _engine_error(f"retrieve from {name!r}", exc) from exc


def _retrieve_documents(
    coll: _OpenCollection,
    name: str,
    doc_ids: Sequence[str],
    fields: list[str],
    with_vector: bool | list[str] = False,
) -> list[qe.Record]:
    """The points holding ``doc_ids`` (the first chunk of each, in a chunked collection)."""
    return _retrieve(coll, name, schema.head_point_ids(coll.spec, doc_ids), fields, with_vector)


# HNSW graph shape: Qdrant's defaults (m 16, ef_construct 100). Segments under the full-scan threshold
# (in KB of vectors: 10,000 is ~6,600 384-d vectors) are searched exactly, which is cheap at that size.
HNSW = qe.HnswIndexConfig(m=HNSW_M, ef_construct=100, full_scan_threshold=10_000)


class EdgeStore:
    """VectorStore over qdrant-edge shards in ``root``."""

    def __init__(self, root: Path, hnsw_ef: int = DEFAULT_HNSW_EF, search_threads: int | None = None) -> None:
        """``search_threads``: size of each opened shard's search pool; None keeps the engine's."""
        if search_threads is not None and search_threads < 1:
            raise ValueError(f"search_threads must be positive (or None), got {search_threads}")
        self._root = root
        self._hnsw_ef = hnsw_ef
        self._search_threads = search_threads
        self._lock = threading.Lock()
        self._open: dict[str, _OpenCollection] = {}
        self._closed = False
        self._catalog = AliasCatalog(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the embedded store directory {root}: {exc}") from exc

    def ping(self) -> None:
        with self._lock:
            self._check_open()

    def get_collection(self, name: str) -> CollectionSpec | None:
        _check_name(name)
        with self._lock:
            self._check_open()
            name = self._resolve(name)
            opened = self._open.get(name)
            if opened is not None:
                if (self._root / name).is_dir():
                    return opened.spec
                # Deleted under us (by hand or another process): forget the handle, report what disk says.
                del self._open[name]
                with contextlib.suppress(Exception):
                    opened.shard.close()
            return self._read_spec(name)

    def create_collection(self, name: str, spec: CollectionSpec, bulk: bool = False) -> None:
        # ``bulk`` changes nothing here: the engine builds its graph only in optimize() anyway.
        _check_name(name)
        with self._lock:
            self._check_open()
            if name in self._read_aliases():
                raise StoreError(f"{name!r} is an alias; a collection cannot take its name")
            stored = self._open[name].spec if name in self._open else self._read_spec(name)
            if stored is not None:
                error = schema.mismatch_error(name, stored, spec)
                if error is not None:
                    raise error
                return
            target = self._root / name
            if target.exists():
                raise StoreError(f"{target} exists but holds no {SPEC_FILE}; not a medsearch collection")
            staging = self._root / f"{STAGING_PREFIX}{name}"
            # Left over by a crash during an earlier creation: it never became visible, so drop it.
            try:
                shutil.rmtree(staging, ignore_errors=True)
                self._build(staging, spec)
                os.rename(staging, target)
                fsync_dir(self._root)
            except OSError as exc:
                raise StoreError(f"cannot create collection {name!r} in {self._root}: {exc}") from exc
            self._open[name] = self._opened(name, spec)

    def count(self, name: str) -> int:
        coll = self._collection(name)
        try:
            return coll.shard.count(qe.CountRequest(exact=True))
        except Exception as exc:
            raise _engine_error(f"count {name!r}", exc) from exc

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        if not doc_ids:
            return {}
        coll = self._collection(name)
        if coll.spec.chunking is not None:
            return schema.chunked_hashes(
                lambda ids: [r.payload for r in _retrieve(coll, name, ids, schema.CHUNK_HASH_FIELDS)], doc_ids
            )
        records = _retrieve_documents(coll, name, doc_ids, schema.HASH_FIELDS)
        return schema.hashes_of([r.payload for r in records])

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        if not points:
            return
        coll = self._collection(name)
        schema.check_points(coll.spec, points)
        batch = ENGINE.points(points)
        try:
            for count, doc_ids in schema.stale_chunks(points).items():
                coll.shard.update(
                    qe.UpdateOperation.delete_points_by_filter(ENGINE.chunks_from(doc_ids, count))
                )
            coll.shard.update(qe.UpdateOperation.upsert_points(batch))
        except Exception as exc:
            raise _engine_error(f"upsert into {name!r}", exc) from exc

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
        coll = self._collection(name)
        query = schema.query_vector(coll.spec, vector)
        where = ENGINE.query_filter(coll.spec, checked_filter(coll.spec, filters))
        if sparse is not None:
            schema.check_hybrid(coll.spec)

        def ranked(limit: int) -> list[schema.Scored]:
            return self._query(coll, name, query, limit, where, score_threshold, sparse)

        if coll.spec.chunking is not None:
            return schema.grouped_by_overfetch(ranked, top_k, coll.chunk_rate)
        return [schema.hit_of(payload, score) for payload, score in ranked(top_k)]

    def _query(
        self,
        coll: _OpenCollection,
        name: str,
        query: list[float],
        limit: int,
        where: qe.Filter | None,
        score_threshold: float | None,
        sparse: SparseVector | None,
    ) -> list[schema.Scored]:
        if sparse is None:
            request = qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(query),
                filter=where,
                with_payload=True,
                with_vector=False,
                score_threshold=score_threshold,
                params=coll.params,
            )
        else:
            depth = schema.prefetch_depth(limit)
            request = qe.QueryRequest(
                limit=limit,
                prefetches=[
                    qe.Prefetch(
                        limit=depth,
                        query=qe.Query.Nearest(query),
                        filter=where,
                        score_threshold=score_threshold,
                        params=coll.params,
                    ),
                    qe.Prefetch(
                        limit=depth,
                        query=qe.Query.Nearest(ENGINE.sparse(sparse), using=BM25_VECTOR),
                        filter=where,
                    ),
                ],
                query=qe.Fusion.Rrf(k=schema.RRF_K),  # type: ignore[arg-type]  # stub lacks the variant
                with_payload=True,
                with_vector=False,
            )
        try:
            points = coll.shard.query(request)
        except Exception as exc:
            raise _engine_error(f"search {name!r}", exc) from exc
        return [(p.payload, p.score) for p in points]

    def optimize(self, name: str) -> None:
        coll = self._collection(name)
        try:
            coll.shard.optimize()
        except Exception as exc:
            raise _engine_error(f"optimize {name!r}", exc) from exc

    def list_collections(self) -> list[str]:
        with self._lock:
            self._check_open()
            try:
                entries = sorted(self._root.iterdir())
            except OSError as exc:
                raise StoreUnavailable(f"cannot list {self._root}: {exc}") from exc
            return [p.name for p in entries if _NAME.match(p.name) and (p / SPEC_FILE).is_file()]

    def delete_collection(self, name: str) -> None:
        _check_name(name)
        with self._lock, self._catalog.locked():
            self._check_open()
            targets = self._read_aliases()
            holders = sorted(alias for alias, target in targets.items() if target == name)
            if holders:
                raise StoreError(f"collection {name!r} is served through alias {holders[0]!r}; not deleted")
            target = self._root / name
            if not (target / SPEC_FILE).is_file():
                return
            opened = self._open.pop(name, None)
            if opened is not None:
                opened.shard.close()
            # Renamed first, so the collection vanishes at once and a crash leaves only a dot-directory.
            doomed = self._root / f"{DELETING_PREFIX}{name}"
            try:
                shutil.rmtree(doomed, ignore_errors=True)
                os.rename(target, doomed)
                fsync_dir(self._root)
            except OSError as exc:
                raise StoreError(f"cannot delete collection {name!r}: {exc}") from exc
            shutil.rmtree(doomed, ignore_errors=True)

    def release(self, name: str) -> None:
        _check_name(name)
        with self._lock:
            opened = self._open.pop(self._resolve(name), None)
        if opened is not None:
            try:
                opened.shard.flush()
                opened.shard.close()
            except Exception as exc:
                raise _engine_error(f"close {name!r}", exc) from exc

    def aliases(self) -> dict[str, str]:
        with self._lock:
            self._check_open()
            return dict(self._read_aliases())

    def switch_alias(self, alias: str, collection: str) -> None:
        _check_name(alias)
        _check_name(collection)
        with self._lock, self._catalog.locked():
            self._check_open()
            if (self._root / alias / SPEC_FILE).exists():
                raise StoreError(f"{alias!r} is a collection; an alias cannot take its name")
            if self._read_spec(collection) is None:
                raise StoreError(f"collection {collection!r} does not exist in {self._root}")
            self._catalog.write({**self._read_aliases(), alias: collection})

    def document_ids(self, name: str) -> Iterator[str]:
        coll = self._collection(name)
        offset: qe.PointId | None = None
        while True:
            request = qe.ScrollRequest(
                offset=offset,
                limit=1024,
                with_payload=qe.PayloadSelector.Include([schema.DOC_ID_KEY, schema.CHUNK_KEY]),
                with_vector=False,
            )
            try:
                records, offset = coll.shard.scroll(request)
            except Exception as exc:
                raise _engine_error(f"scroll {name!r}", exc) from exc
            for record in records:
                if (doc_id := schema.head_doc_id(record.payload)) is not None:
                    yield doc_id
            if offset is None:
                return

    def delete_documents(self, name: str, doc_ids: Sequence[str]) -> None:
        if not doc_ids:
            return
        coll = self._collection(name)
        unique = list(dict.fromkeys(doc_ids))
        if coll.spec.chunking is not None:  # every chunk of each document
            operation = qe.UpdateOperation.delete_points_by_filter(ENGINE.documents(unique))
        else:
            operation = qe.UpdateOperation.delete_points([point_id(d) for d in unique])
        try:
            coll.shard.update(operation)
        except Exception as exc:
            raise _engine_error(f"delete from {name!r}", exc) from exc

    def vectors(self, name: str, doc_ids: Sequence[str]) -> dict[str, list[float]]:
        if not doc_ids:
            return {}
        records = _retrieve_documents(self._collection(name), name, doc_ids, ["doc_id"], [""])
        return dense_vectors((r.payload, r.vector) for r in records)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            opened, self._open = self._open, {}
        errors = []
        for name, coll in opened.items():
            try:
                coll.shard.flush()
                coll.shard.close()
            except Exception as exc:
                errors.append(_engine_error(f"close {name!r}", exc))
        if errors:
            raise errors[0]

    def _check_open(self) -> None:
        """Called with the lock held, before every operation (a stat: about a microsecond)."""
        if self._closed:
            raise StoreError("the embedded store is closed")
        if not self._root.is_dir():
            # Unmounted or moved away: open shards would go on answering from files nobody can update
            # or back up any more. Unavailable until the directory is back, then read from disk again.
            self._drop_open()
            raise StoreUnavailable(f"the embedded store directory {self._root} is missing")

    def _drop_open(self) -> None:
        opened, self._open = self._open, {}
        for coll in opened.values():
            with contextlib.suppress(Exception):  # its files may be gone: nothing left to flush to
                coll.shard.close()

    def _collection(self, name: str) -> _OpenCollection:
        _check_name(name)
        with self._lock:
            self._check_open()
            name = self._resolve(name)
            if name not in self._open:
                spec = self._read_spec(name)
                if spec is None:
                    raise StoreError(f"collection {name!r} does not exist in {self._root}")
                self._open[name] = self._opened(name, spec)
            return self._open[name]

    def _resolve(self, name: str) -> str:
        """The collection ``name`` stands for: an alias' target, else itself (caller holds the lock)."""
        return self._read_aliases().get(name, name)

    def _read_aliases(self) -> dict[str, str]:
        """The alias catalog as it is on disk now (caller holds the lock)."""
        aliases, retired = self._catalog.read()
        # A collection no alias serves any more is forgotten, not closed: searches still running on
        # it hold their reference, and the engine releases the shard when the last one lets go.
        for name in retired:
            self._open.pop(name, None)
        return aliases

    def _read_spec(self, name: str) -> CollectionSpec | None:
        path = self._root / name / SPEC_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc}") from exc
        try:
            return CollectionSpec.model_validate_json(text)
        except ValidationError as exc:
            raise StoreError(f"{path} is not a valid collection spec: {exc}") from exc

    def _opened(self, name: str, spec: CollectionSpec) -> _OpenCollection:
        return _OpenCollection(self._load_shard(name, spec), spec, search_params(self._hnsw_ef, spec.storage))

    def _load_shard(self, name: str, spec: CollectionSpec) -> qe.EdgeShard:
        path = self._root / name / SHARD_DIR
        config = None if self._search_threads is None else _edge_config(spec, self._search_threads)
        try:
            return qe.EdgeShard.load(str(path), config)
        except Exception as exc:
            raise _engine_error(f"open {path}", exc) from exc

    def _build(self, staging: Path, spec: CollectionSpec) -> None:
        try:
            shard = qe.EdgeShard.create(str(staging / SHARD_DIR), _edge_config(spec))
            try:
                for path, kind in schema.index_paths(spec).items():
                    shard.update(qe.UpdateOperation.create_field_index(path, _INDEX_TYPES[kind]))
                shard.flush()
            finally:
                shard.close()
        except Exception as exc:
            raise _engine_error(f"create shard in {staging}", exc) from exc
        write_atomic(staging / SPEC_FILE, spec.model_dump_json(indent=2) + "\n")
