"""Shared fixtures: tiny random-weight models of the real architectures, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_bert, make_tiny_decoder

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    make_tiny_bert(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bert: Path) -> Path:
    from models.export import export_query_encoder

    out = tiny_bert.parent / "tiny-bert-onnx"
    export_query_encoder(tiny_bert, out, progress=lambda _m: None)
    return out


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-gemma"
    make_tiny_decoder(path, "gemma3")
    return path


@pytest.fixture(scope="session")
def default_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default encoders built from the PyPI packages, once per test session (slow tests only)."""
    from models.registry import build

    root = tmp_path_factory.mktemp("default-models")
    for name in ("multilingual-e5-small", "multilingual-e5-small-onnx"):
        build(name, root, progress=lambda _m: None)
    return root
