"""BM25 sparse vectors, computed by Qdrant's own BM25 (the qdrant-edge engine's implementation).

Documents carry term-frequency weights saturated with ``k`` and normalized by length with ``b`` and
the corpus' average length; queries carry one weight per term; the collection applies the IDF
modifier, so the inverse document frequencies come from the engine and stay current as documents are
added or deleted. The same code serves both backends: a Qdrant server stores and searches the vectors
it is given, with the same IDF modifier.

Text is split by Qdrant's multilingual tokenizer, which segments Chinese into words (高血压, 党参) and
keeps Latin terms, drug names and codes as tokens: the exact-term matches the dense encoders blur.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import qdrant_edge as qe
from pydantic import BaseModel, ConfigDict, Field

# The named sparse vector beside the collection's unnamed dense vector.
BM25_VECTOR = "bm25"


class Bm25Spec(BaseModel):
    """How a collection's sparse vectors were made; queries must be encoded the same way."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["bm25"] = Field(default="bm25", description="sparse scheme", examples=["bm25"])
    tokenizer: Literal["multilingual"] = Field(
        default="multilingual",
        description="Qdrant's multilingual tokenizer (Chinese word segmentation, Latin words)",
        examples=["multilingual"],
    )
    k: float = Field(default=1.2, gt=0, description="term-frequency saturation", examples=[1.2])
    b: float = Field(default=0.75, ge=0, le=1, description="length normalization", examples=[0.75])
    avg_len: float = Field(
        gt=0, description="average document length in tokens, measured at creation", examples=[58.3]
    )


class SparseVector(BaseModel):
    model_config = ConfigDict(frozen=True)

    indices: list[int]
    values: list[float]


def _config(k: float, b: float, avg_len: float | None = None) -> qe.Bm25Config:
    return qe.Bm25Config(k=k, b=b, avg_len=avg_len, tokenizer=qe.TokenizerType.Multilingual)


class Bm25Encoder:
    """Sparse vectors of one collection's BM25 spec. Thread-safe (the engine's encoder is immutable)."""

    def __init__(self, spec: Bm25Spec) -> None:
        self.spec = spec
        self._bm25 = qe.Bm25(_config(spec.k, spec.b, spec.avg_len))

    def document(self, text: str) -> SparseVector:
        vector = self._bm25.embed_document(text)
        return SparseVector(indices=list(vector.indices), values=list(vector.values))

    def query(self, text: str) -> SparseVector:
        vector = self._bm25.embed_query(text)
        return SparseVector(indices=list(vector.indices), values=list(vector.values))


def measure_spec(texts: Iterable[str]) -> Bm25Spec:
    """A BM25 spec whose average length is measured on ``texts`` (the corpus a collection starts with).

    With no length normalization (b = 0) and a saturation constant far above any count, the engine's
    document weights are the raw term counts, so their sum is the length in the same tokens BM25 uses.
    """
    counter = qe.Bm25(_config(k=1e9, b=0.0))
    total = documents = 0
    for text in texts:
        total += round(sum(counter.embed_document(text).values))
        documents += 1
    return Bm25Spec(avg_len=max(1.0, total / documents) if documents else 1.0)
