"""A whole alignment run on tiny models: every phase, the committable deltas, the rebuilt pair in one
space, the exported query encoder, and a rerun that resumes instead of training again."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from evaluation.metrics import ndcg_at_k
from medsearch.cli import main
from models.align.artifacts import read_query_delta
from models.align.document_side import DocumentSideConfig
from models.align.pipeline import REPORT_FILE, AlignRecipe, AlignResult, run_alignment
from models.align.query_side import QuerySideConfig
from models.align.selection import Scorer, split_selection
from models.align.stage_configs import (
    DocumentDistillationConfig,
    JointConfig,
    QueryAlignmentConfig,
    QueryRetrievalConfig,
)
from models.data_files import DatasetError
from models.loading import load_encoder
from models.manifest import verify_manifest
from tests.align_recipes import EMBEDDINGGEMMA, GEMMA, RECIPES, shipped_stage

SYMPTOMS = ["头痛", "发烧", "咳嗽", "腹泻", "失眠", "恶心", "便秘", "贫血", "胃痛", "耳鸣", "牙痛", "过敏"]


def _dataset(root: Path) -> Path:
    root.mkdir()
    (root / "qrels").mkdir()
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for i, s in enumerate(SYMPTOMS):
            fh.write(
                json.dumps({"_id": f"d{i}", "title": "", "text": f"{s}的治疗：多休息，按医生说的服药。"})
                + "\n"
            )
    with (root / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for i, s in enumerate(SYMPTOMS):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"{s}怎么办"}) + "\n")
    rows = "".join(f"q{i}\td{i}\t1\n" for i in range(len(SYMPTOMS)))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return root


def _ndcg(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, Sequence[str]]) -> float:
    scores = [ndcg_at_k(list(ranked), {d: 1 for d in relevant[q]}, 10) for q, ranked in rankings.items()]
    return 100 * float(np.mean(scores))


def _align(
    recipe: AlignRecipe,
    models_dir: Path,
    work_dir: Path,
    deltas_dir: Path,
    scorer: Scorer = _ndcg,
    log: Callable[[str], None] = lambda _m: None,
) -> AlignResult:
    return run_alignment(
        recipe,
        models_dir=models_dir,
        work_dir=work_dir,
        deltas_dir=deltas_dir,
        scorer=scorer,
        log=log,
        progress=False,
    )


@pytest.fixture
def models_dir(tmp_path: Path, tiny_bert: Path, tiny_gemma: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_bert, root / "tiny-bert")
    shutil.copytree(tiny_gemma, root / "tiny-gemma")
    return root


def _recipe(dataset: Path) -> AlignRecipe:
    tiny = {"steps": 3, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2}
    fast = {"query_lr": 1e-3, "projection_lr": 1e-3}
    return AlignRecipe(
        name="tiny-care",
        query_model="tiny-bert",
        document_model="tiny-gemma",
        teacher_model="tiny-bert",
        dataset=dataset,
        selection_queries=4,
        query_side=QuerySideConfig(pooling="mean", template="{text}", trainable_layers=1, output_dim=16),
        document_side=DocumentSideConfig(
            mode="top_layers", trainable_layers=1, cache_lower_states=True, output_dim=16
        ),
        fit_projection_texts=8,
        distillation=shipped_stage(
            DocumentDistillationConfig, GEMMA, "distillation", document_lr=1e-3, **tiny
        ),
        stage_one=shipped_stage(QueryAlignmentConfig, GEMMA, "stage_one", **fast, **tiny),
        # CARE's joint stage II: no shipped recipe trains both sides yet.
        stage_two=JointConfig(temperature=0.02, negatives_per_group=2, document_lr=1e-3, **fast, **tiny),
        encode_batch_size=4,
    )


def test_alignment_run_builds_a_servable_pair_in_one_space(tmp_path: Path, models_dir: Path) -> None:
    recipe = _recipe(_dataset(tmp_path / "data"))
    recipe = recipe.model_copy(update={"teacher_model": None, "distillation": None})
    logs: list[str] = []
    result = _align(recipe, models_dir, tmp_path / "work", tmp_path / "deltas", log=logs.append)
    phases = [p.phase for p in result.phases]
    assert phases == ["corpus pass (base)", "stage-one", "stage-two"]
    assert any(line.startswith("align: mined ") for line in logs)
    assert all(p.selection_ndcg10 is not None for p in result.phases)
    assert [p.steps for p in result.phases[1:]] == [3, 3]

    space = result.document.space
    assert space.startswith("tiny-care@")
    for manifest in (result.query, result.query_onnx, result.query_int8):
        assert (manifest.space, manifest.dim, manifest.role) == (space, 16, "query")
    assert verify_manifest(models_dir / "tiny-care").space == space
    assert (tmp_path / "deltas" / "tiny-care.safetensors").is_file()
    assert (tmp_path / "deltas" / "tiny-care-query.safetensors").is_file()
    report = json.loads((tmp_path / "work" / REPORT_FILE).read_text(encoding="utf-8"))
    assert [p["phase"] for p in report["phases"]] == phases

    texts = ["头痛怎么办", "失眠的治疗"]
    query = load_encoder(models_dir / "tiny-care-query-onnx").encode(texts)
    documents = load_encoder(models_dir / "tiny-care", device="cpu").encode(texts)
    assert query.shape == documents.shape == (2, 16)

    # A rerun resumes every stage from its finished checkpoint: no step is trained again.
    again = _align(recipe, models_dir, tmp_path / "work", tmp_path / "deltas2", log=logs.append)
    assert again.document.space == space
    assert [p.selection_ndcg10 for p in again.phases] == [p.selection_ndcg10 for p in result.phases]
    assert any("cached lower states" in line for line in logs)


@pytest.mark.parametrize("probe_depth", [0, 5])
def test_distillation_phase_and_its_teacher(tmp_path: Path, models_dir: Path, probe_depth: int) -> None:
    # The document side (48-d) keeps the teacher's and the query side's 32 dims: no projection.
    # probe_depth > 0: the training queries, through the untrained query side, are the probes.
    recipe = _recipe(_dataset(tmp_path / "data")).model_copy(
        update={
            "distillation_probe_depth": probe_depth,
            "stage_one": None,
            "stage_two": None,
            "query_side": QuerySideConfig(pooling="mean", template="{text}", trainable_layers=1),
            "document_side": DocumentSideConfig(
                mode="top_layers", trainable_layers=1, cache_lower_states=True, output_dim=32
            ),
        }
    )
    result = _align(recipe, models_dir, tmp_path / "w1", tmp_path / "d1")
    assert [(p.phase, p.steps) for p in result.phases] == [("corpus pass (base)", 0), ("distillation", 3)]
    assert list((tmp_path / "w1").glob("teacher-tiny-bert-*.npy"))
    assert result.query.space == result.document.space
    with pytest.raises(ValueError, match="teacher"):
        _align(
            recipe.model_copy(update={"teacher_model": None}), models_dir, tmp_path / "w0", tmp_path / "d0"
        )


def test_frozen_document_stage_two_keeps_the_document_side(tmp_path: Path, models_dir: Path) -> None:
    tiny = {"steps": 3, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2, "query_lr": 1e-3}
    recipe = _recipe(_dataset(tmp_path / "data")).model_copy(
        update={
            "teacher_model": None,
            "distillation": None,
            "stage_two": shipped_stage(QueryRetrievalConfig, GEMMA, "stage_two", projection_lr=1e-3, **tiny),
        }
    )
    logs: list[str] = []
    result = _align(recipe, models_dir, tmp_path / "work", tmp_path / "deltas", log=logs.append)
    assert [(p.phase, p.steps) for p in result.phases[1:]] == [("stage-one", 3), ("stage-two", 3)]
    assert not any(line.startswith("align: mined ") for line in logs)
    assert result.query.space == result.document.space
    # Trained document weights are the base ones: only stage II's query side moved.
    texts = ["头痛怎么办"]
    base = load_encoder(models_dir / "tiny-gemma", device="cpu").encode(texts)
    trained = load_encoder(models_dir / "tiny-care", device="cpu").encode(texts)
    assert np.allclose(base[:, :16] / np.linalg.norm(base[:, :16]), trained, atol=1e-5)


def test_selection_queries_come_from_the_training_split(tmp_path: Path) -> None:
    from models.align.data import load_beir_train

    data = load_beir_train(_dataset(tmp_path / "data"))
    train, held = split_selection(data, 4, seed=0)
    assert len(held) == 4 and not set(train) & set(held)
    assert set(train) | set(held) == set(data.queries)
    assert split_selection(data, 4, seed=0) == (train, held)
    recipe = _recipe(tmp_path / "data").model_copy(update={"split": "dev"})
    with pytest.raises(DatasetError, match="held out"):
        _align(recipe, tmp_path, tmp_path / "w", tmp_path / "d")


def test_a_phase_that_scores_lower_is_not_shipped(tmp_path: Path, models_dir: Path) -> None:
    recipe = _recipe(_dataset(tmp_path / "data")).model_copy(
        update={"teacher_model": None, "distillation": None, "stage_two": None}
    )
    scores = iter([10.0, 5.0])  # base pass, then a worse stage I

    def falling(_rankings: Mapping[str, Sequence[str]], _relevant: Mapping[str, Sequence[str]]) -> float:
        return next(scores)

    logs: list[str] = []
    result = _align(
        recipe, models_dir, tmp_path / "work", tmp_path / "deltas", scorer=falling, log=logs.append
    )
    assert result.kept_phase == "corpus pass (base)"
    assert any("shipping corpus pass (base)" in line for line in logs)
    report = json.loads((tmp_path / "work" / REPORT_FILE).read_text(encoding="utf-8"))
    assert report["best_phase"] == "corpus pass (base)"
    # Stage I trained only the query side: shipping the base pass means a zero query-layer delta.
    _meta, tensors = read_query_delta(tmp_path / "deltas" / "tiny-care-query.safetensors")
    layers = {k: v for k, v in tensors.items() if not k.startswith("projection")}
    assert layers and all(float(v.abs().max()) == 0.0 for v in layers.values())


@pytest.mark.parametrize(
    ("recipe", "field", "key", "stage"),
    [
        (GEMMA, "stage_two", "kl_weight", "query_retrieval"),
        (GEMMA, "stage_one", "negatives_per_group", "query_alignment"),
        (GEMMA, "distillation", "query_lr", "document_distillation"),
        (EMBEDDINGGEMMA, "training", "document_lr", "query_distillation"),
    ],
)
def test_a_setting_on_a_stage_that_ignores_it_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    recipe: str,
    field: str,
    key: str,
    stage: str,
) -> None:
    """A shipped recipe with one misplaced key: refused in one line naming the stage and the key,
    never trained without it."""
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    raw = json.loads((RECIPES / f"{recipe}.json").read_text(encoding="utf-8"))
    raw[field][key] = 1.0
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert main(["models", "align", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"field '{field}" in err and f"stage {stage} has no setting {key!r}" in err
