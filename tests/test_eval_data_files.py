"""One reader for every dataset file: each reader of BEIR and JSONL data (evaluation queries, training
corpus and queries, STS pairs, qrels) refuses a malformed line with the same error naming file and line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from evaluation.beir import load_split
from evaluation.sts import load_sts
from indexer.reader import Rejected, read_documents
from models.align.data import load_beir_train
from models.data_files import DatasetError

GOOD_LINE = b'{"_id": "q1", "text": "t", "sentence1": "a", "sentence2": "b", "score": 1}\n'
BAD_LINES = {
    "invalid JSON": b"{oops\n",
    "expected a JSON object, got list": b"[1, 2]\n",
    "not valid UTF-8 at byte 9": b'{"_id": "\xff"}\n',
}


def _beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8"
        )
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "doc"}\n', encoding="utf-8")
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "query"}\n', encoding="utf-8")
    return root


# Each reader, and the file of its input that gets the bad second line.
READERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "evaluation queries": ("queries.jsonl", lambda root: load_split(root, "dev")),
    "training queries": ("queries.jsonl", lambda root: load_beir_train(root)),
    "training corpus": ("corpus.jsonl", lambda root: load_beir_train(root)),
    "sts pairs": ("sts.jsonl", lambda root: load_sts(root / "sts.jsonl")),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("reason", BAD_LINES)
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path: Path, reader: str, reason: str) -> None:
    root = _beir(tmp_path)
    name, read = READERS[reader]
    path = root / name
    first = path.read_bytes() if path.exists() else GOOD_LINE
    path.write_bytes(first + b"\n" + BAD_LINES[reason])  # a blank line still counts
    with pytest.raises(DatasetError) as caught:
        read(root)
    assert str(caught.value).startswith(f"{path}:3: {reason}")


@pytest.mark.parametrize(
    ("qrels", "error"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\n", "dev.tsv:2: expected 'query-id<TAB>corpus-id<TAB>score'"),
        ("q1\td1\t1\nq1\td1\tyes\n", "dev.tsv:2: score 'yes' is not an integer"),
    ],
)
def test_bad_qrels_rows_name_file_and_line(tmp_path: Path, qrels: str, error: str) -> None:
    root = _beir(tmp_path)
    (root / "qrels" / "dev.tsv").write_text(qrels, encoding="utf-8")
    with pytest.raises(DatasetError, match=error):
        load_split(root, "dev")


@pytest.mark.parametrize("reason", BAD_LINES)
def test_the_indexer_sets_the_same_lines_aside_in_the_same_words(tmp_path: Path, reason: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(json.dumps({"_id": "d1", "text": "doc"}).encode() + b"\n" + BAD_LINES[reason])
    items = list(read_documents(path))
    assert isinstance(items[1], Rejected)
    assert str(items[1]).startswith(f"{path}:2: {reason}")
