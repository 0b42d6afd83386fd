from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsearch.cli import main


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    return tmp_path


def test_index_reports_bad_lines_by_file_and_line_and_exits_1(
    home: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = home / "corpus.jsonl"
    good = json.dumps({"id": "a", "text": "高血压病人可以口服党参"}, ensure_ascii=False)
    corpus.write_text(f"{good}\n{{broken\n", encoding="utf-8")
    rejects = home / "rejects.jsonl"
    code = main(["index", str(corpus), "--model", str(tiny_bert), "--rejects", str(rejects)])
    captured = capsys.readouterr()
    assert code == 1
    assert f"{corpus}:2: invalid JSON" in captured.err
    assert "indexed 1, skipped 0 (unchanged), rejected 1" in captured.out
    assert json.loads(rejects.read_text(encoding="utf-8"))["source"] == f"{corpus}:2"
    # The good line was kept: a clean rerun of it finds it unchanged.
    corpus.write_text(f"{good}\n", encoding="utf-8")
    assert main(["index", str(corpus), "--model", str(tiny_bert)]) == 0
    assert "indexed 0, skipped 1" in capsys.readouterr().out


def test_index_names_a_missing_input_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(home / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_index_without_built_models_says_how_to_build_them(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = home / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n', encoding="utf-8")
    assert main(["index", str(corpus)]) == 2
    assert "medsearch models build" in capsys.readouterr().err


def test_models_build_refuses_unknown_names(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "build", "no-such-model"]) == 2
    assert "no recipe for no-such-model" in capsys.readouterr().err


def test_models_list_shows_role_and_space(
    home: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(tiny_bert.parent))
    assert main(["models", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny-bert "))
    assert "document" in line and "tiny-bert-space" in line
