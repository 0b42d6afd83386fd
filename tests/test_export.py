from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.export import ExportParityError, export_query_encoder, quantize_int8
from models.loading import load_encoder
from models.manifest import ManifestError, read_manifest, verify_manifest
from models.onnx_encoder import OnnxEncoder

TEXTS = ["高血压能吃党参吗", "孩子发烧咳嗽怎么办", "What is hypertension?", "x"]


def test_export_writes_a_verified_query_manifest_in_the_source_space(
    tiny_bert: Path, tiny_onnx: Path
) -> None:
    source = read_manifest(tiny_bert)
    manifest = verify_manifest(tiny_onnx)
    assert manifest.role == "query"
    assert manifest.format == "onnx"
    assert manifest.space == source.space
    assert manifest.prompt == "query: {text}"
    assert manifest.dim == source.dim
    assert set(manifest.files) == {"model.onnx", "tokenizer.json"}


def test_onnx_matches_pytorch_pooling_and_is_normalized(tiny_bert: Path, tiny_onnx: Path) -> None:
    import torch
    from transformers import AutoModel

    onnx_encoder = load_encoder(tiny_onnx)
    vectors = onnx_encoder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # Hand-computed mean pooling over the source model, with the query prompt applied.
    model = AutoModel.from_pretrained(tiny_bert).eval()
    assert isinstance(onnx_encoder, OnnxEncoder)
    for text, got in zip(TEXTS, vectors, strict=True):
        feeds = onnx_encoder.tokenize([text])
        with torch.no_grad():
            hidden = model(input_ids=torch.from_numpy(feeds["input_ids"])).last_hidden_state[0]
        expected = hidden.mean(dim=0).numpy()
        expected /= np.linalg.norm(expected)
        assert float(got @ expected) > 0.9999


def test_onnx_batch_equals_single(tiny_onnx: Path) -> None:
    encoder = load_encoder(tiny_onnx)
    batch = encoder.encode(TEXTS, batch_size=len(TEXTS))
    single = np.stack([encoder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_long_query_is_truncated_to_the_token_limit(tiny_onnx: Path) -> None:
    encoder = load_encoder(tiny_onnx)
    assert isinstance(encoder, OnnxEncoder)
    long = "高血压" * 500
    assert encoder.count_tokens([long]) == [encoder.manifest.max_tokens]
    # Past the limit extra text changes nothing: it was cut.
    np.testing.assert_allclose(encoder.encode([long]), encoder.encode([long + "糖尿病" * 10]), atol=1e-6)


def test_graph_takes_only_ids_and_mask_and_has_dynamic_axes(tiny_onnx: Path) -> None:
    graph = onnx.load(str(tiny_onnx / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)


def test_export_fails_and_leaves_nothing_when_parity_does_not_hold(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "broken-onnx"
    with pytest.raises(ExportParityError):
        export_query_encoder(tiny_bert, out, min_cosine=1.01, progress=lambda _m: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_of_plain_hf_directory_derives_a_manifest(tiny_bert: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain-bert"
    shutil.copytree(tiny_bert, plain)
    (plain / "manifest.json").unlink()
    manifest = export_query_encoder(plain, tmp_path / "plain-onnx", pooling="cls", progress=lambda _m: None)
    assert manifest.pooling == "cls"
    assert manifest.space.startswith("plain-bert@")
    assert manifest.dim == 32


def test_int8_copy_keeps_space_and_stays_close(tiny_onnx: Path, tmp_path: Path) -> None:
    manifest, cosine = quantize_int8(tiny_onnx, tmp_path / "int8", progress=lambda _m: None)
    assert manifest.space == read_manifest(tiny_onnx).space
    assert manifest.quantization == "int8-dynamic-matmul-per-channel+embeddings-int8-per-row"
    assert cosine > 0.95
    verify_manifest(tmp_path / "int8")


def test_tampered_weights_fail_verification(tiny_onnx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_onnx, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    data["added_tokens"] = []
    (copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="does not match"):
        verify_manifest(copy)


def test_decoder_only_models_are_refused_for_query_export(tiny_gemma: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decoder-only"):
        export_query_encoder(tiny_gemma, tmp_path / "x", progress=lambda _m: None)


def test_pairing_is_symmetric_only_for_the_exported_document_encoder(
    tiny_bert: Path, tiny_onnx: Path
) -> None:
    from service.routes.health import pairing
    from store.spec import CollectionSpec

    document = read_manifest(tiny_bert)
    spec = CollectionSpec(
        dim=32, space=document.space, encoder=document.name, encoder_fingerprint=document.fingerprint
    )
    assert pairing(read_manifest(tiny_onnx), spec) == "symmetric"
    other = spec.model_copy(update={"encoder_fingerprint": "0" * 64})
    assert pairing(read_manifest(tiny_onnx), other) == "asymmetric"
    assert pairing(read_manifest(tiny_onnx), None) == "unknown"


def test_replacing_a_directory_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    from models.manifest import ManifestError, replace_model_dir

    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "other-model" / "weights.bin").write_bytes(b"precious")
    built = tmp_path / "built"
    built.mkdir()
    with pytest.raises(ManifestError, match="not a model directory"):
        replace_model_dir(built, models)  # e.g. `medsearch models export --out var/models`
    assert (models / "other-model" / "weights.bin").read_bytes() == b"precious"
    assert built.is_dir()
