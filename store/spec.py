"""What a collection records about the vectors it holds: checked on every search and every reindex."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from store.sparse import Bm25Spec


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


Quantization = Literal["int8"]


class VectorStorage(BaseModel):
    """How the engine keeps a collection's dense vectors. Fixed when the collection is created (Qdrant
    builds its segments for it), so another choice is another collection: a full build."""

    model_config = ConfigDict(frozen=True)

    quantization: Quantization | None = Field(
        default=None,
        description="Qdrant scalar quantization: 'int8' keeps a 1-byte-per-dimension copy of every vector "
        "in RAM (4x smaller than float32), which searches walk the graph with; the best candidates are "
        "then rescored with the original vectors (oversampled). None: original vectors only",
        examples=["int8"],
    )
    on_disk: bool = Field(
        default=False,
        description="The original float32 vectors are memory-mapped from disk and read on demand instead "
        "of held in RAM; with int8 quantization a search reads them only to rescore its candidates",
        examples=[False],
    )


# Fields added after versioned builds existed: left out of a spec's identity while at their default,
# so a collection built before them keeps its version name and a rerun of its build stays a no-op.
_ADDED_LATER = {"storage": VectorStorage()}


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
    storage: VectorStorage = Field(
        default_factory=VectorStorage,
        description="How the dense vectors are stored and searched (quantization, on disk); collections "
        "written before it was recorded hold float32 vectors in RAM, the default",
    )

    def filter_fields(self) -> tuple[str, ...]:
        return (*self.keyword_fields, *self.integer_fields, *self.date_fields)

    def identity_json(self) -> str:
        """The JSON a digest of the spec is taken over (indexer/versions.py): fields added later are
        left out while at their default, so the digest of an older spec has not changed."""
        unchanged = {key for key, default in _ADDED_LATER.items() if getattr(self, key) == default}
        return self.model_dump_json(exclude=unchanged)
