"""The stage settings of the shipped alignment recipes (models/recipes), for tests on tiny models:
a test trains with what a recipe ships, overriding only the sizes a tiny run needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

RECIPES = Path(__file__).resolve().parents[1] / "models" / "recipes"
GEMMA = "care-gemma-3-270m"
EMBEDDINGGEMMA = "care-embeddinggemma-300m"
C = TypeVar("C", bound=BaseModel)


def shipped_stage(config: type[C], recipe: str, key: str, **tiny: object) -> C:
    """The config of stage ``key`` in the shipped ``recipe``, with ``tiny`` overrides, validated."""
    raw = json.loads((RECIPES / f"{recipe}.json").read_text(encoding="utf-8"))[key]
    return config.model_validate({**raw, **tiny})
