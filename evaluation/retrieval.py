"""In-process retrieval evaluation: index a BEIR corpus into a throwaway embedded collection, then search
it with the query encoder through the same store code the service uses."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from evaluation.beir import BeirSplit
from evaluation.metrics import score_run
from indexer.pipeline import index_files
from models.encoder import Encoder
from store.factory import open_store

TOP_K = 100


def evaluate_pair(
    split: BeirSplit,
    query_encoder: Encoder,
    document_encoder: Encoder,
    *,
    batch_size: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    if query_encoder.manifest.space != document_encoder.manifest.space:
        raise ValueError(
            f"query encoder space {query_encoder.manifest.space!r} differs from document encoder space "
            f"{document_encoder.manifest.space!r}"
        )
    with tempfile.TemporaryDirectory(prefix="medsearch-eval-") as tmp:
        store = open_store(None, Path(tmp))
        try:
            summary = index_files(
                [split.corpus_path],
                document_encoder,
                store,
                "eval",
                batch_size=batch_size,
                on_progress=on_progress,
            )
            if not summary.ok:
                raise ValueError(f"{split.corpus_path}: {summary.describe()}; first: {summary.rejected[:1]}")
            qids = list(split.queries)
            vectors = query_encoder.encode([split.queries[q] for q in qids], batch_size=64)
            run = {
                qid: [hit.doc_id for hit in store.search("eval", vector, TOP_K)]
                for qid, vector in zip(qids, vectors, strict=True)
            }
        finally:
            store.close()
    return score_run(run, split.qrels)
