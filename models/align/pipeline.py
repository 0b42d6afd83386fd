"""One alignment run, from a recipe to servable encoders: `medsearch models align` drives this.

Phases, each resumable from its own checkpoint directory under the run's work directory:

1. corpus pass: the document side over every corpus document (fills the lower-state cache, saved so
   a rerun skips it);
2. distillation (optional warm start): the document side learns a teacher embedder's document vectors;
3. stage I: the query side learns the document side's vectors of self-pairs (training queries and
   documents);
4. mining (joint stage II only): hard negatives per training query, from the current dense pair or
   a lexical ranker;
5. stage II: both sides on (query, positive, negatives) groups, or (the document side frozen) the
   query side against the whole corpus's fixed vectors;
6. artifacts: the document delta and the query delta (small, committable), the rebuilt encoders in
   the models directory, the ONNX export of the query side and its int8 quantization.

After each phase the pair is scored on selection queries held out of the *training* split (never the
dev split): the figures let a recipe be tuned without touching the split it is reported on. Scoring
and lexical ranking live above this package (``evaluation``), so they are passed in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.align.artifacts import (
    build_document_encoder,
    build_query_encoder,
    save_document_delta,
    save_query_delta,
)
from models.align.data import BeirTrainData, beir_groups, load_beir_train, self_pair_texts
from models.align.document_side import DocumentSideConfig, DocumentTower
from models.align.negatives import Ranker, hard_negatives, rank_dense, rank_with
from models.align.query_side import QuerySideConfig, QueryTower, fit_projection
from models.align.selection import PhaseReport, Scorer, selection_score, split_selection
from models.align.stage_configs import (
    DocumentDistillationConfig,
    JointConfig,
    QueryAlignmentConfig,
    QueryRetrievalConfig,
    StageConfig,
    StageTwoConfig,
)
from models.align.train import (
    DistillationProbes,
    train_document_distillation,
    train_joint,
    train_query_alignment,
    train_query_retrieval,
)
from models.loading import load_encoder
from models.manifest import ModelManifest, verify_manifest

Log = Callable[[str], None]
CACHE_FILE = "lower-states.safetensors"
REPORT_FILE = "report.json"


class NegativeMining(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["dense", "bm25"] = "dense"
    depth: int = Field(default=50, gt=0)
    count: int = Field(default=7, ge=0)
    skip: int = Field(
        default=3, ge=0, description="Top non-positive hits skipped (likely unlabelled positives)."
    )


class AlignRecipe(BaseModel):
    """Everything a run depends on; the committed default recipe is a JSON file of this model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Document encoder name; the query encoder is NAME-query.")
    query_model: str = Field(description="Built BERT-family query base (a directory in the models dir).")
    document_model: str = Field(description="Built decoder-only document base.")
    teacher_model: str | None = Field(default=None, description="Built embedder for distillation.")
    dataset: Path = Field(description="BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    split: str = "train"
    query_field: str = "text"
    selection_queries: int = Field(default=300, ge=0, description="Held out of the training split.")
    seed: int = 0
    query_side: QuerySideConfig = QuerySideConfig()
    document_side: DocumentSideConfig = DocumentSideConfig()
    fit_projection_texts: int = Field(default=2000, ge=0, description="Ridge-fit start of a projection.")
    distillation: DocumentDistillationConfig | None = None
    distillation_probe_depth: int = Field(
        default=0,
        ge=0,
        description="Distil with the training queries as probes: each query's top N documents under "
        "the teacher fill the batches, and the student must rank them as the teacher does for the "
        "query side as it starts (0: random documents, vectors only).",
    )
    stage_one: QueryAlignmentConfig | None = None
    negatives: NegativeMining = NegativeMining()
    stage_two: StageTwoConfig | None = Field(
        default=None,
        description="A joint config trains both sides on mined groups (CARE); a query_retrieval config "
        "keeps the document side frozen and trains the query side against the whole corpus.",
    )
    encode_batch_size: int = Field(default=16, gt=0)
    keep_best_phase: bool = Field(
        default=True,
        description="Ship the weights of the phase with the best selection nDCG@10, not the last "
        "(early stopping across phases; needs selection_queries).",
    )


@dataclass
class AlignResult:
    document: ModelManifest
    query: ModelManifest
    query_onnx: ModelManifest
    query_int8: ModelManifest
    phases: list[PhaseReport] = field(default_factory=list)
    kept_phase: str | None = None


@dataclass
class _Snapshot:
    """Trainable weights of both sides after the best-scoring phase so far."""

    phase: str
    score: float
    query: dict[str, torch.Tensor]
    document: dict[str, torch.Tensor]


@dataclass
class _Run:
    recipe: AlignRecipe
    models_dir: Path
    work_dir: Path
    scorer: Scorer
    lexical: Callable[[Mapping[str, str]], Ranker] | None
    log: Log
    progress: bool
    threads: int
    data: BeirTrainData = field(init=False)
    train_ids: list[str] = field(init=False)
    selection_ids: list[str] = field(init=False)
    doc_ids: list[str] = field(init=False)
    doc_texts: list[str] = field(init=False)
    reports: list[PhaseReport] = field(default_factory=list)
    best: _Snapshot | None = None

    def load_data(self) -> None:
        r = self.recipe
        self.data = load_beir_train(r.dataset, r.split, query_field=r.query_field)
        self.train_ids, self.selection_ids = split_selection(self.data, r.selection_queries, r.seed)
        self.doc_ids = list(self.data.corpus)
        self.doc_texts = [self.data.corpus[d] for d in self.doc_ids]
        self.log(
            f"align: {len(self.train_ids)} training queries, {len(self.selection_ids)} held out for "
            f"selection, {len(self.doc_ids)} documents"
        )

    def score(self, query: QueryTower, doc_vectors: torch.Tensor) -> float | None:
        if not self.selection_ids:
            return None
        texts = [self.data.queries[q] for q in self.selection_ids]
        return selection_score(
            self.scorer,
            self.selection_ids,
            query.encode(texts).numpy(),
            self.doc_ids,
            doc_vectors.numpy(),
            {q: self.data.positives[q] for q in self.selection_ids},
        )

    def corpus_vectors(self, document: DocumentTower) -> torch.Tensor:
        return document.encode(self.doc_texts, self.recipe.encode_batch_size, progress=self.progress)

    def record(self, report: PhaseReport, query: QueryTower, document: DocumentTower) -> None:
        self.reports.append(report)
        score = report.selection_ndcg10
        if (
            self.recipe.keep_best_phase
            and score is not None
            and (self.best is None or score > self.best.score)
        ):
            self.best = _Snapshot(report.phase, score, query.trainable_state(), document.trainable_state())
        figure = (
            f", selection nDCG@10 {report.selection_ndcg10:.1f}"
            if report.selection_ndcg10 is not None
            else ""
        )
        self.log(f"align: {report.phase} done in {report.seconds:.0f} s{figure}")
        payload = {
            "recipe": json.loads(self.recipe.model_dump_json()),
            "phases": [vars(p) for p in self.reports],
            "best_phase": self.best.phase if self.best is not None else None,
        }
        (self.work_dir / REPORT_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _load_or_fill_cache(run: _Run, document: DocumentTower) -> torch.Tensor:
    """Base corpus vectors; the pass also fills the lower-state cache, saved for the next run."""
    cache_path = run.work_dir / CACHE_FILE
    if document.cache is not None and cache_path.is_file():
        document.cache.load(cache_path)
        run.log(f"align: {len(document.cache)} cached lower states from {cache_path}")
    vectors = run.corpus_vectors(document)
    if document.cache is not None and not cache_path.is_file():
        document.cache.save(cache_path)
    return vectors


def _teacher_vectors(run: _Run, teacher_name: str) -> torch.Tensor:
    """The teacher's corpus vectors, kept in the work dir by the teacher's fingerprint."""
    teacher_dir = run.models_dir / teacher_name
    manifest = verify_manifest(teacher_dir)
    path = run.work_dir / f"teacher-{teacher_name}-{manifest.fingerprint[:12]}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    run.log(f"align: teacher {teacher_name} over {len(run.doc_texts)} documents")
    vectors = load_encoder(teacher_dir, threads=run.threads, device="cpu").encode(
        run.doc_texts, batch_size=run.recipe.encode_batch_size
    )
    np.save(path, vectors)
    return torch.from_numpy(vectors)


def _probes(run: _Run, query: QueryTower, targets: torch.Tensor) -> DistillationProbes:
    """The untrained query side's vectors of the training queries and their teacher top documents."""
    vectors = query.encode([run.data.queries[q] for q in run.train_ids])
    unit = torch.nn.functional.normalize(targets.float(), dim=-1)
    if vectors.shape[1] != unit.shape[1]:
        raise ValueError(
            f"distillation probes: the query side has dim {vectors.shape[1]}, the teacher {unit.shape[1]}"
        )
    depth = min(run.recipe.distillation_probe_depth, len(unit))
    return DistillationProbes(vectors, torch.topk(vectors @ unit.T, depth, dim=1).indices)


def _mine(run: _Run, query: QueryTower, doc_vectors: torch.Tensor) -> dict[str, list[str]]:
    mining = run.recipe.negatives
    queries = {q: run.data.queries[q] for q in run.train_ids}
    if mining.source == "bm25":
        if run.lexical is None:
            raise ValueError("the recipe mines negatives with bm25 but no lexical ranker was given")
        rankings = rank_with(
            run.lexical(dict(zip(run.doc_ids, run.doc_texts, strict=True))), queries, mining.depth
        )
    else:
        vectors = query.encode(list(queries.values())).numpy()
        rankings = rank_dense(list(queries), vectors, run.doc_ids, doc_vectors.numpy(), mining.depth)
    negatives = hard_negatives(rankings, run.data.positives, count=mining.count, skip=mining.skip)
    run.log(
        f"align: mined {sum(map(len, negatives.values()))} {mining.source} negatives "
        f"for {len(negatives)} queries"
    )
    return negatives


def run_alignment(
    recipe: AlignRecipe,
    *,
    models_dir: Path,
    work_dir: Path,
    deltas_dir: Path,
    scorer: Scorer,
    lexical: Callable[[Mapping[str, str]], Ranker] | None = None,
    log: Log = print,
    progress: bool = True,
    threads: int = 0,
) -> AlignResult:
    """Run every phase the recipe names and build the aligned pair into ``models_dir``."""
    from models.export import export_query_encoder, quantize_int8

    if threads:
        torch.set_num_threads(threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(recipe, models_dir, work_dir, scorer, lexical, log, progress, threads)
    run.load_data()

    started = time.perf_counter()
    document = DocumentTower(models_dir / recipe.document_model, recipe.document_side, seed=recipe.seed)
    query = QueryTower(models_dir / recipe.query_model, recipe.query_side, seed=recipe.seed)
    if query.dim != document.dim:
        raise ValueError(
            f"query side dim {query.dim} != document side dim {document.dim}: set query_side.output_dim "
            "(a projection) or document_side.output_dim (truncation)"
        )
    doc_vectors = _load_or_fill_cache(run, document)
    run.record(
        PhaseReport(
            "corpus pass (base)",
            time.perf_counter() - started,
            selection_ndcg10=run.score(query, doc_vectors),
        ),
        query,
        document,
    )

    def phase(name: str, config: StageConfig, train: Callable[[Path], tuple[int, list[float]]]) -> None:
        nonlocal doc_vectors
        began = time.perf_counter()
        steps, losses = train(work_dir / name)
        if config.stage in ("document_distillation", "joint"):  # the document side changed
            doc_vectors = run.corpus_vectors(document)
        run.record(
            PhaseReport(
                name,
                time.perf_counter() - began,
                steps=steps,
                last_loss=losses[-1] if losses else None,
                selection_ndcg10=run.score(query, doc_vectors),
            ),
            query,
            document,
        )

    if recipe.distillation is not None:
        teacher_name = recipe.teacher_model
        if teacher_name is None:
            raise ValueError("the recipe distills the document side but names no teacher_model")
        targets = _teacher_vectors(run, teacher_name)
        distill = recipe.distillation
        probes = _probes(run, query, targets) if recipe.distillation_probe_depth else None

        def do_distill(ckpt: Path) -> tuple[int, list[float]]:
            result = train_document_distillation(
                document,
                run.doc_texts,
                targets,
                distill,
                probes=probes,
                checkpoint_dir=ckpt,
                progress=progress,
            )
            return result.steps, result.losses

        phase("distillation", distill, do_distill)

    if recipe.stage_one is not None:
        stage_one = recipe.stage_one
        texts = self_pair_texts((run.data.queries[q] for q in run.train_ids), run.doc_texts)
        targets = document.encode(texts, recipe.encode_batch_size, progress=progress)
        if (
            query.projection is not None
            and recipe.fit_projection_texts
            and not (work_dir / "stage-one").exists()
        ):
            cosine = fit_projection(
                query, texts[: recipe.fit_projection_texts], targets[: recipe.fit_projection_texts]
            )
            log(f"align: projection fitted, mean cosine {cosine:.3f}")

        def do_stage_one(ckpt: Path) -> tuple[int, list[float]]:
            result = train_query_alignment(
                query, texts, targets, stage_one, checkpoint_dir=ckpt, progress=progress
            )
            return result.steps, result.losses

        phase("stage-one", stage_one, do_stage_one)

    if isinstance(recipe.stage_two, QueryRetrievalConfig):
        frozen_two = recipe.stage_two
        row = {doc_id: i for i, doc_id in enumerate(run.doc_ids)}
        labelled = [q for q in run.train_ids if any(d in row for d in run.data.positives[q])]

        def do_query_retrieval(ckpt: Path) -> tuple[int, list[float]]:
            result = train_query_retrieval(
                query,
                [run.data.queries[q] for q in labelled],
                [[row[d] for d in run.data.positives[q] if d in row] for q in labelled],
                doc_vectors,
                frozen_two,
                checkpoint_dir=ckpt,
                progress=progress,
            )
            return result.steps, result.losses

        phase("stage-two", frozen_two, do_query_retrieval)
    elif isinstance(recipe.stage_two, JointConfig):
        stage_two = recipe.stage_two
        negatives = _mine(run, query, doc_vectors)
        train_only = BeirTrainData(
            corpus=run.data.corpus,
            queries={q: run.data.queries[q] for q in run.train_ids},
            positives=run.data.positives,
        )
        groups = beir_groups(train_only, negatives, prompt=None)

        def do_stage_two(ckpt: Path) -> tuple[int, list[float]]:
            result = train_joint(query, document, groups, stage_two, checkpoint_dir=ckpt, progress=progress)
            return result.steps, result.losses

        phase("stage-two", stage_two, do_stage_two)

    kept = _restore_best(run, query, document)
    return _write_artifacts(run, query, document, deltas_dir, export_query_encoder, quantize_int8, kept)


def _restore_best(run: _Run, query: QueryTower, document: DocumentTower) -> str | None:
    """Load the best phase's weights when a later phase scored lower; returns the phase shipped."""
    best = run.best
    if best is None:
        return None
    last = run.reports[-1]
    if best.phase != last.phase:
        query.load_trainable_state(best.query)
        document.load_trainable_state(best.document)
        run.log(
            f"align: shipping {best.phase} (selection nDCG@10 {best.score:.1f}); {last.phase} scored "
            f"{last.selection_ndcg10:.1f}"
        )
    return best.phase


def _write_artifacts(
    run: _Run,
    query: QueryTower,
    document: DocumentTower,
    deltas_dir: Path,
    export: Callable[..., ModelManifest],
    quantize: Callable[..., tuple[ModelManifest, float]],
    kept_phase: str | None,
) -> AlignResult:
    recipe, models_dir = run.recipe, run.models_dir
    if recipe.document_side.mode == "frozen":
        document_manifest = document.base_manifest
        space = document.base_manifest.space
    else:
        delta = save_document_delta(document, deltas_dir / f"{recipe.name}.safetensors", name=recipe.name)
        space = delta.space
        document_manifest = build_document_encoder(
            models_dir / recipe.document_model,
            deltas_dir / f"{recipe.name}.safetensors",
            models_dir / recipe.name,
            progress=run.log,
        )
    query_name = f"{recipe.name}-query"
    query_delta = deltas_dir / f"{query_name}.safetensors"
    save_query_delta(query, query_delta, name=query_name, space=space)
    query_manifest = build_query_encoder(
        models_dir / recipe.query_model, query_delta, models_dir / query_name, progress=run.log
    )
    onnx = export(
        models_dir / query_name,
        models_dir / f"{query_name}-onnx",
        name=f"{query_name}-onnx",
        progress=run.log,
    )
    int8, cosine = quantize(
        models_dir / f"{query_name}-onnx", models_dir / f"{query_name}-onnx-int8", progress=run.log
    )
    run.log(f"align: int8 query encoder, min cosine to fp32 {cosine:.4f}")
    return AlignResult(document_manifest, query_manifest, onnx, int8, run.reports, kept_phase)
