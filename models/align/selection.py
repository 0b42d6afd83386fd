"""Model selection on queries held out of the training split (never the dev split), shared by every
trainer: the held-out split, its nDCG@10, and the per-phase report that carries it.

Scoring lives above the models package (``evaluation``), so trainers are handed a ``Scorer``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.align.data import BeirTrainData
from models.align.negatives import rank_dense

# (rankings: query id -> doc ids best first, relevant: query id -> doc ids) -> nDCG@10 in percent.
Scorer = Callable[[Mapping[str, Sequence[str]], Mapping[str, Sequence[str]]], float]
SELECTION_DEPTH = 100


@dataclass
class PhaseReport:
    phase: str
    seconds: float
    steps: int = 0
    last_loss: float | None = None
    selection_ndcg10: float | None = None


def split_selection(data: BeirTrainData, count: int, seed: int) -> tuple[list[str], list[str]]:
    """(training query ids, selection query ids): a seeded random ``count`` held out for selection."""
    ids = list(data.queries)
    random.Random(seed).shuffle(ids)
    held = set(ids[:count])
    return [q for q in data.queries if q not in held], [q for q in data.queries if q in held]


def selection_score(
    scorer: Scorer,
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    doc_ids: Sequence[str],
    doc_vectors: np.ndarray,
    relevant: Mapping[str, Sequence[str]],
) -> float:
    """The scorer's figure for the selection queries ranked over the whole corpus."""
    rankings = rank_dense(query_ids, query_vectors, doc_ids, doc_vectors, SELECTION_DEPTH)
    return scorer(rankings, relevant)
