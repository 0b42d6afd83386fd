"""Load a BEIR-layout dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BeirSplit:
    root: Path
    split: str
    queries: dict[str, str]  # only the queries that have qrels in this split
    qrels: dict[str, dict[str, int]]

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus.jsonl"


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected qrels/<split>.tsv in BEIR layout)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for line, row in enumerate(reader, start=1):
            if line == 1 and row and row[0] == "query-id":
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{line}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: score {row[2]!r} is not an integer") from exc
    return qrels


def load_split(root: Path, split: str) -> BeirSplit:
    qrels = load_qrels(root / "qrels" / f"{split}.tsv")
    queries: dict[str, str] = {}
    path = root / "queries.jsonl"
    with path.open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                qid = str(obj["_id"])
                text = obj["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: not a BEIR query line ({exc})") from exc
            if qid in qrels:
                queries[qid] = text
    return BeirSplit(root=root, split=split, queries=queries, qrels=qrels)


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
