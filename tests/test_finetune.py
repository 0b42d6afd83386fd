"""`medsearch models finetune-e5` on the tiny random BERT and a tiny BEIR dataset: the weights move
(the embeddings do not), the built pair is verifiable and classified symmetric-bert in its own space,
a rerun builds the same weights, and bad input fails with a message that names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from evaluation.configs import discover, scan_models
from medsearch.align_cli import ndcg10
from medsearch.cli import main
from models.data_files import DatasetError
from models.finetune import REPORT_SUFFIX, FinetuneConfig, FinetuneError, FinetuneResult, finetune
from models.loading import load_encoder
from models.manifest import read_manifest, verify_manifest
from models.training_loop import lr_factor

SYMPTOMS = ["头痛", "发烧", "咳嗽", "腹泻", "失眠", "恶心", "便秘", "贫血", "胃痛", "耳鸣", "牙痛", "过敏"]


def write_dataset(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for i, s in enumerate(SYMPTOMS):
            doc = {"_id": f"d{i}", "title": "", "text": f"{s}的治疗：多休息，按医生说的服药。"}
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for i, s in enumerate(SYMPTOMS):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"{s}怎么办"}, ensure_ascii=False) + "\n")
    # q0 has two positives, d1 is the positive of two queries: both must be masked, never negatives.
    rows = "".join(f"q{i}\td{i}\t1\n" for i in range(len(SYMPTOMS))) + "q0\td1\t1\n"
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


def models_with_base(root: Path, tiny_bert: Path) -> Path:
    shutil.copytree(tiny_bert, root / "tiny-bert")
    return root


def config(dataset: Path, **overrides: object) -> FinetuneConfig:
    fields: dict[str, object] = {
        "name": "tiny-bert-ft",
        "base_model": "tiny-bert",
        "dataset": dataset,
        "selection_queries": 4,
        "steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
        "lr": 1e-3,
        "query_max_tokens": 32,
        "document_max_tokens": 32,
        "encode_batch_size": 4,
        **overrides,
    }
    return FinetuneConfig.model_validate(fields)


def run(cfg: FinetuneConfig, models_dir: Path, logs: list[str] | None = None) -> FinetuneResult:
    sink = logs.append if logs is not None else (lambda _m: None)
    return finetune(cfg, models_dir=models_dir, scorer=ndcg10, log=sink, progress=False)


def test_finetune_builds_a_symmetric_pair_in_a_new_space(
    tmp_path: Path, dataset: Path, tiny_bert: Path
) -> None:
    models = models_with_base(tmp_path / "models", tiny_bert)
    logs: list[str] = []
    result = run(config(dataset), models, logs)

    assert [p.phase for p in result.phases] == [
        "data and base model",
        "base",
        "training",
        "fine-tuned",
        "build",
        "onnx export",
    ]
    assert result.phases[1].selection_ndcg10 is not None and result.phases[3].selection_ndcg10 is not None
    assert result.phases[2].steps == 3 == len(result.losses)
    assert all(np.isfinite(result.losses))
    assert "finetune: 8 training queries, 4 held out for selection, 12 documents" in logs

    base = read_manifest(models / "tiny-bert")
    built = verify_manifest(models / "tiny-bert-ft")  # every file matches its sha256
    assert built == result.document
    assert (built.name, built.space, built.role, built.format) == (
        "tiny-bert-ft",
        "tiny-bert-ft",
        "document",
        "hf",
    )
    assert (built.prompt, built.pooling, built.max_tokens, built.dim) == (
        base.prompt,
        base.pooling,
        base.max_tokens,
        base.dim,
    )
    assert built.derived_from == base.fingerprint != built.fingerprint
    assert "fine-tuned" in built.source and "train qrels" in built.source and "seed 0" in built.source

    # The encoder layers moved; the (frozen) embeddings did not.
    before = load_file(str(models / "tiny-bert" / "model.safetensors"))
    after = load_file(str(models / "tiny-bert-ft" / "model.safetensors"))
    assert after.keys() <= before.keys()  # the unused pooler head, if any, is not built
    changed = {k for k in after if not np.array_equal(before[k], after[k])}
    assert changed and not any(k.startswith("embeddings.") for k in changed)
    assert any(".layer.0." in k for k in changed)

    onnx = verify_manifest(models / "tiny-bert-ft-onnx")
    assert onnx == result.query_onnx
    assert (onnx.role, onnx.space, onnx.prompt) == ("query", "tiny-bert-ft", "query: {text}")
    assert onnx.derived_from == built.fingerprint
    # The evaluation pairs the export with its document encoder as symmetric-bert.
    kinds = {c.name: c.kind for c in discover(scan_models(models)[0], lexical=False)}
    assert kinds["symmetric-bert:tiny-bert-ft-onnx/tiny-bert-ft"] == "symmetric-bert"
    assert not any(name.startswith(".") for name in (p.name for p in models.iterdir()))  # no staging left

    # The built pair encodes like the trained weights: query export vs transformers runtime.
    text = ["头痛怎么办"]
    hf = load_encoder(models / "tiny-bert-ft", device="cpu")
    assert hf.encode(text).shape == (1, built.dim)
    assert load_encoder(models / "tiny-bert-ft-onnx").encode(text).shape == (1, built.dim)

    report = json.loads((models / f"tiny-bert-ft{REPORT_SUFFIX}").read_text(encoding="utf-8"))
    assert report["document_encoder"]["fingerprint"] == built.fingerprint
    assert report["query_encoder"]["derived_from"] == built.fingerprint
    assert report["config"]["temperature"] == 0.02 and report["config"]["split"] == "train"
    assert report["dataset"]["training_queries"] == 8 and report["dataset"]["selection_queries"] == 4
    assert report["selection_ndcg10"]["base"] == result.phases[1].selection_ndcg10
    assert report["losses"] == result.losses


def test_rerun_is_deterministic_and_the_cli_prints_each_phase(
    tmp_path: Path,
    dataset: Path,
    tiny_bert: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first_models = models_with_base(tmp_path / "first", tiny_bert)
    cfg = config(dataset, lr=5e-5, steps=2)
    first = run(cfg, first_models)

    models = models_with_base(tmp_path / "second", tiny_bert)
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(models))
    argv = ["models", "finetune-e5", str(dataset), "--base", "tiny-bert", "--name", "tiny-bert-ft"]
    argv += ["--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--selection-queries", "4"]
    argv += ["--query-max-tokens", "32", "--document-max-tokens", "32", "--encode-batch-size", "4"]
    for _ in range(2):  # the second run replaces the first build with the same weights
        assert main(argv) == 0
        again = verify_manifest(models / "tiny-bert-ft")
        assert again.fingerprint == first.document.fingerprint
    out = capsys.readouterr().out
    for phase in ("base", "training", "fine-tuned", "build", "onnx export"):
        assert any(line.startswith(phase) for line in out.splitlines())
    assert "document encoder tiny-bert-ft (space tiny-bert-ft)" in out
    report = json.loads((models / f"tiny-bert-ft{REPORT_SUFFIX}").read_text(encoding="utf-8"))
    assert report["losses"] == first.losses


def test_bad_input_fails_with_a_clear_message(
    tmp_path: Path,
    dataset: Path,
    tiny_bert: Path,
    tiny_gemma: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = models_with_base(tmp_path / "models", tiny_bert)
    with pytest.raises(FinetuneError, match=r"dataset directory .* not found"):
        run(config(tmp_path / "missing"), models)
    with pytest.raises(DatasetError, match="held out for evaluation"):
        run(config(dataset, split="dev"), models)
    with pytest.raises(FinetuneError, match="cannot fill one batch of 16"):
        run(config(dataset, batch_size=16), models)
    shutil.copytree(tiny_gemma, models / "tiny-gemma")
    with pytest.raises(FinetuneError, match="BERT-family"):
        run(config(dataset, base_model="tiny-gemma"), models)
    with pytest.raises(ValueError, match="warmup_steps 5 exceeds steps 3"):
        config(dataset, warmup_steps=5)
    assert not (models / "tiny-bert-ft").exists()

    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(models))
    cases = [
        ([str(tmp_path / "missing")], "not found"),
        ([str(dataset), "--split", "dev"], "held out for evaluation"),
        (
            [str(dataset), "--base", "nope", "--selection-queries", "4", "--batch-size", "4"],
            "build the base with: medsearch models build nope",
        ),
        ([str(dataset), "--steps", "0"], "steps: Input should be greater than 0"),
    ]
    for extra, message in cases:
        assert main(["models", "finetune-e5", *extra]) == 2
        assert message in capsys.readouterr().err
    (models / "tiny-bert-ft").mkdir()
    (models / "tiny-bert-ft" / "precious.txt").write_text("x", encoding="utf-8")
    argv = ["models", "finetune-e5", str(dataset), "--base", "tiny-bert", "--name", "tiny-bert-ft"]
    assert main([*argv, "--selection-queries", "4", "--batch-size", "4"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "refusing to replace" in line and "not a model directory" in line and "build the base" not in line
    assert (models / "tiny-bert-ft" / "precious.txt").read_text(encoding="utf-8") == "x"


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    assert [lr_factor(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(s, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
