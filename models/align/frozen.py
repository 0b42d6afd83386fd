"""Alignment into a frozen LLM embedder's space (CARE stage I with the document side kept as it is).

When the document encoder is already an embedder (EmbeddingGemma), its index is never retrained: the
small query encoder learns that space, from two signals the embedder itself gives plus the labels:

1. the corpus pass: the embedder's document vectors of every corpus document (passed in, so the CLI
   can share the evaluation's vector cache);
2. the teacher pass: the embedder's *query* vectors of the training queries and of unlabelled
   pseudo-queries (``models.align.pseudo``), cached in the work directory;
3. a ridge start: the projection from the small encoder's pooled features to the teacher's query
   vectors in closed form;
4. query distillation (``train.train_query_distillation``): InfoNCE on the labels against the whole
   corpus, listwise KL to the teacher's ranking of the whole corpus, scored on selection queries held
   out of the training split every ``select_every`` steps; the best step is kept;
5. artifacts: the query delta (committable), the rebuilt query encoder, its ONNX export and the int8
   quantization, which a quality gate may refuse to publish.

The query encoder's manifest names the embedder's own space, so the service pairs it with an index
built by the untouched embedder and refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.align.artifacts import build_query_encoder, save_query_delta
from models.align.data import load_beir_train
from models.align.pseudo import PseudoQueries, pseudo_queries
from models.align.query_side import QuerySideConfig, QueryTower, fit_projection
from models.align.selection import Scorer, selection_score, split_selection
from models.align.stage_configs import QueryDistillationConfig, QueryPointwiseConfig
from models.align.student import QueryStudent
from models.align.teacher_layers import TeacherLayersConfig, TeacherLayersTower
from models.align.text_set import TextSetConfig, build_text_set, load_text_set
from models.align.train import TeacherSignal, train_query_distillation, train_query_pointwise
from models.encoder import Precision
from models.int8_plan import INT8_PLAN_SUFFIX, Int8Plan, save_int8_plan
from models.loading import load_encoder
from models.manifest import ManifestError, ModelManifest, verify_manifest
from models.training_loop import CHECKPOINT_FILE, TrainResult
from models.vocabulary import tokens_to_keep

Log = Callable[[str], None]
# (document model dir, doc ids, doc texts) -> (len(ids), dim) document vectors, in order.
CorpusVectors = Callable[[Path, Sequence[str], Sequence[str]], np.ndarray]
# (fp32 query encoder dir, int8 query encoder dir) -> (fp32 nDCG@10, int8 nDCG@10) on a gate set.
QualityGate = Callable[[Path, Path], tuple[float, float]]
REPORT_FILE = "report.json"
BEST_FILE = "best.pt"
SCORES_FILE = "selection.json"
TEACHER_CHUNK = 512
TEACHER_DIR = "teacher-queries"


def teacher_cache_dir(root: Path, teacher: str, texts: Sequence[str]) -> Path:
    """Where the teacher's vectors of ``texts`` live under ``root``: one directory per teacher name
    and text list, shared by every recipe that distils the same texts (the e5 and the teacher-layers
    students read one pass); ``teacher.json`` inside refuses another build of that teacher."""
    digest = hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()[:16]
    return root / f"{teacher}-{digest}"


TEACHER_META = "teacher.json"
TEXT_SET_DIR = "text-set"


class TeacherCacheError(RuntimeError):
    """The cached teacher vectors were computed by another teacher, in another precision or for
    other texts: mixing them would train the student toward two different spaces."""


class QualityGateError(RuntimeError):
    """The int8 query encoder loses more than the recipe allows against fp32: it is not published."""


class FrozenAlignRecipe(BaseModel):
    """A query encoder aligned into a frozen document embedder's space; a JSON file of this model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["frozen_document"] = "frozen_document"
    name: str = Field(description="Prefix of the outputs: NAME-query, NAME-query-onnx, NAME-query-onnx-int8.")
    query_model: str | None = Field(
        default=None, description="Built BERT-family query base (a directory in the models dir)."
    )
    teacher_layers: TeacherLayersConfig | None = Field(
        default=None, description="Instead of query_model: a student cut from the teacher's first layers."
    )
    document_model: str = Field(description="Built document embedder with a query prompt (the teacher).")
    teacher_precision: Precision = Field(
        default="fp32",
        description="Arithmetic of the teacher's query pass (a fast path is used only if it passes the "
        "precision gate; the cache records the one used and refuses to mix).",
    )
    dataset: Path
    split: str = "train"
    query_field: str = "text"
    selection_queries: int = Field(default=300, ge=1)
    seed: int = 0
    query_side: QuerySideConfig = QuerySideConfig()
    pseudo_queries: PseudoQueries | None = PseudoQueries()
    text_set: TextSetConfig | None = Field(
        default=None,
        description="Unlabelled texts built by models.align.text_set (then pseudo_queries must be null): "
        "stage I trains on all of them, stage II draws its pseudo-queries from them.",
    )
    fit_projection: bool = True
    start_from: Path | None = Field(
        default=None,
        description="A best.pt of an earlier run of the same tower (its stage_one/best.pt, say): a fresh run "
        "starts from those weights instead of the base, e.g. for another pass over the text set.",
    )
    stage_one: QueryPointwiseConfig | None = Field(
        default=None, description="Pointwise distillation on the unlabelled texts before `training`."
    )
    training: QueryDistillationConfig
    select_every: int = Field(default=50, gt=0)
    stage_one_select_every: int = Field(default=250, gt=0, description="Selection interval of stage_one.")
    encode_batch_size: int = Field(default=16, gt=0)
    int8_max_drop: float = Field(
        default=0.5, ge=0, description="Refuse the int8 encoder when it loses more nDCG@10 than this."
    )
    int8_keep_float: list[str] = Field(
        default_factory=list,
        description="MatMul node-name fragments the int8 graph keeps in float32 (models/int8_plan.py).",
    )
    int8_blockwise: list[str] = Field(
        default_factory=list,
        description="MatMul node-name fragments the int8 graph stores as 8-bit weight blocks "
        "(models/int8_plan.py).",
    )
    trim_vocabulary: bool = Field(
        default=False,
        description="int8 keeps only the word-embedding rows the training texts and corpus use (plus "
        "every single character, byte and special token); the list is saved beside the delta.",
    )

    @model_validator(mode="after")
    def _one_student_one_source(self) -> FrozenAlignRecipe:
        if (self.query_model is None) == (self.teacher_layers is None):
            raise ValueError("set exactly one of query_model and teacher_layers")
        if self.text_set is not None and self.pseudo_queries is not None:
            raise ValueError("text_set replaces pseudo_queries: set pseudo_queries to null")
        if self.stage_one is not None and self.text_set is None:
            raise ValueError("stage_one trains on the text set: set text_set")
        return self


@dataclass
class FrozenAlignResult:
    query: ModelManifest
    query_onnx: ModelManifest
    query_int8: ModelManifest
    report: dict[str, object] = field(default_factory=dict)


def teacher_query_vectors(
    document_dir: Path,
    texts: Sequence[str],
    cache_dir: Path,
    *,
    batch_size: int,
    log: Log,
    threads: int = 0,
    precision: Precision = "fp32",
) -> np.ndarray:
    """The embedder's query vectors of ``texts`` (float32), computed once into ``cache_dir`` as
    float16 parts of ``TEACHER_CHUNK`` rows: an interrupted pass resumes at its first missing part,
    a rerun only reads. ``teacher.json`` names the teacher, the texts and the precision in use; a
    cache of another teacher, other texts or another precision is refused, never mixed."""
    manifest = verify_manifest(document_dir)
    identity: dict[str, object] = {
        "teacher": manifest.name,
        "fingerprint": manifest.fingerprint,
        "query_prompt": manifest.query_prompt,
        "dim": manifest.dim,
        "texts": len(texts),
        "texts_sha256": hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest(),
    }
    meta_path = cache_dir / TEACHER_META
    saved: dict[str, object] = {}
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text(encoding="utf-8"))
        for key, value in identity.items():
            if saved.get(key) != value:
                raise TeacherCacheError(
                    f"{cache_dir}: cached teacher vectors have another {key} ({saved.get(key)!r}, this "
                    f"run: {value!r}); remove {cache_dir} to compute them again"
                )
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoder = None
    parts = []
    for number, start in enumerate(range(0, len(texts), TEACHER_CHUNK)):
        path = cache_dir / f"part-{number:05d}.npy"
        if not path.is_file():
            if encoder is None:
                log(f"align: teacher {manifest.name} encoding {len(texts) - start} of {len(texts)} texts")
                encoder = load_encoder(
                    document_dir, threads=threads, device="cpu", mode="query", precision=precision
                )
                used = str(getattr(encoder, "precision", "fp32"))
                if saved.get("precision", used) != used:
                    raise TeacherCacheError(
                        f"{cache_dir}: cached teacher vectors were computed in {saved['precision']}, this "
                        f"machine's teacher runs in {used}; remove {cache_dir} or set teacher_precision"
                    )
                saved = {**identity, "precision": used}
                meta_path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
            vectors = encoder.encode(texts[start : start + TEACHER_CHUNK], batch_size=batch_size)
            partial = path.with_name(path.name + ".partial.npy")
            np.save(partial, vectors.astype(np.float16))
            partial.replace(path)
        parts.append(np.load(path).astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, manifest.dim), dtype=np.float32)


@dataclass
class _Selection:
    """Scores the query side on held-out training queries and keeps its best weights."""

    texts: list[str]
    ids: list[str]
    relevant: dict[str, Sequence[str]]
    doc_ids: list[str]
    doc_vectors: np.ndarray
    scorer: Scorer
    path: Path
    best_score: float = float("-inf")
    best_step: int = -1
    scores: dict[int, float] = field(default_factory=dict)

    def score(self, query: QueryStudent) -> float:
        vectors = query.encode(self.texts).numpy()
        return selection_score(self.scorer, self.ids, vectors, self.doc_ids, self.doc_vectors, self.relevant)

    @property
    def scores_path(self) -> Path:
        return self.path.with_name(SCORES_FILE)

    def record(self, step: int, query: QueryStudent) -> float:
        score = self.score(query)
        self.scores[step] = score
        # The curve survives a resume: the report of a resumed run still shows every scored step.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scores_path.write_text(json.dumps({str(k): v for k, v in self.scores.items()}) + "\n")
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"step": step, "score": score, "state": query.trainable_state()}, self.path)
        return score

    def restore_previous(self) -> None:
        """The best of an interrupted run, so a resumed run still ships its best step."""
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=True)
            self.best_score, self.best_step = float(saved["score"]), int(saved["step"])
        if self.scores_path.is_file():
            saved_scores = json.loads(self.scores_path.read_text())
            self.scores = {int(k): float(v) for k, v in saved_scores.items()} | self.scores

    def load_best(self, query: QueryStudent) -> None:
        query.load_trainable_state(torch.load(self.path, weights_only=True)["state"])


def run_frozen_alignment(
    recipe: FrozenAlignRecipe,
    *,
    models_dir: Path,
    work_dir: Path,
    deltas_dir: Path,
    scorer: Scorer,
    corpus_vectors: CorpusVectors,
    gate: QualityGate | None = None,
    log: Log = print,
    progress: bool = True,
    threads: int = 0,
    cache_dir: Path | None = None,
    teacher_cache: Path | None = None,
) -> FrozenAlignResult:
    """Train, select and publish a query encoder in ``recipe.document_model``'s space.

    ``cache_dir`` holds the PyPI files a text set reads, ``teacher_cache`` the teacher's query vectors
    (both default to directories under ``work_dir``)."""
    from models.export import export_query_encoder, quantize_int8

    if threads:
        torch.set_num_threads(threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    document_dir = models_dir / recipe.document_model
    document = verify_manifest(document_dir)
    if document.query_prompt is None:
        raise ValueError(f"{recipe.document_model} has no query prompt: it cannot teach a query encoder")
    if recipe.query_model is not None:
        try:  # checked before the long corpus and teacher passes, not after them
            verify_manifest(models_dir / recipe.query_model)
        except ManifestError as exc:
            raise ManifestError(f"{exc}; build it with: medsearch models build {recipe.query_model}") from exc

    data = load_beir_train(recipe.dataset, recipe.split, query_field=recipe.query_field)
    train_ids, selection_ids = split_selection(data, recipe.selection_queries, recipe.seed)
    doc_ids = list(data.corpus)
    doc_texts = [data.corpus[d] for d in doc_ids]
    row = {d: i for i, d in enumerate(doc_ids)}
    labelled = [q for q in train_ids if any(d in row for d in data.positives[q])]
    log(
        f"align: {len(labelled)} training queries, {len(selection_ids)} for selection, "
        f"{len(doc_ids)} documents"
    )

    unlabelled: list[str] = []
    text_set_counts: dict[str, int] = {}
    if recipe.text_set is not None:
        text_dir = work_dir / TEXT_SET_DIR
        built = build_text_set(
            recipe.text_set,
            recipe.dataset,
            text_dir,
            exclude_ids=set(selection_ids),
            cache_dir=cache_dir or work_dir / "pypi",
            log=log,
        )
        unlabelled = load_text_set(
            text_dir / "texts.jsonl", recipe.dataset, recipe.text_set.question_max_chars
        )
        log(f"align: text set of {len(unlabelled)} texts ({built.counts_line()})")
        text_set_counts = built.counts
    elif recipe.pseudo_queries is not None:
        unlabelled = pseudo_queries(
            recipe.pseudo_queries, recipe.dataset / "queries.jsonl", set(labelled), doc_texts
        )

    corpus = np.asarray(corpus_vectors(document_dir, doc_ids, doc_texts), dtype=np.float32)
    timings["corpus pass"] = time.perf_counter() - began
    query_texts = [data.queries[q] for q in labelled]
    # One teacher pass over every distinct text: the labelled titles are usually in the text set too.
    distinct = list(dict.fromkeys([*query_texts, *unlabelled]))
    at = {text: i for i, text in enumerate(distinct)}
    started = time.perf_counter()
    teacher_all = teacher_query_vectors(
        document_dir,
        distinct,
        teacher_cache_dir(teacher_cache or work_dir / TEACHER_DIR, document.name, distinct),
        batch_size=recipe.encode_batch_size,
        log=log,
        threads=threads,
        precision=recipe.teacher_precision,
    )
    teacher_queries = teacher_all[[at[t] for t in query_texts]]
    teacher_unlabelled = teacher_all[[at[t] for t in unlabelled]]
    timings["teacher pass"] = time.perf_counter() - started
    log(f"align: teacher vectors for {len(query_texts)} queries and {len(unlabelled)} unlabelled texts")

    query: QueryStudent
    if recipe.teacher_layers is not None:
        query = TeacherLayersTower(document_dir, recipe.teacher_layers, seed=recipe.seed)
    else:
        side = recipe.query_side.model_copy(update={"output_dim": document.dim})
        query = QueryTower(models_dir / str(recipe.query_model), side, seed=recipe.seed)

    def selection_for(directory: Path) -> _Selection:
        return _Selection(
            texts=[data.queries[q] for q in selection_ids],
            ids=selection_ids,
            relevant={q: data.positives[q] for q in selection_ids},
            doc_ids=doc_ids,
            doc_vectors=corpus,
            scorer=scorer,
            path=directory / BEST_FILE,
        )

    def run_stage(
        name: str,
        directory: Path,
        steps: int,
        every: int,
        train: Callable[[Callable[[int, float], None]], TrainResult],
    ) -> tuple[_Selection, TrainResult]:
        """One selected stage: scored at its start and every ``select_every`` steps, resumable,
        leaving the tower at its best step."""
        selection = selection_for(directory)
        if (directory / CHECKPOINT_FILE).is_file():
            selection.restore_previous()
        else:
            log(f"align: {name} start, selection nDCG@10 {selection.record(0, query):.1f}")

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                score = selection.record(step, query)
                log(f"align: {name} step {step}, loss {loss:.4f}, selection nDCG@10 {score:.1f}")

        stage_began = time.perf_counter()
        trained = train(on_step)
        timings[name] = time.perf_counter() - stage_began
        selection.load_best(query)
        log(
            f"align: {name} best at step {selection.best_step} (selection nDCG@10 {selection.best_score:.1f})"
        )
        return selection, trained

    stage_one_dir, stage_two_dir = work_dir / "stage-one", work_dir / "training"
    fresh = not any((d / CHECKPOINT_FILE).is_file() for d in (stage_one_dir, stage_two_dir))
    if fresh and recipe.start_from is not None:
        if not recipe.start_from.is_file():
            raise FileNotFoundError(f"start_from: no such file {recipe.start_from}")
        started_from = torch.load(recipe.start_from, weights_only=True)
        query.load_trainable_state(started_from["state"])
        log(f"align: starting from {recipe.start_from} (step {started_from['step']})")
    elif fresh and isinstance(query, QueryTower) and recipe.fit_projection and query.projection is not None:
        cosine = fit_projection(query, query_texts, torch.from_numpy(teacher_queries))
        log(f"align: projection fitted to the teacher's query vectors, mean cosine {cosine:.3f}")
    selections: dict[str, _Selection] = {}
    if recipe.stage_one is not None and not (stage_two_dir / CHECKPOINT_FILE).is_file():
        stage_one = recipe.stage_one
        selections["stage_one"], _ = run_stage(
            "stage_one",
            stage_one_dir,
            stage_one.steps,
            recipe.stage_one_select_every,
            lambda on_step: train_query_pointwise(
                query,
                unlabelled,
                torch.from_numpy(teacher_unlabelled),
                stage_one,
                corpus=torch.from_numpy(corpus),
                checkpoint_dir=stage_one_dir,
                progress=progress,
                on_step=on_step,
            ),
        )

    selection, result = run_stage(
        "training",
        stage_two_dir,
        recipe.training.steps,
        recipe.select_every,
        lambda on_step: train_query_distillation(
            query,
            query_texts,
            [[row[d] for d in data.positives[q] if d in row] for q in labelled],
            torch.from_numpy(corpus),
            TeacherSignal(
                torch.from_numpy(teacher_queries), unlabelled, torch.from_numpy(teacher_unlabelled)
            ),
            recipe.training,
            checkpoint_dir=stage_two_dir,
            progress=progress,
            on_step=on_step,
        ),
    )
    selections["training"] = selection
    log(f"align: shipping step {selection.best_step} (selection nDCG@10 {selection.best_score:.1f})")

    query_name = f"{recipe.name}-query"
    delta_path = deltas_dir / f"{query_name}.safetensors"
    save_query_delta(query, delta_path, name=query_name, space=document.space)
    base_dir = document_dir if recipe.teacher_layers is not None else models_dir / str(recipe.query_model)
    manifest = build_query_encoder(base_dir, delta_path, models_dir / query_name, progress=log)
    onnx = export_query_encoder(
        models_dir / query_name, models_dir / f"{query_name}-onnx", name=f"{query_name}-onnx", progress=log
    )
    int8_dir = models_dir / f"{query_name}-onnx-int8"
    plan = Int8Plan(keep_float=list(recipe.int8_keep_float), blockwise=list(recipe.int8_blockwise))
    if recipe.trim_vocabulary:
        tokenizer_file = models_dir / query_name / "tokenizer.json"
        table_rows = int(query.model.get_input_embeddings().weight.shape[0])
        kept = tokens_to_keep(tokenizer_file, [*unlabelled, *query_texts, *doc_texts], table_rows)
        plan = plan.model_copy(update={"vocabulary": kept})
    if plan != Int8Plan():
        save_int8_plan(plan, deltas_dir / f"{query_name}{INT8_PLAN_SUFFIX}")
    int8, cosine = quantize_int8(models_dir / f"{query_name}-onnx", int8_dir, plan=plan, progress=log)
    log(f"align: int8 query encoder, min cosine to fp32 {cosine:.4f}")
    report: dict[str, object] = {
        "recipe": json.loads(recipe.model_dump_json()),
        "training_queries": len(labelled),
        "unlabelled_texts": len(unlabelled),
        "text_set": text_set_counts,
        "selection_ndcg10": {
            stage: {str(k): v for k, v in sorted(chosen.scores.items())}
            for stage, chosen in selections.items()
        },
        "shipped_step": selection.best_step,
        "steps": result.steps,
        "int8_min_cosine": cosine,
    }
    refused = None
    if gate is not None:
        fp32_score, int8_score = gate(models_dir / f"{query_name}-onnx", int8_dir)
        report["gate"] = {
            "fp32_ndcg10": fp32_score,
            "int8_ndcg10": int8_score,
            "max_drop": recipe.int8_max_drop,
        }
        if fp32_score - int8_score > recipe.int8_max_drop:
            shutil.rmtree(int8_dir)  # never left marked as built
            refused = (
                f"int8 {int8_score:.1f} vs fp32 {fp32_score:.1f} nDCG@10 "
                f"(allowed drop {recipe.int8_max_drop})"
            )
    timings["total"] = time.perf_counter() - began
    report["seconds"] = timings
    (work_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if refused is not None:
        raise QualityGateError(
            f"int8 query encoder refused: {refused}; the fp32 export {models_dir / (query_name + '-onnx')} "
            "is published, the int8 one is not"
        )
    return FrozenAlignResult(manifest, onnx, int8, report)
