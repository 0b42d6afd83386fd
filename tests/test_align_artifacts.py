"""What a run leaves behind: small fp16 deltas, a document encoder rebuilt from base + delta, and a query
encoder directory, both manifests naming the same new space."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models.align.artifacts import (
    DeltaMismatchError,
    build_document_encoder,
    build_query_encoder,
    read_document_delta,
    read_query_delta,
    save_document_delta,
    save_query_delta,
    save_query_encoder,
)
from models.align.document_side import DocumentSideConfig, DocumentTower
from models.align.query_side import QuerySideConfig, QueryTower
from models.export import export_query_encoder
from models.loading import load_encoder
from models.manifest import read_manifest, verify_manifest, write_manifest
from models.projection import PROJECTION_FILE
from tests.tiny_models import make_tiny_decoder

TEXTS = ["高血压能吃党参吗", "头痛发烧怎么办", "糖尿病人饮食注意什么，水果能吃吗？" * 3, "x"]


def _quiet(_message: str) -> None:
    pass


def _trained(model_dir: Path, config: DocumentSideConfig) -> DocumentTower:
    """A tower whose trainable tensors moved away from the base, as training would move them."""
    tower = DocumentTower(model_dir, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tower.trainable_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return tower


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-qwen"
    make_tiny_decoder(path, "qwen3")  # hidden 32, like tiny_bert: no projection needed
    return path


@pytest.mark.parametrize(
    "config",
    [
        DocumentSideConfig(mode="top_layers", trainable_layers=1),
        DocumentSideConfig(mode="lora", lora_rank=4, lora_alpha=8),
    ],
    ids=["top_layers", "lora"],
)
def test_base_plus_delta_rebuilds_the_trained_document_encoder(
    tiny_gemma: Path, tmp_path: Path, config: DocumentSideConfig
) -> None:
    tower = _trained(tiny_gemma, config)
    delta = save_document_delta(tower, tmp_path / "delta.safetensors", name="tiny-gemma-care")
    assert delta.space.startswith("tiny-gemma-care@")

    meta, tensors = read_document_delta(tmp_path / "delta.safetensors")
    assert meta == delta
    assert set(tensors) == set(tower.trainable_parameters())  # trainable tensors only
    assert {t.dtype for t in tensors.values()} == {torch.float16}

    out = tmp_path / "tiny-gemma-care"
    manifest = build_document_encoder(tiny_gemma, tmp_path / "delta.safetensors", out, progress=_quiet)
    assert verify_manifest(out) == manifest
    base = verify_manifest(tiny_gemma)
    assert (manifest.name, manifest.space, manifest.role) == ("tiny-gemma-care", delta.space, "document")
    assert manifest.derived_from == base.fingerprint
    assert (manifest.pooling, manifest.prompt, manifest.dim) == (base.pooling, base.prompt, base.dim)
    assert "tokenizer.json" in manifest.files

    rebuilt = load_encoder(out, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(rebuilt, tower.encode(TEXTS).numpy(), atol=2e-3)  # fp16 delta
    untrained = load_encoder(tiny_gemma, device="cpu").encode(TEXTS)
    assert np.abs(rebuilt - untrained).max() > 1e-2  # the delta really changed the encoder


def test_embedder_document_side_keeps_its_dense_layers_through_a_lora_delta(
    tiny_st_embedder: Path, tmp_path: Path
) -> None:
    # CARE stage II on an LLM embedder (EmbeddingGemma): LoRA on the Gemma3 stack, while the frozen
    # Dense layers after the pooling must run in training and ship with the rebuilt encoder.
    untrained_tower = DocumentTower(
        tiny_st_embedder, DocumentSideConfig(mode="lora", lora_rank=4, lora_alpha=8)
    )
    untrained = load_encoder(tiny_st_embedder, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(untrained_tower.encode(TEXTS).numpy(), untrained, atol=1e-5)

    tower = _trained(tiny_st_embedder, DocumentSideConfig(mode="lora", lora_rank=4, lora_alpha=8))
    save_document_delta(tower, tmp_path / "delta.safetensors", name="tiny-st-care")
    out = tmp_path / "tiny-st-care"
    manifest = build_document_encoder(tiny_st_embedder, tmp_path / "delta.safetensors", out, progress=_quiet)
    assert manifest.dense_layers == ["2_Dense", "3_Dense"]
    assert verify_manifest(out) == manifest  # the Dense modules' files are there and pinned
    rebuilt = load_encoder(out, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(rebuilt, tower.encode(TEXTS).numpy(), atol=2e-3)  # fp16 delta
    assert np.abs(rebuilt - untrained).max() > 1e-2


def test_truncated_document_side_keeps_its_dim_through_the_delta(tiny_gemma: Path, tmp_path: Path) -> None:
    # Keeping the first N dims lets a decoder share the space of a narrower query encoder.
    full_dim = verify_manifest(tiny_gemma).dim
    tower = _trained(tiny_gemma, DocumentSideConfig(mode="top_layers", trainable_layers=1, output_dim=16))
    vectors = tower.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 16)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(TEXTS)))

    delta = save_document_delta(tower, tmp_path / "delta.safetensors", name="tiny-gemma-16")
    assert delta.dim == 16
    manifest = build_document_encoder(
        tiny_gemma, tmp_path / "delta.safetensors", tmp_path / "d", progress=_quiet
    )
    assert manifest.dim == 16
    np.testing.assert_allclose(
        load_encoder(tmp_path / "d", device="cpu").encode(TEXTS), vectors.numpy(), atol=2e-3
    )

    with pytest.raises(ValueError, match="exceeds"):
        DocumentTower(tiny_gemma, DocumentSideConfig(output_dim=full_dim + 1))


def test_delta_is_refused_on_other_base_weights(tiny_gemma: Path, tmp_path: Path) -> None:
    tower = _trained(tiny_gemma, DocumentSideConfig(mode="lora", lora_rank=2))
    save_document_delta(tower, tmp_path / "delta.safetensors", name="care", space="care-space")
    other = tmp_path / "other-gemma"
    make_tiny_decoder(other, "gemma3", seed=7)
    with pytest.raises(DeltaMismatchError, match="not the tiny-gemma"):
        build_document_encoder(other, tmp_path / "delta.safetensors", tmp_path / "out", progress=_quiet)
    assert not (tmp_path / "out").exists()


def test_frozen_document_side_has_no_delta(tiny_gemma: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-llm-space"):
        save_document_delta(
            DocumentTower(tiny_gemma, DocumentSideConfig()), tmp_path / "d.safetensors", name="x"
        )


def test_a_plain_safetensors_file_is_not_a_delta(tiny_gemma: Path) -> None:
    with pytest.raises(ValueError, match="not an alignment delta"):
        read_document_delta(tiny_gemma / "model.safetensors")


def test_query_encoder_directory_with_projection(tiny_bert: Path, tmp_path: Path) -> None:
    tower = QueryTower(tiny_bert, QuerySideConfig(output_dim=48, task="找答案", max_tokens=40), seed=2)
    manifest = save_query_encoder(tower, tmp_path / "q", name="tiny-bert-care", space="care-space")
    assert verify_manifest(tmp_path / "q") == manifest
    assert (manifest.role, manifest.format, manifest.space) == ("query", "hf", "care-space")
    assert (manifest.pooling, manifest.dim, manifest.max_tokens) == ("cls", 48, 40)
    assert manifest.prompt == "<instruct>找答案\n<query>{text}"
    assert manifest.derived_from == verify_manifest(tiny_bert).fingerprint
    assert PROJECTION_FILE in manifest.files
    with safe_open(str(tmp_path / "q" / PROJECTION_FILE), framework="pt") as fh:
        assert fh.get_tensor("weight").shape == (48, 32)

    reloaded = QueryTower(tmp_path / "q", QuerySideConfig(task="找答案", max_tokens=40))
    torch.testing.assert_close(reloaded.encode(TEXTS), tower.encode(TEXTS), atol=1e-6, rtol=1e-6)

    # The export bakes the projection into the graph: 48-d vectors equal to the tower's.
    exported = export_query_encoder(tmp_path / "q", tmp_path / "q-onnx", progress=_quiet)
    assert (exported.dim, exported.space) == (48, "care-space")
    onnx_vectors = load_encoder(tmp_path / "q-onnx").encode(TEXTS)
    np.testing.assert_allclose(onnx_vectors, tower.encode(TEXTS).numpy(), atol=1e-5)


def test_aligned_pair_exports_and_shares_one_space(tiny_bert: Path, tiny_qwen: Path, tmp_path: Path) -> None:
    document = _trained(tiny_qwen, DocumentSideConfig(mode="top_layers", trainable_layers=1))
    query = QueryTower(tiny_bert, QuerySideConfig(output_dim=document.dim))
    delta = save_document_delta(document, tmp_path / "delta.safetensors", name="tiny-qwen-care")
    doc_manifest = build_document_encoder(
        tiny_qwen, tmp_path / "delta.safetensors", tmp_path / "docs", progress=_quiet
    )
    save_query_encoder(query, tmp_path / "q", name="tiny-bert-care", space=delta.space)

    onnx_manifest = export_query_encoder(tmp_path / "q", tmp_path / "q-onnx", progress=_quiet)
    assert onnx_manifest.space == doc_manifest.space == delta.space
    assert (onnx_manifest.role, onnx_manifest.pooling, onnx_manifest.prompt) == (
        "query",
        "cls",
        query.config.prompt(),
    )
    onnx_vectors = load_encoder(tmp_path / "q-onnx").encode(TEXTS)
    np.testing.assert_allclose(onnx_vectors, query.encode(TEXTS).numpy(), atol=1e-5)


def test_query_delta_rebuilds_the_trained_query_encoder(tiny_bert: Path, tmp_path: Path) -> None:
    config = QuerySideConfig(output_dim=48, trainable_layers=1, task="找答案", max_tokens=40)
    tower = QueryTower(tiny_bert, config, seed=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tower.trainable_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    delta = save_query_delta(tower, tmp_path / "q.safetensors", name="tiny-bert-care", space="care-space")
    meta, tensors = read_query_delta(tmp_path / "q.safetensors")
    assert meta == delta
    # Only the top layer and the projection travel: lower layers and embeddings stay the base's.
    layers = {key.split(".")[3] for key in tensors if key.startswith("model.encoder.layer.")}
    assert layers == {str(tower.model.config.num_hidden_layers - 1)}
    assert "projection.weight" in tensors and not any("embeddings" in key for key in tensors)

    manifest = build_query_encoder(tiny_bert, tmp_path / "q.safetensors", tmp_path / "q", progress=_quiet)
    assert (manifest.name, manifest.space, manifest.dim, manifest.role) == (
        "tiny-bert-care",
        "care-space",
        48,
        "query",
    )
    rebuilt = QueryTower(tmp_path / "q", QuerySideConfig(task="找答案", max_tokens=40))
    torch.testing.assert_close(rebuilt.encode(TEXTS), tower.encode(TEXTS), atol=2e-3, rtol=0)  # fp16
    untrained = QueryTower(tiny_bert, config, seed=3)
    assert (rebuilt.encode(TEXTS) - untrained.encode(TEXTS)).abs().max() > 1e-2

    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert, other)
    changed = QueryTower(other, QuerySideConfig())
    with torch.no_grad():
        next(iter(changed.model.encoder.layer[-1].parameters())).add_(1.0)
    changed.model.save_pretrained(other, safe_serialization=True)
    write_manifest(other, read_manifest(other))
    with pytest.raises(DeltaMismatchError, match="not the"):
        build_query_encoder(other, tmp_path / "q.safetensors", tmp_path / "q2", progress=_quiet)
