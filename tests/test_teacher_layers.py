"""A query tower cut from the teacher's own first layers: it reproduces the teacher, trains toward its
vectors, round-trips through a committed delta, and exports to ONNX with its heads baked in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer

from models.align.artifacts import DeltaMismatchError, build_query_encoder, save_query_delta
from models.align.stage_configs import QueryPointwiseConfig
from models.align.teacher_layers import TeacherLayersConfig, TeacherLayersTower
from models.align.train import train_query_pointwise
from models.export import export_query_encoder, quantize_int8
from models.int8_plan import Int8Plan, load_int8_plan, save_int8_plan
from models.loading import load_encoder
from models.manifest import read_manifest, staged_model_dir, verify_manifest, write_manifest
from models.vocabulary import tokens_to_keep

TEXTS = ["头痛怎么办", "发烧吃什么药", "咳嗽有痰", "腹泻三天", "失眠多梦", "恶心想吐", "便秘怎么调理", "贫血"]
# Longer than the tiny embedder's sliding window (9 tokens either side), so the window really cuts.
MAX_TOKENS = 48


def _tower(embedder: Path, layers: int) -> TeacherLayersTower:
    return TeacherLayersTower(embedder, TeacherLayersConfig(layers=layers, max_tokens=MAX_TOKENS))


def _teacher(embedder: Path) -> np.ndarray:
    manifest = read_manifest(embedder).model_copy(update={"max_tokens": MAX_TOKENS})
    write_manifest(embedder, manifest)
    return load_encoder(embedder, device="cpu", mode="query").encode(TEXTS)


@pytest.fixture()
def embedder(tiny_st_embedder: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "models" / "tiny-st-embedder"
    shutil.copytree(tiny_st_embedder, copy)
    return copy


def test_all_layers_reproduce_the_teacher_and_fewer_do_not(embedder: Path) -> None:
    teacher = _teacher(embedder)
    whole = _tower(embedder, 2).encode(TEXTS).numpy()
    assert np.min(np.sum(whole * teacher, axis=1)) > 0.9999
    cut = _tower(embedder, 1)
    assert len(cut.model.layers) == 1
    assert np.min(np.sum(cut.encode(TEXTS).numpy() * teacher, axis=1)) < 0.999


def test_the_embedding_table_stays_frozen_and_the_heads_train(embedder: Path) -> None:
    trainable = _tower(embedder, 1).trainable_parameters()
    assert not any("embed_tokens" in name for name in trainable)
    assert any(name.startswith("dense.") for name in trainable)
    assert any(name.startswith("model.layers.0.") for name in trainable)


def test_pointwise_stage_pulls_the_student_onto_the_teacher(embedder: Path) -> None:
    teacher = torch.from_numpy(_teacher(embedder))
    student = _tower(embedder, 1)
    before = float((student.encode(TEXTS) * teacher).sum(dim=1).mean())
    config = QueryPointwiseConfig(steps=40, batch_size=4, query_lr=3e-3, warmup_steps=0)
    result = train_query_pointwise(student, TEXTS, teacher, config, progress=False)
    after = float((student.encode(TEXTS) * teacher).sum(dim=1).mean())
    assert result.steps == 40
    assert after > before + 0.05 and after > 0.9


def test_delta_rebuilds_the_student_and_its_onnx_export_matches(
    embedder: Path, tmp_path: Path, tiny_bert: Path
) -> None:
    teacher = torch.from_numpy(_teacher(embedder))
    student = _tower(embedder, 1)
    config = QueryPointwiseConfig(steps=10, batch_size=4, query_lr=3e-3, warmup_steps=0)
    train_query_pointwise(student, TEXTS, teacher, config, progress=False)
    trained = student.encode(TEXTS).numpy()

    delta = tmp_path / "deltas" / "student.safetensors"
    space = read_manifest(embedder).space
    save_query_delta(student, delta, name="student", space=space)
    models = embedder.parent
    built = build_query_encoder(embedder, delta, models / "student", progress=lambda _m: None)
    assert (built.role, built.space, built.dim) == ("query", space, read_manifest(embedder).dim)
    assert built.derived_from == ""  # trained weights: evaluation pairs it as asymmetric, not an export
    rebuilt = load_encoder(models / "student", device="cpu", mode="query").encode(TEXTS)
    assert np.min(np.sum(rebuilt * trained, axis=1)) > 0.999  # fp16 delta

    exported_manifest = export_query_encoder(
        models / "student", models / "student-onnx", progress=lambda _m: None
    )
    assert exported_manifest.space == space and exported_manifest.dense_layers == []
    exported = load_encoder(models / "student-onnx").encode(TEXTS)
    assert np.min(np.sum(exported * rebuilt, axis=1)) > 0.9999
    _, cosine = quantize_int8(models / "student-onnx", models / "student-onnx-int8", progress=lambda _m: None)
    assert cosine > 0.9
    verify_manifest(models / "student-onnx-int8")

    # A trimmed vocabulary: rows of the training texts (plus characters, bytes and specials) only.
    table_rows = int(student.model.get_input_embeddings().weight.shape[0])
    everything = tokens_to_keep(models / "student" / "tokenizer.json", TEXTS[:4], table_rows)
    assert everything.ids == list(range(table_rows))  # char-level: every token is one character
    tokenizer = Tokenizer.from_file(str(models / "student" / "tokenizer.json"))
    used = {i for text in ["task: search result | query: ", *TEXTS[:4]] for i in tokenizer.encode(text).ids}
    kept = everything.model_copy(update={"ids": sorted(used | {0, 1, 2, 3})})
    plan = Int8Plan(keep_float=["down_proj"], vocabulary=kept)
    # Saved from the student's directory, read back against its export's (re-serialized) tokenizer,
    # as `medsearch models build` does; another tokenizer's vocabulary is refused.
    save_int8_plan(plan, tmp_path / "student.int8.json")
    assert load_int8_plan(tmp_path / "student.int8.json", models / "student-onnx" / "tokenizer.json") == plan
    with pytest.raises(ValueError, match="another tokenizer"):
        load_int8_plan(tmp_path / "student.int8.json", tiny_bert / "tokenizer.json")
    trimmed, _ = quantize_int8(
        models / "student-onnx", models / "student-onnx-trim", plan=plan, progress=lambda _m: None
    )
    assert trimmed.quantization is not None and f"vocabulary-{len(kept.ids)}-rows" in trimmed.quantization
    assert trimmed.quantization.endswith("+float-down_proj")
    # The tokenizer is trimmed to the same tokens: memory the service no longer holds.
    trimmed_tokenizer = Tokenizer.from_file(str(models / "student-onnx-trim" / "tokenizer.json"))
    assert trimmed_tokenizer.get_vocab_size(with_added_tokens=False) <= len(kept.ids) + 1 < table_rows
    graph = onnx.load(str(models / "student-onnx-trim" / "model.onnx"))
    float_matmuls = [n.name for n in graph.graph.node if n.op_type == "MatMul"]
    assert float_matmuls and all("down_proj" in n or "self_attn/MatMul" in n for n in float_matmuls)
    full = load_encoder(models / "student-onnx").encode(TEXTS[:4])
    cut = load_encoder(models / "student-onnx-trim").encode(TEXTS[:4])
    assert np.min(np.sum(full * cut, axis=1)) > 0.99  # texts inside the kept rows: int8 error only
    outside = ["失眠多梦恶心想吐便秘贫血" * 2]  # characters outside the kept rows: the unknown row
    trimmed_vector = load_encoder(models / "student-onnx-trim").encode(outside)[0]
    full_vector = load_encoder(models / "student-onnx").encode(outside)[0]
    assert float(trimmed_vector @ full_vector) < 0.99

    # down_proj as 8-bit weight blocks instead of float32: MatMulNBits nodes, named in the manifest,
    # and within int8 error of fp32.
    blockwise = Int8Plan(blockwise=["down_proj"])
    blocks, _ = quantize_int8(
        models / "student-onnx", models / "student-onnx-blocks", plan=blockwise, progress=lambda _m: None
    )
    assert blocks.quantization is not None and blocks.quantization.endswith("+blockwise-int8-down_proj")
    nodes = onnx.load(str(models / "student-onnx-blocks" / "model.onnx")).graph.node
    block_nodes = [n.name for n in nodes if n.op_type == "MatMulNBits"]
    assert block_nodes and all("down_proj" in n for n in block_nodes)
    assert not [n.name for n in nodes if n.op_type == "MatMul" and "down_proj" in n.name]
    in_blocks = load_encoder(models / "student-onnx-blocks").encode(TEXTS[:4])
    assert np.min(np.sum(full * in_blocks, axis=1)) > 0.99


def test_a_delta_refuses_other_base_weights(embedder: Path, tmp_path: Path) -> None:
    student = _tower(embedder, 1)
    delta = tmp_path / "student.safetensors"
    save_query_delta(student, delta, name="student", space="s")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(embedder / "model.safetensors"))
    name = next(k for k in weights if "layers.0.mlp.up_proj" in k)
    weights[name] = weights[name] + 1
    save_file(weights, str(embedder / "model.safetensors"))
    write_manifest(embedder, read_manifest(embedder))
    with pytest.raises(DeltaMismatchError, match="not the tiny-st-embedder"):
        build_query_encoder(embedder, delta, tmp_path / "out", progress=lambda _m: None)


def test_teacher_cache_is_fp16_resumable_and_refuses_another_teacher(embedder: Path, tmp_path: Path) -> None:
    from models.align.frozen import TEACHER_META, TeacherCacheError, teacher_query_vectors

    cache = tmp_path / "teacher"
    texts = [f"{t}{i}" for i in range(80) for t in TEXTS[:1]]
    import models.align.frozen as frozen

    original = frozen.TEACHER_CHUNK
    frozen.TEACHER_CHUNK = 32
    try:
        log: list[str] = []
        first = teacher_query_vectors(embedder, texts, cache, batch_size=8, log=log.append)
        parts = sorted(cache.glob("part-*.npy"))
        assert len(parts) == 3 and np.load(parts[0]).dtype == np.float16
        parts[1].unlink()  # an interrupted pass: only the missing part is computed again
        log.clear()
        again = teacher_query_vectors(embedder, texts, cache, batch_size=8, log=log.append)
        assert log == [f"align: teacher tiny-st-embedder encoding 48 of {len(texts)} texts"]
        np.testing.assert_allclose(first, again, atol=1e-3)

        with pytest.raises(TeacherCacheError, match="another texts "):
            teacher_query_vectors(embedder, texts[:-1], cache, batch_size=8, log=log.append)
        meta = json.loads((cache / TEACHER_META).read_text())
        meta["fingerprint"] = "f" * 64
        (cache / TEACHER_META).write_text(json.dumps(meta))
        with pytest.raises(TeacherCacheError, match="another fingerprint"):
            teacher_query_vectors(embedder, texts, cache, batch_size=8, log=log.append)
    finally:
        frozen.TEACHER_CHUNK = original


def _student_onnx(embedder: Path) -> Path:
    student = _tower(embedder, 1)
    models = embedder.parent
    with staged_model_dir(models / "student") as work:
        student.save(work, name="student", space=read_manifest(embedder).space)
    export_query_encoder(models / "student", models / "student-onnx", progress=lambda _m: None)
    return models / "student-onnx"


@pytest.mark.parametrize("document_space", ["multilingual-e5-small", "tiny-st-embedder@other"])
def test_the_service_refuses_the_student_beside_documents_of_another_space(
    embedder: Path, tmp_path: Path, document_space: str
) -> None:
    from service.state import StartupError, load_state
    from settings import Settings
    from store.factory import open_store
    from store.spec import CollectionSpec

    onnx = _student_onnx(embedder)
    settings = Settings(home=tmp_path, models_dir=onnx.parent, query_model=onnx.name)
    store = open_store(None, settings.store_path)
    store.create_collection(
        settings.collection,
        CollectionSpec(
            dim=read_manifest(onnx).dim, space=document_space, encoder="other", encoder_fingerprint="e" * 64
        ),
    )
    store.close()
    with pytest.raises(StartupError, match="refusing to serve"):
        load_state(settings)


def test_the_service_serves_the_student_beside_its_teachers_documents(embedder: Path, tmp_path: Path) -> None:
    from service.state import load_state
    from settings import Settings
    from store.factory import open_store
    from store.spec import CollectionSpec

    onnx = _student_onnx(embedder)
    teacher = read_manifest(embedder)
    settings = Settings(home=tmp_path, models_dir=onnx.parent, query_model=onnx.name)
    store = open_store(None, settings.store_path)
    store.create_collection(
        settings.collection,
        CollectionSpec(
            dim=teacher.dim,
            space=teacher.space,
            encoder=teacher.name,
            encoder_fingerprint=teacher.fingerprint,
        ),
    )
    store.close()
    state = load_state(settings)
    assert state.problem is None and state.spec is not None and state.spec.space == teacher.space
    state.store.close()
