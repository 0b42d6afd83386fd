"""Hard negatives: the best-ranked documents that are not labelled relevant.

The ranking comes from outside: a lexical ranker (BM25, which lives in ``evaluation`` above this
package, so it is passed in as a function) or the current dense model (query and document vectors).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np

# (query text, depth) -> doc ids, best first.
Ranker = Callable[[str, int], Sequence[str]]


def rank_with(ranker: Ranker, queries: Mapping[str, str], depth: int) -> dict[str, list[str]]:
    return {qid: list(ranker(text, depth)) for qid, text in queries.items()}


def rank_dense(
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    doc_ids: Sequence[str],
    doc_vectors: np.ndarray,
    depth: int,
) -> dict[str, list[str]]:
    """Doc ids by descending dot product (cosine for normalized vectors), ties broken by corpus order."""
    if len(query_ids) != len(query_vectors) or len(doc_ids) != len(doc_vectors):
        raise ValueError("ids and vectors must have the same length")
    scores = np.asarray(query_vectors, dtype=np.float32) @ np.asarray(doc_vectors, dtype=np.float32).T
    depth = min(depth, len(doc_ids))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return {qid: [doc_ids[j] for j in row] for qid, row in zip(query_ids, order, strict=True)}


def hard_negatives(
    rankings: Mapping[str, Sequence[str]],
    positives: Mapping[str, Collection[str]],
    *,
    count: int,
    skip: int = 0,
) -> dict[str, list[str]]:
    """Per query, up to ``count`` ranked doc ids that are not its positives.

    ``skip`` drops the first non-positive hits too: the very top of a good ranking is where unlabelled
    relevant documents (false negatives) concentrate.
    """
    if count < 0 or skip < 0:
        raise ValueError("count and skip must be >= 0")
    mined = {}
    for qid, ranked in rankings.items():
        known = positives.get(qid, ())
        candidates = [d for d in dict.fromkeys(ranked) if d not in known]
        mined[qid] = candidates[skip : skip + count]
    return mined
