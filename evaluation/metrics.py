"""Ranking and correlation metrics (pytrec_eval/BEIR and MTEB conventions), all pure functions.

A query with no relevant document in the qrels is not scored (BEIR drops it); ``score_run`` skips it.
Runs are ``query id -> {doc id: score}``; ``rank`` turns scores into an order with trec_eval's tie rule
(equal scores: larger doc id first), so the same scores always give the same figures as BEIR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
RankingMetric = Callable[[Sequence[str], Mapping[str, int]], float]


def rank(scores: Mapping[str, float]) -> list[str]:
    """Doc ids by decreasing score; ties by decreasing doc id, as trec_eval (and so BEIR) breaks them."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    gains = [qrels.get(doc, 0) for doc in ranked[:k]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains) if g > 0)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, g in qrels.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if qrels.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def map_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, g in qrels.items() if g > 0}
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for i, doc in enumerate(ranked[:k]):
        if doc in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / min(len(relevant), k)


RETRIEVAL_METRICS: dict[str, RankingMetric] = {
    "ndcg@10": lambda r, q: ndcg_at_k(r, q, 10),
    "recall@10": lambda r, q: recall_at_k(r, q, 10),
    "recall@100": lambda r, q: recall_at_k(r, q, 100),
    "mrr@10": lambda r, q: mrr_at_k(r, q, 10),
    "map@10": lambda r, q: map_at_k(r, q, 10),
}

# CMedTEB reranking reports MAP and MRR of the candidates' order.
RERANK_METRICS: dict[str, RankingMetric] = {
    "map@10": lambda r, q: map_at_k(r, q, 10),
    "mrr@10": lambda r, q: mrr_at_k(r, q, 10),
}


def score_run(
    run: Run, qrels: Qrels, metrics: Mapping[str, RankingMetric] = RETRIEVAL_METRICS
) -> dict[str, float]:
    """Mean of each metric (in percent) over the queries of ``run`` that have a relevant document.

    A query present in ``run`` with no scored documents counts as a complete miss; one absent from
    ``run`` is not scored at all, so callers put every query they asked in ``run``.
    """
    scored = [q for q in run if any(g > 0 for g in qrels.get(q, {}).values())]
    if not scored:
        return {name: 0.0 for name in metrics} | {"queries": 0.0}
    ranked = {q: rank(run[q]) for q in scored}
    result = {
        name: 100.0 * sum(fn(ranked[q], qrels[q]) for q in scored) / len(scored)
        for name, fn in metrics.items()
    }
    result["queries"] = float(len(scored))
    return result


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (as scipy.stats.rankdata)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values in sorted order, and the run each element belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (no ordering to agree with)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError("pearson needs two 1-d sequences of the same length, at least 2 long")
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman correlation: Pearson of the average ranks, so ties are handled as in scipy."""
    return pearson(average_ranks(x), average_ranks(y))
