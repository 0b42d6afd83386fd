"""Load a BEIR-layout dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

Queries and qrels are small and held in memory; the corpus is only ever streamed (``iter_corpus``).
A query line may carry ``candidates`` (a list of corpus ids) for the reranking task.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.reader import Document, Rejected, read_documents

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"


class DatasetError(ValueError):
    """The directory is not a usable BEIR dataset; the message names the file and line."""


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
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected qrels/<split>.tsv in BEIR layout)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for line, row in enumerate(reader, start=1):
            if line == 1 and row and row[0] == "query-id":
                continue
            if not row:
                continue
            if len(row) < 3:
                raise DatasetError(f"{path}:{line}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError as exc:
                raise DatasetError(f"{path}:{line}: score {row[2]!r} is not an integer") from exc
    return qrels


def _field(obj: dict[str, Any], name: str) -> object:
    """``text``, a top-level key, or ``metadata.KEY``."""
    if name.startswith("metadata."):
        metadata = obj.get("metadata")
        return metadata.get(name.removeprefix("metadata.")) if isinstance(metadata, dict) else None
    return obj.get(name)


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
    path = root / QUERIES_FILE
    with path.open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line}"
            try:
                obj = json.loads(raw)
                qid = str(obj["_id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"{where}: not a BEIR query line ({exc})") from exc
            if qid not in qrels:
                continue
            text = _field(obj, query_field)
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{where}: query {qid!r} has no text in field {query_field!r}")
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
