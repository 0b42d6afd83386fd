"""`medsearch eval`: retrieval quality of the configured encoder pair on a BEIR dataset directory."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

from medsearch.cli_support import fail, model_dir
from medsearch.settings import Settings


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from evaluation.beir import file_fingerprint, load_split
    from evaluation.retrieval import evaluate_pair
    from models.encoder import load_encoder
    from models.manifest import ManifestError

    root = Path(args.dataset)
    try:
        split = load_split(root, args.split)
        query = load_encoder(model_dir(settings, args.query_model or settings.query_model), settings.threads)
        document = load_encoder(
            model_dir(settings, args.document_model or settings.document_model), settings.threads
        )
    except (OSError, ValueError, ManifestError) as exc:
        return fail(str(exc))
    from indexer.reader import count_lines

    with tqdm(total=count_lines(split.corpus_path), unit="doc", desc="encoding corpus") as bar:
        metrics = evaluate_pair(split, query, document, on_progress=lambda done, _i: bar.update(done - bar.n))
    result = {
        "default": {
            **metrics,
            "query_encoder": query.manifest.name,
            "query_fingerprint": query.manifest.fingerprint,
            "document_encoder": document.manifest.name,
            "document_fingerprint": document.manifest.fingerprint,
        },
        "dataset": {
            "path": str(root),
            "split": args.split,
            "corpus_sha256": file_fingerprint(split.corpus_path),
        },
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
    print(
        "| configuration | nDCG@10 | R@10 | R@100 | MRR@10 | MAP@10 | queries |\n"
        "|---|---|---|---|---|---|---|"
    )
    m = metrics
    print(
        f"| default ({query.manifest.name} -> {document.manifest.name}) | {m['ndcg@10']:.1f} | "
        f"{m['recall@10']:.1f} | {m['recall@100']:.1f} | {m['mrr@10']:.1f} | {m['map@10']:.1f} | "
        f"{int(m['queries'])} |"
    )
    if args.output:
        Path(args.output).write_text(
            json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"wrote {args.output}")
    return 0


def add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="retrieval quality on a BEIR dataset directory")
    ev.add_argument("dataset", metavar="DATASET_DIR")
    ev.add_argument("--split", default="dev")
    ev.add_argument("--output", metavar="FILE")
    ev.add_argument("--query-model")
    ev.add_argument("--document-model")
    ev.set_defaults(func=cmd_eval)
