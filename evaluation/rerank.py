"""The reranking task: each query comes with candidate documents; the encoder pair orders them.

Candidates are the query line's ``candidates`` when the dataset gives them; otherwise they are the
query's positives plus hard negatives mined by BM25 (its top documents that are not positives), as
CMedTEB's reranking sets were built. Candidates are the same for every configuration of one run.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from evaluation.beir import BeirSplit
from evaluation.lexical import BM25Index

DEFAULT_NEGATIVES = 20


def needs_mining(split: BeirSplit) -> bool:
    return any(q.candidates is None for q in split.queries.values())


def build_candidates(
    split: BeirSplit,
    corpus_ids: Container[str],
    bm25: BM25Index | None,
    negatives: int = DEFAULT_NEGATIVES,
) -> dict[str, list[str]]:
    """qid -> candidate doc ids (only ids present in the corpus), for every query of the split."""
    candidates: dict[str, list[str]] = {}
    for qid, query in split.queries.items():
        if query.candidates is not None:
            chosen = list(dict.fromkeys(query.candidates))
        else:
            if bm25 is None:
                raise ValueError(f"query {qid!r} has no candidates and no BM25 index was given to mine them")
            positives = [d for d, grade in split.qrels.get(qid, {}).items() if grade > 0]
            mined = bm25.search(query.text, negatives + len(positives))
            hard = [d for d in _by_score(mined) if d not in positives][:negatives]
            chosen = positives + hard
        candidates[qid] = [d for d in chosen if d in corpus_ids]
    return candidates


def _by_score(scores: Mapping[str, float]) -> list[str]:
    return sorted(scores, key=lambda d: (-scores[d], d))


def candidate_source(split: BeirSplit) -> str:
    given = sum(q.candidates is not None for q in split.queries.values())
    if given == len(split.queries):
        return "dataset"
    return "bm25-mined" if given == 0 else "dataset+bm25-mined"
