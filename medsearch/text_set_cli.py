"""`medsearch models text-set`: build (or reuse) a recipe's distillation text set and print its report.

The same build `medsearch models align` runs first, into the same place, so the texts can be inspected
(counts per source, samples) before hours of teacher encoding and training are spent on them. The
training queries held out for selection (``split_selection`` over the recipe's count and seed, or
``--exclude-selection``/``--seed``) are left out, exactly as the alignment run holds them out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medsearch.align_cli import RecipeError, load_recipe
from medsearch.cli_support import fail
from settings import Settings

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "models" / "recipes" / "embeddinggemma-300m-k4.json"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_models_text_set(args: argparse.Namespace, settings: Settings) -> int:
    from models.align.data import load_beir_train
    from models.align.frozen import TEXT_SET_DIR, FrozenAlignRecipe
    from models.align.selection import split_selection
    from models.align.text_set import TEXTS_FILE, build_text_set
    from models.data_files import DatasetError

    if args.exclude_selection is not None and args.exclude_selection < 0:
        return fail(f"--exclude-selection {args.exclude_selection}: must be 0 or more")
    recipe_path = Path(args.recipe)
    try:
        recipe = load_recipe(recipe_path, args.dataset, FrozenAlignRecipe.model_validate)
    except RecipeError as exc:
        return fail(str(exc))
    if recipe.text_set is None:
        return fail(f"{recipe_path}: the recipe has no text_set")
    out = Path(args.out) if args.out else settings.home / "align" / recipe.name / TEXT_SET_DIR
    try:
        data = load_beir_train(recipe.dataset, recipe.split, query_field=recipe.query_field)
        count = recipe.selection_queries if args.exclude_selection is None else args.exclude_selection
        seed = recipe.seed if args.seed is None else args.seed
        _train, selection = split_selection(data, count, seed)
        report = build_text_set(
            recipe.text_set,
            recipe.dataset,
            out,
            exclude_ids=set(selection),
            cache_dir=settings.home / "cache" / "pypi",
            log=_log,
        )
    except (DatasetError, OSError, ValueError) as exc:
        return fail(str(exc))
    print(json.dumps({"texts": str(out / TEXTS_FILE), **report.__dict__}, indent=2, ensure_ascii=False))
    return 0


def add_text_set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    parser.add_argument(
        "--recipe", default=str(DEFAULT_RECIPE), help="frozen_document recipe with a text_set"
    )
    parser.add_argument("--dataset", help="override the recipe's BEIR dataset directory")
    parser.add_argument("--out", help="output directory (default: MEDSEARCH_HOME/align/NAME/text-set)")
    parser.add_argument(
        "--exclude-selection",
        type=int,
        metavar="N",
        help="training queries held out for selection, never drawn (default: the recipe's, 300)",
    )
    parser.add_argument("--seed", type=int, help="seed of the selection split (default: the recipe's, 0)")
    parser.set_defaults(func=cmd_models_text_set)
