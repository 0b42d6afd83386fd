"""The CARE training stages: each supplies its batches and loss to the one loop (models/training_loop.py),
which makes every stage deterministic from a seed and resumable from a checkpoint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.align.data import TrainingGroup
from models.align.document_side import DocumentTower
from models.align.losses import embedding_mse, group_positive_index, info_nce, score_distillation
from models.align.query_side import QueryTower
from models.align.stage_configs import (
    DocumentDistillationConfig,
    JointConfig,
    QueryAlignmentConfig,
    QueryDistillationConfig,
    QueryPointwiseConfig,
    QueryRetrievalConfig,
    QueryStageConfig,
    StageConfig,
)
from models.align.student import QueryStudent
from models.training_loop import (
    CHECKPOINT_FILE,
    Checkpointing,
    ParamGroup,
    StepCallback,
    StepLoss,
    TrainResult,
    batch_items,
    run_loop,
)


def _fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _embed(query: QueryStudent, texts: Sequence[str], config: QueryStageConfig) -> torch.Tensor:
    """The query side's vectors with gradients, float32 whatever the autocast computed in."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
        return query.embed(list(texts)).float()


def _query_groups(query: QueryStudent, config: QueryStageConfig) -> list[ParamGroup]:
    """The query encoder and its projection, each at its own learning rate."""
    named = query.trainable_parameters()
    return [
        ParamGroup([p for name, p in named.items() if not name.startswith("projection.")], config.query_lr),
        ParamGroup([p for name, p in named.items() if name.startswith("projection.")], config.projection_lr),
    ]


def _document_group(document: DocumentTower, lr: float) -> ParamGroup:
    return ParamGroup(list(document.trainable_parameters().values()), lr)


def _run(
    config: StageConfig,
    groups: list[ParamGroup],
    query: QueryStudent | None,
    document: DocumentTower | None,
    n_items: int,
    step_loss: StepLoss,
    data_fingerprint: str,
    checkpoint_dir: Path | None,
    progress: bool,
    on_step: StepCallback | None,
) -> TrainResult:
    def state() -> dict[str, Any]:
        return {
            "query": query.trainable_state() if query is not None else {},
            "document": document.trainable_state() if document is not None else {},
        }

    def load(saved: dict[str, Any]) -> None:
        if query is not None:
            query.load_trainable_state(saved["query"])
        if document is not None:
            document.load_trainable_state(saved["document"])

    checkpoint = (
        Checkpointing(
            path=checkpoint_dir / CHECKPOINT_FILE,
            every=config.checkpoint_every,
            identity={"config": config.model_dump_json(), "data": data_fingerprint},
            state=state,
            load=load,
        )
        if checkpoint_dir is not None
        else None
    )
    # Dropout on the query side, as in any fine-tuning; the document side has none and stays in eval.
    return run_loop(
        config,
        groups,
        n_items,
        step_loss,
        desc=config.stage,
        train_mode=[query] if query is not None else [],
        checkpoint=checkpoint,
        progress=progress,
        on_step=on_step,
    )


@dataclass(frozen=True)
class DistillationProbes:
    """Queries whose rankings the document side must reproduce during distillation.

    ``vectors`` (P, dim): the query side's unit vectors of training queries, as it stands before
    training; ``candidates`` (P, depth): each query's best documents under the teacher, best first.
    Batches are then built from these hard candidates rather than from random documents.
    """

    vectors: torch.Tensor
    candidates: torch.Tensor

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.candidates.ndim != 2 or len(self.vectors) != len(self.candidates):
            raise ValueError("probes need one vector and one candidate row per query")


def _unit_targets(texts: Sequence[str], targets: torch.Tensor, dim: int) -> torch.Tensor:
    if len(texts) != len(targets) or targets.ndim != 2:
        raise ValueError("targets must be one (dim,) row per text")
    if targets.shape[1] != dim:
        raise ValueError(f"targets have dim {targets.shape[1]}, the trained side {dim}: set output_dim")
    return F.normalize(targets.float(), dim=-1)


def train_document_distillation(
    document: DocumentTower,
    texts: Sequence[str],
    targets: torch.Tensor,
    config: DocumentDistillationConfig,
    *,
    probes: DistillationProbes | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Warm start for a document side that is not an embedder yet (a base LLM): each text's vector
    is pulled onto a teacher's vector of the same text (``targets``, e.g. a small embedder's document
    vectors), the batch's other texts pushed away. The query side is untouched.

    Without ``probes`` a step takes ``batch_size`` random texts. With them it takes ``batch_size``
    probe queries and ``documents_per_probe`` of each one's teacher candidates, and adds
    ``score_distillation``: those queries must rank the student's vectors as they rank the teacher's.
    """
    unit = _unit_targets(texts, targets, document.dim)
    payload: list[object] = [list(texts), hashlib.sha256(unit.numpy().tobytes()).hexdigest()]
    if probes is not None:
        if probes.vectors.shape[1] != document.dim:
            raise ValueError(
                f"probe vectors have dim {probes.vectors.shape[1]}, the document side {document.dim}"
            )
        if config.documents_per_probe > probes.candidates.shape[1]:
            raise ValueError("documents_per_probe exceeds the probes' candidate depth")
        probe_vectors = F.normalize(probes.vectors.float(), dim=-1)
        payload.append(
            hashlib.sha256(probe_vectors.numpy().tobytes() + probes.candidates.numpy().tobytes()).hexdigest()
        )

    def text_loss(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = document.embed([texts[i] for i in rows])
        wanted = unit[rows]
        index = torch.tensor(rows)
        copies = (index[:, None] == index[None, :]) & ~torch.eye(len(rows), dtype=torch.bool)
        loss = info_nce(vectors, wanted, torch.arange(len(rows)), config.temperature, copies)
        return loss + config.mse_weight * embedding_mse(vectors, wanted), vectors

    def step_loss(step: int, items: list[int]) -> torch.Tensor:
        if probes is None:
            return text_loss(items)[0]
        rng = np.random.default_rng([config.seed, step])
        depth = probes.candidates.shape[1]
        rows = [
            int(probes.candidates[p, j])
            for p in items
            for j in rng.choice(depth, config.documents_per_probe, replace=False)
        ]
        loss, vectors = text_loss(rows)
        return loss + score_distillation(probe_vectors[items], vectors, unit[rows], config.probe_temperature)

    n_items = len(texts) if probes is None else len(probes.vectors)
    groups = [_document_group(document, config.document_lr)]
    return _run(
        config,
        groups,
        None,
        document,
        n_items,
        step_loss,
        _fingerprint(payload),
        checkpoint_dir,
        progress,
        on_step,
    )


def train_query_alignment(
    query: QueryStudent,
    texts: Sequence[str],
    targets: torch.Tensor,
    config: QueryAlignmentConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Stage I: each text, as a query, against its own document vector (``targets``, from the frozen
    document side); the other texts of the batch are its negatives."""
    unit = _unit_targets(texts, targets, query.dim)
    fingerprint = _fingerprint([list(texts), hashlib.sha256(unit.numpy().tobytes()).hexdigest()])

    def step_loss(_step: int, items: list[int]) -> torch.Tensor:
        vectors = query.embed([texts[i] for i in items])
        wanted = unit[items]
        loss = info_nce(vectors, wanted, torch.arange(len(items)), config.temperature)
        return loss + config.mse_weight * embedding_mse(vectors, wanted)

    groups = _query_groups(query, config)
    return _run(
        config, groups, query, None, len(texts), step_loss, fingerprint, checkpoint_dir, progress, on_step
    )


def _pick(rng: np.random.Generator, group: TrainingGroup, negatives: int) -> tuple[str, list[str]]:
    """One positive, and ``negatives`` given negatives (repeated when the group has fewer)."""
    positive = group.positives[int(rng.integers(len(group.positives)))]
    given = group.negatives
    if not given or negatives == 0:
        return positive, []
    chosen = rng.choice(len(given), size=negatives, replace=len(given) < negatives)
    return positive, [given[int(i)] for i in chosen]


def train_joint(
    query: QueryTower,  # per-query instructions: a BERT-family tower's CARE template
    document: DocumentTower,
    groups: Sequence[TrainingGroup],
    config: JointConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Stage II: each query against every document of the batch (its positive, its negatives and the
    other queries' documents), both sides trained; copies of a query's positives are never negatives."""
    if query.dim != document.dim:
        raise ValueError(f"query dim {query.dim} != document dim {document.dim}: set output_dim")
    fingerprint = _fingerprint([[g.query, g.positives, g.negatives, g.prompt] for g in groups])

    def step_loss(step: int, items: list[int]) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, step])
        docs: list[str] = []
        sizes: list[int] = []
        for i in items:
            positive, negatives = _pick(rng, groups[i], config.negatives_per_group)
            docs += [positive, *negatives]
            sizes.append(1 + len(negatives))
        chosen = [groups[i] for i in items]
        exclude = torch.tensor([[doc in g.positives for doc in docs] for g in chosen])
        vectors = query.embed([g.query for g in chosen], [g.prompt for g in chosen])
        doc_vectors = document.embed(docs)
        positive_index = group_positive_index(sizes)
        loss = info_nce(vectors, doc_vectors, positive_index, config.temperature, exclude)
        if config.mse_weight:
            loss = loss + config.mse_weight * embedding_mse(vectors, doc_vectors[positive_index])
        return loss

    params = [*_query_groups(query, config), _document_group(document, config.document_lr)]
    return _run(
        config,
        params,
        query,
        document,
        len(groups),
        step_loss,
        fingerprint,
        checkpoint_dir,
        progress,
        on_step,
    )


def _corpus_targets(
    rng: np.random.Generator, items: Sequence[int], positives: Sequence[Sequence[int]], n_documents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Against a fixed corpus: one positive row per query (the target) and, per query, every one of
    its positive rows (none of them may count as a negative)."""
    chosen = torch.tensor([positives[i][int(rng.integers(len(positives[i])))] for i in items])
    known = torch.zeros(len(items), n_documents, dtype=torch.bool)
    for row, i in enumerate(items):
        known[row, list(positives[i])] = True
    return chosen, known


def train_query_retrieval(
    query: QueryStudent,
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    corpus: torch.Tensor,
    config: QueryRetrievalConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Stage II with the document side frozen: each training query against the fixed vectors of the
    whole corpus (``corpus``, one row per document), one of its positives (rows in ``positives``) as
    the target and its other positives masked.

    With the documents frozen their vectors are computed once, so every corpus document is a negative
    for the price of one matrix product: no mining, and the hardest negatives are always included.
    """
    if len(queries) != len(positives):
        raise ValueError(f"{len(queries)} queries but {len(positives)} positive lists")
    if corpus.ndim != 2 or corpus.shape[1] != query.dim:
        raise ValueError(f"corpus vectors must be (documents, {query.dim}): set output_dim")
    for i, rows in enumerate(positives):
        if not rows or not all(0 <= r < len(corpus) for r in rows):
            raise ValueError(f"query {i}: positives must be non-empty corpus rows")
    unit = F.normalize(corpus.float(), dim=-1)
    fingerprint = _fingerprint(
        [list(queries), [list(r) for r in positives], hashlib.sha256(unit.numpy().tobytes()).hexdigest()]
    )

    def step_loss(step: int, items: list[int]) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, step])
        chosen, known = _corpus_targets(rng, items, positives, len(unit))
        vectors = query.embed([queries[i] for i in items])
        loss = info_nce(vectors, unit, chosen, config.temperature, known)
        if config.mse_weight:
            loss = loss + config.mse_weight * embedding_mse(vectors, unit[chosen])
        return loss

    groups = _query_groups(query, config)
    return _run(
        config, groups, query, None, len(queries), step_loss, fingerprint, checkpoint_dir, progress, on_step
    )


@dataclass(frozen=True)
class TeacherSignal:
    """What a frozen embedder says about the training texts: its own query vectors of the labelled
    queries (``queries``, one row each) and of unlabelled pseudo-queries (``pseudo_texts`` and
    ``pseudo``)."""

    queries: torch.Tensor
    pseudo_texts: Sequence[str]
    pseudo: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.pseudo_texts) != len(self.pseudo):
            raise ValueError(
                f"{len(self.pseudo_texts)} pseudo-queries but {len(self.pseudo)} teacher vectors"
            )


def train_query_distillation(
    query: QueryStudent,
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    corpus: torch.Tensor,
    teacher: TeacherSignal,
    config: QueryDistillationConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """The query side learns a frozen embedder's space from its labels and from the embedder itself.

    Each step takes ``batch_size`` labelled queries and ``pseudo_per_step`` pseudo-queries. Labelled
    queries: InfoNCE against the whole corpus (``corpus``, the embedder's fixed document vectors),
    their other positives and near-duplicates of the positive masked. Every query: KL from the
    teacher's softmax over the whole corpus (the embedder's own query vector against the same
    documents) to the student's, i.e. listwise distillation of the teacher's ranking; ``mse_weight``
    adds the squared distance to the teacher's query vector.
    """
    if len(queries) != len(positives) or len(queries) != len(teacher.queries):
        raise ValueError("queries, positives and teacher query vectors must have one row per query")
    if corpus.ndim != 2 or corpus.shape[1] != query.dim:
        raise ValueError(f"corpus vectors must be (documents, {query.dim}): set output_dim")
    if teacher.queries.shape[1] != corpus.shape[1] or (
        len(teacher.pseudo) and teacher.pseudo.shape[1] != corpus.shape[1]
    ):
        raise ValueError("teacher query vectors and corpus vectors must share one dimension")
    for i, rows in enumerate(positives):
        if not rows or not all(0 <= r < len(corpus) for r in rows):
            raise ValueError(f"query {i}: positives must be non-empty corpus rows")
    if config.pseudo_per_step and len(teacher.pseudo_texts) < config.pseudo_per_step:
        raise ValueError(f"{len(teacher.pseudo_texts)} pseudo-queries cannot fill {config.pseudo_per_step}")
    unit = F.normalize(corpus.float(), dim=-1)
    teacher_queries = F.normalize(teacher.queries.float(), dim=-1)
    teacher_pseudo = F.normalize(teacher.pseudo.float(), dim=-1)
    fingerprint = _fingerprint(
        [
            list(queries),
            [list(r) for r in positives],
            list(teacher.pseudo_texts),
            hashlib.sha256(
                unit.numpy().tobytes() + teacher_queries.numpy().tobytes() + teacher_pseudo.numpy().tobytes()
            ).hexdigest(),
        ]
    )

    def step_loss(step: int, items: list[int]) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, step])
        chosen, known = _corpus_targets(rng, items, positives, len(unit))
        if config.duplicate_cosine is not None:
            known |= unit[chosen] @ unit.T >= config.duplicate_cosine
        vectors = _embed(query, [queries[i] for i in items], config)
        loss = info_nce(vectors, unit, chosen, config.temperature, known)
        targets = teacher_queries[items]
        if config.pseudo_per_step:
            extra = batch_items(config.seed + 1, step, len(teacher.pseudo_texts), config.pseudo_per_step)
            vectors = torch.cat([vectors, _embed(query, [teacher.pseudo_texts[i] for i in extra], config)])
            targets = torch.cat([targets, teacher_pseudo[extra]])
        if config.kl_weight:
            student = F.log_softmax(vectors @ unit.T / config.kl_temperature, dim=-1)
            wanted = F.log_softmax(targets @ unit.T / config.kl_temperature, dim=-1)
            loss = loss + config.kl_weight * F.kl_div(student, wanted, log_target=True, reduction="batchmean")
        if config.mse_weight:
            loss = loss + config.mse_weight * embedding_mse(vectors, targets)
        return loss

    groups = _query_groups(query, config)
    return _run(
        config, groups, query, None, len(queries), step_loss, fingerprint, checkpoint_dir, progress, on_step
    )


def train_query_pointwise(
    query: QueryStudent,
    texts: Sequence[str],
    teacher: torch.Tensor,
    config: QueryPointwiseConfig,
    *,
    corpus: torch.Tensor | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Stage I against a frozen teacher: each text's student vector is pulled onto the teacher's
    query vector of the same text (1 - cosine, averaged), over many unlabelled texts.

    Pointwise cosine to cached teacher query vectors is what NanoVDR found best among six objectives
    (and what LEAF and EmbedDistill start with); ``kl_weight`` adds the KL of the teacher's softmax
    over ``corpus`` (the teacher's document vectors) to the student's, i.e. its ranking.
    """
    if teacher.ndim != 2 or len(teacher) != len(texts) or teacher.shape[1] != query.dim:
        raise ValueError(f"teacher vectors must be ({len(texts)}, {query.dim}), one row per text")
    if config.kl_weight and corpus is None:
        raise ValueError("a listwise KL needs the teacher's corpus vectors")
    targets = F.normalize(teacher.float(), dim=-1)
    unit = F.normalize(corpus.float(), dim=-1) if corpus is not None else None
    fingerprint = _fingerprint(
        [
            hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest(),
            hashlib.sha256(targets.numpy().tobytes()).hexdigest(),
            None if unit is None else hashlib.sha256(unit.numpy().tobytes()).hexdigest(),
        ]
    )

    def step_loss(step: int, items: list[int]) -> torch.Tensor:
        vectors = _embed(query, [texts[i] for i in items], config)
        wanted = targets[items]
        loss = (1 - (vectors * wanted).sum(dim=-1)).mean()
        if config.kl_weight and unit is not None:
            student = F.log_softmax(vectors @ unit.T / config.temperature, dim=-1)
            teacher_scores = F.log_softmax(wanted @ unit.T / config.temperature, dim=-1)
            loss = loss + config.kl_weight * F.kl_div(
                student, teacher_scores, log_target=True, reduction="batchmean"
            )
        if config.mse_weight:
            loss = loss + config.mse_weight * embedding_mse(vectors, wanted)
        return loss

    return _run(
        config,
        _query_groups(query, config),
        query,
        None,
        len(texts),
        step_loss,
        fingerprint,
        checkpoint_dir,
        progress,
        on_step,
    )
