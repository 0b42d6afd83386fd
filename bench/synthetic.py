"""Synthetic document vectors shaped like a real encoder's, the queries near them and their exact top k.

A capacity run needs collections of 100k and 1M documents that nobody has encoded (EmbeddingGemma
does ~7.5 documents/s on 2 cores). Vectors are drawn from a Gaussian with the mean and covariance of
real corpus vectors (768-d EmbeddingGemma vectors of cmedqa-im, from the evaluation's cache), then
normalised as the encoder normalises: the same mean direction (cosine of random pairs ~0.46), the same
spread by direction. What a Gaussian lacks is the real corpus' clusters (near-duplicate answers, one
topic's documents): a real document's nearest neighbour is closer (mean cosine 0.85 at 7,244
documents, against 0.72 drawn), so HNSW recall on these vectors is, if anything, pessimistic.

Without a cache, ``fallback_model`` draws from a Gaussian of the same mean norm, total variance and
power-law spectrum as EmbeddingGemma's (measured on 2026-12-03), oriented at random.

Vectors come in chunks, each drawn from its own seed (``seed``, chunk number), so the first N
documents are the same in every process and every size: a child process regenerates exactly what the
parent computed the exact neighbours of, without either holding a million vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 4096
TOP_K = 10
# Fallback spectrum: EmbeddingGemma-300M on the 7,244 cmedqa-im documents has |mean| 0.675, total
# variance 0.544 and eigenvalues falling as k^-1.11 over the first 256 directions.
FALLBACK_DIM = 768
FALLBACK_MEAN_NORM = 0.675
FALLBACK_TOTAL_VARIANCE = 0.544
FALLBACK_DECAY = 1.11
# A query is a document plus noise drawn from the documents' own spread (no mean): cosine ~0.8 to it,
# so its true neighbours are that document and others around it, not the document alone.
QUERY_NOISE = 1.0


@dataclass(frozen=True)
class VectorModel:
    """Vectors = normalise(mean + z @ factor.T), z standard normal: covariance factor @ factor.T."""

    mean: np.ndarray  # (dim,)
    factor: np.ndarray  # (dim, dim)
    source: str

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.mean.astype(np.float32).tobytes())
        digest.update(self.factor.astype(np.float32).tobytes())
        return digest.hexdigest()[:16]

    def draw(self, rng: np.random.Generator, n: int, centred: bool = False) -> np.ndarray:
        """``n`` float32 rows; ``centred``: the spread alone, unnormalised (query noise)."""
        z = rng.standard_normal((n, self.dim), dtype=np.float32)
        rows = z @ self.factor.T
        if centred:
            return rows
        return _unit(rows + self.mean)

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, mean=self.mean, factor=self.factor, source=np.asarray(self.source))

    @classmethod
    def load(cls, path: Path) -> VectorModel:
        with np.load(path, allow_pickle=False) as saved:
            return cls(saved["mean"], saved["factor"], str(saved["source"]))


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def fitted_model(matrix: np.ndarray, source: str) -> VectorModel:
    """The Gaussian of ``matrix``'s rows (float64 statistics, float32 model)."""
    rows = np.asarray(matrix, dtype=np.float64)
    covariance = np.cov(rows, rowvar=False)
    values, vectors = np.linalg.eigh(covariance)
    factor = vectors * np.sqrt(np.clip(values, 0.0, None))
    return VectorModel(rows.mean(axis=0).astype(np.float32), factor.astype(np.float32), source)


def fallback_model(seed: int = 0, dim: int = FALLBACK_DIM) -> VectorModel:
    rng = np.random.default_rng([seed, 1])
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -FALLBACK_DECAY
    spectrum *= FALLBACK_TOTAL_VARIANCE / spectrum.sum()
    direction = rng.standard_normal(dim)
    mean = FALLBACK_MEAN_NORM * direction / np.linalg.norm(direction)
    source = (
        f"fallback: Gaussian, |mean| {FALLBACK_MEAN_NORM}, total variance {FALLBACK_TOTAL_VARIANCE}, "
        f"spectrum k^-{FALLBACK_DECAY} (EmbeddingGemma's shape), random orientation"
    )
    return VectorModel(mean.astype(np.float32), (basis * np.sqrt(spectrum)).astype(np.float32), source)


def chunk_of(model: VectorModel, seed: int, index: int, size: int) -> np.ndarray:
    """Documents ``index * CHUNK`` ... (at most ``CHUNK``) of a collection of ``size``."""
    count = min(CHUNK, size - index * CHUNK)
    return model.draw(np.random.default_rng([seed, index]), count)


def documents(model: VectorModel, seed: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first document number, vectors) chunk by chunk: documents 0 .. size-1."""
    for index in range((size + CHUNK - 1) // CHUNK):
        yield index * CHUNK, chunk_of(model, seed, index, size)


@dataclass(frozen=True)
class Truth:
    """Held-out queries and their exact top ``TOP_K`` documents by cosine (brute force)."""

    queries: np.ndarray  # (q, dim) unit rows
    anchors: np.ndarray  # (q,) the document each query was drawn near
    neighbours: np.ndarray  # (q, TOP_K) document numbers, best first

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, queries=self.queries, anchors=self.anchors, neighbours=self.neighbours)

    @classmethod
    def load(cls, path: Path) -> Truth:
        with np.load(path, allow_pickle=False) as saved:
            return cls(saved["queries"], saved["anchors"], saved["neighbours"])


def exact_truth(model: VectorModel, seed: int, size: int, count: int) -> Truth:
    """``count`` queries near random documents of the collection, and their exact neighbours: the
    float32 cosine ranking Qdrant's exact search computes, here in numpy over the regenerated vectors,
    so that it neither depends on the engine under test nor pages an on-disk collection's vectors into
    the process being measured."""
    rng = np.random.default_rng([seed, size, 2])
    anchors = np.sort(rng.choice(size, size=min(count, size), replace=False))
    picked = np.concatenate(
        [
            chunk_of(model, seed, int(index), size)[anchors[anchors // CHUNK == index] - index * CHUNK]
            for index in np.unique(anchors // CHUNK)
        ]
    )
    queries = _unit(picked + QUERY_NOISE * model.draw(rng, len(anchors), centred=True))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for first, chunk in documents(model, seed, size):
        scores = np.concatenate([best_scores, queries @ chunk.T], axis=1)
        numbers = np.broadcast_to(np.arange(first, first + len(chunk)), (len(queries), len(chunk)))
        ids = np.concatenate([best_ids, numbers], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return Truth(queries, anchors, best_ids)


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean share of each query's true top k among the k documents found."""
    k = truth.shape[1]
    hits = sum(len(set(f[:k]) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(found))
