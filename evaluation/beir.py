"""Load a BEIR-layout dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

Queries and qrels are small and held in memory; the corpus is only ever streamed (``iter_corpus``).
A query line may carry ``candidates`` (a list of corpus ids) for the reranking task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from indexer.reader import Document, Rejected, read_documents
from models.data_files import DatasetError, read_json_objects, read_qrels, text_field

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"


@dataclass(frozen=True)
class BeirQuery:
    qid: str
    text: str
    candidates: tuple[str, ...] | None = None  # reranking candidates given by the dataset


@dataclass(frozen=True)
class BeirSplit:
    root: Path
    split: str
    queries: dict[str, BeirQuery]  # the split's queries that have qrels, in file order
    qrels: dict[str, dict[str, int]]

    @property
    def corpus_path(self) -> Path:
        return self.root / CORPUS_FILE

    @property
    def queries_path(self) -> Path:
        return self.root / QUERIES_FILE

    @property
    def qrels_path(self) -> Path:
        return qrels_path(self.root, self.split)

    def query_texts(self) -> dict[str, str]:
        return {qid: q.text for qid, q in self.queries.items()}


def qrels_path(root: Path, split: str) -> Path:
    return root / "qrels" / f"{split}.tsv"


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for row in read_qrels(path):
        qrels.setdefault(row.query_id, {})[row.corpus_id] = row.score
    return qrels


def _candidates(value: object, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str | int) for c in value):
        raise DatasetError(f"{where}: 'candidates' must be a list of corpus ids")
    return tuple(str(c) for c in value)


def load_split(
    root: Path, split: str, *, query_field: str = "text", max_queries: int | None = None
) -> BeirSplit:
    """The queries of ``split`` (those with qrels), their text taken from ``query_field``.

    ``max_queries`` keeps the first N of them in file order, so smoke runs are reproducible.
    """
    qrels = load_qrels(qrels_path(root, split))
    queries: dict[str, BeirQuery] = {}
    for where, obj in read_json_objects(root / QUERIES_FILE):
        if "_id" not in obj:
            raise DatasetError(f"{where}: field '_id' is missing")
        qid = str(obj["_id"])
        if qid not in qrels:
            continue
        text = text_field(obj, query_field, where)
        queries[qid] = BeirQuery(qid, text, _candidates(obj.get("candidates"), where))
        if max_queries is not None and len(queries) >= max_queries:
            break
    return BeirSplit(root=root, split=split, queries=queries, qrels=qrels)


def iter_corpus(path: Path) -> Iterator[Document]:
    """Stream the corpus; a malformed or duplicate line stops the evaluation (figures would be wrong)."""
    seen: set[str] = set()
    for item in read_documents(path):
        if isinstance(item, Rejected):
            raise DatasetError(str(item))
        if item.doc_id in seen:
            raise DatasetError(f"{item.source}: duplicate document id {item.doc_id!r}")
        seen.add(item.doc_id)
        yield item


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DatasetFingerprint:
    corpus: str
    queries: str
    qrels: str

    @property
    def combined(self) -> str:
        """sha256 over the three files' digests: what the figures of one split were computed on."""
        digest = hashlib.sha256()
        for name, value in (("corpus", self.corpus), ("queries", self.queries), ("qrels", self.qrels)):
            digest.update(f"{name}\0{value}\n".encode())
        return digest.hexdigest()


def dataset_fingerprint(split: BeirSplit) -> DatasetFingerprint:
    return DatasetFingerprint(
        corpus=file_fingerprint(split.corpus_path),
        queries=file_fingerprint(split.queries_path),
        qrels=file_fingerprint(split.qrels_path),
    )
