"""One small interface over Qdrant. Backends: embedded engine (qdrant-edge) and a Qdrant server.

Every collection records which document space its vectors live in, so a query encoder from another
space is refused before it can return garbage.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from store.sparse import Bm25Spec, SparseVector

if TYPE_CHECKING:
    from store.filters import FilterLike

# Fixed namespace: the same document id maps to the same point id in every deployment, so a rerun
# of the indexer overwrites instead of duplicating.
POINT_NAMESPACE = uuid.UUID("5b0e3c1e-8d2f-4a57-9a43-2f1f6c0d9e11")


def point_id(doc_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, doc_id))


class StoreError(RuntimeError):
    """The store answered, but refused the operation (bad schema, missing collection...)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or timed out; callers may retry later."""


class CollectionSpec(BaseModel):
    """What a collection records about the vectors it holds."""

    model_config = ConfigDict(frozen=True)

    dim: int = Field(gt=0, description="Vector dimension.", examples=[384])
    space: str = Field(
        description="Vector space the documents were encoded into; queries must be encoded into it too.",
        examples=["multilingual-e5-small"],
    )
    encoder: str = Field(
        description="Name of the document encoder that produced the vectors.",
        examples=["multilingual-e5-small"],
    )
    encoder_fingerprint: str = Field(
        description="sha256 of the document encoder (weights and what shapes a vector).",
        examples=["f6b6c56905d97df7e7aa24a5237183dbc0c674d0522f43619419bbb89bf39987"],
    )
    keyword_fields: tuple[str, ...] = Field(
        default=(), description="metadata keys indexed for exact-match filtering", examples=[["department"]]
    )
    integer_fields: tuple[str, ...] = Field(
        default=(),
        description="metadata keys holding integers, indexed for match and range filters",
        examples=[["year"]],
    )
    date_fields: tuple[str, ...] = Field(
        default=(),
        description="metadata keys holding ISO 8601 dates, indexed for range filters",
        examples=[["updated"]],
    )
    sparse: Bm25Spec | None = Field(
        default=None,
        description="BM25 vectors beside the dense ones (hybrid search); None: dense only",
    )

    def filter_fields(self) -> tuple[str, ...]:
        return (*self.keyword_fields, *self.integer_fields, *self.date_fields)


class DocumentPoint(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    doc_id: str
    vector: list[float]
    title: str = ""
    text: str
    metadata: dict[str, object] = Field(default_factory=dict)
    content_hash: str = Field(description="sha256 of what was encoded; lets reruns skip unchanged docs")
    sparse: SparseVector | None = Field(default=None, description="BM25 vector, when the collection has them")


class Hit(BaseModel):
    doc_id: str
    score: float
    title: str
    text: str
    metadata: dict[str, object]


class VectorStore(Protocol):
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...

    def get_collection(self, name: str) -> CollectionSpec | None: ...

    def create_collection(self, name: str, spec: CollectionSpec) -> None: ...

    def count(self, name: str) -> int: ...

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        """doc_id -> content_hash for those of ``doc_ids`` already stored."""
        ...

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None: ...

    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int,
        filters: FilterLike | None = None,
        score_threshold: float | None = None,
        sparse: SparseVector | None = None,
    ) -> list[Hit]:
        """Nearest points by cosine, restricted by ``filters`` (a Filter, or a mapping of exact
        matches) on the collection's declared fields; points scoring below ``score_threshold`` are
        left out by the engine.

        With ``sparse`` (a BM25 query vector; the collection must hold BM25 vectors): hybrid search,
        the dense and the BM25 candidates fused by reciprocal rank (scores are then RRF scores, and
        ``score_threshold`` applies to the dense candidates' cosine)."""
        ...

    def optimize(self, name: str) -> None:
        """Build the search index over what was written (call once a bulk write is done)."""
        ...

    def close(self) -> None: ...
