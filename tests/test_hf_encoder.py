"""The transformers runtime on tiny random-weight models of the real architectures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.hf_encoder import HFEncoder, pad_batch
from models.loading import load_encoder
from models.manifest import ManifestError, ModelManifest, read_manifest
from tests.tiny_models import make_tiny_decoder

# Lengths from one token to well past max_tokens (64), in an order that length sorting changes.
TEXTS = [
    "高",
    "高血压患者能吃阿司匹林吗？医生说要注意饮食和运动，每天检查血压。" * 4,
    "头痛发烧",
    "咳嗽 cough 三天了, 需要吃药吗",
    "糖尿病人饮食注意什么，水果能吃吗？",
    "",
]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-qwen"
    make_tiny_decoder(path, "qwen3")
    return path


@pytest.fixture(scope="module")
def tiny_gemma_mean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-gemma-mean"
    make_tiny_decoder(path, "gemma3", pooling="mean")
    return path


@pytest.fixture(params=["tiny_bert", "tiny_gemma", "tiny_qwen", "tiny_gemma_mean"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(request.param))


@pytest.fixture(params=["tiny_gemma", "tiny_qwen"])
def decoder_dir(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(request.param))


def _encoder(model_dir: Path, **changes: object) -> HFEncoder:
    manifest = read_manifest(model_dir).model_copy(update=changes)
    return HFEncoder(model_dir, manifest, device="cpu")


def _hidden(encoder: HFEncoder, ids: list[int]) -> torch.Tensor:
    """The model's last hidden states for one unpadded sequence: (seq, hidden)."""
    with torch.inference_mode():
        return encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_batch_invariance(model_dir: Path) -> None:
    encoder = _encoder(model_dir)
    alone = np.stack([encoder.encode([text])[0] for text in TEXTS])
    for batch_size in (len(TEXTS), 4, 2):
        together = encoder.encode(TEXTS, batch_size=batch_size)
        assert together.dtype == np.float32
        assert together.shape == (len(TEXTS), encoder.manifest.dim)
        np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_left_padding_keeps_absolute_positions(tiny_bert: Path) -> None:
    # Rotary decoders barely notice shifted positions; learned absolute positions (BERT) do.
    encoder = _encoder(tiny_bert, pooling="last_token")
    alone = np.stack([encoder.encode([text])[0] for text in TEXTS])
    np.testing.assert_allclose(encoder.encode(TEXTS), alone, atol=1e-5, rtol=0)


def test_order_is_the_callers(model_dir: Path) -> None:
    encoder = _encoder(model_dir)
    vectors = encoder.encode(TEXTS)
    assert len({tuple(np.round(row, 4)) for row in vectors}) == len(TEXTS)  # rows are distinguishable
    perm = [3, 0, 5, 1, 4, 2]
    permuted = encoder.encode([TEXTS[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(permuted, vectors[perm], atol=1e-5, rtol=0)


def test_load_encoder_picks_this_runtime(tiny_gemma: Path) -> None:
    encoder = load_encoder(tiny_gemma, threads=1, device="cpu")
    assert isinstance(encoder, HFEncoder)
    assert encoder.encode(["高血压"]).shape == (1, encoder.manifest.dim)


def test_last_token_appends_eos_and_pads_left(decoder_dir: Path) -> None:
    encoder = _encoder(decoder_dir)
    eos, pad = encoder.tokenizer.eos_token_id, encoder.tokenizer.pad_token_id
    ids = encoder.tokenize(["高血压能吃吗", "药"])
    assert [row[-1] for row in ids] == [eos, eos]
    assert [row.count(eos) for row in ids] == [1, 1]

    batch = encoder.collate(ids)
    short = len(ids[1])
    width = len(ids[0])
    assert batch.input_ids[1].tolist() == [pad] * (width - short) + ids[1]
    assert batch.attention_mask[1].tolist() == [0] * (width - short) + [1] * short
    assert batch.position_ids[1, width - short :].tolist() == list(range(short))
    assert batch.input_ids[:, -1].tolist() == [eos, eos]  # the pooled column is real for every row
    assert batch.position_ids[0].tolist() == list(range(width))


def test_other_poolings_pad_right(tiny_bert: Path) -> None:
    encoder = _encoder(tiny_bert)
    ids = encoder.tokenize(["高血压能吃吗", "药"])
    batch = encoder.collate(ids)
    width, short = len(ids[0]), len(ids[1])
    assert batch.input_ids[1].tolist() == ids[1] + [encoder.tokenizer.pad_token_id] * (width - short)
    assert batch.attention_mask[1].tolist() == [1] * short + [0] * (width - short)


def test_pad_batch_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError):
        pad_batch([], pad_id=0, side="left")


def test_gemma_keeps_bos_first(tiny_gemma: Path) -> None:
    encoder = _encoder(tiny_gemma)
    bos = encoder.tokenizer.bos_token_id
    assert [row[0] for row in encoder.tokenize(["高血压", TEXTS[1]])] == [bos, bos]


def test_truncation_keeps_eos(decoder_dir: Path) -> None:
    encoder = _encoder(decoder_dir)
    limit = encoder.manifest.max_tokens
    (row,) = encoder.tokenize([TEXTS[1]])
    assert len(row) == limit
    assert row[-1] == encoder.tokenizer.eos_token_id
    # What survives is the start of the text: the end was cut to make room for EOS.
    full = encoder.tokenizer(TEXTS[1], add_special_tokens=True)["input_ids"]
    assert row[:-1] == full[: limit - 1]
    assert encoder.count_tokens([TEXTS[1], "药"]) == [limit, len(encoder.tokenize(["药"])[0])]


def test_truncation_keeps_the_tokenizers_specials(tiny_bert: Path) -> None:
    encoder = _encoder(tiny_bert)
    (row,) = encoder.tokenize([TEXTS[1]])
    assert len(row) == encoder.manifest.max_tokens
    assert row[0] == encoder.tokenizer.cls_token_id
    assert row[-1] == encoder.tokenizer.sep_token_id


def test_last_token_pooling_is_the_final_real_hidden_state(decoder_dir: Path) -> None:
    encoder = _encoder(decoder_dir, normalize=False)
    texts = ["高血压能吃什么药", "头痛", TEXTS[1]]
    vectors = encoder.encode(texts)
    for text, vector in zip(texts, vectors, strict=True):
        (ids,) = encoder.tokenize([text])
        expected = _hidden(encoder, ids)[-1].numpy()
        np.testing.assert_allclose(vector, expected, atol=1e-5, rtol=1e-5)


def test_mean_pooling_is_the_average_over_real_tokens(tiny_bert: Path, tiny_gemma_mean: Path) -> None:
    for model_dir in (tiny_bert, tiny_gemma_mean):
        encoder = _encoder(model_dir, normalize=False)
        texts = ["高血压能吃什么药", "头痛", TEXTS[1]]
        vectors = encoder.encode(texts)
        for text, vector in zip(texts, vectors, strict=True):
            (ids,) = encoder.tokenize([text])
            expected = _hidden(encoder, ids).mean(dim=0).numpy()
            np.testing.assert_allclose(vector, expected, atol=1e-5, rtol=1e-5)


def test_cls_pooling_is_the_first_hidden_state(tiny_bert: Path) -> None:
    encoder = _encoder(tiny_bert, pooling="cls", normalize=False)
    vectors = encoder.encode(["高血压能吃什么药", "头痛"])
    for text, vector in zip(["高血压能吃什么药", "头痛"], vectors, strict=True):
        (ids,) = encoder.tokenize([text])
        np.testing.assert_allclose(vector, _hidden(encoder, ids)[0].numpy(), atol=1e-5, rtol=1e-5)


def test_dim_truncation_then_normalization(model_dir: Path) -> None:
    full = _encoder(model_dir, normalize=False).encode(TEXTS)
    short = _encoder(model_dir, dim=16).encode(TEXTS)
    assert short.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    head = full[:, :16]
    np.testing.assert_allclose(short, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-5)


def test_dim_larger_than_the_model_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(ManifestError, match="output width 32"):
        _encoder(tiny_bert, dim=33)


def test_prompt_is_applied(tiny_bert: Path) -> None:
    manifest: ModelManifest = read_manifest(tiny_bert)
    assert manifest.prompt == "passage: {text}"
    encoder = _encoder(tiny_bert)
    expected = encoder.tokenizer("passage: 高血压", add_special_tokens=True)["input_ids"]
    assert encoder.tokenize(["高血压"]) == [expected]
    bare = _encoder(tiny_bert, prompt="{text}")
    assert not np.allclose(encoder.encode(["高血压"]), bare.encode(["高血压"]), atol=1e-4)
    np.testing.assert_allclose(encoder.encode(["高血压"]), bare.encode(["passage: 高血压"]), atol=1e-6)


def test_empty_input(tiny_gemma: Path) -> None:
    encoder = _encoder(tiny_gemma)
    out = encoder.encode([])
    assert out.shape == (0, encoder.manifest.dim)
    assert out.dtype == np.float32


def test_an_aligned_query_encoders_projection_is_applied(tiny_bert: Path, tmp_path: Path) -> None:
    """A trained query side saved as HF weights + projection.safetensors encodes into the wider space,
    exactly as its ONNX export will."""
    import shutil

    from models.manifest import write_manifest
    from models.projection import save_projection

    model_dir = tmp_path / "aligned"
    shutil.copytree(tiny_bert, model_dir)
    base = load_encoder(tiny_bert, device="cpu")
    projection = torch.nn.Linear(base.manifest.dim, 48, bias=False)
    save_projection(projection, model_dir)
    write_manifest(model_dir, read_manifest(tiny_bert).model_copy(update={"dim": 48}))
    texts = ["头痛怎么办", "高血压能吃党参吗"]
    pooled = torch.from_numpy(base.encode(texts))  # unit vectors: the direction is all that matters
    expected = torch.nn.functional.normalize(projection(pooled), dim=-1).detach().numpy()
    got = load_encoder(model_dir, device="cpu").encode(texts)
    assert got.shape == (2, 48)
    np.testing.assert_allclose(got, expected, atol=1e-5)
