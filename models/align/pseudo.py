"""Unlabelled pseudo-queries: texts a frozen teacher embedder scores against the corpus, so the query
side learns the teacher's rankings far beyond the few thousand labelled training queries.

Two sources, both free of evaluation data: the long question bodies of the *training* queries (kept
in the queries file's metadata) and short sentences cut from the corpus documents. Selection is
seeded, so a recipe always trains on the same texts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Collection, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|\n")


class PseudoQueries(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    question_field: str | None = Field(
        default="question", description="metadata key of a training query's long question body."
    )
    question_max_chars: int = Field(default=96, gt=0, description="Bodies are cut to this many chars.")
    corpus_sentences: int = Field(default=15000, ge=0, description="Sentences drawn from the corpus.")
    min_chars: int = Field(default=8, gt=0)
    max_chars: int = Field(default=60, gt=0)
    seed: int = 0


def question_bodies(queries_path: Path, ids: Collection[str], field: str, max_chars: int) -> list[str]:
    """The metadata ``field`` of the queries in ``ids`` (training ids only), cut to ``max_chars``."""
    bodies: list[str] = []
    with queries_path.open(encoding="utf-8") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            obj = json.loads(raw)
            if str(obj.get("_id")) not in ids:
                continue
            metadata = obj.get("metadata")
            body = metadata.get(field) if isinstance(metadata, dict) else None
            if isinstance(body, str) and body.strip():
                bodies.append(body.strip()[:max_chars])
    return bodies


def corpus_sentences(
    documents: Iterable[str], count: int, min_chars: int, max_chars: int, seed: int
) -> list[str]:
    """Up to ``count`` distinct sentences of ``min_chars``..``max_chars`` chars, a seeded sample."""
    pool = dict.fromkeys(
        sentence.strip()
        for text in documents
        for sentence in _SENTENCE_END.split(text)
        if min_chars <= len(sentence.strip()) <= max_chars
    )
    sentences = sorted(pool)
    random.Random(seed).shuffle(sentences)
    return sentences[:count]


def pseudo_queries(
    config: PseudoQueries, queries_path: Path, train_ids: Collection[str], documents: Iterable[str]
) -> list[str]:
    bodies = (
        question_bodies(queries_path, train_ids, config.question_field, config.question_max_chars)
        if config.question_field
        else []
    )
    sentences = corpus_sentences(
        documents, config.corpus_sentences, config.min_chars, config.max_chars, config.seed
    )
    return list(dict.fromkeys([*bodies, *sentences]))
