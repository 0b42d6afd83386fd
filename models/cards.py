"""Model cards: the committed record of how an encoder pair was trained and what it measured.

A card is a markdown page for people and a JSON file for the product; the JSON's figures are copied
into the built encoders' manifests, so `/info` and `medsearch models list` report the quality of what is
actually served without reading the repository at run time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from models.manifest import ModelManifest, read_manifest, write_manifest

CARDS_DIR = Path(__file__).resolve().parent / "cards"


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    card: str = Field(description="The markdown card, as a repository path.")
    figures: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Built encoder name -> figure label -> value."
    )


def load_card(name: str, cards_dir: Path = CARDS_DIR) -> ModelCard:
    path = cards_dir / f"{name}.json"
    try:
        return ModelCard.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: invalid model card: {exc}") from exc


def apply_card(model_dir: Path, card: ModelCard) -> ModelManifest:
    """Record the card and this encoder's figures in its manifest (rewritten only when they differ)."""
    manifest = read_manifest(model_dir)
    update = {"card": card.card, "figures": card.figures.get(manifest.name, {})}
    if manifest.card == update["card"] and manifest.figures == update["figures"]:
        return manifest
    return write_manifest(model_dir, manifest.model_copy(update=update))
