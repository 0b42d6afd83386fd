"""The two CARE training stages: one loop, deterministic from a seed, resumable from a checkpoint.

Determinism without replaying anything: the items of step s come from a permutation seeded by
(seed, epoch of s), stage-II positives and negatives from a generator seeded by (seed, s), and the
only other randomness (query-side dropout) from the torch RNG, whose state the checkpoint keeps. So a
run resumed from the checkpoint of step n takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from models.align.data import TrainingGroup
from models.align.document_side import DocumentTower
from models.align.losses import embedding_mse, group_positive_index, info_nce, score_distillation
from models.align.query_side import QueryTower

CHECKPOINT_FILE = "checkpoint.pt"
Stage = Literal["document_distillation", "query_alignment", "joint", "query_retrieval", "query_distillation"]
StepCallback = Callable[[int, float], None]  # (steps done, loss of the last step)


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: Stage
    steps: int = Field(gt=0)
    seed: int = 0
    batch_size: int = Field(default=8, gt=1, description="Queries (stage I: texts) per step.")
    temperature: float = Field(gt=0)
    mse_weight: float = Field(default=0.0, ge=0)
    negatives_per_group: int = Field(default=7, ge=0, description="Stage II: given negatives per query.")
    query_lr: float = Field(default=2e-5, gt=0)
    projection_lr: float = Field(default=1e-4, gt=0)
    document_lr: float = Field(default=1e-4, gt=0, description="LoRA; full top layers want ~1e-5.")
    weight_decay: float = Field(default=0.01, ge=0)
    documents_per_probe: int = Field(
        default=4, gt=0, description="Distillation with probes: documents drawn per probe query."
    )
    probe_temperature: float = Field(default=0.02, gt=0, description="Distillation with probes.")
    kl_weight: float = Field(
        default=1.0, ge=0, description="Query distillation: weight of the KL to the teacher's scores."
    )
    kl_temperature: float = Field(default=0.02, gt=0, description="Query distillation: score temperature.")
    pseudo_per_step: int = Field(
        default=0, ge=0, description="Query distillation: unlabelled pseudo-queries added to each step."
    )
    duplicate_cosine: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Query distillation: documents at least this close to a query's positive are not "
        "its negatives (near-duplicate answers); None: only the labelled positives are masked.",
    )
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=50, gt=0)


def stage_one_config(steps: int, **overrides: Any) -> TrainConfig:
    """CARE stage I: InfoNCE at temperature 0.1 plus MSE, document side frozen."""
    return TrainConfig(stage="query_alignment", steps=steps, temperature=0.1, mse_weight=1.0, **overrides)


def distillation_config(steps: int, **overrides: Any) -> TrainConfig:
    """Warm start of the document side: its vectors pulled onto a teacher's (InfoNCE at 0.05 + MSE)."""
    return TrainConfig(
        stage="document_distillation", steps=steps, temperature=0.05, mse_weight=1.0, **overrides
    )


def stage_two_config(steps: int, **overrides: Any) -> TrainConfig:
    """CARE stage II: InfoNCE at temperature 0.02 over (query, positive, 7 negatives) groups."""
    return TrainConfig(stage="joint", steps=steps, temperature=0.02, **overrides)


def query_retrieval_config(steps: int, **overrides: Any) -> TrainConfig:
    """Stage II with the document side frozen: InfoNCE at 0.05 over the whole corpus."""
    return TrainConfig(**{"stage": "query_retrieval", "steps": steps, "temperature": 0.05, **overrides})


class CheckpointMismatchError(RuntimeError):
    """The checkpoint directory holds a run with another configuration or other data."""


@dataclass
class TrainResult:
    steps: int  # steps done in total, including those before a resume
    resumed_from: int  # 0 for a fresh run
    losses: list[float] = field(default_factory=list)  # one per step run by this call


def batch_items(seed: int, step: int, n_items: int, batch_size: int) -> list[int]:
    """Indices of step ``step``: epoch-wise permutations, the incomplete last batch dropped."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_items} training items cannot fill one batch of {batch_size}")
    permutation = np.random.default_rng([seed, step // per_epoch]).permutation(n_items)
    offset = (step % per_epoch) * batch_size
    return [int(i) for i in permutation[offset : offset + batch_size]]


def _fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _optimizer(
    config: TrainConfig, query: QueryTower | None, document: DocumentTower | None
) -> torch.optim.Optimizer:
    """AdamW with one learning rate per part; no weight decay on biases and norm scales."""
    named: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"query": [], "projection": [], "document": []}
    for name, param in (query.trainable_parameters() if query is not None else {}).items():
        named["projection" if name.startswith("projection.") else "query"].append((name, param))
    if document is not None:
        named["document"] = list(document.trainable_parameters().items())
    rates = {"query": config.query_lr, "projection": config.projection_lr, "document": config.document_lr}
    groups = []
    for part, params in named.items():
        for decay in (True, False):
            chosen = [p for _, p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": rates[part],
                        "weight_decay": config.weight_decay if decay else 0.0,
                    }
                )
    return torch.optim.AdamW(groups)


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then linear decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        remaining = config.steps - step
        return max(0.0, remaining / max(1, config.steps - config.warmup_steps))

    return factor


def _run(
    config: TrainConfig,
    query: QueryTower | None,
    document: DocumentTower | None,
    n_items: int,
    step_loss: Callable[[int, list[int]], torch.Tensor],
    data_fingerprint: str,
    checkpoint_dir: Path | None,
    progress: bool,
    on_step: StepCallback | None,
) -> TrainResult:
    optimizer = _optimizer(config, query, document)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir is not None else None
    identity = {"config": config.model_dump_json(), "data": data_fingerprint}

    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start = _restore(checkpoint, identity, query, document, optimizer, scheduler)
    else:
        torch.manual_seed(config.seed)
    result = TrainResult(steps=start, resumed_from=start)

    if query is not None:
        query.train()  # dropout on, as in any fine-tuning; the document side has none and stays in eval
    bar = tqdm(total=config.steps, initial=start, desc=config.stage, unit="step", disable=not progress)
    try:
        for step in range(start, config.steps):
            loss = step_loss(step, batch_items(config.seed, step, n_items, config.batch_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            result.losses.append(value)
            result.steps = step + 1
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update()
            if checkpoint is not None and (
                result.steps % config.checkpoint_every == 0 or result.steps == config.steps
            ):
                _save(checkpoint, identity, result.steps, query, document, optimizer, scheduler)
            if on_step is not None:
                on_step(result.steps, value)
    finally:
        bar.close()
        if query is not None:
            query.eval()
    return result


def _save(
    path: Path,
    identity: dict[str, str],
    step: int,
    query: QueryTower | None,
    document: DocumentTower | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    state = {
        **identity,
        "step": step,
        "query": query.trainable_state() if query is not None else {},
        "document": document.trainable_state() if document is not None else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint intact


def _restore(
    path: Path,
    identity: dict[str, str],
    query: QueryTower | None,
    document: DocumentTower | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    state = torch.load(path, weights_only=True)
    for key, expected in identity.items():
        if state.get(key) != expected:
            raise CheckpointMismatchError(
                f"{path} was written by a run with other {key}; resume with the same settings or "
                "use another checkpoint directory"
            )
    if query is not None:
        query.load_trainable_state(state["query"])
    if document is not None:
        document.load_trainable_state(state["document"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


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
    config: TrainConfig,
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
    if config.stage != "document_distillation":
        raise ValueError("train_document_distillation needs a document_distillation config")
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
    return _run(
        config, None, document, n_items, step_loss, _fingerprint(payload), checkpoint_dir, progress, on_step
    )


def train_query_alignment(
    query: QueryTower,
    texts: Sequence[str],
    targets: torch.Tensor,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Stage I: each text, as a query, against its own document vector (``targets``, from the frozen
    document side); the other texts of the batch are its negatives."""
    if config.stage != "query_alignment":
        raise ValueError("train_query_alignment needs a query_alignment config")
    unit = _unit_targets(texts, targets, query.dim)
    fingerprint = _fingerprint([list(texts), hashlib.sha256(unit.numpy().tobytes()).hexdigest()])

    def step_loss(_step: int, items: list[int]) -> torch.Tensor:
        vectors = query.embed([texts[i] for i in items])
        wanted = unit[items]
        loss = info_nce(vectors, wanted, torch.arange(len(items)), config.temperature)
        return loss + config.mse_weight * embedding_mse(vectors, wanted)

    return _run(config, query, None, len(texts), step_loss, fingerprint, checkpoint_dir, progress, on_step)


def _pick(rng: np.random.Generator, group: TrainingGroup, negatives: int) -> tuple[str, list[str]]:
    """One positive, and ``negatives`` given negatives (repeated when the group has fewer)."""
    positive = group.positives[int(rng.integers(len(group.positives)))]
    given = group.negatives
    if not given or negatives == 0:
        return positive, []
    chosen = rng.choice(len(given), size=negatives, replace=len(given) < negatives)
    return positive, [given[int(i)] for i in chosen]


def train_joint(
    query: QueryTower,
    document: DocumentTower,
    groups: Sequence[TrainingGroup],
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Stage II: each query against every document of the batch (its positive, its negatives and the
    other queries' documents), both sides trained; copies of a query's positives are never negatives."""
    if config.stage != "joint":
        raise ValueError("train_joint needs a joint config")
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

    return _run(
        config, query, document, len(groups), step_loss, fingerprint, checkpoint_dir, progress, on_step
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
    query: QueryTower,
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    corpus: torch.Tensor,
    config: TrainConfig,
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
    if config.stage != "query_retrieval":
        raise ValueError("train_query_retrieval needs a query_retrieval config")
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

    return _run(config, query, None, len(queries), step_loss, fingerprint, checkpoint_dir, progress, on_step)


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
    query: QueryTower,
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    corpus: torch.Tensor,
    teacher: TeacherSignal,
    config: TrainConfig,
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
    if config.stage != "query_distillation":
        raise ValueError("train_query_distillation needs a query_distillation config")
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
        vectors = query.embed([queries[i] for i in items])
        loss = info_nce(vectors, unit, chosen, config.temperature, known)
        targets = teacher_queries[items]
        if config.pseudo_per_step:
            extra = batch_items(config.seed + 1, step, len(teacher.pseudo_texts), config.pseudo_per_step)
            vectors = torch.cat([vectors, query.embed([teacher.pseudo_texts[i] for i in extra])])
            targets = torch.cat([targets, teacher_pseudo[extra]])
        if config.kl_weight:
            student = F.log_softmax(vectors @ unit.T / config.kl_temperature, dim=-1)
            wanted = F.log_softmax(targets @ unit.T / config.kl_temperature, dim=-1)
            loss = loss + config.kl_weight * F.kl_div(student, wanted, log_target=True, reduction="batchmean")
        if config.mse_weight:
            loss = loss + config.mse_weight * embedding_mse(vectors, targets)
        return loss

    return _run(config, query, None, len(queries), step_loss, fingerprint, checkpoint_dir, progress, on_step)
