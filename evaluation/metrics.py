"""Ranking metrics over one query's ranked ids and its graded qrels (pytrec_eval/BEIR conventions).

A query with no relevant documents in the qrels is not scored (BEIR drops it); callers skip it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


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


RETRIEVAL_METRICS = {
    "ndcg@10": lambda r, q: ndcg_at_k(r, q, 10),
    "recall@10": lambda r, q: recall_at_k(r, q, 10),
    "recall@100": lambda r, q: recall_at_k(r, q, 100),
    "mrr@10": lambda r, q: mrr_at_k(r, q, 10),
    "map@10": lambda r, q: map_at_k(r, q, 10),
}


def score_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean of each retrieval metric (in percent) over the queries that have relevant documents."""
    scored = [q for q in run if any(g > 0 for g in qrels.get(q, {}).values())]
    if not scored:
        return {name: 0.0 for name in RETRIEVAL_METRICS} | {"queries": 0.0}
    result = {
        name: 100.0 * sum(fn(run[q], qrels[q]) for q in scored) / len(scored)
        for name, fn in RETRIEVAL_METRICS.items()
    }
    result["queries"] = float(len(scored))
    return result
