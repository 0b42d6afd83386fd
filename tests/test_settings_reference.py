"""docs/configuration.md is generated from Settings: it must say what the code does."""

from __future__ import annotations

from settings import Settings
from settings.reference import DOC, reference_markdown


def test_every_setting_says_what_it_does() -> None:
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undocumented == []


def test_configuration_reference_matches_the_settings_class() -> None:
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: python -m settings.reference > docs/configuration.md"
    )
    for name in Settings.model_fields:
        assert f"`MEDSEARCH_{name.upper()}`" in reference_markdown()
