"""Alignment training data: BEIR training splits, self-pair texts, hard negatives."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import index_files
from models.align.data import (
    TrainingGroup,
    beir_groups,
    load_beir_train,
    self_pair_texts,
)
from models.align.negatives import hard_negatives, rank_dense, rank_with
from models.data_files import DatasetError
from models.encoder import Encoder
from models.loading import load_encoder
from store.factory import open_store


def _write_lines(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    _write_lines(
        tmp_path / "corpus.jsonl",
        [
            {"_id": "d1", "title": "", "text": "高血压可以吃党参"},
            {"_id": "d2", "title": "头痛", "text": "多休息"},
            {"_id": "d3", "text": "糖尿病饮食"},
        ],
    )
    _write_lines(
        tmp_path / "queries.jsonl",
        [
            {"_id": "q1", "text": "高血压能吃党参吗", "metadata": {"question": "我有高血压，能吃党参吗？"}},
            {"_id": "q2", "text": "头痛怎么办", "metadata": {"question": "头痛三天了怎么办？"}},
            {"_id": "q3", "text": "dev only"},
            {"_id": "q4", "text": "unlabelled"},
        ],
    )
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td3\t0\n", encoding="utf-8"
    )
    (tmp_path / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td3\t1\n", encoding="utf-8")
    return tmp_path


def test_beir_train_split(beir: Path) -> None:
    data = load_beir_train(beir)
    assert data.queries == {"q1": "高血压能吃党参吗", "q2": "头痛怎么办"}  # dev and unlabelled left out
    assert data.positives == {"q1": ("d1",), "q2": ("d2",)}  # score 0 is not a positive
    assert data.corpus["d2"] == "头痛\n多休息"  # title joined as the indexer encodes it
    assert data.corpus["d3"] == "糖尿病饮食"
    question = load_beir_train(beir, query_field="metadata.question")
    assert question.queries["q1"] == "我有高血压，能吃党参吗？"


class _RecordingEncoder:
    """The tiny encoder, keeping every text it is asked to encode."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.texts: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.texts.extend(texts)
        return self.inner.encode(texts, batch_size=batch_size)


def test_alignment_trains_on_the_text_the_indexer_encodes(
    beir: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    """A document side trained on one layout and served another loses quality silently."""
    encoder = _RecordingEncoder(load_encoder(tiny_bert, threads=1))
    store = open_store(None, tmp_path / "qdrant")
    try:
        summary = index_files([beir / "corpus.jsonl"], encoder, store, "c", sparse=False)
    finally:
        store.close()
    assert summary.indexed == 3
    assert any("\n" in text for text in encoder.texts)  # a titled document is among them
    assert sorted(encoder.texts) == sorted(load_beir_train(beir).corpus.values())


def test_held_out_splits_are_refused(beir: Path) -> None:
    for split in ("dev", "test"):
        with pytest.raises(DatasetError, match="held out"):
            load_beir_train(beir, split)


@pytest.mark.parametrize(
    ("qrels", "error"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\n", "train.tsv:2: expected"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\tyes\n", "train.tsv:3: score 'yes'"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td9\t1\n", "train.tsv:3: corpus id 'd9'"),
        ("query-id\tcorpus-id\tscore\nq9\td1\t1\n", "train.tsv:2: query id 'q9'"),
    ],
)
def test_bad_qrels_name_the_line(beir: Path, qrels: str, error: str) -> None:
    (beir / "qrels" / "train.tsv").write_text(qrels, encoding="utf-8")
    with pytest.raises(DatasetError, match=error):
        load_beir_train(beir)


def test_bad_corpus_and_query_lines_name_the_line(beir: Path) -> None:
    corpus = (beir / "corpus.jsonl").read_text(encoding="utf-8")
    (beir / "corpus.jsonl").write_text(corpus + '{"_id": "d4", "text": ""}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"corpus.jsonl:4: field 'text'"):
        load_beir_train(beir)
    (beir / "corpus.jsonl").write_text(corpus + "{oops\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"corpus.jsonl:4: invalid JSON"):
        load_beir_train(beir)
    (beir / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    _write_lines(beir / "queries.jsonl", [{"_id": "q3", "text": "x"}, {"_id": "q1", "text": "高血压"}])
    with pytest.raises(DatasetError, match=r"queries.jsonl:2: field 'metadata.question'"):
        load_beir_train(beir, query_field="metadata.question")


def test_beir_groups_use_texts_and_never_a_positive_as_negative(beir: Path) -> None:
    data = load_beir_train(beir)
    groups = beir_groups(data, {"q1": ["d1", "d2", "d3"]}, prompt="find answers")
    assert groups[0] == TrainingGroup(
        query="高血压能吃党参吗",
        positives=("高血压可以吃党参",),
        negatives=("头痛\n多休息", "糖尿病饮食"),
        prompt="find answers",
    )
    assert groups[1].negatives == ()  # no mined negatives: in-batch ones only


def test_self_pair_texts_dedupe_in_order() -> None:
    assert self_pair_texts(["a", "b", " "], ["b", "c", "a"]) == ["a", "b", "c"]


def test_hard_negatives_skip_positives_then_take_count() -> None:
    rankings = {"q1": ["p", "a", "b", "a", "c", "d"], "q2": ["x"]}
    mined = hard_negatives(rankings, {"q1": {"p"}}, count=2)
    assert mined == {"q1": ["a", "b"], "q2": ["x"]}
    assert hard_negatives(rankings, {"q1": {"p"}}, count=2, skip=1)["q1"] == ["b", "c"]
    with pytest.raises(ValueError):
        hard_negatives(rankings, {}, count=-1)


def test_rankings_from_a_ranker_and_from_vectors() -> None:
    seen: list[tuple[str, int]] = []

    def ranker(text: str, depth: int) -> list[str]:
        seen.append((text, depth))
        return ["d2", "d1"]

    assert rank_with(ranker, {"q1": "高血压"}, depth=5) == {"q1": ["d2", "d1"]}
    assert seen == [("高血压", 5)]

    docs = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    queries = np.array([[0.0, 1.0], [1.0, 0.1]])
    assert rank_dense(["q1", "q2"], queries, ["a", "b", "c"], docs, depth=2) == {
        "q1": ["c", "b"],
        "q2": ["a", "b"],
    }
