"""Retrieval runs: dense search through a throwaway embedded collection (the store code the service
uses), scoring of given candidates by cosine, and reciprocal-rank fusion of two runs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from evaluation.metrics import Run, rank
from evaluation.vectors import Vectors
from models.manifest import ModelManifest
from store.base import DocumentPoint, VectorStore
from store.factory import open_store
from store.spec import CollectionSpec, VectorStorage

TOP_K = 100
RRF_K = 60  # the constant of Cormack et al. (2009), used by most hybrid search engines
COLLECTION = "eval"
UPSERT_BATCH = 512


class DenseIndex:
    """Document vectors in a temporary embedded collection, searched like the service searches."""

    def __init__(self, store: VectorStore, collection: str) -> None:
        self._store = store
        self._collection = collection

    def run(
        self, qids: Sequence[str], vectors: np.ndarray, top_k: int = TOP_K
    ) -> dict[str, dict[str, float]]:
        return {
            qid: {hit.doc_id: hit.score for hit in self._store.search(self._collection, vector, top_k)}
            for qid, vector in zip(qids, vectors, strict=True)
        }


@contextmanager
def temporary_index(
    vectors: Vectors, manifest: ModelManifest, storage: VectorStorage | None = None
) -> Iterator[DenseIndex]:
    """An embedded collection holding ``vectors`` (ids and vectors only: hits need no text), stored as
    ``storage`` says (int8 quantization, on disk), so their effect on quality is measured through the
    store code that serves them."""
    with tempfile.TemporaryDirectory(prefix="medsearch-eval-") as tmp:
        store = open_store(None, Path(tmp))
        try:
            store.create_collection(
                COLLECTION,
                CollectionSpec(
                    dim=manifest.dim,
                    space=manifest.space,
                    encoder=manifest.name,
                    encoder_fingerprint=manifest.fingerprint,
                    storage=storage or VectorStorage(),
                ),
            )
            for start in range(0, len(vectors.ids), UPSERT_BATCH):
                ids = vectors.ids[start : start + UPSERT_BATCH]
                rows = vectors.matrix[start : start + UPSERT_BATCH]
                store.upsert(
                    COLLECTION,
                    [
                        DocumentPoint(doc_id=doc_id, vector=row.tolist(), text="", content_hash="")
                        for doc_id, row in zip(ids, rows, strict=True)
                    ],
                )
            # Searched as the service searches: HNSW once the graph is built.
            store.optimize(COLLECTION)
            yield DenseIndex(store, COLLECTION)
        finally:
            store.close()


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def score_candidates(
    candidates: Mapping[str, Sequence[str]],
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    documents: Vectors,
) -> Run:
    """Cosine of each query with each of its candidates (candidates missing from ``documents`` dropped)."""
    rows = documents.rows()
    unit_docs = unit_rows(documents.matrix)
    unit_queries = unit_rows(query_vectors)
    run: dict[str, dict[str, float]] = {}
    for qid, vector in zip(query_ids, unit_queries, strict=True):
        if qid not in candidates:
            continue
        present = [d for d in candidates[qid] if d in rows]
        cosines = unit_docs[[rows[d] for d in present]] @ vector if present else np.zeros(0)
        run[qid] = {d: float(c) for d, c in zip(present, cosines, strict=True)}
    return run


def reciprocal_rank_fusion(runs: Sequence[Run], top_k: int = TOP_K, k: int = RRF_K) -> Run:
    """sum over runs of 1 / (k + rank); each run ordered by ``rank`` (so ties break the same way)."""
    fused: dict[str, dict[str, float]] = {}
    for qid in dict.fromkeys(q for run in runs for q in run):
        scores: dict[str, float] = {}
        for run in runs:
            for position, doc in enumerate(rank(run.get(qid, {})), start=1):
                scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + position)
        fused[qid] = {doc: scores[doc] for doc in rank(scores)[:top_k]}
    return fused
