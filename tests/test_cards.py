"""Model cards: committed figures reach the built manifests (and so /info) without retraining."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.cards import CARDS_DIR, ModelCard, apply_card, load_card
from models.manifest import ModelManifest, read_manifest, verify_manifest, write_manifest
from models.registry import ALIGNED, RECIPES


def _built(tmp_path: Path, name: str = "enc") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"\x00" * 64)
    write_manifest(
        model_dir,
        ModelManifest(
            name=name,
            role="query",
            format="onnx",
            architecture="X",
            pooling="mean",
            max_tokens=8,
            dim=4,
            space="s",
        ),
    )
    return model_dir


def test_apply_card_records_this_encoders_figures_and_keeps_the_weights_fingerprint(tmp_path: Path) -> None:
    model_dir = _built(tmp_path)
    before = read_manifest(model_dir)
    card = ModelCard(card="models/cards/c.md", figures={"enc": {"nDCG@10": 27.5}, "other": {"nDCG@10": 1.0}})
    after = apply_card(model_dir, card)
    assert after.figures == {"nDCG@10": 27.5} and after.card == "models/cards/c.md"
    assert after.fingerprint == before.fingerprint
    assert verify_manifest(model_dir) == after
    # Unchanged card: the manifest file is not rewritten.
    stamp = (model_dir / "manifest.json").stat().st_mtime_ns
    apply_card(model_dir, card)
    assert (model_dir / "manifest.json").stat().st_mtime_ns == stamp


def test_an_encoder_the_card_does_not_list_gets_no_figures(tmp_path: Path) -> None:
    model_dir = _built(tmp_path, "unlisted")
    assert apply_card(model_dir, ModelCard(card="c.md", figures={"enc": {"x": 1.0}})).figures == {}


def test_invalid_card_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"card": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: invalid model card"):
        load_card("bad", tmp_path)


def test_committed_card_covers_every_aligned_encoder() -> None:
    card = load_card(ALIGNED)
    assert (CARDS_DIR.parent.parent / card.card).is_file()
    aligned = {name for name, recipe in RECIPES.items() if recipe.card == ALIGNED}
    assert aligned == set(card.figures)
    assert all(card.figures[name] for name in aligned)
