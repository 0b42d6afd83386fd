"""`medsearch models align`: run an alignment recipe from the command line.

Two kinds of recipe: ``frozen_document`` (models.align.frozen: a query encoder learns a frozen LLM
embedder's space; the default) and the two-stage pipeline that also trains a base LLM's document side
(models.align.pipeline). This layer wires in what the models package must not import: nDCG@10 from
``evaluation.metrics`` to score the held-out selection queries, BM25 from ``evaluation.lexical`` for
lexical negatives, the evaluation's document-vector cache (one corpus pass serves training and
evaluation), and the int8 quality gate on an evaluation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

# Imported at load (the CLI loads this module only for `medsearch models align`): where torch or the
# evaluation package is missing (the api image), loading fails and the CLI says so in one line.
from evaluation.metrics import ndcg_at_k
from medsearch.cli_support import fail
from models.align.pipeline import AlignRecipe, run_alignment
from settings import Settings

# The recipe of the served query encoder (issue 25).
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "models" / "recipes" / "embeddinggemma-300m-k4.json"
R = TypeVar("R")
DEFAULT_DELTAS = Path(__file__).resolve().parents[1] / "models" / "deltas"


def ndcg10(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, Sequence[str]]) -> float:
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


def corpus_vectors_from_cache(cache_root: Path, corpus_file: Path, threads: int) -> Any:
    """A ``CorpusVectors`` reading and filling the evaluation's cache for this corpus file."""
    from evaluation.beir import file_fingerprint
    from evaluation.vectors import cached_vectors
    from models.loading import load_encoder
    from models.manifest import read_manifest

    def vectors(model_dir: Path, ids: Sequence[str], texts: Sequence[str]) -> Any:
        result = cached_vectors(
            cache_root,
            read_manifest(model_dir),
            file_fingerprint(corpus_file),
            lambda: iter(zip(ids, texts, strict=True)),
            lambda: load_encoder(model_dir, threads=threads, device="cpu"),
        )
        if result.ids != list(ids):
            raise ValueError(f"{cache_root}: cached vectors of {corpus_file} are not in corpus order")
        return result.matrix

    return vectors


def int8_gate(dataset: Path, split: str, document_dir: Path, corpus: Any, threads: int) -> Any:
    """A ``QualityGate``: nDCG@10 of the fp32 and int8 query encoders on ``split`` (a check that
    refuses to publish, never a tuning signal)."""
    from evaluation.beir import iter_corpus, load_split
    from models.align.negatives import rank_dense
    from models.documents import document_text
    from models.loading import load_encoder

    def gate(fp32_dir: Path, int8_dir: Path) -> tuple[float, float]:
        evaluation = load_split(dataset, split)
        docs = list(iter_corpus(dataset / "corpus.jsonl"))
        doc_ids = [d.doc_id for d in docs]
        matrix = corpus(document_dir, doc_ids, [document_text(d.title, d.text) for d in docs])
        ids = list(evaluation.queries)
        texts = [evaluation.queries[q].text for q in ids]
        relevant = {q: [d for d, g in evaluation.qrels[q].items() if g > 0] for q in ids}
        scores = []
        for model_dir in (fp32_dir, int8_dir):
            vectors = load_encoder(model_dir, threads=threads).encode(texts)
            scores.append(ndcg10(rank_dense(ids, vectors, doc_ids, matrix, 100), relevant))
        _log(f"align: int8 gate on {split}: fp32 {scores[0]:.1f}, int8 {scores[1]:.1f} nDCG@10")
        return scores[0], scores[1]

    return gate


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _work_dir(args: argparse.Namespace, settings: Settings, name: str) -> Path:
    work_dir = Path(args.work_dir) if args.work_dir else settings.home / "align" / name
    _log(f"align: recipe {args.recipe} -> work dir {work_dir}, deltas in {args.deltas_dir}")
    return work_dir


class RecipeError(ValueError):
    """A recipe file that cannot be read or validated; the message names the file (and line or field)."""


def load_recipe(path: Path, dataset: str | None, parse: Callable[[dict[str, Any]], R]) -> R:
    """The recipe JSON at ``path`` (its dataset overridden when given), validated by ``parse``."""
    from pydantic import ValidationError

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if dataset:
            raw["dataset"] = dataset
        return parse(raw)
    except OSError as exc:
        raise RecipeError(f"{path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{path}: field {where!r}: {first['msg'].removeprefix('Value error, ')}") from exc


def cmd_models_align(args: argparse.Namespace, settings: Settings) -> int:
    from models.align.frozen import FrozenAlignRecipe
    from models.data_files import DatasetError
    from models.manifest import ManifestError
    from models.training_loop import CheckpointMismatchError

    def parse(raw: dict[str, Any]) -> FrozenAlignRecipe | AlignRecipe:
        if raw.get("kind") == "frozen_document":
            return FrozenAlignRecipe.model_validate(raw)
        return AlignRecipe.model_validate(raw)

    try:
        recipe = load_recipe(Path(args.recipe), args.dataset, parse)
    except RecipeError as exc:
        return fail(str(exc))
    if isinstance(recipe, FrozenAlignRecipe):
        return _run_frozen(recipe, args, settings)
    work_dir = _work_dir(args, settings, recipe.name)
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
    except (DatasetError, CheckpointMismatchError, ManifestError, OSError, ValueError) as exc:
        return fail(str(exc))
    print(f"document encoder {result.document.name} (space {result.document.space})")
    for manifest in (result.query, result.query_onnx, result.query_int8):
        print(f"query encoder {manifest.name} (space {manifest.space})")
    for phase in result.phases:
        figure = "-" if phase.selection_ndcg10 is None else f"{phase.selection_ndcg10:.1f}"
        print(f"{phase.phase:24s} steps {phase.steps:5d}  {phase.seconds:7.0f} s  selection nDCG@10 {figure}")
    return 0


def _run_frozen(recipe: Any, args: argparse.Namespace, settings: Settings) -> int:
    from models.align.frozen import QualityGateError, TeacherCacheError, run_frozen_alignment
    from models.data_files import DatasetError
    from models.manifest import ManifestError
    from models.training_loop import CheckpointMismatchError

    work_dir = _work_dir(args, settings, recipe.name)
    corpus = corpus_vectors_from_cache(
        settings.home / "cache", Path(recipe.dataset) / "corpus.jsonl", settings.threads
    )
    gate = (
        int8_gate(
            Path(recipe.dataset),
            args.gate_split,
            settings.models_path / recipe.document_model,
            corpus,
            settings.threads,
        )
        if args.gate_split
        else None
    )
    try:
        result = run_frozen_alignment(
            recipe,
            models_dir=settings.models_path,
            work_dir=work_dir,
            deltas_dir=Path(args.deltas_dir),
            scorer=ndcg10,
            corpus_vectors=corpus,
            gate=gate,
            log=_log,
            threads=settings.threads,
            cache_dir=settings.home / "cache" / "pypi",
            teacher_cache=settings.home / "cache" / "teacher-queries",
        )
    except (
        QualityGateError,
        TeacherCacheError,
        DatasetError,
        CheckpointMismatchError,
        ManifestError,
        OSError,
        ValueError,
    ) as exc:
        return fail(str(exc))
    for manifest in (result.query, result.query_onnx, result.query_int8):
        print(f"query encoder {manifest.name} (space {manifest.space})")
    print(json.dumps({k: result.report[k] for k in ("selection_ndcg10", "shipped_step", "seconds")}))
    if "gate" in result.report:
        print(f"int8 gate: {json.dumps(result.report['gate'])}")
    return 0


def add_align_arguments(align: argparse.ArgumentParser) -> None:
    """Fill `medsearch models align` (the CLI creates the parser: this module loads only when it runs)."""
    align.description = __doc__.splitlines()[0] if __doc__ else None
    align.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe JSON (default: the shipped one)")
    align.add_argument("--dataset", help="override the recipe's BEIR dataset directory")
    align.add_argument(
        "--work-dir", help="checkpoints, caches and report (default: MEDSEARCH_HOME/align/NAME)"
    )
    align.add_argument(
        "--deltas-dir", default=str(DEFAULT_DELTAS), help="where the trained deltas are written"
    )
    align.add_argument(
        "--gate-split",
        default="dev",
        help="evaluation split on which the int8 query encoder must stay within the recipe's "
        "int8_max_drop nDCG@10 of fp32 to be published ('' turns the gate off; frozen_document only)",
    )
    align.set_defaults(func=cmd_models_align)
