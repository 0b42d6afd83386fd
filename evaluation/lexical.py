"""The lexical baseline: BM25 (the ``bm25s`` library) over character unigrams+bigrams for CJK text.

Chinese has no spaces, so words cannot be split without a segmenter; overlapping character unigrams
and bigrams are the standard segmenter-free tokens for CJK BM25. Other scripts are lower-cased words.
Token ids are assigned while the corpus streams, so no document text is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>(?:(?![{_CJK}])\w)+)")


def tokenize(text: str) -> list[str]:
    """CJK runs -> every character and every adjacent pair; anything else -> lower-cased words."""
    tokens: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        run = match.group()
        if match.lastgroup == "cjk":
            tokens.extend(run)
            tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
        else:
            tokens.append(run)
    return tokens


class BM25Index:
    """BM25 (Lucene variant, k1 1.5, b 0.75) over a corpus given as (doc id, text) pairs."""

    def __init__(self, documents: Iterable[tuple[str, str]]) -> None:
        import bm25s

        vocab: dict[str, int] = {}
        corpus_ids: list[list[int]] = []
        self.doc_ids: list[str] = []
        for doc_id, text in documents:
            self.doc_ids.append(doc_id)
            corpus_ids.append([vocab.setdefault(token, len(vocab)) for token in tokenize(text)])
        if not self.doc_ids:
            raise ValueError("BM25 needs at least one document")
        self._row = {doc_id: i for i, doc_id in enumerate(self.doc_ids)}
        self._bm25 = bm25s.BM25()
        self._bm25.index((corpus_ids, vocab), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (in corpus order) for ``query``."""
        ids = self._bm25.get_tokens_ids(tokenize(query))
        if not ids:
            return np.zeros(len(self.doc_ids), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(ids), dtype=np.float32)

    def search(self, query: str, top_k: int) -> dict[str, float]:
        """The ``top_k`` best-scoring documents that share at least one token with the query."""
        scores = self.scores(query)
        k = min(top_k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        return {self.doc_ids[i]: float(scores[i]) for i in top if scores[i] > 0}

    def score_documents(self, query: str, doc_ids: Iterable[str]) -> dict[str, float]:
        scores = self.scores(query)
        return {d: float(scores[self._row[d]]) for d in doc_ids if d in self._row}
