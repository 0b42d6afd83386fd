"""The training loop on tiny models: it learns, it is deterministic, and an interrupted run resumes to
exactly the weights of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.align.data import TrainingGroup
from models.align.document_side import DocumentSideConfig, DocumentTower
from models.align.losses import info_nce, score_distillation
from models.align.query_side import QuerySideConfig, QueryTower
from models.align.stage_configs import (
    DocumentDistillationConfig,
    JointConfig,
    QueryAlignmentConfig,
    QueryRetrievalConfig,
)
from models.align.train import (
    DistillationProbes,
    train_document_distillation,
    train_joint,
    train_query_alignment,
    train_query_retrieval,
)
from models.training_loop import CHECKPOINT_FILE, CheckpointMismatchError, batch_items
from tests.align_recipes import GEMMA, shipped_stage

SYMPTOMS = ["头痛", "发烧", "咳嗽", "腹泻", "失眠", "恶心", "便秘", "贫血"]
GROUPS = [
    TrainingGroup(
        query=f"{s}怎么办",
        positives=(f"{s}的治疗：多休息，按医生说的服药。",),
        negatives=tuple(f"{o}的症状和检查" for o in SYMPTOMS if o != s)[:4],
        prompt="找答案" if i % 2 else None,
    )
    for i, s in enumerate(SYMPTOMS)
]


class Interrupted(Exception):
    pass


def _towers(bert: Path, gemma: Path, seed: int = 0) -> tuple[QueryTower, DocumentTower]:
    document = DocumentTower(
        gemma, DocumentSideConfig(mode="top_layers", trainable_layers=1, cache_lower_states=True)
    )
    query = QueryTower(bert, QuerySideConfig(output_dim=document.dim), seed=seed)
    return query, document


def _stage_two(steps: int, **overrides: object) -> JointConfig:
    """CARE's joint stage II (no shipped recipe trains both sides yet)."""
    settings: dict[str, object] = {
        "steps": steps,
        "temperature": 0.02,
        "batch_size": 3,
        "negatives_per_group": 2,
        "checkpoint_every": 2,
        "query_lr": 1e-3,
        "projection_lr": 1e-3,
        "document_lr": 1e-3,
    }
    return JointConfig.model_validate({**settings, **overrides})


def _stage_one(steps: int, **tiny: object) -> QueryAlignmentConfig:
    return shipped_stage(QueryAlignmentConfig, GEMMA, "stage_one", steps=steps, warmup_steps=0, **tiny)


def _distillation(steps: int, **tiny: object) -> DocumentDistillationConfig:
    return shipped_stage(
        DocumentDistillationConfig, GEMMA, "distillation", steps=steps, warmup_steps=0, **tiny
    )


def _retrieval(steps: int, **tiny: object) -> QueryRetrievalConfig:
    return shipped_stage(QueryRetrievalConfig, GEMMA, "stage_two", steps=steps, warmup_steps=0, **tiny)


def _weights(query: QueryTower, document: DocumentTower) -> dict[str, torch.Tensor]:
    return {
        **{f"q.{k}": v for k, v in query.trainable_state().items()},
        **{f"d.{k}": v for k, v in document.trainable_state().items()},
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_batches_cover_every_item_once_per_epoch() -> None:
    epoch = [i for step in range(3) for i in batch_items(7, step, 10, 3)]
    assert len(set(epoch)) == 9  # 3 full batches; the incomplete one is dropped
    assert batch_items(7, 0, 10, 3) == batch_items(7, 0, 10, 3)
    assert batch_items(7, 3, 10, 3) != batch_items(7, 0, 10, 3)  # a new permutation next epoch
    with pytest.raises(ValueError, match="cannot fill"):
        batch_items(0, 0, 2, 3)


def test_stage_one_pulls_queries_onto_their_document_vectors(tiny_bert: Path, tiny_gemma: Path) -> None:
    document = DocumentTower(tiny_gemma, DocumentSideConfig())
    texts = [g.positives[0] for g in GROUPS]
    targets = document.encode(texts)
    query = QueryTower(tiny_bert, QuerySideConfig(output_dim=document.dim))

    def mean_cosine() -> float:
        return float((query.encode(texts) * targets).sum(dim=-1).mean())

    before = mean_cosine()
    config = _stage_one(30, batch_size=4, query_lr=1e-3, projection_lr=1e-2)
    result = train_query_alignment(query, texts, targets, config, progress=False)
    assert result.steps == 30 and len(result.losses) == 30
    assert mean_cosine() > before + 0.2
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_stage_one_checks_its_inputs(tiny_bert: Path) -> None:
    query = QueryTower(tiny_bert, QuerySideConfig())
    with pytest.raises(ValueError, match="set output_dim"):
        train_query_alignment(query, ["a", "b"], torch.zeros(2, 48), _stage_one(1, batch_size=2))


def test_distillation_pulls_document_vectors_onto_a_teachers(
    tiny_bert: Path, tiny_gemma: Path, tmp_path: Path
) -> None:
    # The warm start for a base LLM: its (truncated) document vectors learn a small embedder's.
    texts = [g.positives[0] for g in GROUPS] + [g.query for g in GROUPS]
    teacher = QueryTower(tiny_bert, QuerySideConfig(template="{text}", pooling="mean")).encode(texts)
    config = DocumentSideConfig(
        mode="top_layers", trainable_layers=1, cache_lower_states=True, output_dim=teacher.shape[1]
    )
    document = DocumentTower(tiny_gemma, config)

    def mean_cosine() -> float:
        return float((document.encode(texts) * teacher).sum(dim=-1).mean())

    before = mean_cosine()
    settings = _distillation(40, batch_size=8, document_lr=3e-3, checkpoint_every=10)
    result = train_document_distillation(document, texts, teacher, settings, progress=False)
    assert result.steps == 40
    assert mean_cosine() > before + 0.2
    assert sum(result.losses[-5:]) < sum(result.losses[:5])

    # Resumable like the other stages: interrupted after step 25, resumed from the step-20 checkpoint,
    # it ends on exactly the weights of the uninterrupted run above.
    def stop_after_25(steps: int, _loss: float) -> None:
        if steps == 25:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_document_distillation(
            DocumentTower(tiny_gemma, config),
            texts,
            teacher,
            settings,
            progress=False,
            checkpoint_dir=tmp_path,
            on_step=stop_after_25,
        )
    resumed = DocumentTower(tiny_gemma, config)
    again = train_document_distillation(
        resumed, texts, teacher, settings, progress=False, checkpoint_dir=tmp_path
    )
    assert again.resumed_from == 20 and again.losses == result.losses[20:]
    _assert_same(resumed.trainable_state(), document.trainable_state())


def test_distillation_with_probes_teaches_the_queries_rankings(tiny_bert: Path, tiny_gemma: Path) -> None:
    # Probes: fixed query vectors whose rankings of the teacher's documents the student must copy;
    # batches are drawn from each probe's teacher candidates.
    texts = [g.positives[0] for g in GROUPS] + [n for g in GROUPS for n in g.negatives[:1]]
    teacher_side = QueryTower(tiny_bert, QuerySideConfig(template="{text}", pooling="mean"))
    teacher = teacher_side.encode(texts)
    queries = teacher_side.encode([g.query for g in GROUPS])
    probes = DistillationProbes(queries, torch.topk(queries @ teacher.T, 6, dim=1).indices)
    config = DocumentSideConfig(
        mode="top_layers", trainable_layers=1, cache_lower_states=True, output_dim=teacher.shape[1]
    )
    document = DocumentTower(tiny_gemma, config)

    def disagreement() -> float:
        return float(score_distillation(queries, document.encode(texts), teacher, 0.05))

    before = disagreement()
    settings = _distillation(30, batch_size=4, documents_per_probe=3, document_lr=3e-3)
    result = train_document_distillation(document, texts, teacher, settings, probes=probes, progress=False)
    assert result.steps == 30
    assert disagreement() < 0.5 * before
    again = DocumentTower(tiny_gemma, config)
    train_document_distillation(again, texts, teacher, settings, probes=probes, progress=False)
    _assert_same(again.trainable_state(), document.trainable_state())

    with pytest.raises(ValueError, match="candidate depth"):
        train_document_distillation(
            document,
            texts,
            teacher,
            _distillation(1, batch_size=2, documents_per_probe=7),
            probes=probes,
        )
    with pytest.raises(ValueError, match="one vector and one candidate row"):
        DistillationProbes(queries, probes.candidates[:3])


def test_stage_two_trains_both_sides(tiny_bert: Path, tiny_gemma: Path) -> None:
    query, document = _towers(tiny_bert, tiny_gemma)
    before = _weights(query, document)
    result = train_joint(query, document, GROUPS, _stage_two(4), progress=False)
    after = _weights(query, document)
    assert result.steps == 4
    assert all(v > 0 for v in result.losses)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"q", "d"}
    assert not query.training  # left in eval mode


def test_same_seed_same_weights_other_seed_other_weights(tiny_bert: Path, tiny_gemma: Path) -> None:
    runs = []
    for seed in (0, 0, 1):
        query, document = _towers(tiny_bert, tiny_gemma)
        train_joint(query, document, GROUPS, _stage_two(3, seed=seed), progress=False)
        runs.append(_weights(query, document))
    _assert_same(runs[0], runs[1])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_interrupted_run_resumes_to_identical_weights(
    tiny_bert: Path, tiny_gemma: Path, tmp_path: Path
) -> None:
    config = _stage_two(6)  # checkpoints after steps 2, 4 and 6; query-side dropout is on
    query, document = _towers(tiny_bert, tiny_gemma)
    straight = train_joint(query, document, GROUPS, config, progress=False)
    expected = _weights(query, document)

    def stop_after_five(steps: int, _loss: float) -> None:
        if steps == 5:
            raise Interrupted

    query, document = _towers(tiny_bert, tiny_gemma)
    with pytest.raises(Interrupted):
        train_joint(
            query, document, GROUPS, config, checkpoint_dir=tmp_path, progress=False, on_step=stop_after_five
        )

    query, document = _towers(tiny_bert, tiny_gemma)  # a fresh process: base weights again
    resumed = train_joint(query, document, GROUPS, config, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 4  # step 5 was lost with the interruption and is redone
    assert resumed.losses == straight.losses[4:]
    _assert_same(_weights(query, document), expected)

    query, document = _towers(tiny_bert, tiny_gemma)
    done = train_joint(query, document, GROUPS, config, checkpoint_dir=tmp_path, progress=False)
    assert (done.resumed_from, done.losses) == (6, [])  # finished: nothing to run, weights restored
    _assert_same(_weights(query, document), expected)


def test_a_checkpoint_of_another_run_is_refused(tiny_bert: Path, tiny_gemma: Path, tmp_path: Path) -> None:
    query, document = _towers(tiny_bert, tiny_gemma)
    train_joint(query, document, GROUPS, _stage_two(2), checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    with pytest.raises(CheckpointMismatchError, match="other config"):
        train_joint(query, document, GROUPS, _stage_two(2, seed=5), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="other data"):
        train_joint(query, document, GROUPS[:-1], _stage_two(2), checkpoint_dir=tmp_path, progress=False)


def test_a_copy_of_the_positive_is_not_a_negative(tiny_bert: Path, tiny_gemma: Path) -> None:
    # Each group's only negative is its own positive again: it must not be counted against the query.
    same = [TrainingGroup(query=f"{s}?", positives=(f"{s}!",), negatives=(f"{s}!",)) for s in SYMPTOMS[:2]]
    query, document = _towers(tiny_bert, tiny_gemma)
    config = _stage_two(1, batch_size=2, negatives_per_group=1)
    items = batch_items(config.seed, 0, len(same), 2)
    docs = [d for i in items for d in (same[i].positives[0], same[i].negatives[0])]

    torch.manual_seed(config.seed)  # the loop seeds the query side's dropout the same way
    query.train()
    with torch.no_grad():
        vectors = query.embed([same[i].query for i in items])
        doc_vectors = document.embed(docs)
    positives = torch.tensor([0, 2])
    copies = torch.tensor([[False, True, False, False], [False, False, False, True]])
    expected = info_nce(vectors, doc_vectors, positives, config.temperature, copies)
    counted = info_nce(vectors, doc_vectors, positives, config.temperature)

    result = train_joint(query, document, same, config, progress=False)
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-5)
    assert result.losses[0] < counted.item()


def test_frozen_document_stage_two_ranks_each_query_over_the_whole_corpus(tiny_bert: Path) -> None:
    # 40 fixed document vectors, the first 8 the queries' positives; the rest are negatives that no
    # batch samples but every query must be ranked against.
    corpus = torch.nn.functional.normalize(
        torch.randn(40, 32, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    frozen = corpus.clone()
    queries = [g.query for g in GROUPS]
    query = QueryTower(tiny_bert, QuerySideConfig(pooling="mean", template="{text}"))

    def hits_at_one() -> int:
        best = (query.encode(queries) @ corpus.T).argmax(dim=1)
        return int((best == torch.arange(len(queries))).sum())

    before = hits_at_one()
    config = _retrieval(60, batch_size=4, query_lr=1e-2)
    result = train_query_retrieval(query, queries, [[i] for i in range(8)], corpus, config, progress=False)
    assert result.steps == 60
    assert before <= 2 and hits_at_one() == len(queries)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert torch.equal(corpus, frozen)  # the document side is only read


def test_frozen_document_stage_two_masks_a_querys_other_positives(tiny_bert: Path) -> None:
    # Both corpus rows are query 0's positives: whichever is the target, the other is not a negative,
    # so with two rows the loss is exactly zero.
    query = QueryTower(tiny_bert, QuerySideConfig(template="{text}"))
    corpus = torch.randn(2, query.dim)
    config = _retrieval(1, batch_size=2)
    result = train_query_retrieval(query, ["头痛", "发烧"], [[0, 1], [0, 1]], corpus, config, progress=False)
    assert result.losses == [pytest.approx(0.0, abs=1e-6)]


def test_frozen_document_stage_two_checks_its_inputs(tiny_bert: Path) -> None:
    query = QueryTower(tiny_bert, QuerySideConfig())
    corpus = torch.zeros(3, query.dim)
    config = _retrieval(1, batch_size=2)
    with pytest.raises(ValueError, match="query 1: positives"):
        train_query_retrieval(query, ["a", "b"], [[0], [3]], corpus, config)
    with pytest.raises(ValueError, match="2 queries but 1"):
        train_query_retrieval(query, ["a", "b"], [[0]], corpus, config)
    with pytest.raises(ValueError, match="set output_dim"):
        train_query_retrieval(query, ["a", "b"], [[0], [1]], torch.zeros(3, 48), config)
