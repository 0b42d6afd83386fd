"""The indexing job: documents -> groups -> document encoder -> store, resumable by content hash.

Point ids are UUID5 of the document id, so a rerun overwrites rather than duplicates; documents whose
content hash is already stored are skipped without encoding, so a rerun over an indexed corpus takes
seconds. A store that cannot be reached is retried with back-off; whatever still fails (a refusal,
a document the encoder cannot encode) is reported per document, never silently dropped, and never
takes the rest of its group with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from indexer.chunking import split_text
from indexer.planning import FilterFields, IndexingError, StorageChoice, prepare_collection
from indexer.reader import Document, Rejected, read_documents
from models.documents import document_text
from models.encoder import Chunkable, Encoder
from store.base import DocumentPoint, VectorStore
from store.errors import StoreError, StoreUnavailable
from store.filters import FieldKind, field_kinds, metadata_problem
from store.sparse import Bm25Encoder, Bm25Spec, measure_spec
from store.spec import ChunkingSpec

REJECTED_SAMPLES = 20
SAMPLE_IDS = 32  # documents searched for by their own vectors before a build is served
DELETE_BATCH = 1000
T = TypeVar("T")


@dataclass(frozen=True)
class Partition:
    """Part ``index`` of ``count`` of the documents (``--shard i/N``): those whose id hashes to it.
    Workers given the same input and different parts write disjoint documents into one collection.
    (Not a Qdrant shard: the collection is one, whichever worker writes a document.)"""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard {self.index}/{self.count}: need 0 <= i < N")

    @classmethod
    def parse(cls, text: str) -> Partition:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
        return cls(index, count)

    def owns(self, doc_id: str) -> bool:
        digest = hashlib.sha256(doc_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    # The first REJECTED_SAMPLES rejected lines (without their text) and the count of all: the rest
    # are in the rejects file, so memory does not grow with a bad input.
    rejected: list[Rejected] = field(default_factory=list)
    rejected_count: int = 0
    failed: list[str] = field(default_factory=list)  # doc ids whose group the store refused
    seconds: float = 0.0
    # Valid documents of the input (of this partition, with --shard) and the first few of their ids: a
    # full build must then hold exactly `accepted` points, and the sample is searched to check it.
    accepted: int = 0
    sample_ids: list[str] = field(default_factory=list)
    deleted: int = 0
    # Why the deletes of an incremental run were not made (None: made, or not asked for).
    deletes_refused: str | None = None

    @property
    def ok(self) -> bool:
        return not self.rejected_count and not self.failed

    def reject(self, item: Rejected) -> None:
        self.rejected_count += 1
        if len(self.rejected) < REJECTED_SAMPLES:
            self.rejected.append(replace(item, raw=""))

    def describe(self) -> str:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"indexed {self.indexed}, skipped {self.skipped} (unchanged), rejected {self.rejected_count}, "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({rate:.1f} docs/s)"
        )


def content_hash(doc: Document, encoder_fingerprint: str) -> str:
    payload = json.dumps(
        [encoder_fingerprint, doc.title, doc.text, doc.metadata], ensure_ascii=False, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _groups(items: Iterable[Document | Rejected], size: int) -> Iterator[list[Document | Rejected]]:
    group: list[Document | Rejected] = []
    for item in items:
        group.append(item)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


@dataclass(frozen=True)
class Retry:
    """Store calls are retried when the store was unreachable (StoreUnavailable), with exponential
    back-off; a refusal (any other StoreError) would fail the same way again and is not retried."""

    attempts: int = 3
    backoff_s: float = 0.5

    def __call__(self, call: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except StoreUnavailable:
                if attempt == self.attempts:
                    raise
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")


def _encode_isolating(encoder: Encoder, texts: list[str], batch_size: int) -> list[np.ndarray | str]:
    """A vector per text, or why that text could not be encoded.

    A batch the encoder refuses is encoded again one text at a time, so one bad document fails
    alone instead of taking its batch with it on every rerun; a non-finite vector is a failure of
    its own document.
    """
    results: list[np.ndarray | str]
    try:
        results = list(encoder.encode(texts, batch_size=batch_size))
    except Exception:  # which document broke the batch is found one by one
        results = []
        for text in texts:
            try:
                results.append(encoder.encode([text], batch_size=1)[0])
            except Exception as exc:
                results.append(f"encoder error: {type(exc).__name__}: {str(exc)[:200]}")
    return [
        v if isinstance(v, str) or np.all(np.isfinite(v)) else "encoder produced NaN or infinity"
        for v in results
    ]


class _RejectLog:
    """Where rejected lines and failed documents go, so nothing is lost: one JSON object per line.

    The file holds patient text: it is created readable by its owner only, and every record is on
    disk before the run goes on (a killed run keeps what it rejected). It is never one of the inputs.
    """

    def __init__(self, path: Path | None, inputs: Sequence[Path]) -> None:
        self._fh = None
        if path is None:
            return
        for source in inputs:
            if path.exists() and source.exists() and path.samefile(source):
                raise IndexingError(f"--rejects {path} is one of the inputs; writing it would empty {source}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        except OSError as exc:
            raise IndexingError(f"cannot write the rejects file {path}: {exc}") from exc
        self._fh = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, source: str, reason: str, **extra: str) -> None:
        if self._fh:
            record = {"source": source, "reason": reason, **extra}
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh:
            self._fh.close()


class _SeenIds:
    """Ids met so far in this run, each with one int for where (file number and line): the ids are
    the unavoidable cost of finding duplicates, a "path:line" string per id is not."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._where: dict[str, int] = {}

    def add(self, doc: Document) -> None:
        self._where[doc.doc_id] = self._paths.index(doc.path) << 32 | doc.line

    def first(self, doc_id: str) -> str | None:
        where = self._where.get(doc_id)
        if where is None:
            return None
        return f"{self._paths[where >> 32]}:{where & 0xFFFFFFFF}"


def _accept(
    group: list[Document | Rejected],
    seen: _SeenIds,
    kinds: Mapping[str, FieldKind],
    summary: IndexSummary,
    log: _RejectLog,
) -> list[Document]:
    """The group's valid documents; rejected lines and repeated ids are recorded, not indexed."""
    docs: list[Document] = []
    for item in group:
        if isinstance(item, Document) and (first := seen.first(item.doc_id)) is not None:
            reason = f"duplicate id {item.doc_id!r} (first at {first})"
            item = Rejected(item.path, item.line, reason, "")
        elif isinstance(item, Document) and (problem := metadata_problem(kinds, item.metadata)) is not None:
            item = Rejected(item.path, item.line, problem, "")
        if isinstance(item, Rejected):
            summary.reject(item)
            log.write(f"{item.path}:{item.line}", item.reason, line=item.raw)
            continue
        seen.add(item)
        docs.append(item)
    return docs


@dataclass
class _GroupWriter:
    """Documents -> unchanged ones skipped -> encoded -> upserted, each failure isolated to the
    documents it concerns and reported (summary.failed and the rejects file), never dropped."""

    encoder: Encoder
    store: VectorStore
    collection: str
    bm25: Bm25Encoder | None
    batch_size: int
    retry: Retry
    summary: IndexSummary
    log: _RejectLog
    chunking: ChunkingSpec | None = None

    def fail(self, docs: Sequence[Document], reason: str) -> None:
        self.summary.failed.extend(d.doc_id for d in docs)
        for d in docs:
            self.log.write(d.source, reason, id=d.doc_id)

    def write(self, docs: list[Document]) -> None:
        if not docs:
            return
        fingerprint = self.encoder.manifest.encoding_fingerprint
        hashes = {d.doc_id: content_hash(d, fingerprint) for d in docs}
        try:
            stored = self.retry(lambda: self.store.content_hashes(self.collection, list(hashes)))
        except StoreError as exc:
            self.fail(docs, f"{type(exc).__name__}: {exc}")
            return
        todo = [d for d in docs if stored.get(d.doc_id) != hashes[d.doc_id]]
        self.summary.skipped += len(docs) - len(todo)
        if not todo:
            return
        pieces = [self.pieces(d) for d in todo]
        flat = [piece.encoded for doc_pieces in pieces for piece in doc_pieces]
        encoded = iter(_encode_isolating(self.encoder, flat, self.batch_size))
        written: list[Document] = []
        points: list[DocumentPoint] = []
        for d, doc_pieces in zip(todo, pieces, strict=True):
            vectors = [next(encoded) for _ in doc_pieces]
            failure = next((v for v in vectors if isinstance(v, str)), None)
            if failure is not None:  # a document is written whole or not at all
                self.fail([d], str(failure))
                continue
            written.append(d)
            for piece, vector in zip(doc_pieces, vectors, strict=True):
                assert not isinstance(vector, str)
                points.append(
                    DocumentPoint(
                        doc_id=d.doc_id,
                        vector=vector.tolist(),
                        title=d.title,
                        text=piece.shown,
                        metadata=d.metadata,
                        content_hash=hashes[d.doc_id],
                        sparse=self.bm25.document(piece.encoded) if self.bm25 is not None else None,
                        chunk=piece.index,
                        chunks=len(doc_pieces) if piece.index is not None else None,
                    )
                )
        if not points:
            return
        try:
            self.retry(lambda: self.store.upsert(self.collection, points))
        except StoreError as exc:
            self.fail(written, f"{type(exc).__name__}: {exc}")
        else:
            self.summary.indexed += len(written)

    def pieces(self, doc: Document) -> list[_Piece]:
        """What is encoded for ``doc``: the document whole, or its chunks (chunked collections)."""
        text = document_text(doc.title, doc.text)
        if self.chunking is None:
            return [_Piece(None, text, doc.text)]
        assert isinstance(self.encoder, Chunkable)
        chunks = split_text(text, self.encoder.token_spans, self.chunking.max_tokens, self.chunking.overlap)
        body = len(text) - len(doc.text)  # the title line before the text, shown apart in hits
        return [_Piece(c.index, c.text, text[max(c.start, body) : c.end] or c.text) for c in chunks]


@dataclass(frozen=True)
class _Piece:
    index: int | None  # chunk number; None: the whole document
    encoded: str  # what the encoder reads
    shown: str  # what a hit shows as text (the title travels apart)


def index_files(
    paths: Sequence[Path],
    encoder: Encoder,
    store: VectorStore,
    collection: str,
    *,
    fields: FilterFields | None = None,
    sparse: bool | None = None,
    group_size: int = 64,
    batch_size: int = 16,
    rejects_path: Path | None = None,
    retry: Retry = Retry(),
    on_progress: Callable[[int, int], None] | None = None,
    partition: Partition | None = None,
    delete_missing: DeleteGuard | None = None,
    storage: StorageChoice | None = None,
) -> IndexSummary:
    """Index every document of ``paths``. ``on_progress(done_lines, indexed)`` is called per group.

    ``group_size`` documents are read, encoded (the encoder sorts them by length into ``batch_size``
    batches) and upserted together. ``partition``: only the documents of that part of the id space are
    written (every line is still read and checked). ``delete_missing``: afterwards, delete the
    stored documents the input no longer has, within the guard's limit. ``storage``: how the vectors
    are stored (an existing collection stored otherwise is refused: storage is fixed at creation).
    """
    spec = prepare_collection(
        store, collection, encoder, fields, sparse, lambda: measure_corpus(paths), storage or StorageChoice()
    )
    kinds = field_kinds(spec)
    bm25 = Bm25Encoder(spec.sparse) if spec.sparse is not None else None
    summary = IndexSummary()
    seen = _SeenIds(paths)
    started = time.perf_counter()
    log = _RejectLog(rejects_path, paths)
    writer = _GroupWriter(encoder, store, collection, bm25, batch_size, retry, summary, log, spec.chunking)
    done = 0
    try:
        for path in paths:
            for group in _groups(read_documents(path), group_size):
                done += len(group)
                docs = _accept(group, seen, kinds, summary, log)
                if partition is not None:
                    docs = [d for d in docs if partition.owns(d.doc_id)]
                summary.accepted += len(docs)
                room = SAMPLE_IDS - len(summary.sample_ids)
                summary.sample_ids.extend(d.doc_id for d in docs[:room])
                writer.write(docs)
                if on_progress:
                    on_progress(done, summary.indexed)
        if delete_missing is not None:
            _delete_missing(store, collection, seen, summary, delete_missing, retry)
        if summary.indexed or summary.deleted:
            store.optimize(collection)
    finally:
        log.close()
        summary.seconds = time.perf_counter() - started
    return summary


def measure_corpus(paths: Sequence[Path]) -> Bm25Spec:
    """BM25 statistics of the documents in ``paths`` (one pass, nothing kept)."""
    return measure_spec(
        document_text(item.title, item.text)
        for path in paths
        for item in read_documents(path)
        if isinstance(item, Document)
    )


@dataclass(frozen=True)
class DeleteGuard:
    """How much of a collection one incremental run may delete: an empty or truncated input would
    otherwise empty the index. Deletes also wait for a clean run (no rejected or failed line): a
    document whose new line was rejected is not gone from the corpus."""

    max_fraction: float = 0.2


def _delete_missing(
    store: VectorStore,
    collection: str,
    seen: _SeenIds,
    summary: IndexSummary,
    guard: DeleteGuard,
    retry: Retry,
) -> None:
    if not summary.ok:
        summary.deletes_refused = (
            f"{summary.rejected_count} rejected and {len(summary.failed)} failed documents: deletes are "
            "made only after a clean run (fix the input and rerun)"
        )
        return
    stored = 0
    missing: list[str] = []
    for doc_id in retry(lambda: list(store.document_ids(collection))):
        stored += 1
        if seen.first(doc_id) is None:
            missing.append(doc_id)
    if stored and len(missing) > guard.max_fraction * stored:
        summary.deletes_refused = (
            f"the input lacks {len(missing)} of the {stored} documents in {collection!r} "
            f"({len(missing) / stored:.0%}, more than the {guard.max_fraction:.0%} allowed); nothing "
            "deleted. Check the input; if the deletes are meant, rerun with --max-delete-fraction 1"
        )
        return
    for start in range(0, len(missing), DELETE_BATCH):
        part = missing[start : start + DELETE_BATCH]
        retry(lambda part=part: store.delete_documents(collection, part))  # type: ignore[misc]
        summary.deleted += len(part)
