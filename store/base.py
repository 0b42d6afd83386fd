"""One small interface over Qdrant. Backends: embedded engine (qdrant-edge) and a Qdrant server.

Every collection records which document space its vectors live in, so a query encoder from another
space is refused before it can return garbage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from store.sparse import Bm25Spec, SparseVector

if TYPE_CHECKING:
    from store.filters import FilterLike

# Fixed namespace: the same document id maps to the same point id in every deployment, so a rerun
# of the indexer overwrites instead of duplicating.
POINT_NAMESPACE = uuid.UUID("5b0e3c1e-8d2f-4a57-9a43-2f1f6c0d9e11")


# Chunks of a long document get ids in a namespace of their own: never equal to a whole document's.
CHUNK_NAMESPACE = uuid.uuid5(POINT_NAMESPACE, "chunk")


def point_id(doc_id: str, chunk: int | None = None) -> str:
    """Stable id of a whole document (``chunk`` None) or of its chunk number ``chunk``."""
    if chunk is None:
        return str(uuid.uuid5(POINT_NAMESPACE, doc_id))
    return str(uuid.uuid5(CHUNK_NAMESPACE, f"{chunk}:{doc_id}"))


class StoreError(RuntimeError):
    """The store answered, but refused the operation (bad schema, missing collection...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        # The server's HTTP status, when it answered with one: safe to log, unlike the message, which
        # quotes Qdrant's answer (it can echo filter values).
        self.status = status


class StoreUnavailable(StoreError):
    """The store could not be reached or timed out; callers may retry later."""


class ChunkingSpec(BaseModel):
    """How a collection's long documents were split (indexer/chunking.py): each chunk is a point."""

    model_config = ConfigDict(frozen=True)

    max_tokens: int = Field(
        gt=0,
        description="Most tokens of document text per chunk: the document encoder's limit less its prompt "
        "and special tokens",
        examples=[510],
    )
    overlap: int = Field(ge=0, description="Tokens consecutive chunks of a document share", examples=[64])

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkingSpec:
        if self.overlap >= self.max_tokens:
            raise ValueError(f"overlap ({self.overlap}) must be below max_tokens ({self.max_tokens})")
        return self


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
        description="sha256 of the document encoder's weights (an export of them records it as its origin).",
        examples=["f6b6c56905d97df7e7aa24a5237183dbc0c674d0522f43619419bbb89bf39987"],
    )
    encoding_fingerprint: str = Field(
        default="",
        description="sha256 of everything that shaped the vectors: the weights and the manifest's prompt, "
        "pooling, truncation and normalization ('' in collections indexed before it was recorded).",
        examples=["0d1f5a9c3e7b24680d1f5a9c3e7b24680d1f5a9c3e7b24680d1f5a9c3e7b2468"],
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
    chunking: ChunkingSpec | None = Field(
        default=None,
        description="Long documents split into chunks, one point each; a search returns each document "
        "once, with its best chunk. None: one point per whole document",
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
    chunk: int | None = Field(
        default=None,
        ge=0,
        description="Which chunk of the document this point is (a chunked collection); None: the whole "
        "document. ``text`` is then the chunk's text and the vectors the chunk's",
    )
    chunks: int | None = Field(
        default=None,
        gt=0,
        description="How many chunks the document has; set with ``chunk``. Writing a document's chunks "
        "removes any it had beyond these",
    )

    @model_validator(mode="after")
    def _chunk_within_chunks(self) -> DocumentPoint:
        if (self.chunk is None) != (self.chunks is None):
            raise ValueError("chunk and chunks are set together")
        if self.chunk is not None and self.chunks is not None and self.chunk >= self.chunks:
            raise ValueError(f"chunk {self.chunk} of a document with {self.chunks} chunks")
        return self


class Hit(BaseModel):
    doc_id: str
    score: float
    title: str
    text: str
    metadata: dict[str, object]
    chunk: int | None = None  # the best-matching chunk of the document; None: a whole-document point


class VectorStore(Protocol):
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...

    def get_collection(self, name: str) -> CollectionSpec | None: ...

    def create_collection(self, name: str, spec: CollectionSpec, bulk: bool = False) -> None:
        """Create ``name`` (idempotent; completes an interrupted creation). ``bulk``: it is loaded whole
        before anyone searches it, so the search index may be built once, by ``optimize``."""
        ...

    def count(self, name: str) -> int: ...

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        """doc_id -> content_hash for those of ``doc_ids`` already stored (in a chunked collection:
        whose first and last chunks are both stored with that hash)."""
        ...

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        """Write the points. In a chunked collection: the chunks of those documents beyond their new
        count are removed first, then the chunks are written in the order given (a document's in
        order, each carrying the document's content hash), so an interrupted write is never taken
        for a complete one by ``content_hashes``."""
        ...

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
        ``score_threshold`` applies to the dense candidates' cosine).

        In a chunked collection every hit is a distinct document, found by its best chunk (``chunk``
        and ``text`` are that chunk's): the ``top_k`` best documents, not the best chunks."""
        ...

    def optimize(self, name: str) -> None:
        """Build the search index over what was written and return once it is built."""
        ...

    def list_collections(self) -> list[str]:
        """Names of the collections (not aliases), sorted."""
        ...

    def delete_collection(self, name: str) -> None:
        """Delete a collection; refused while an alias points at it. Absent: nothing to do."""
        ...

    def aliases(self) -> dict[str, str]:
        """alias -> collection."""
        ...

    def switch_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` in one atomic step: readers see the old target or the new
        one, never neither. Every call that takes a collection name also takes an alias."""
        ...

    def document_ids(self, name: str) -> Iterator[str]:
        """Every stored document id (streamed, in no particular order)."""
        ...

    def delete_documents(self, name: str, doc_ids: Sequence[str]) -> None: ...

    def release(self, name: str) -> None:
        """Let go of what this process holds of the collection (the embedded engine's shard, which one
        process at a time may open), so that another process can serve it. Reopened on next use."""
        ...

    def vectors(self, name: str, doc_ids: Sequence[str]) -> dict[str, list[float]]:
        """doc_id -> stored dense vector, for those of ``doc_ids`` present."""
        ...

    def close(self) -> None: ...
