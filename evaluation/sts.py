"""The STS task: sentence pairs with a gold similarity; Spearman and Pearson of the pair's cosine.

Two JSONL layouts are read:

- plain: ``{"sentence1": ..., "sentence2": ..., "score": ...}``;
- FlagEmbedding (CARE's stage2-medteb-sts.jsonl): ``{"query": ..., "pos": [...], "neg": [...]}``,
  read as pairs (query, pos) with score 1 and (query, neg) with score 0.

Sentence 1 is encoded by the configuration's query encoder and sentence 2 by its document encoder,
so an asymmetric pair is measured the way it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.metrics import pearson, spearman
from evaluation.retrieval import unit_rows
from models.data_files import DatasetError, read_json_objects, text_field, text_list


@dataclass(frozen=True)
class StsPair:
    sentence1: str
    sentence2: str
    score: float


@dataclass(frozen=True)
class StsSet:
    path: Path
    pairs: list[StsPair]
    layout: str  # "plain" or "flagembedding"

    @property
    def name(self) -> str:
        return self.path.stem

    def sentences(self, side: int) -> list[str]:
        """Distinct sentences of one side, in first-seen order (each is encoded once)."""
        texts = (p.sentence1 if side == 1 else p.sentence2 for p in self.pairs)
        return list(dict.fromkeys(texts))


def _pairs_of(obj: dict[str, Any], where: str) -> tuple[list[StsPair], str]:
    if "sentence1" in obj:
        score = obj.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise DatasetError(f"{where}: field 'score' is missing or not a number")
        return [
            StsPair(text_field(obj, "sentence1", where), text_field(obj, "sentence2", where), float(score))
        ], "plain"
    if "query" in obj and ("pos" in obj or "neg" in obj):
        query = text_field(obj, "query", where)
        pairs = [
            StsPair(query, text, score)
            for key, score in (("pos", 1.0), ("neg", 0.0))
            for text in text_list(obj, key, where, required=False)
        ]
        return pairs, "flagembedding"
    raise DatasetError(f"{where}: expected sentence1/sentence2/score or query/pos/neg fields")


def load_sts(path: Path) -> StsSet:
    pairs: list[StsPair] = []
    layouts: set[str] = set()
    for where, obj in read_json_objects(path):
        found, layout = _pairs_of(obj, where)
        pairs.extend(found)
        layouts.add(layout)
    if len(pairs) < 2:
        raise DatasetError(f"{path}: an STS set needs at least two pairs, found {len(pairs)}")
    if len({p.score for p in pairs}) < 2:
        raise DatasetError(f"{path}: every gold score is equal; correlation is undefined")
    return StsSet(path, pairs, "+".join(sorted(layouts)))


def cosines(sts: StsSet, side1: np.ndarray, side2: np.ndarray) -> np.ndarray:
    """Cosine per pair; ``side1``/``side2`` are vectors of ``sts.sentences(1)`` / ``sentences(2)``."""
    row1 = {text: i for i, text in enumerate(sts.sentences(1))}
    row2 = {text: i for i, text in enumerate(sts.sentences(2))}
    a = unit_rows(side1)[[row1[p.sentence1] for p in sts.pairs]]
    b = unit_rows(side2)[[row2[p.sentence2] for p in sts.pairs]]
    return np.einsum("ij,ij->i", a, b)


def score_sts(sts: StsSet, side1: np.ndarray, side2: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson (in percent, as MTEB reports them) of cosine against the gold scores."""
    predicted = cosines(sts, side1, side2)
    gold = [p.score for p in sts.pairs]
    return {
        "spearman": 100.0 * spearman(predicted, gold),
        "pearson": 100.0 * pearson(predicted, gold),
        "pairs": float(len(sts.pairs)),
    }
