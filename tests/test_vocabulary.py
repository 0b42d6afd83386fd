"""Trimming a tokenizer to the tokens a query tower keeps (models.vocabulary.trim_tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from models.vocabulary import trim_tokenizer

CORPUS = [
    "头痛怎么办，吃什么药好",
    "孩子发烧三天了怎么办",
    "高血压患者能喝咖啡吗",
    "糖尿病的饮食注意什么",
    "失眠多梦是什么原因",
    "胃痛恶心想吐怎么回事",
    "headache and fever treatment",
] * 20


def _gemma_like_bpe(path: Path) -> Tokenizer:
    """A BPE with byte fallback and a space marker, trained on a few texts (Gemma's tokenizer shape)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *bytes_]
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(path))
    return tokenizer


def test_a_trimmed_bpe_keeps_the_ids_of_texts_inside_the_kept_tokens(tmp_path: Path) -> None:
    full = _gemma_like_bpe(tmp_path / "full.json")
    vocab = full.get_vocab()
    inside = ["头痛怎么办", "孩子发烧怎么办", "失眠多梦"]
    keep = {i for text in inside for i in full.encode(text).ids}
    keep |= {i for token, i in vocab.items() if len(token) == 1 or token.startswith("<")}
    size = trim_tokenizer(tmp_path / "full.json", tmp_path / "trimmed.json", keep)
    trimmed = Tokenizer.from_file(str(tmp_path / "trimmed.json"))
    assert size == trimmed.get_vocab_size(with_added_tokens=False) < full.get_vocab_size()
    spec = json.loads((tmp_path / "trimmed.json").read_text(encoding="utf-8"))
    assert (
        0
        < len(spec["model"]["merges"])
        < len(json.loads((tmp_path / "full.json").read_text())["model"]["merges"])
    )
    for text in inside:
        assert trimmed.encode(text).ids == full.encode(text).ids
    # Every kept token keeps its id (the graph's row remap is keyed by them).
    assert all(trimmed.token_to_id(token) == i for token, i in vocab.items() if i in keep)
    # A text with tokens outside the kept set splits into kept pieces (characters or bytes).
    outside = "高血压患者能喝咖啡吗 treatment"
    assert full.encode(outside).ids != trimmed.encode(outside).ids
    assert all(trimmed.id_to_token(i) is not None for i in trimmed.encode(outside).ids)
    assert trimmed.decode(trimmed.encode(outside).ids) == outside


def test_a_word_level_vocabulary_drops_to_the_unknown_token(tmp_path: Path) -> None:
    words = Tokenizer(models.WordLevel({"<unk>": 0, "头": 1, "痛": 2, "发": 3, "烧": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    words.save(str(tmp_path / "full.json"))
    assert trim_tokenizer(tmp_path / "full.json", tmp_path / "trimmed.json", [1, 2]) == 3  # + <unk>
    trimmed = Tokenizer.from_file(str(tmp_path / "trimmed.json"))
    assert trimmed.encode("头痛发烧").ids == [1, 2, 0, 0]


def test_other_tokenizer_models_are_refused(tmp_path: Path) -> None:
    pieces = Tokenizer(models.WordPiece({"[UNK]": 0, "头": 1}, unk_token="[UNK]"))
    pieces.save(str(tmp_path / "wordpiece.json"))
    with pytest.raises(ValueError, match="cannot trim a WordPiece tokenizer"):
        trim_tokenizer(tmp_path / "wordpiece.json", tmp_path / "out.json", [0, 1])
