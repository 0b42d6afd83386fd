"""One small interface over Qdrant. Backends: embedded engine (qdrant-edge) and a Qdrant server.

Every collection records which document space its vectors live in (store/spec.py), so a query
encoder from another space is refused before it can return garbage. Errors: store/errors.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from store.filters import FilterLike
from store.sparse import SparseVector
from store.spec import CollectionSpec

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
