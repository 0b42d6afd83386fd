"""Alignment into a frozen embedder's space: query distillation, pseudo-queries, the whole run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.align.frozen import (
    REPORT_FILE,
    FrozenAlignRecipe,
    FrozenAlignResult,
    QualityGateError,
    run_frozen_alignment,
)
from models.align.pseudo import PseudoQueries, corpus_sentences, pseudo_queries, question_bodies
from models.align.query_side import QuerySideConfig, QueryTower
from models.align.stage_configs import QueryDistillationConfig
from models.align.train import TeacherSignal, train_query_distillation
from models.loading import load_encoder
from models.manifest import verify_manifest
from tests.align_recipes import EMBEDDINGGEMMA, shipped_stage

SYMPTOMS = ["头痛", "发烧", "咳嗽", "腹泻", "失眠", "恶心", "便秘", "贫血"]


def _config(steps: int, **overrides: object) -> QueryDistillationConfig:
    tiny: dict[str, object] = {
        "steps": steps,
        "batch_size": 4,
        "warmup_steps": 0,
        "pseudo_per_step": 0,
        "duplicate_cosine": None,
        # The tiny random encoder's vectors are close together: softer scores than the shipped 0.02.
        "temperature": 0.05,
        "kl_temperature": 0.05,
        "query_lr": 1e-2,
        "projection_lr": 1e-2,
        **overrides,
    }
    return shipped_stage(QueryDistillationConfig, EMBEDDINGGEMMA, "training", **tiny)


def _no_pseudo(queries: int, dim: int) -> TeacherSignal:
    return TeacherSignal(torch.zeros(queries, dim), [], torch.zeros(0, dim))


def _pseudo_hits_before_and_after(tiny_bert: Path, kl_weight: float) -> tuple[int, int]:
    """8 labelled queries and 8 unlabelled pseudo-queries over 24 fixed documents; the teacher puts
    pseudo-query i nearest document 8 + i. No label says so: only the KL term can teach it. Returns
    how many pseudo-queries rank their teacher's document first, before and after 80 steps."""
    corpus = torch.nn.functional.normalize(
        torch.randn(24, 32, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    frozen = corpus.clone()
    queries = [f"{s}怎么办" for s in SYMPTOMS]
    pseudo = [f"{s}的原因是什么" for s in SYMPTOMS]
    query = QueryTower(tiny_bert, QuerySideConfig(pooling="mean", template="{text}"))
    teacher = TeacherSignal(corpus[:8].clone(), pseudo, corpus[8:16].clone())

    def pseudo_hits() -> int:
        best = (query.encode(pseudo) @ corpus.T).argmax(dim=1)
        return int((best == torch.arange(8, 16)).sum())

    before = pseudo_hits()
    config = _config(80, pseudo_per_step=4, kl_weight=kl_weight)
    result = train_query_distillation(
        query, queries, [[i] for i in range(8)], corpus, teacher, config, progress=False
    )
    assert result.steps == 80
    assert torch.equal(corpus, frozen)  # the document side is only read
    return before, pseudo_hits()


def test_pseudo_queries_learn_the_teachers_ranking(tiny_bert: Path) -> None:
    before, after = _pseudo_hits_before_and_after(tiny_bert, kl_weight=1.0)
    assert before <= 2 and after >= 7


def test_without_the_kl_term_pseudo_queries_learn_nothing_specific(tiny_bert: Path) -> None:
    _before, after = _pseudo_hits_before_and_after(tiny_bert, kl_weight=0.0)
    assert after <= 2


def test_near_duplicates_of_the_positive_are_not_negatives(tiny_bert: Path) -> None:
    # Two identical documents, one labelled: masked as a near-duplicate, the other is no negative
    # and the InfoNCE loss is zero; unmasked it is log 2.
    query = QueryTower(tiny_bert, QuerySideConfig(template="{text}"))
    row = torch.nn.functional.normalize(torch.randn(1, query.dim), dim=-1)
    corpus = torch.cat([row, row])
    args = (query, ["头痛", "发烧"], [[0], [0]], corpus, _no_pseudo(2, query.dim))
    masked = train_query_distillation(
        *args, _config(1, batch_size=2, kl_weight=0.0, duplicate_cosine=0.99), progress=False
    )
    assert masked.losses == [pytest.approx(0.0, abs=1e-6)]
    plain = train_query_distillation(*args, _config(1, batch_size=2, kl_weight=0.0), progress=False)
    assert plain.losses == [pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)]


def test_query_distillation_checks_its_inputs(tiny_bert: Path) -> None:
    query = QueryTower(tiny_bert, QuerySideConfig())
    corpus = torch.zeros(3, query.dim)
    teacher = TeacherSignal(torch.zeros(2, query.dim), ["x"], torch.zeros(1, query.dim))
    with pytest.raises(ValueError, match="query 1: positives"):
        train_query_distillation(query, ["a", "b"], [[0], [3]], corpus, teacher, _config(1, batch_size=2))
    with pytest.raises(ValueError, match="one row per query"):
        train_query_distillation(query, ["a", "b"], [[0]], corpus, teacher, _config(1, batch_size=2))
    with pytest.raises(ValueError, match="cannot fill 4"):
        train_query_distillation(
            query, ["a", "b"], [[0], [1]], corpus, teacher, _config(1, batch_size=2, pseudo_per_step=4)
        )
    with pytest.raises(ValueError, match="pseudo-queries but"):
        TeacherSignal(torch.zeros(2, 4), ["x", "y"], torch.zeros(1, 4))


def test_corpus_sentences_are_cut_at_chinese_punctuation_and_sampled_by_seed() -> None:
    documents = [
        "高血压要低盐饮食。每天监测血压！可以服用降压药吗？可以。",
        "糖尿病患者要控制饮食；多运动\n短",
    ]
    sentences = corpus_sentences(documents, 10, min_chars=4, max_chars=12, seed=0)
    assert set(sentences) == {
        "高血压要低盐饮食。",
        "每天监测血压！",
        "可以服用降压药吗？",
        "糖尿病患者要控制饮食；",
        "多运动",
    } - {"多运动"}
    assert corpus_sentences(documents, 2, 4, 12, seed=0) == corpus_sentences(documents, 2, 4, 12, seed=0)
    assert len(corpus_sentences(documents, 2, 4, 12, seed=0)) == 2


def test_question_bodies_come_only_from_the_given_training_ids(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    rows = [
        {"_id": "q1", "text": "头痛", "metadata": {"question": "我最近经常头痛，晚上睡不好，怎么办？"}},
        {"_id": "q2", "text": "发烧", "metadata": {"question": "孩子发烧三天了"}},
        {"_id": "q3", "text": "咳嗽"},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert question_bodies(path, {"q1", "q3"}, "question", max_chars=6) == ["我最近经常头"]
    config = PseudoQueries(question_max_chars=100, corpus_sentences=5, min_chars=2, max_chars=20)
    texts = pseudo_queries(config, path, {"q2"}, ["多喝水。注意休息。"])
    assert texts[0] == "孩子发烧三天了" and set(texts[1:]) == {"多喝水。", "注意休息。"}


# --- the whole run ------------------------------------------------------------------------------

SICK = ["头痛", "发烧", "咳嗽", "腹泻", "失眠", "恶心", "便秘", "贫血", "胃痛", "耳鸣", "牙痛", "过敏"]


def _dataset(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for i, s in enumerate(SICK):
            doc = {"_id": f"d{i}", "title": "", "text": f"{s}的治疗：多休息。按医生说的服药！"}
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for i, s in enumerate(SICK):
            row = {
                "_id": f"q{i}",
                "text": f"{s}怎么办",
                "metadata": {"question": f"我最近{s}，很难受，怎么办？"},
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    rows = "".join(f"q{i}\td{i}\t1\n" for i in range(len(SICK)))
    for split in ("train", "dev"):
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return root


def _ndcg(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, Sequence[str]]) -> float:
    return (
        100 * sum(1.0 for q, ranked in rankings.items() if ranked[0] in relevant[q]) / max(1, len(rankings))
    )


def _direct(model_dir: Path, _ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    return load_encoder(model_dir, device="cpu").encode(list(texts))


def _align(
    recipe: FrozenAlignRecipe, models: Path, tmp_path: Path, work: str = "work", **extra: Any
) -> FrozenAlignResult:
    """run_frozen_alignment on the tiny fixtures: their models, the one-hit scorer, direct corpus
    vectors, no progress bars; ``extra`` adds or overrides arguments (gate, log)."""
    options: dict[str, Any] = {
        "models_dir": models,
        "work_dir": tmp_path / work,
        "deltas_dir": tmp_path / "deltas",
        "scorer": _ndcg,
        "corpus_vectors": _direct,
        "progress": False,
    }
    return run_frozen_alignment(recipe, **(options | extra))


@pytest.fixture
def frozen_setup(tmp_path: Path, tiny_bert: Path, tiny_st_embedder: Path) -> tuple[Path, FrozenAlignRecipe]:
    models = tmp_path / "models"
    shutil.copytree(tiny_bert, models / "tiny-bert")
    shutil.copytree(tiny_st_embedder, models / "tiny-st-embedder")
    recipe = FrozenAlignRecipe(
        name="tiny-frozen",
        query_model="tiny-bert",
        document_model="tiny-st-embedder",
        dataset=_dataset(tmp_path / "data"),
        selection_queries=4,
        query_side=QuerySideConfig(pooling="mean", template="query: {text}"),
        pseudo_queries=PseudoQueries(corpus_sentences=10, min_chars=2, max_chars=20),
        training=_config(4, batch_size=4, pseudo_per_step=2, checkpoint_every=2),
        select_every=2,
        encode_batch_size=4,
    )
    return models, recipe


def test_frozen_run_publishes_a_query_encoder_in_the_embedders_space(
    tmp_path: Path, frozen_setup: tuple[Path, FrozenAlignRecipe]
) -> None:
    models, recipe = frozen_setup
    messages: list[str] = []
    result = _align(recipe, models, tmp_path, gate=lambda _fp32, _int8: (50.0, 49.8), log=messages.append)
    document = verify_manifest(models / "tiny-st-embedder")
    assert result.query_int8.name == "tiny-frozen-query-onnx-int8"
    for name in ("tiny-frozen-query", "tiny-frozen-query-onnx", "tiny-frozen-query-onnx-int8"):
        manifest = verify_manifest(models / name)
        assert (manifest.role, manifest.space, manifest.dim) == ("query", document.space, document.dim)
    report = json.loads((tmp_path / "work" / REPORT_FILE).read_text())
    assert set(report["selection_ndcg10"]["training"]) == {"0", "2", "4"}
    assert report["unlabelled_texts"] > 8  # 8 training question bodies + corpus sentences
    assert report["gate"] == {"fp32_ndcg10": 50.0, "int8_ndcg10": 49.8, "max_drop": 0.5}
    assert (tmp_path / "deltas" / "tiny-frozen-query.safetensors").is_file()
    # Selection queries are held out: their question bodies never become pseudo-queries.
    assert any("teacher vectors for 8 queries" in m for m in messages)
    # The served pair: the ONNX query encoder's vectors rank against the embedder's documents.
    vectors = load_encoder(models / "tiny-frozen-query-onnx").encode(["头痛怎么办"])
    assert vectors.shape == (1, document.dim)


def test_a_rerun_resumes_from_the_caches_and_checkpoint(
    tmp_path: Path, frozen_setup: tuple[Path, FrozenAlignRecipe]
) -> None:
    models, recipe = frozen_setup
    first = _align(recipe, models, tmp_path)
    messages: list[str] = []
    second = _align(recipe, models, tmp_path, log=messages.append)
    assert not any("encoding" in m for m in messages)  # teacher vectors read back, not recomputed
    assert first.query.fingerprint == second.query.fingerprint
    # The resumed run's report still holds the curve the first run scored.
    assert second.report["selection_ndcg10"] == first.report["selection_ndcg10"]


def test_a_run_can_start_from_an_earlier_runs_best_weights(
    tmp_path: Path, frozen_setup: tuple[Path, FrozenAlignRecipe]
) -> None:
    """Another pass over the texts starts where the earlier run's best step left the tower."""
    models, recipe = frozen_setup
    first = _align(recipe, models, tmp_path, "first")
    best = tmp_path / "first" / "training" / "best.pt"
    again = recipe.model_copy(update={"name": "tiny-again", "start_from": best})
    messages: list[str] = []
    second = _align(again, models, tmp_path, "second", log=messages.append)
    first_scores = first.report["selection_ndcg10"]["training"]  # type: ignore[index]
    assert second.report["selection_ndcg10"]["training"]["0"] == max(first_scores.values())  # type: ignore[index]
    assert any(m.startswith(f"align: starting from {best}") for m in messages)
    assert not any("projection fitted" in m for m in messages)  # the loaded projection is kept
    with pytest.raises(FileNotFoundError, match="start_from: no such file"):
        _align(recipe.model_copy(update={"start_from": tmp_path / "missing.pt"}), models, tmp_path, "third")


def test_an_int8_encoder_that_loses_too_much_is_not_published(
    tmp_path: Path, frozen_setup: tuple[Path, FrozenAlignRecipe]
) -> None:
    models, recipe = frozen_setup
    with pytest.raises(QualityGateError, match=r"int8 48.0 vs fp32 50.0"):
        _align(recipe, models, tmp_path, gate=lambda _fp32, _int8: (50.0, 48.0))
    assert not (models / "tiny-frozen-query-onnx-int8").exists()
    assert verify_manifest(models / "tiny-frozen-query-onnx").role == "query"


def test_a_document_model_without_a_query_prompt_cannot_teach(
    tmp_path: Path, frozen_setup: tuple[Path, FrozenAlignRecipe], tiny_gemma: Path
) -> None:
    models, recipe = frozen_setup
    shutil.copytree(tiny_gemma, models / "tiny-gemma")
    with pytest.raises(ValueError, match="no query prompt"):
        _align(recipe.model_copy(update={"document_model": "tiny-gemma"}), models, tmp_path)


def test_a_teacher_layers_student_trains_on_a_text_set_in_two_stages(
    tmp_path: Path, frozen_setup: tuple[Path, FrozenAlignRecipe]
) -> None:
    """The issue-25 recipe shape on tiny models: a text set (corpus sources only, no downloads), a
    pointwise stage I and the labelled stage II, each selected, then the published int8 student."""
    from models.align.stage_configs import QueryPointwiseConfig
    from models.align.teacher_layers import TeacherLayersConfig
    from models.align.text_set import TextSetConfig

    models, base = frozen_setup
    recipe = FrozenAlignRecipe.model_validate(
        {
            **base.model_dump(exclude={"query_model", "query_side", "pseudo_queries"}),
            "query_model": None,
            "pseudo_queries": None,
            "teacher_layers": TeacherLayersConfig(layers=1, max_tokens=48),
            "text_set": TextSetConfig(
                templates_per_term=0, jieba_words=0, sentence_min_chars=2, window_chars=6, window_stride=3
            ),
            "stage_one": QueryPointwiseConfig(steps=6, batch_size=4, query_lr=1e-3, checkpoint_every=3),
            "stage_one_select_every": 3,
        }
    )
    messages: list[str] = []
    result = _align(recipe, models, tmp_path, log=messages.append)
    document = verify_manifest(models / "tiny-st-embedder")
    assert (result.query_int8.space, result.query_int8.dim) == (document.space, document.dim)
    report = json.loads((tmp_path / "work" / REPORT_FILE).read_text())
    assert set(report["selection_ndcg10"]) == {"stage_one", "training"}
    assert set(report["selection_ndcg10"]["stage_one"]) == {"0", "3", "6"}
    texts = [json.loads(line) for line in (tmp_path / "work" / "text-set" / "texts.jsonl").open()]
    # Every query of this fixture is also a dev query: none of their titles or bodies may appear.
    assert {row["source"] for row in texts} == {"corpus_sentence", "corpus_window"}
    assert not {row["text"] for row in texts} & {f"{s}怎么办" for s in SICK}
    vectors = load_encoder(models / f"{recipe.name}-query-onnx-int8").encode(["头痛怎么办"])
    assert vectors.shape == (1, document.dim)
