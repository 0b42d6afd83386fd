"""Training data for alignment: labelled groups and stage-I self-pair texts.

Two sources: a BEIR directory's training split (queries, qrels, corpus; negatives mined separately),
and FlagEmbedding-style JSONL (``{"query", "pos": [...], "neg": [...], "prompt"?}``, one group per
line), the format CARE's training data is published in. Every bad line is reported as ``file:line``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.documents import document_text

# Held-out splits are for reporting only: training on them would make every figure meaningless.
REFUSED_SPLITS = frozenset({"dev", "test", "validation", "val"})


class AlignDataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


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


def _read_json_lines(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) for every non-blank line; anything but a JSON object is an error."""
    with path.open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise AlignDataError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
            if not isinstance(obj, dict):
                raise AlignDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _read_positives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """query id -> [(doc id, file:line)] for qrels rows with a positive score."""
    if not path.is_file():
        raise AlignDataError(f"{path} not found (expected qrels/<split>.tsv in BEIR layout)")
    positives: dict[str, list[tuple[str, str]]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for line, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or (line == 1 and row[0] == "query-id"):
                continue
            where = f"{path}:{line}"
            if len(row) < 3:
                raise AlignDataError(f"{where}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                score = int(row[2])
            except ValueError as exc:
                raise AlignDataError(f"{where}: score {row[2]!r} is not an integer") from exc
            if score > 0:
                positives.setdefault(row[0], []).append((row[1], where))
    return positives


def _query_text(obj: dict[str, Any], field: str) -> object:
    if field.startswith("metadata."):
        metadata = obj.get("metadata")
        return metadata.get(field.removeprefix("metadata.")) if isinstance(metadata, dict) else None
    return obj.get(field)


def load_beir_train(root: Path, split: str = "train", *, query_field: str = "text") -> BeirTrainData:
    """The corpus, the split's queries that have a positive, and their positive doc ids.

    ``query_field`` is ``text`` or ``metadata.KEY``. Held-out splits (``dev``, ``test``...) are refused.
    """
    if split in REFUSED_SPLITS:
        raise AlignDataError(f"split {split!r} is held out for evaluation; train on a training split")
    labelled = _read_positives(root / "qrels" / f"{split}.tsv")

    corpus: dict[str, str] = {}
    for where, obj in _read_json_lines(root / "corpus.jsonl"):
        doc_id, text, title = obj.get("_id"), obj.get("text"), obj.get("title") or ""
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or not str(doc_id).strip():
            raise AlignDataError(f"{where}: field '_id' is missing or not a string")
        if not isinstance(text, str) or not text.strip() or not isinstance(title, str):
            raise AlignDataError(f"{where}: field 'text' (or 'title') is missing, empty or not a string")
        corpus[str(doc_id)] = document_text(title, text)

    queries: dict[str, str] = {}
    for where, obj in _read_json_lines(root / "queries.jsonl"):
        qid = str(obj.get("_id", ""))
        if qid not in labelled:
            continue
        text = _query_text(obj, query_field)
        if not isinstance(text, str) or not text.strip():
            raise AlignDataError(f"{where}: query field {query_field!r} is missing, empty or not a string")
        queries[qid] = text

    positives: dict[str, tuple[str, ...]] = {}
    for qid, rows in labelled.items():
        for doc_id, where in rows:
            if doc_id not in corpus:
                raise AlignDataError(f"{where}: corpus id {doc_id!r} is not in corpus.jsonl")
        if qid not in queries:
            raise AlignDataError(f"{rows[0][1]}: query id {qid!r} is not in queries.jsonl")
        positives[qid] = tuple(dict.fromkeys(doc_id for doc_id, _ in rows))
    if not queries:
        raise AlignDataError(f"{root}: split {split!r} has no labelled queries")
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


def _string_list(obj: dict[str, Any], key: str, where: str, *, required: bool) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise AlignDataError(f"{where}: field {key!r} must be a list of non-empty strings")
    if required and not value:
        raise AlignDataError(f"{where}: field {key!r} is empty")
    return tuple(value)


def read_flag_groups(path: Path) -> list[TrainingGroup]:
    """Groups from FlagEmbedding JSONL; other keys (``pos_id``, ``type``, scores) are ignored."""
    groups = []
    for where, obj in _read_json_lines(path):
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise AlignDataError(f"{where}: field 'query' is missing, empty or not a string")
        prompt = obj.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise AlignDataError(f"{where}: field 'prompt' is not a string")
        groups.append(
            TrainingGroup(
                query=query,
                positives=_string_list(obj, "pos", where, required=True),
                negatives=_string_list(obj, "neg", where, required=False),
                prompt=prompt or None,
            )
        )
    if not groups:
        raise AlignDataError(f"{path}: no training groups")
    return groups


def self_pair_texts(*sources: Iterable[str]) -> list[str]:
    """Stage-I texts: each is encoded as a query and, unchanged, as its own document.

    Deduplicated in first-seen order (a text twice in one batch would be its own in-batch negative);
    blank texts are dropped.
    """
    return list(dict.fromkeys(text for source in sources for text in source if text.strip()))
