"""`medsearch eval`: compare every configuration the built encoders allow on a BEIR dataset directory.

In-process (default): a temporary embedded collection per document encoder, searched through the
store code. Black-box (``--url``): the same retrieval metrics from a running service's POST /search.
Prints a markdown table on stdout; ``--output`` writes every figure as JSON (see evaluation.results).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

# Imported at load (the CLI loads this module only for `medsearch eval`): where the evaluation package
# is missing (the api image), loading fails and the CLI says so in one line.
from evaluation.beir import BeirSplit
from evaluation.blackbox import ServedPair
from evaluation.metrics import Run
from medsearch.cli_support import fail
from models.manifest import model_dir
from settings import Settings

if TYPE_CHECKING:
    # Only for annotations: the runner imports the store client, which `medsearch eval --help`
    # should not pay for.
    from evaluation.runner import Task

TASK_CHOICES = ("retrieval", "rerank", "sts")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tqdm_progress(label: str, total: int) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="doc", desc=label, file=sys.stderr)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _dataset_info(args: argparse.Namespace, split: BeirSplit, documents: int) -> dict[str, Any]:
    from evaluation.beir import dataset_fingerprint

    fp = dataset_fingerprint(split)
    return {
        "path": str(Path(args.dataset).resolve()),
        "split": args.split,
        "fingerprint": fp.combined,
        "corpus_sha256": fp.corpus,
        "queries_sha256": fp.queries,
        "qrels_sha256": fp.qrels,
        "documents": documents,
        "queries": len(split.queries),
        "max_queries": args.max_queries,
        "query_field": args.query_field,
    }


def _references(args: argparse.Namespace, dataset: dict[str, Any]) -> list[Any]:
    """Reference baselines of exactly these files and split (none for a subset of the queries)."""
    from evaluation.references import references_for

    if args.max_queries is not None:
        return []
    return references_for(dataset["fingerprint"], dataset["split"])


def _write(args: argparse.Namespace, table: str, document: dict[str, Any]) -> None:
    print(table)
    if args.output:
        Path(args.output).write_text(
            json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _log(f"wrote {args.output}")


def _tasks(args: argparse.Namespace) -> frozenset[Task]:
    tasks = {cast("Task", t) for t in args.task or TASK_CHOICES}
    if not args.sts:
        tasks.discard("sts")
    return frozenset(tasks)


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from evaluation.beir import DatasetError, load_split

    started = time.perf_counter()
    root = Path(args.dataset)
    try:
        split = load_split(root, args.split, query_field=args.query_field, max_queries=args.max_queries)
    except (OSError, DatasetError) as exc:
        return fail(str(exc))
    if not split.queries:
        return fail(f"no query of {root / 'queries.jsonl'} has qrels in split {args.split!r}")
    if args.mode != "dense" and not args.url:
        return fail("--mode applies to a running service (--url); in process, hybrid is --config hybrid-rrf")
    if args.url:
        return _eval_service(args, settings, split, started)
    return _eval_in_process(args, settings, split, started)


def _eval_in_process(args: argparse.Namespace, settings: Settings, split: BeirSplit, started: float) -> int:
    from evaluation.beir import DatasetError
    from evaluation.configs import ConfigError, discover, find_default, lineage_warnings, scan_models, select
    from evaluation.rerank import candidate_source
    from evaluation.results import document, markdown_table
    from evaluation.runner import InProcessEvaluation, Options
    from evaluation.sts import load_sts
    from indexer.reader import count_lines
    from models.loading import load_encoder
    from models.manifest import ManifestError
    from store.spec import VectorStorage

    tasks = _tasks(args)
    try:
        models, warnings = scan_models(settings.models_path)
        warnings += lineage_warnings(models)
        configs = discover(models)
        default = find_default(
            configs,
            model_dir(settings.models_path, args.query_model or settings.query_model),
            model_dir(settings.models_path, args.document_model or settings.document_model),
        )
        if default is None:
            warnings.append(
                "the configured query and document models are not both built in one space: no default"
            )
        for warning in warnings:
            _log(f"warning: {warning}")
        if args.list_configs:
            for config in configs:
                marker = "  (default)" if default is not None and config.name == default.name else ""
                print(f"{config.name}{marker}")
            return 0
        chosen = select(configs, args.config or [], default)
        sts_sets = tuple(load_sts(Path(p)) for p in args.sts or ()) if "sts" in tasks else ()
    except (ConfigError, OSError, ValueError) as exc:
        return fail(str(exc))
    _log(f"configurations: {', '.join(c.name for c in chosen)}")
    # The cache holds float32 vectors, keyed by the model alone: a fast path neither reads nor fills it.
    cache_root = None if args.no_cache else Path(args.cache_dir or settings.home / "cache")
    if cache_root is not None and args.precision != "fp32":
        _log(f"precision {args.precision}: document vectors are encoded, not cached")
        cache_root = None
    evaluation = InProcessEvaluation(
        split=split,
        configs=chosen,
        default=default,
        load=lambda path, mode: load_encoder(
            path, threads=settings.threads, device=args.device, mode=mode, precision=args.precision
        ),
        cache_root=cache_root,
        options=Options(
            tasks=tasks,
            sts=sts_sets,
            batch_size=args.batch_size,
            rerank_negatives=args.rerank_negatives,
            storage=VectorStorage(quantization=args.quantization, on_disk=args.vectors_on_disk),
        ),
        progress=_tqdm_progress,
        log=_log,
    )
    try:
        results = evaluation.run()
    except (DatasetError, ManifestError, OSError) as exc:
        return fail(str(exc))
    default_name = default.name if default is not None else None
    run_info: dict[str, Any] = {
        "mode": "in-process",
        "tasks": sorted(tasks),
        "top_k": evaluation.options.top_k,
        "storage": evaluation.options.storage.model_dump(),
        "configurations": [c.name for c in chosen],
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "warnings": warnings,
    }
    if "rerank" in tasks:
        run_info["reranking"] = {
            "candidates": candidate_source(split),
            "negatives": args.rerank_negatives,
        }
    if sts_sets:
        from evaluation.beir import file_fingerprint

        run_info["sts"] = [
            {
                "name": s.name,
                "path": str(s.path),
                "sha256": file_fingerprint(s.path),
                "pairs": len(s.pairs),
                "layout": s.layout,
            }
            for s in sts_sets
        ]
    run_info["seconds"] = round(time.perf_counter() - started, 1)
    dataset = _dataset_info(args, split, count_lines(split.corpus_path))
    refs = _references(args, dataset)
    _write(
        args,
        markdown_table(results, default_name, refs),
        document(results, default_name, dataset, run_info, refs),
    )
    return 0


def _eval_service(args: argparse.Namespace, settings: Settings, split: BeirSplit, started: float) -> int:
    import httpx

    from evaluation.beir import DatasetError, iter_corpus
    from evaluation.blackbox import ServiceError, fetch_pair, search_run
    from evaluation.metrics import score_run
    from evaluation.results import ConfigResult, document, markdown_table

    if args.sts or (args.task and set(args.task) != {"retrieval"}):
        return fail("--url measures retrieval only: reranking and STS need the encoders (run without --url)")
    if args.config:
        return fail("--url evaluates the pair the service serves; --config does not apply")
    if args.quantization or args.vectors_on_disk:
        return fail(
            "--url searches the collection as it was indexed; --quantization and --vectors-on-disk "
            "apply in process"
        )
    try:
        corpus_ids = {doc.doc_id for doc in iter_corpus(split.corpus_path)}
    except (OSError, DatasetError) as exc:
        return fail(str(exc))

    async def evaluate() -> tuple[ServedPair, Run, float]:
        async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as client:
            pair = await fetch_pair(client, len(corpus_ids))
            began = time.perf_counter()
            run = await search_run(
                client, split.query_texts(), corpus_ids, concurrency=args.concurrency, mode=args.mode
            )
            return pair, run, time.perf_counter() - began

    try:
        pair, run, seconds = asyncio.run(evaluate())
    except (ServiceError, httpx.HTTPError) as exc:
        return fail(f"{args.url}: {exc}")
    result = ConfigResult(
        configuration=pair.name if args.mode == "dense" else f"hybrid-rrf:{pair.name}",
        kind=pair.kind if args.mode == "dense" else "hybrid-rrf",
        query_encoder=pair.query_encoder,
        query_fingerprint=pair.query_fingerprint,
        document_encoder=pair.document_encoder,
        document_fingerprint=pair.document_fingerprint,
        space=pair.space,
        retrieval=score_run(run, split.qrels),
        seconds=seconds,
    )
    served_by_default = pair.query_encoder == (
        args.query_model or settings.query_model
    ) and pair.document_encoder == (args.document_model or settings.document_model)
    default_name = pair.name if served_by_default else None
    run_info = {
        "mode": "service",
        "url": args.url,
        "search_mode": args.mode,
        "collection": pair.collection,
        "tasks": ["retrieval"],
        "top_k": 100,
        "configurations": [result.configuration],
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    dataset = _dataset_info(args, split, len(corpus_ids))
    refs = _references(args, dataset)
    _write(
        args,
        markdown_table([result], default_name, refs),
        document([result], default_name, dataset, run_info, refs),
    )
    return 0


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    """Fill `medsearch eval` (the CLI creates the parser: this module loads only when it runs)."""
    from models.encoder import PRECISIONS

    ev.description = __doc__.splitlines()[0] if __doc__ else None
    ev.add_argument("dataset", metavar="DATASET_DIR", help="corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    ev.add_argument("--split", default="dev", help="qrels split (default dev; never tune on it)")
    ev.add_argument("--output", metavar="FILE", help="write every figure as JSON")
    ev.add_argument(
        "--config",
        action="append",
        metavar="NAME",
        help="configuration name, kind (asymmetric, symmetric-bert, symmetric-llm, bm25, hybrid-rrf) or "
        "'default'; repeatable (default: all; see --list-configs)",
    )
    ev.add_argument("--list-configs", action="store_true", help="list the configurations and exit")
    ev.add_argument(
        "--max-queries", type=_positive_int, metavar="N", help="first N queries of the split (smoke runs)"
    )
    ev.add_argument("--task", action="append", choices=TASK_CHOICES, help="repeatable (default: all)")
    ev.add_argument("--sts", action="append", metavar="FILE", help="STS pairs (JSONL); repeatable")
    ev.add_argument(
        "--query-field", default="text", help="query text: 'text' or 'metadata.KEY' (default text)"
    )
    ev.add_argument(
        "--rerank-negatives", type=_positive_int, default=20, help="BM25-mined negatives per query"
    )
    ev.add_argument("--batch-size", type=_positive_int, default=16, help="document encoder batch size")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="transformers encoders: fp32 (default, cached) or a fast path used if it passes the "
        "quality gate (auto, bf16, int8; never cached)",
    )
    ev.add_argument(
        "--quantization",
        choices=["int8"],
        help="search a collection with Qdrant int8 quantization (rescored), as `index --quantization int8` "
        "builds it: its quality beside a run without (in process only)",
    )
    ev.add_argument(
        "--vectors-on-disk",
        action="store_true",
        help="the collection's original vectors on disk (in process)",
    )
    ev.add_argument("--cache-dir", help="document vector cache (default: MEDSEARCH_HOME/cache)")
    ev.add_argument("--no-cache", action="store_true", help="encode documents without the cache")
    ev.add_argument("--query-model", help="query encoder of the default pair (default: settings)")
    ev.add_argument("--document-model", help="document encoder of the default pair (default: settings)")
    ev.add_argument("--url", help="evaluate a running service (black-box), e.g. http://127.0.0.1:8000")
    ev.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight with --url")
    ev.add_argument(
        "--mode", choices=["dense", "hybrid"], default="dense", help="search mode with --url (hybrid: + BM25)"
    )
    ev.add_argument("--timeout", type=float, default=30.0, help="seconds per request with --url")
    ev.set_defaults(func=cmd_eval)
