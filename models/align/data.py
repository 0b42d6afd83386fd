"""Training data for alignment: labelled groups and stage-I self-pair texts.

The source is a BEIR directory's training split (queries, qrels, corpus; negatives mined
separately). Every bad line is reported as ``file:line``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.data_files import DatasetError, read_json_objects, read_qrels, text_field
from models.documents import document_text

# Held-out splits are for reporting only: training on them would make every figure meaningless.
REFUSED_SPLITS = frozenset({"dev", "test", "validation", "val"})


@dataclass(frozen=True)
class TrainingGroup:
    """One query with its relevant texts and known non-relevant ones."""

    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    prompt: str | None = None  # task instruction for this query; None: the run's default task


@dataclass(frozen=True)
class BeirTrainData:
    corpus: dict[str, str]  # doc id -> text as the indexer encodes it
    queries: dict[str, str]  # training queries that have a positive, in file order
    positives: dict[str, tuple[str, ...]]  # query id -> relevant doc ids (qrels score > 0)


def _read_positives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """query id -> [(doc id, file:line)] for qrels rows with a positive score."""
    positives: dict[str, list[tuple[str, str]]] = {}
    for row in read_qrels(path):
        if row.score > 0:
            positives.setdefault(row.query_id, []).append((row.corpus_id, row.where))
    return positives


def load_beir_train(root: Path, split: str = "train", *, query_field: str = "text") -> BeirTrainData:
    """The corpus, the split's queries that have a positive, and their positive doc ids.

    ``query_field`` is ``text`` or ``metadata.KEY``. Held-out splits (``dev``, ``test``...) are refused.
    """
    if split in REFUSED_SPLITS:
        raise DatasetError(f"split {split!r} is held out for evaluation; train on a training split")
    labelled = _read_positives(root / "qrels" / f"{split}.tsv")

    corpus: dict[str, str] = {}
    for where, obj in read_json_objects(root / "corpus.jsonl"):
        doc_id, text, title = obj.get("_id"), obj.get("text"), obj.get("title") or ""
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or not str(doc_id).strip():
            raise DatasetError(f"{where}: field '_id' is missing or not a string")
        if not isinstance(text, str) or not text.strip() or not isinstance(title, str):
            raise DatasetError(f"{where}: field 'text' (or 'title') is missing, empty or not a string")
        corpus[str(doc_id)] = document_text(title, text)

    queries: dict[str, str] = {}
    for where, obj in read_json_objects(root / "queries.jsonl"):
        qid = str(obj.get("_id", ""))
        if qid not in labelled:
            continue
        queries[qid] = text_field(obj, query_field, where)

    positives: dict[str, tuple[str, ...]] = {}
    for qid, rows in labelled.items():
        for doc_id, where in rows:
            if doc_id not in corpus:
                raise DatasetError(f"{where}: corpus id {doc_id!r} is not in corpus.jsonl")
        if qid not in queries:
            raise DatasetError(f"{rows[0][1]}: query id {qid!r} is not in queries.jsonl")
        positives[qid] = tuple(dict.fromkeys(doc_id for doc_id, _ in rows))
    if not queries:
        raise DatasetError(f"{root}: split {split!r} has no labelled queries")
    return BeirTrainData(corpus=corpus, queries=queries, positives=positives)


def beir_groups(
    data: BeirTrainData, negatives: Mapping[str, Sequence[str]] | None = None, *, prompt: str | None = None
) -> list[TrainingGroup]:
    """One group per training query, in file order; ``negatives`` maps query id -> doc ids."""
    negatives = negatives or {}
    groups = []
    for qid, text in data.queries.items():
        known = set(data.positives[qid])
        mined = [data.corpus[d] for d in negatives.get(qid, ()) if d not in known]
        groups.append(
            TrainingGroup(
                query=text,
                positives=tuple(data.corpus[d] for d in data.positives[qid]),
                negatives=tuple(mined),
                prompt=prompt,
            )
        )
    return groups


def self_pair_texts(*sources: Iterable[str]) -> list[str]:
    """Stage-I texts: each is encoded as a query and, unchanged, as its own document.

    Deduplicated in first-seen order (a text twice in one batch would be its own in-batch negative);
    blank texts are dropped.
    """
    return list(dict.fromkeys(text for source in sources for text in source if text.strip()))
