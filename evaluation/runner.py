"""In-process evaluation of several configurations on one BEIR split, sharing every expensive step.

Document vectors are computed once per document encoder (and cached on disk, see evaluation.vectors),
put into one temporary embedded collection and searched by every query encoder of that space; query
vectors are computed once per query encoder and reused by retrieval and reranking; BM25 is built once
and serves the lexical baseline, the hybrid and the mining of reranking negatives.

Encoders are opened per (directory, mode): a symmetric-llm document encoder with a query prompt of its
own encodes the queries in mode "query" and the documents in mode "document" (see
``Configuration.query_mode``); every other encoder is opened once, in mode "document".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np

from evaluation.beir import BeirSplit, file_fingerprint, iter_corpus
from evaluation.configs import BM25, HYBRID, BuiltModel, Configuration
from evaluation.lexical import BM25Index
from evaluation.metrics import RERANK_METRICS, Run, score_run
from evaluation.rerank import DEFAULT_NEGATIVES, build_candidates, needs_mining
from evaluation.results import ConfigResult
from evaluation.retrieval import (
    RRF_K,
    TOP_K,
    DenseIndex,
    reciprocal_rank_fusion,
    score_candidates,
    temporary_index,
)
from evaluation.sts import StsSet, score_sts
from evaluation.vectors import Vectors, cached_vectors
from indexer.reader import count_lines
from models.documents import document_text
from models.encoder import EncodeMode, Encoder
from store.spec import VectorStorage

Task = Literal["retrieval", "rerank", "sts"]
TASKS: tuple[Task, ...] = ("retrieval", "rerank", "sts")
# (model directory, mode) -> encoder; mode "query" renders the manifest's query prompt.
EncoderLoader = Callable[[Path, EncodeMode], Encoder]
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _done: None


@dataclass(frozen=True)
class Options:
    tasks: frozenset[Task] = frozenset(TASKS)
    sts: tuple[StsSet, ...] = ()
    top_k: int = TOP_K
    batch_size: int = 16  # document encoder batch
    query_batch_size: int = 64
    rerank_negatives: int = DEFAULT_NEGATIVES
    chunk: int = 256  # documents encoded (and cached) per part
    # How the temporary collection stores the vectors (e.g. int8 quantization): searched as served.
    storage: VectorStorage = field(default_factory=VectorStorage)


def bm25_method() -> dict[str, object]:
    return {
        "library": f"bm25s=={version('bm25s')}",
        "variant": "lucene, k1=1.5, b=0.75",
        "tokens": "CJK character unigrams+bigrams; other scripts lower-cased words",
    }


@dataclass
class InProcessEvaluation:
    split: BeirSplit
    configs: Sequence[Configuration]  # what to report
    default: Configuration | None
    load: EncoderLoader
    cache_root: Path | None
    options: Options = field(default_factory=Options)
    progress: ProgressFactory = no_progress
    log: Callable[[str], None] = lambda _m: None

    _encoders: dict[tuple[Path, EncodeMode], Encoder] = field(default_factory=dict, init=False)
    _query_vectors: dict[tuple[Path, EncodeMode], np.ndarray] = field(default_factory=dict, init=False)
    _bm25: BM25Index | None = field(default=None, init=False)
    _candidates: dict[str, list[str]] | None = field(default=None, init=False)
    _corpus_fingerprint: str = field(default="", init=False)
    _qids: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._qids = list(self.split.queries)
        self._corpus_fingerprint = file_fingerprint(self.split.corpus_path)

    # --- shared, computed at most once ------------------------------------------------------

    def encoder(self, model: BuiltModel, mode: EncodeMode = "document") -> Encoder:
        key = (model.path, mode)
        if key not in self._encoders:
            prompt = " with its query prompt" if mode == "query" else ""
            self.log(f"loading {model.manifest.name} ({model.path}){prompt}")
            self._encoders[key] = self.load(model.path, mode)
        return self._encoders[key]

    def query_vectors(self, model: BuiltModel, mode: EncodeMode = "document") -> np.ndarray:
        key = (model.path, mode)
        if key not in self._query_vectors:
            texts = [self.split.queries[q].text for q in self._qids]
            self._query_vectors[key] = self.encoder(model, mode).encode(
                texts, batch_size=self.options.query_batch_size
            )
        return self._query_vectors[key]

    def _corpus_texts(self) -> Iterator[tuple[str, str]]:
        return (
            (doc.doc_id, document_text(doc.title, doc.text)) for doc in iter_corpus(self.split.corpus_path)
        )

    def document_vectors(self, model: BuiltModel) -> Vectors:
        label = f"document vectors {model.manifest.name}"
        return cached_vectors(
            self.cache_root,
            model.manifest,
            self._corpus_fingerprint,
            self._corpus_texts,
            lambda: self.encoder(model),
            chunk=self.options.chunk,
            batch_size=self.options.batch_size,
            on_progress=self.progress(label, self._corpus_size()),
        )

    def _corpus_size(self) -> int:
        return count_lines(self.split.corpus_path)

    def bm25(self) -> BM25Index:
        if self._bm25 is None:
            self.log("building BM25 over the corpus")
            self._bm25 = BM25Index(self._corpus_texts())
        return self._bm25

    def candidates(self) -> dict[str, list[str]]:
        if self._candidates is None:
            bm25 = self.bm25() if needs_mining(self.split) else None
            corpus_ids = set(bm25.doc_ids) if bm25 else {doc_id for doc_id, _ in self._corpus_texts()}
            self._candidates = build_candidates(self.split, corpus_ids, bm25, self.options.rerank_negatives)
        return self._candidates

    def sts_document_side(self, model: BuiltModel, sts: StsSet) -> np.ndarray:
        sentences = sts.sentences(2)
        vectors = cached_vectors(
            self.cache_root,
            model.manifest,
            f"sts-sentence2:{file_fingerprint(sts.path)}",
            lambda: ((str(i), text) for i, text in enumerate(sentences)),
            lambda: self.encoder(model),
            batch_size=self.options.batch_size,
        )
        return vectors.matrix

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> list[ConfigResult]:
        tasks = self.options.tasks
        wanted = {c.name for c in self.configs}
        hybrid = "retrieval" in tasks and any(c.kind == "hybrid-rrf" for c in self.configs)
        needed = list(self.configs)
        if hybrid and self.default is not None and self.default.name not in wanted:
            needed.append(self.default)
        results: dict[str, ConfigResult] = {}
        runs: dict[str, Run] = {}
        groups: dict[Path, list[Configuration]] = {}
        for config in needed:
            if config.dense and config.document is not None:
                groups.setdefault(config.document.path, []).append(config)
        for group in groups.values():
            document = group[0].document
            assert document is not None
            vectors = self.document_vectors(document)
            self.log(f"{document.manifest.name}: {len(vectors.ids)} document vectors")
            context = (
                temporary_index(vectors, document.manifest, self.options.storage)
                if "retrieval" in tasks
                else nullcontext()
            )
            with context as index:
                for config in group:
                    result, run = self._dense(config, vectors, index)
                    results[config.name] = result
                    if run is not None:
                        runs[config.name] = run
        if "retrieval" in tasks and any(c.kind in ("bm25", "hybrid-rrf") for c in needed):
            started = time.perf_counter()
            runs[BM25] = {
                qid: self.bm25().search(self.split.queries[qid].text, self.options.top_k)
                for qid in self._qids
            }
            results[BM25] = ConfigResult(
                configuration=BM25,
                kind="bm25",
                method=bm25_method(),
                retrieval=score_run(runs[BM25], self.split.qrels),
                seconds=time.perf_counter() - started,
            )
        if hybrid and self.default is not None and self.default.name in runs:
            fused = reciprocal_rank_fusion([runs[BM25], runs[self.default.name]], self.options.top_k)
            results[HYBRID] = ConfigResult(
                configuration=HYBRID,
                kind="hybrid-rrf",
                method={"fuses": [BM25, self.default.name], "rrf_k": RRF_K},
                retrieval=score_run(fused, self.split.qrels),
            )
        return [results[c.name] for c in self.configs if c.name in results]

    def _dense(
        self, config: Configuration, vectors: Vectors, index: DenseIndex | None
    ) -> tuple[ConfigResult, Run | None]:
        assert config.query is not None and config.document is not None
        self.log(f"evaluating {config.name}")
        started = time.perf_counter()
        query_vectors = self.query_vectors(config.query, config.query_mode)
        run = index.run(self._qids, query_vectors, self.options.top_k) if index is not None else None
        reranking = None
        if "rerank" in self.options.tasks:
            candidates = score_candidates(self.candidates(), self._qids, query_vectors, vectors)
            reranking = score_run(candidates, self.split.qrels, RERANK_METRICS)
        sts = {}
        if "sts" in self.options.tasks:
            for sts_set in self.options.sts:
                side1 = self.encoder(config.query, config.query_mode).encode(
                    sts_set.sentences(1), batch_size=self.options.query_batch_size
                )
                sts[sts_set.name] = score_sts(
                    sts_set, side1, self.sts_document_side(config.document, sts_set)
                )
        q, d = config.query.manifest, config.document.manifest
        result = ConfigResult(
            configuration=config.name,
            kind=config.kind,
            query_encoder=q.name,
            query_fingerprint=q.fingerprint,
            document_encoder=d.name,
            document_fingerprint=d.fingerprint,
            space=d.space,
            retrieval=score_run(run, self.split.qrels) if run is not None else None,
            reranking=reranking,
            sts=sts,
            seconds=time.perf_counter() - started,
        )
        return result, run
