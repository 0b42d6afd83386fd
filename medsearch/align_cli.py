"""`medsearch models align`: run an alignment recipe (models.align.pipeline) from the command line.

This layer wires in what the models package must not import: nDCG@10 from ``evaluation.metrics`` to
score the held-out selection queries, and BM25 from ``evaluation.lexical`` for lexical negatives.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsearch.cli_support import fail
from medsearch.settings import Settings

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "models" / "recipes" / "care-gemma-3-270m.json"
DEFAULT_DELTAS = Path(__file__).resolve().parents[1] / "models" / "deltas"


def ndcg10(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, Sequence[str]]) -> float:
    from evaluation.metrics import ndcg_at_k

    if not rankings:
        return 0.0
    total = sum(ndcg_at_k(list(ranked), dict.fromkeys(relevant[q], 1), 10) for q, ranked in rankings.items())
    return 100 * total / len(rankings)


def bm25_ranker(corpus: Mapping[str, str]) -> Any:
    from evaluation.lexical import BM25Index

    index = BM25Index(corpus.items())

    def rank(query: str, depth: int) -> list[str]:
        hits = index.search(query, depth)
        return sorted(hits, key=lambda d: -hits[d])

    return rank


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_models_align(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from models.align.data import AlignDataError
    from models.align.pipeline import AlignRecipe, run_alignment
    from models.align.train import CheckpointMismatchError
    from models.manifest import ManifestError

    recipe_path = Path(args.recipe)
    try:
        raw = json.loads(recipe_path.read_text(encoding="utf-8"))
        if args.dataset:
            raw["dataset"] = args.dataset
        recipe = AlignRecipe.model_validate(raw)
    except OSError as exc:
        return fail(f"{recipe_path}: {exc.strerror or exc}")
    except json.JSONDecodeError as exc:
        return fail(f"{recipe_path}:{exc.lineno}: invalid JSON: {exc.msg}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return fail(f"{recipe_path}: field {where!r}: {first['msg']}")
    work_dir = Path(args.work_dir) if args.work_dir else settings.home / "align" / recipe.name
    _log(f"align: recipe {recipe_path} -> work dir {work_dir}, deltas in {args.deltas_dir}")
    try:
        result = run_alignment(
            recipe,
            models_dir=settings.models_path,
            work_dir=work_dir,
            deltas_dir=Path(args.deltas_dir),
            scorer=ndcg10,
            lexical=bm25_ranker,
            log=_log,
            threads=settings.threads,
        )
    except (AlignDataError, CheckpointMismatchError, ManifestError, OSError, ValueError) as exc:
        return fail(str(exc))
    print(f"document encoder {result.document.name} (space {result.document.space})")
    for manifest in (result.query, result.query_onnx, result.query_int8):
        print(f"query encoder {manifest.name} (space {manifest.space})")
    for phase in result.phases:
        figure = "-" if phase.selection_ndcg10 is None else f"{phase.selection_ndcg10:.1f}"
        print(f"{phase.phase:24s} steps {phase.steps:5d}  {phase.seconds:7.0f} s  selection nDCG@10 {figure}")
    return 0


def add_align_parser(models_sub: Any) -> None:
    align = models_sub.add_parser(
        "align",
        help="train a query encoder and an LLM document encoder into one space (CARE's two stages)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    align.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe JSON (default: the shipped one)")
    align.add_argument("--dataset", help="override the recipe's BEIR dataset directory")
    align.add_argument(
        "--work-dir", help="checkpoints, caches and report (default: MEDSEARCH_HOME/align/NAME)"
    )
    align.add_argument(
        "--deltas-dir", default=str(DEFAULT_DELTAS), help="where the trained deltas are written"
    )
    align.set_defaults(func=cmd_models_align)
