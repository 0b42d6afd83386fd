"""`medsearch models finetune-e5`: the fair small symmetric baseline (models.finetune) from the command line.

multilingual-e5-small fine-tuned on the same BEIR training qrels the aligned pair is trained on, one set
of weights for queries and documents, built as a document encoder in a new space plus its ONNX query
export. This layer wires in what the models package must not import: nDCG@10 from
``evaluation.metrics`` (via ``medsearch.align_cli.ndcg10``) to score the held-out selection queries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Imported at load (the CLI loads this module only for `medsearch models finetune-e5`): where torch or
# the evaluation package is missing (the api image), loading fails and the CLI says so in one line.
from medsearch.align_cli import ndcg10
from medsearch.cli_support import fail
from settings import Settings

# CLI option -> FinetuneConfig field; an option left out keeps the field's default.
OPTIONS: dict[str, str] = {
    "name": "name",
    "base": "base_model",
    "split": "split",
    "query_field": "query_field",
    "selection_queries": "selection_queries",
    "seed": "seed",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "warmup_steps": "warmup_steps",
    "temperature": "temperature",
    "query_max_tokens": "query_max_tokens",
    "document_max_tokens": "document_max_tokens",
    "encode_batch_size": "encode_batch_size",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_models_finetune(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from models.data_files import DatasetError
    from models.export import ExportParityError
    from models.finetune import FinetuneConfig, FinetuneError, finetune
    from models.manifest import ManifestError, ModelDirRefusedError

    overrides = {field: getattr(args, option) for option, field in OPTIONS.items()}
    try:
        config = FinetuneConfig(
            dataset=Path(args.dataset), **{k: v for k, v in overrides.items() if v is not None}
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "configuration"
        return fail(f"{where}: {first['msg']}")
    _log(
        f"finetune: {config.base_model} -> {config.name} on {config.dataset} ({config.split}), "
        f"{config.steps} steps of {config.batch_size}, models in {settings.models_path}"
    )
    try:
        result = finetune(
            config, models_dir=settings.models_path, scorer=ndcg10, log=_log, threads=settings.threads
        )
    except ModelDirRefusedError as exc:  # an output directory that is not this model's: never deleted
        return fail(str(exc))
    except ManifestError as exc:
        return fail(f"{exc}; build the base with: medsearch models build {config.base_model}")
    except (DatasetError, FinetuneError, ExportParityError, OSError, ValueError) as exc:
        return fail(str(exc))
    for phase in result.phases:
        figure = "-" if phase.selection_ndcg10 is None else f"{phase.selection_ndcg10:.1f}"
        loss = "" if phase.last_loss is None else f"  last loss {phase.last_loss:.4f}"
        print(
            f"{phase.phase:20s} steps {phase.steps:5d}  {phase.seconds:8.1f} s  "
            f"selection nDCG@10 {figure}{loss}"
        )
    print(f"document encoder {result.document.name} (space {result.document.space})")
    print(f"query encoder {result.query_onnx.name} (space {result.query_onnx.space})")
    print(f"report {result.report_path}")
    return 0


def add_finetune_arguments(ft: argparse.ArgumentParser) -> None:
    """Fill `medsearch models finetune-e5` (the CLI creates the parser: this module loads only when
    it runs)."""
    # Defaults live in models.finetune.FinetuneConfig; the help repeats them so that building the
    # parser does not import torch.
    ft.description = __doc__.splitlines()[0] if __doc__ else None
    ft.add_argument("dataset", metavar="DATASET_DIR", help="corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    ft.add_argument("--split", help="training qrels split (default train; dev/test are refused)")
    ft.add_argument("--name", help="built document encoder and its space (default multilingual-e5-small-ft)")
    ft.add_argument(
        "--base", help="built BERT-family document encoder to start from (default multilingual-e5-small)"
    )
    ft.add_argument("--query-field", help="query text: 'text' or 'metadata.KEY' (default text)")
    ft.add_argument(
        "--selection-queries", type=int, help="training queries held out for selection (default 300)"
    )
    ft.add_argument("--seed", type=int, help="default 0")
    ft.add_argument("--steps", type=int, help="default 300")
    ft.add_argument("--batch-size", type=int, help="queries per step (default 32)")
    ft.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5)")
    ft.add_argument("--warmup-steps", type=int, help="linear warm-up before the linear decay (default 30)")
    ft.add_argument("--temperature", type=float, help="InfoNCE temperature (default 0.02)")
    ft.add_argument("--query-max-tokens", type=int, help="training query truncation (default 64)")
    ft.add_argument("--document-max-tokens", type=int, help="training document truncation (default 256)")
    ft.add_argument("--encode-batch-size", type=int, help="batch for scoring encodes (default 32)")
    ft.set_defaults(func=cmd_models_finetune)
