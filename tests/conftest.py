"""Shared fixtures: tiny random-weight models of the real architectures, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.manifest import write_manifest
from tests.tiny_models import make_tiny_bert, make_tiny_decoder, make_tiny_st_embedder

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
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A document encoder with a query prompt of its own, as an LLM embedder (EmbeddingGemma) has;
    a tiny BERT underneath, in a space of its own. The query prompt is longer than the document one."""
    path = tmp_path_factory.mktemp("models") / "tiny-embedder"
    manifest = make_tiny_bert(path, space="tiny-embedder-space", seed=1)
    write_manifest(
        path,
        manifest.model_copy(
            update={
                "prompt": "title: none | text: {text}",
                "query_prompt": "task: search result | query: {text}",
                "source": "tests.conftest.tiny_embedder",
            }
        ),
    )
    return path


@pytest.fixture(scope="session")
def tiny_st_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EmbeddingGemma-shaped sentence-transformers embedder (Gemma3, Dense layers, query prompt),
    built as ``medsearch models build`` builds the real one."""
    from models.bootstrap.embeddinggemma import sentence_transformers_manifest

    path = tmp_path_factory.mktemp("models") / "tiny-st-embedder"
    make_tiny_st_embedder(path)
    manifest = sentence_transformers_manifest(
        path, name="tiny-st-embedder", source="tests.conftest", license="test"
    )
    write_manifest(path, manifest)
    return path


@pytest.fixture(scope="session")
def default_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default encoders built from the PyPI packages, once per test session (slow tests only)."""
    from models.registry import build

    root = tmp_path_factory.mktemp("default-models")
    # The served default pair (issue 25): EmbeddingGemma documents, its distilled K=4 int8 query tower
    # (rebuilt from the committed delta and int8 plan), and the e5-small pair it replaced.
    for name in (
        "embeddinggemma-300m",
        "embeddinggemma-300m-k4-query-onnx-int8",
        "multilingual-e5-small",
        "multilingual-e5-small-onnx",
    ):
        build(name, root, progress=lambda _m: None)
    return root
