"""The trainable towers on tiny models: same inputs as the runtimes, the right parts trainable, and the
cached lower-layer path equal to the full forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.align.document_side import DocumentSideConfig, DocumentTower
from models.align.lora import LoRALinear
from models.align.query_side import QuerySideConfig, QueryTower, fit_projection
from models.align.state_cache import LowerStateCache
from models.hf_encoder import HFEncoder
from models.manifest import read_manifest
from tests.tiny_models import make_tiny_decoder

TEXTS = [
    "高血压患者能吃阿司匹林吗？医生说要注意饮食和运动，每天检查血压。" * 3,  # truncated at 64 tokens
    "头痛",
    "咳嗽 cough 三天了, 需要吃药吗",
    "糖尿病人饮食注意什么，水果能吃吗？",
]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-qwen"
    make_tiny_decoder(path, "qwen3")
    return path


@pytest.fixture(params=["tiny_gemma", "tiny_qwen"])
def decoder_dir(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(request.param))


def test_frozen_document_side_encodes_like_the_runtime(decoder_dir: Path) -> None:
    tower = DocumentTower(decoder_dir, DocumentSideConfig())
    assert tower.trainable_parameters() == {}
    runtime = HFEncoder(decoder_dir, read_manifest(decoder_dir), device="cpu")
    np.testing.assert_allclose(tower.encode(TEXTS, batch_size=3).numpy(), runtime.encode(TEXTS), atol=1e-5)
    short = DocumentTower(decoder_dir, DocumentSideConfig(max_tokens=8))
    assert [len(r) for r in short.encoder.tokenize(TEXTS[:2])] == [8, len(runtime.tokenize(["头痛"])[0])]


def test_top_layers_train_only_the_top_layers_and_final_norm(tiny_gemma: Path) -> None:
    tower = DocumentTower(tiny_gemma, DocumentSideConfig(mode="top_layers", trainable_layers=1))
    names = set(tower.trainable_parameters())
    assert names == {n for n, _ in tower.model.named_parameters() if n.startswith(("layers.1.", "norm."))}
    assert tower.first_trainable == 1


def test_lora_wraps_the_projections_and_starts_at_the_base(decoder_dir: Path) -> None:
    base = DocumentTower(decoder_dir, DocumentSideConfig()).encode(TEXTS)
    tower = DocumentTower(decoder_dir, DocumentSideConfig(mode="lora", lora_rank=4, lora_alpha=8))
    wrapped = [m for m in tower.model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7  # q k v o gate up down, in both layers
    assert all(n.endswith((".lora_a", ".lora_b")) for n in tower.trainable_parameters())
    assert wrapped[0].lora_a.shape[0] == 4 and wrapped[0].scale == 2.0
    np.testing.assert_allclose(tower.encode(TEXTS).numpy(), base.numpy(), atol=1e-6)  # B starts at 0
    only_top = DocumentTower(decoder_dir, DocumentSideConfig(mode="lora", trainable_layers=1))
    assert {n.split(".")[1] for n in only_top.trainable_parameters()} == {"1"}


@pytest.mark.parametrize("mode", ["top_layers", "lora"])
def test_cached_lower_states_equal_the_full_forward(decoder_dir: Path, mode: str) -> None:
    config = DocumentSideConfig(mode=mode, trainable_layers=1)  # type: ignore[arg-type]
    full = DocumentTower(decoder_dir, config)
    cached = DocumentTower(decoder_dir, config.model_copy(update={"cache_lower_states": True}))
    with torch.no_grad():  # move LoRA's B off zero so its gradients are not trivially equal
        for tower in (full, cached):
            for name, param in tower.trainable_parameters().items():
                if name.endswith("lora_b"):
                    param.fill_(0.01)
    weights = torch.linspace(-1, 1, full.dim)
    for tower in (full, cached):
        (tower.embed(TEXTS) * weights).sum().backward()
    np.testing.assert_allclose(cached.encode(TEXTS).numpy(), full.encode(TEXTS).numpy(), atol=1e-5)
    full_params = full.trainable_parameters()
    for name, param in cached.trainable_parameters().items():
        assert param.grad is not None and full_params[name].grad is not None
        torch.testing.assert_close(param.grad, full_params[name].grad, atol=1e-5, rtol=1e-4)

    assert cached.cache is not None and len(cached.cache) == len(TEXTS)
    cached.embed(TEXTS[:2])
    assert len(cached.cache) == len(TEXTS)  # reused, not recomputed


def test_gradients_stay_finite_under_left_padding(decoder_dir: Path) -> None:
    # A left pad attends to nothing; if that produced NaN it would leak into the weight gradients.
    tower = DocumentTower(decoder_dir, DocumentSideConfig(mode="top_layers", trainable_layers=2))
    tower.embed(["头痛", TEXTS[0]]).sum().backward()
    grads = [p.grad for p in tower.trainable_parameters().values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_state_cache_round_trip_and_refusal(tiny_gemma: Path, tmp_path: Path) -> None:
    config = DocumentSideConfig(mode="top_layers", trainable_layers=1, cache_lower_states=True)
    tower = DocumentTower(tiny_gemma, config)
    expected = tower.encode(TEXTS)
    assert tower.cache is not None
    tower.cache.save(tmp_path / "states.safetensors")

    again = DocumentTower(tiny_gemma, config)
    assert again.cache is not None
    again.cache.load(tmp_path / "states.safetensors")
    assert len(again.cache) == len(TEXTS)
    np.testing.assert_allclose(again.encode(TEXTS).numpy(), expected.numpy(), atol=1e-6)

    # States from other weights, or entering another layer, are never mixed in.
    with pytest.raises(ValueError, match="entering layer 1"):
        LowerStateCache(0, source=tower.base_manifest.fingerprint).load(tmp_path / "states.safetensors")
    with pytest.raises(ValueError, match="not of 'other weights'"):
        LowerStateCache(1, source="other weights").load(tmp_path / "states.safetensors")


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (DocumentSideConfig(mode="top_layers"), "needs trainable_layers"),
        (DocumentSideConfig(cache_lower_states=True), "frozen layers below"),
        (DocumentSideConfig(mode="lora", cache_lower_states=True), "frozen layers below"),
    ],
)
def test_document_side_refuses_impossible_configs(
    tiny_gemma: Path, config: DocumentSideConfig, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        DocumentTower(tiny_gemma, config)


def test_document_side_must_be_a_decoder_stack(tiny_bert: Path) -> None:
    # A BERT has no decoder layer stack to cache below or put LoRA on; LLM embedders do (see
    # test_align_artifacts: EmbeddingGemma-shaped).
    with pytest.raises(ValueError, match="decoder-stack"):
        DocumentTower(tiny_bert, DocumentSideConfig())


def test_query_side_renders_the_care_template(tiny_bert: Path) -> None:
    tower = QueryTower(tiny_bert, QuerySideConfig(task="找答案"))
    assert tower.render(["头痛"]) == ["<instruct>找答案\n<query>头痛"]
    assert tower.render(["头痛"], ["other"]) == ["<instruct>other\n<query>头痛"]
    assert tower.config.prompt() == "<instruct>找答案\n<query>{text}"
    with pytest.raises(ValueError, match="must hold"):
        QuerySideConfig(template="<query>").prompt()


def test_query_side_pools_cls_then_projects_then_normalizes(tiny_bert: Path) -> None:
    tower = QueryTower(tiny_bert, QuerySideConfig(output_dim=48), seed=3).eval()
    assert tower.dim == 48 and tower.projection is not None
    vectors = tower.encode(TEXTS)
    for text, vector in zip(TEXTS, vectors, strict=True):
        ids = tower.tokenizer(tower.render([text]), truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            cls = tower.model(input_ids=ids["input_ids"]).last_hidden_state[0, 0]
            expected = nn.functional.normalize(tower.projection.weight @ cls, dim=0)
        torch.testing.assert_close(vector, expected, atol=1e-5, rtol=1e-5)
    single = torch.cat([tower.encode([t]) for t in TEXTS])
    torch.testing.assert_close(vectors, single, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_query_side_projection_only_when_dims_differ(tiny_bert: Path) -> None:
    assert QueryTower(tiny_bert, QuerySideConfig()).projection is None
    assert QueryTower(tiny_bert, QuerySideConfig(output_dim=32)).projection is None
    seeded = [QueryTower(tiny_bert, QuerySideConfig(output_dim=48), seed=s).projection for s in (1, 1, 2)]
    weights = [p.weight for p in seeded if p is not None]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_query_side_freezes_the_word_embeddings(tiny_bert: Path) -> None:
    frozen = QueryTower(tiny_bert, QuerySideConfig())
    assert "model.embeddings.word_embeddings.weight" not in frozen.trainable_parameters()
    assert "model.encoder.layer.0.attention.self.query.weight" in frozen.trainable_parameters()
    free = QueryTower(tiny_bert, QuerySideConfig(freeze_embeddings=False))
    assert "model.embeddings.word_embeddings.weight" in free.trainable_parameters()


def test_query_side_refuses_a_decoder(tiny_gemma: Path) -> None:
    with pytest.raises(ValueError, match="BERT-family"):
        QueryTower(tiny_gemma, QuerySideConfig())


def test_fit_projection_solves_ridge_least_squares(tiny_bert: Path) -> None:
    tower = QueryTower(tiny_bert, QuerySideConfig(output_dim=48))
    targets = torch.randn(len(TEXTS) * 10, 48, generator=torch.Generator().manual_seed(0))
    texts = [f"{t}{i}" for i in range(10) for t in TEXTS]
    fit_projection(tower, texts, targets, ridge=0.5)
    assert tower.projection is not None
    features = tower.encode(texts, pooled_only=True)
    weight = tower.projection.weight.detach()
    # Normal equations: the ridge objective's gradient vanishes at the fitted weight.
    gradient = (features @ weight.T - targets).T @ features + 0.5 * weight
    assert gradient.abs().max().item() < 1e-3 * targets.abs().max().item() * len(texts)


def test_probe_measures_each_mode(
    tiny_bert: Path,
    tiny_gemma: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from models.align import probe

    # The tiny decoder has 2 layers: the real probe's top-2/top-4 cached modes need more.
    cached = DocumentSideConfig(mode="top_layers", trainable_layers=1, cache_lower_states=True)
    monkeypatch.setitem(probe.DOCUMENT_MODES, "top1-cached", cached)
    rows = [{"_id": f"d{i}", "text": TEXTS[0] + str(i)} for i in range(8)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    args = ["--document", str(tiny_gemma), "--query", str(tiny_bert), "--corpus", str(corpus), "--queries"]
    modes = ["frozen", "top1-cached", "lora-all"]
    probe.main([*args, str(corpus), "--modes", *modes, "--tokens", "16", "--batch", "2", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    documents = [r for r in lines if r.get("side") == "document"]
    assert [r["mode"] for r in documents] == modes
    assert all(r["tokens"] == r["min_tokens"] == 16 and r["step_s"] > 0 for r in documents)
    assert documents[0]["trainable_params"] == 0 and documents[2]["trainable_params"] > 0
    assert "cache_fill_s_per_text" in documents[1] and "cache_fill_s_per_text" not in documents[2]
    assert [r["batch"] for r in lines if r.get("side") == "query"] == [2, 8]
