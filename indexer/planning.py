"""The collection spec an indexing run writes: planned from the document encoder, the declared filter
fields, BM25, chunking and vector storage, and checked against the collection it writes into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from models.encoder import Chunkable, Encoder
from store.base import VectorStore
from store.schema import spec_difference
from store.sparse import Bm25Spec
from store.spec import ChunkingSpec, CollectionSpec, Quantization, VectorStorage


class IndexingError(RuntimeError):
    """The run cannot start (e.g. the collection holds another document space)."""


@dataclass(frozen=True)
class FilterFields:
    """Metadata keys declared for filtering, by the type their values must have."""

    keyword: tuple[str, ...] = ()
    integer: tuple[str, ...] = ()
    date: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: CollectionSpec) -> FilterFields:
        return cls(spec.keyword_fields, spec.integer_fields, spec.date_fields)


@dataclass(frozen=True)
class StorageChoice:
    """``--quantization`` and ``--vectors-on-disk`` as given; None keeps what the collection has (for a
    full build: the served version's), so a routine reindex keeps the operator's earlier choice."""

    quantization: Quantization | Literal["none"] | None = None
    on_disk: bool | None = None

    def applied_to(self, current: VectorStorage | None) -> VectorStorage:
        current = current or VectorStorage()
        quantization = current.quantization
        if self.quantization is not None:
            quantization = None if self.quantization == "none" else self.quantization
        on_disk = current.on_disk if self.on_disk is None else self.on_disk
        return VectorStorage(quantization=quantization, on_disk=on_disk)


def chunking_of(encoder: Encoder, overlap: int | None) -> ChunkingSpec | None:
    """Chunks as long as the encoder reads, consecutive ones sharing ``overlap`` tokens; None (whole
    documents, truncated by the encoder) when ``overlap`` is None or the encoder cannot say how it
    counts tokens."""
    if overlap is None or not isinstance(encoder, Chunkable):
        return None
    budget = encoder.text_budget
    return ChunkingSpec(max_tokens=budget, overlap=min(overlap, budget // 2))


def collection_spec(
    encoder: Encoder, fields: FilterFields, chunking: ChunkingSpec | None = None
) -> CollectionSpec:
    manifest = encoder.manifest
    if manifest.role != "document":
        raise IndexingError(f"{manifest.name} is a {manifest.role} encoder; index with a document encoder")
    declared = [*fields.keyword, *fields.integer, *fields.date]
    repeated = sorted({key for key in declared if declared.count(key) > 1})
    if repeated:
        raise IndexingError(f"metadata fields declared with more than one type: {repeated}")
    return CollectionSpec(
        dim=manifest.dim,
        space=manifest.space,
        encoder=manifest.name,
        encoder_fingerprint=manifest.fingerprint,
        encoding_fingerprint=manifest.encoding_fingerprint,
        keyword_fields=tuple(sorted(set(fields.keyword))),
        integer_fields=tuple(sorted(set(fields.integer))),
        date_fields=tuple(sorted(set(fields.date))),
        chunking=chunking,
    )


def _describe(spec: CollectionSpec) -> str:
    bm25 = "with BM25 vectors" if spec.sparse is not None else "no BM25 vectors"
    place = "on disk" if spec.storage.on_disk else "in RAM"
    vectors = f"{spec.storage.quantization or 'float32'} vectors, originals {place}"
    fields = list(spec.filter_fields())
    return f"{spec.encoder} (space {spec.space!r}, filter fields {fields}, {bm25}, {vectors})"


def planned_spec(
    existing: CollectionSpec | None,
    encoder: Encoder,
    fields: FilterFields | None,
    sparse: bool | None = None,
    measure_bm25: Callable[[], Bm25Spec] | None = None,
    chunking: ChunkingSpec | Literal["keep"] | None = "keep",
    storage: VectorStorage | None = None,
) -> CollectionSpec:
    """The spec a run writes: ``fields`` / ``sparse`` / ``storage`` None and ``chunking`` "keep" keep
    ``existing``'s choice. New BM25 vectors take their average document length from ``measure_bm25``
    (a pass over the input)."""
    if chunking == "keep":
        chunking = existing.chunking if existing is not None else None
    if fields is None:
        fields = FilterFields.of(existing) if existing is not None else FilterFields()
    if storage is None:
        storage = existing.storage if existing is not None else VectorStorage()
    if sparse is None:
        sparse = existing is not None and existing.sparse is not None
    bm25 = None
    if sparse:
        if existing is not None and existing.sparse is not None:
            bm25 = existing.sparse
        elif measure_bm25 is not None:
            bm25 = measure_bm25()
        else:
            raise IndexingError("a collection with BM25 vectors needs its corpus to measure their lengths")
    return collection_spec(encoder, fields, chunking).model_copy(update={"sparse": bm25, "storage": storage})


def prepare_collection(
    store: VectorStore,
    collection: str,
    encoder: Encoder,
    fields: FilterFields | None,
    sparse: bool | None = None,
    measure_bm25: Callable[[], Bm25Spec] | None = None,
    storage: StorageChoice = StorageChoice(),
) -> CollectionSpec:
    """Create the collection, or check that an existing one holds this encoder's vectors, stored as
    ``storage`` asks. Chunking is the existing collection's (none for a new one): a full build
    creates its version, chunked or not, before indexing into it."""
    existing = store.get_collection(collection)
    wanted = storage.applied_to(existing.storage if existing is not None else None)
    spec = planned_spec(existing, encoder, fields, sparse, measure_bm25, storage=wanted)
    if existing is not None and existing != spec:
        raise IndexingError(
            f"collection {collection!r} holds vectors of {_describe(existing)}; this run would write "
            f"{_describe(spec)} ({spec_difference(existing, spec)}). Its documents cannot be updated in "
            "place: run a full build (without --incremental), or index into another collection."
        )
    # Also for an existing collection: creating is idempotent and completes one whose creation was
    # interrupted (a server collection without its payload indexes).
    store.create_collection(collection, spec)
    return spec
