"""`medsearch bench`: service load, query-encoder latency, indexer throughput (or all three), document
encoding precision, and the store's capacity at growing collection sizes.

Each run prints its figures as markdown tables and writes JSON + markdown + PNG under bench/results.
Heavy imports (httpx, onnxruntime, torch, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Imported at load (the CLI loads this module only for `medsearch bench`): where the bench package is
# missing (the api image), loading fails and the CLI says so in one line.
from bench.capacity import STORAGES, CapacityBench
from bench.precision import PrecisionBench
from bench.query_latency import QueryEncoderBench
from bench.service_load import ServiceBench
from bench.throughput import IndexerBench
from medsearch.cli_support import fail
from models.manifest import ModelManifest, model_dir
from settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_CORPUS = "data/demo/corpus.jsonl"
DEFAULT_RESULTS = "bench/results"


class BenchSetupError(RuntimeError):
    """A prerequisite of a benchmark is missing; the message says how to provide it."""


def _note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from exc
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return numbers


def _built(settings: Settings, keep: Callable[[ModelManifest], bool]) -> list[Path]:
    """Directories in the models directory whose valid manifest ``keep`` accepts, by name."""
    from models.manifest import ManifestError, built_models

    root = settings.models_path
    if not root.is_dir():
        raise BenchSetupError(f"models directory {root} not found; build it with: medsearch models build")
    found = []
    for path, manifest in built_models(root):
        if isinstance(manifest, ManifestError):
            _note(f"skipping {path.name}: {manifest}")
        elif keep(manifest):
            found.append(path)
    return found


def _chosen(settings: Settings, names: list[str] | None, keep: Callable[[ModelManifest], bool]) -> list[Path]:
    return [model_dir(settings.models_path, n) for n in names] if names else _built(settings, keep)


# --- service ------------------------------------------------------------------------------------


def run_service(args: argparse.Namespace) -> ServiceBench:
    import httpx

    from bench.queries import QUESTIONS
    from bench.service_load import RawEncode, measure_service, require_loopback, run_fast, time_raw_encode
    from bench.spawn import spawned_service
    from models.loading import load_encoder
    from models.manifest import ManifestError, named_model_dir

    def raw_encode(served: str) -> RawEncode | None:
        """The served model as the service runs it (its threads), from this machine's models."""
        settings = Settings()
        try:
            model_dir = named_model_dir(settings.models_path, served)
        except ManifestError:
            return None
        if not model_dir.is_dir():
            return None
        _note(f"service: raw encode of {served} ({settings.query_threads} thread(s)), the service idle")
        encoder = load_encoder(model_dir, threads=settings.query_threads)
        latency = time_raw_encode(lambda text: encoder.encode([text], 1), QUESTIONS)
        return RawEncode(model=served, threads=settings.query_threads, latency=latency)

    def measure(url: str, pid: int | None, spawned: bool) -> ServiceBench:
        return run_fast(
            measure_service(
                url,
                QUESTIONS,
                args.concurrency,
                args.duration,
                top_k=args.top_k,
                timeout_s=args.timeout,
                warmup=args.warmup,
                pid=pid,
                spawned=spawned,
                on_level=lambda c: _note(f"service: concurrency {c} for {args.duration:g} s"),
                compare=(args.compare, args.compare_model, args.compare_prefix) if args.compare else None,
                raw_encoder=raw_encode,
            )
        )

    if args.spawn:
        if args.pid is not None:
            raise BenchSetupError("--pid names a running service; with --spawn the spawned one is measured")
        _note("service: starting `medsearch serve` on a free loopback port")
        with spawned_service(args.ready_timeout) as service:
            return measure(service.url, service.pid, spawned=True)
    url = require_loopback(args.url)
    try:
        ready = httpx.get(f"{url}/readyz", timeout=5.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        ready = False
    if not ready:
        raise BenchSetupError(
            f"no ready service at {url} (GET /readyz); start one with `medsearch serve` or pass --spawn"
        )
    return measure(url, args.pid, spawned=False)


# --- query encoders -----------------------------------------------------------------------------


def run_query_encoders(args: argparse.Namespace, settings: Settings) -> QueryEncoderBench:
    from bench.inputs import CountingEncoder
    from bench.queries import question_sources
    from bench.query_latency import EncoderLatency, QueryEncoderBench, Side, latency_ratios, time_encoder
    from evaluation.configs import encodes_own_queries
    from models.encoder import EncodeMode
    from models.loading import load_encoder
    from models.manifest import read_manifest

    queries = _chosen(settings, args.query_model, lambda m: m.role == "query")
    # The symmetric-LLM reference: decoder-only LLMs and LLM embedders with a query prompt of their own.
    llms = _chosen(settings, args.llm, encodes_own_queries)
    if not queries:
        raise BenchSetupError("no query encoder built; build one with: medsearch models build")
    if not llms:
        _note(
            "no LLM document encoder built: no LLM ratio "
            "(medsearch models build gemma-3-270m or embeddinggemma-300m)"
        )
    sources = question_sources(args.inputs)
    runs: list[tuple[Path, Side]] = [(p, "query") for p in queries] + [(p, "llm-as-query") for p in llms]
    results: list[EncoderLatency] = []
    for path, side in runs:
        # An LLM embedder encodes queries as it does in retrieval: with its own query prompt.
        mode: EncodeMode = (
            "query" if side == "llm-as-query" and read_manifest(path).query_prompt is not None else "document"
        )
        encoder = load_encoder(path, threads=settings.threads, device="cpu", mode=mode)
        if not isinstance(encoder, CountingEncoder):
            raise BenchSetupError(f"{path}: the encoder's runtime cannot count tokens")
        name, limit = encoder.manifest.name, encoder.manifest.max_tokens
        overhead = encoder.count_tokens([""])[0]  # prompt and special tokens
        lengths = [n for n in args.query_lengths if overhead < n <= limit]
        if len(lengths) < len(args.query_lengths):
            _note(
                f"{name}: lengths not above its {overhead} prompt tokens or over max_tokens {limit} skipped"
            )
        prompt = ", query prompt" if mode == "query" else ""
        _note(f"query: {name} ({side}{prompt}) at {lengths} tokens")
        results.append(time_encoder(encoder, side, lengths, sources, args.repeats, args.warmup_encodes))
        del encoder  # freed before the next model loads: two LLMs need not fit at once
    return QueryEncoderBench(
        repeats=args.repeats,
        warmup=args.warmup_encodes,
        inputs_per_length=args.inputs,
        threads=settings.threads,
        encoders=results,
        ratios=latency_ratios(results),
    )


# --- indexer ------------------------------------------------------------------------------------


def corpus_sources(corpus: Path, count: int, min_chars: int) -> list[str]:
    """``count`` texts built as the indexer builds document text, consecutive documents joined
    until each has at least ``min_chars`` characters."""
    from indexer.reader import Document, read_documents
    from models.documents import document_text

    texts = [document_text(d.title, d.text) for d in read_documents(corpus) if isinstance(d, Document)]
    if not texts:
        raise BenchSetupError(f"{corpus}: no documents")
    sources = []
    for i in range(count):
        parts: list[str] = []
        j = i
        while sum(len(p) for p in parts) < min_chars and j < i + len(texts):
            parts.append(texts[j % len(texts)])
            j += 1
        sources.append("\n".join(parts))
    return sources


def run_indexer(args: argparse.Namespace, settings: Settings) -> IndexerBench:
    from bench.throughput import FORMULA, IndexerBench, matmul_peak, time_indexing
    from models.hf_encoder import HFEncoder
    from models.loading import load_encoder

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise BenchSetupError(f"corpus {corpus} not found (pass --corpus FILE)")
    paths = _chosen(settings, args.document_model, lambda m: m.role == "document" and m.format == "hf")
    if not paths:
        raise BenchSetupError("no document encoder built; build one with: medsearch models build")
    _note(f"indexer: float32 matmul peak probe on {args.device} ({args.probe_seconds:g} s)")
    peak = matmul_peak(args.probe_seconds, args.probe_size, args.device)
    # Chinese runs at most a few characters per token in these tokenizers; cut_to_tokens checks.
    sources = corpus_sources(corpus, args.docs, min_chars=4 * max(args.doc_lengths))
    rows = []
    for path in paths:
        encoder = load_encoder(path, threads=settings.threads, device=args.device)
        if not isinstance(encoder, HFEncoder):
            raise BenchSetupError(f"{path}: the indexer benchmark runs transformers document encoders")
        lengths = [n for n in args.doc_lengths if n <= encoder.manifest.max_tokens]
        if len(lengths) < len(args.doc_lengths):
            _note(f"{encoder.manifest.name}: lengths over max_tokens {encoder.manifest.max_tokens} skipped")
        _note(f"indexer: {encoder.manifest.name}, {args.docs} documents at {lengths} tokens")
        rows += time_indexing(encoder, lengths, sources, args.batch_size, peak.peak_gflops)
        del encoder  # freed before the next model loads
    return IndexerBench(formula=FORMULA, peak=peak, rows=rows)


# --- precision -----------------------------------------------------------------------------------


def run_precision(args: argparse.Namespace, settings: Settings) -> PrecisionBench:
    import torch

    from bench.precision import Kind, PrecisionBench, compare_precisions
    from bench.throughput import PeakProbe, matmul_peak
    from indexer.reader import Document, read_documents
    from models.documents import document_text
    from models.hf_encoder import HFEncoder
    from models.manifest import read_manifest
    from models.precision import FAST_PATHS, fast_path_for, native_cpu_bf16
    from models.precision_gate import GATE_BATCH_SIZE, GATE_TEXTS, check

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise BenchSetupError(f"corpus {corpus} not found (pass --corpus FILE)")
    path = model_dir(settings.models_path, args.document_model or settings.document_model)
    manifest = read_manifest(path)
    if manifest.format != "hf":
        raise BenchSetupError(f"{path}: precision applies to transformers document encoders")
    texts = []
    for doc in read_documents(corpus):
        if isinstance(doc, Document):
            texts.append(document_text(doc.title, doc.text))
            if len(texts) == args.limit:
                break
    if not texts:
        raise BenchSetupError(f"{corpus}: no documents")
    encoder = HFEncoder(path, manifest, threads=settings.threads, device=args.device, precision="fp32")
    fast = fast_path_for(args.precision, encoder.device, native_cpu_bf16())
    if fast is None:
        raise BenchSetupError("--precision fp32 leaves nothing to compare; pass auto, bf16 or int8")
    kinds: tuple[Kind, ...] = ("fp32", fast)
    peaks: dict[str, PeakProbe] = {}
    for kind in kinds:
        _note(f"precision: {kind} matmul peak probe on {args.device} ({args.probe_seconds:g} s)")
        peaks[kind] = matmul_peak(args.probe_seconds, args.probe_size, args.device, kind)
    _note(f"precision: building the {fast} path of {manifest.name}")
    fast_model = FAST_PATHS[fast](encoder.model)
    reference = encoder.encode(GATE_TEXTS, batch_size=GATE_BATCH_SIZE)
    fp32_model, encoder.model = encoder.model, fast_model
    gate = check(fast, reference, encoder.encode(GATE_TEXTS, batch_size=GATE_BATCH_SIZE))
    encoder.model = fp32_model
    _note(f"precision: {gate.summary()}")
    _note(f"precision: {len(texts)} documents, {args.repeats} passes each, alternating")
    rows = compare_precisions(encoder, fast_model, fast, texts, args.batch_size, args.repeats, peaks)
    lengths = encoder.count_tokens(texts)
    return PrecisionBench(
        encoder=manifest.name,
        device=str(encoder.device),
        threads=torch.get_num_threads(),
        corpus=str(corpus),
        documents=len(texts),
        tokens=sum(lengths),
        max_tokens_seen=max(lengths),
        batch_size=args.batch_size,
        peaks=list(peaks.values()),
        rows=rows,
        gate=gate,
    )


# --- capacity -----------------------------------------------------------------------------------


def run_capacity(args: argparse.Namespace, settings: Settings) -> CapacityBench:
    from bench.capacity import default_setup, measure_capacity
    from bench.synthetic import fallback_model, fitted_model
    from evaluation.vectors import largest_cached

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise BenchSetupError(f"corpus {corpus} not found (pass --corpus FILE)")
    encoder = args.document_model or settings.document_model
    cached = largest_cached(settings.home / "cache", encoder)
    if cached is not None:
        source = f"Gaussian fitted to {len(cached.ids):,} cached {encoder} document vectors"
        model = fitted_model(cached.matrix, source)
    else:
        _note(
            f"capacity: no cached {encoder} document vectors under {settings.home / 'cache'} (medsearch eval "
            "fills it): the fallback distribution"
        )
        model = fallback_model(args.seed)
    threads = settings.search_threads if args.search_threads is None else args.search_threads
    setup = default_setup(model, corpus, args.seed, args.queries, args.ef, args.concurrency, threads or None)
    _note(f"capacity: {model.source}; sizes {args.sizes}, storage {args.storage}")
    return measure_capacity(
        args.sizes,
        args.storage,
        setup,
        model,
        corpus,
        Path(args.work_dir) if args.work_dir else settings.home / "bench-capacity",
        again=args.again,
        keep_collections=args.keep_collections,
        log=lambda message: _note(f"capacity: {message}"),
    )


# --- commands -----------------------------------------------------------------------------------


def _report(args: argparse.Namespace, sections: dict[str, Any]) -> int:
    from bench.machine import git_commit, machine_info
    from bench.report import BenchReport, markdown, now, write_report

    report = BenchReport(created=now(), commit=git_commit(), machine=machine_info(), **sections)
    print(markdown(report))
    try:
        files = write_report(report, Path(args.results_dir))
    except ModuleNotFoundError as exc:
        return fail(f"{exc}: JSON and markdown written, no PNG; install the extra: pip install -e '.[bench]'")
    written = [files.json, files.markdown, *([files.png] if files.png else [])]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_parts(args: argparse.Namespace, settings: Settings, parts: tuple[str, ...]) -> int:
    from httpx import HTTPError

    from bench.capacity import CapacityError
    from bench.inputs import InputLengthError
    from bench.service_load import NotLoopback
    from bench.spawn import SpawnError
    from models.manifest import ManifestError

    sections: dict[str, Any] = {}
    error = None
    try:
        # The service first: the encoders measured afterwards would otherwise share the CPU with it.
        if "service" in parts:
            sections["service"] = run_service(args)
        if "query" in parts:
            sections["query_encoders"] = run_query_encoders(args, settings)
        if "indexer" in parts:
            sections["indexer"] = run_indexer(args, settings)
        if "precision" in parts:
            sections["precision"] = run_precision(args, settings)
        if "capacity" in parts:
            sections["capacity"] = run_capacity(args, settings)
    except (
        BenchSetupError,
        NotLoopback,
        SpawnError,
        InputLengthError,
        ManifestError,
        HTTPError,
        CapacityError,
    ) as exc:
        error = str(exc)
    except ModuleNotFoundError as exc:
        error = f"{exc}. Install the indexing and benchmark extras: pip install -e '.[index,bench]'"
    # What was measured before a failure is still reported and written.
    status = _report(args, sections) if sections else 0
    return fail(error) if error is not None else status


def _service_options(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--url", default=DEFAULT_URL, help=f"running service (loopback only; default {DEFAULT_URL})"
    )
    target.add_argument(
        "--spawn", action="store_true", help="start `medsearch serve` for the run, stop it after"
    )
    p.add_argument("--pid", type=int, help="service pid for RSS (default: found by the URL's port)")
    p.add_argument(
        "--compare",
        metavar="URL",
        help="also load another embedding server's POST /embeddings (e.g. infinity-emb) with the same "
        "queries and levels, and report the throughput ratio (ours searches too, theirs only encodes)",
    )
    p.add_argument("--compare-model", default="multilingual-e5-small-onnx-int8", help="model name there")
    p.add_argument(
        "--compare-prefix", default="query: ", help="query prompt the other server does not add (e5's)"
    )
    p.add_argument(
        "--duration", type=_positive_float, default=10.0, help="seconds per concurrency level (default 10)"
    )
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="levels (default 1,8,32)")
    p.add_argument("--top-k", type=_positive_int, default=10)
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="per-request timeout in seconds")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests before the first level")
    p.add_argument(
        "--ready-timeout", type=_positive_float, default=120.0, help="seconds to wait for a spawned service"
    )


def _query_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--query-lengths", type=_int_list, default=[8, 16, 32, 64], help="tokens (default 8,16,32,64)"
    )
    p.add_argument("--repeats", type=_positive_int, default=50, help="timed encodes per length (default 50)")
    p.add_argument(
        "--query-warmup",
        dest="warmup_encodes",
        type=int,
        default=5,
        metavar="N",
        help="untimed encodes per length",
    )
    p.add_argument("--inputs", type=_positive_int, default=4, help="distinct inputs per length (default 4)")
    p.add_argument("--query-model", action="append", help="query encoder (repeatable; default: all built)")
    p.add_argument(
        "--llm",
        action="append",
        help="LLM document encoder run as query encoder, decoder-only or with a query prompt "
        "(repeatable; default: all built)",
    )


def _indexer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--doc-lengths", type=_int_list, default=[128, 256], help="tokens (default 128,256)")
    p.add_argument("--docs", type=_positive_int, default=32, help="documents per length (default 32)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--document-model", action="append", help="document encoder (repeatable; default: all)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"JSONL corpus (default {DEFAULT_CORPUS})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--probe-seconds", type=_positive_float, default=3.0, help="matmul peak probe length")
    p.add_argument("--probe-size", type=_positive_int, default=2048, help="matmul probe matrix size")


def _precision_options(p: argparse.ArgumentParser) -> None:
    from models.encoder import PRECISIONS

    p.add_argument("--limit", type=_positive_int, default=256, help="first N corpus documents (default 256)")
    p.add_argument(
        "--precision",
        choices=[c for c in PRECISIONS if c != "fp32"],
        default="auto",
        help="fast path compared with fp32 (auto: bf16 on CUDA or a CPU with native bf16, else int8)",
    )
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed passes per precision (default 3)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--document-model", help="document encoder (default: settings)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"JSONL corpus (default {DEFAULT_CORPUS})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--probe-seconds", type=_positive_float, default=3.0, help="matmul peak probe length")
    p.add_argument("--probe-size", type=_positive_int, default=2048, help="largest matmul probe size")


def _storage_list(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(names) - set(STORAGES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(STORAGES)}, got {value!r}")
    return names


def _capacity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        type=_int_list,
        default=[10_000, 100_000, 1_000_000],
        help="collection sizes in documents (default 10000,100000,1000000); each is measured on its own "
        "and kept in --work-dir, so a large size can run later and join the report",
    )
    p.add_argument(
        "--storage",
        type=_storage_list,
        default=list(STORAGES),
        help=f"vector storage (default {','.join(STORAGES)}): what index --quantization and "
        "--vectors-on-disk build",
    )
    p.add_argument("--ef", type=_int_list, default=[64, 128, 256], help="hnsw_ef values (default 64,128,256)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8], help="searches in flight (default 1,8)")
    p.add_argument(
        "--search-threads",
        type=int,
        help="the engine's search pool per shard (default MEDSEARCH_SEARCH_THREADS, as the service opens "
        "it; 0: the engine's default, one per CPU)",
    )
    p.add_argument("--queries", type=_positive_int, default=300, help="held-out queries (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help=f"JSONL corpus whose texts are cycled as payloads (default {DEFAULT_CORPUS})",
    )
    p.add_argument(
        "--document-model",
        help="encoder whose cached corpus vectors shape the synthetic ones "
        "(default: MEDSEARCH_DOCUMENT_MODEL)",
    )
    p.add_argument(
        "--work-dir", help="collections and per-size results (default MEDSEARCH_HOME/bench-capacity)"
    )
    p.add_argument("--again", action="store_true", help="measure again what the work dir already holds")
    p.add_argument(
        "--keep-collections",
        action="store_true",
        help="keep the built collections (default: deleted once measured)",
    )


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    """Fill `medsearch bench` (the CLI creates the parser: this module loads only when it runs)."""
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    commands = {
        "service": ("load test a running (or --spawn'ed) service", (_service_options,)),
        "query": ("query-encoder latency by length, with the LLM-as-query ratio", (_query_options,)),
        "indexer": ("document-encoder throughput and FLOP rate against a matmul peak", (_indexer_options,)),
        "precision": (
            "document encoding in fp32 against a fast path (bf16/int8): docs/s, cosine, %% of peak",
            (_precision_options,),
        ),
        "capacity": (
            "the embedded store at growing sizes: load, HNSW build, memory, disk, latency, recall",
            (_capacity_options,),
        ),
        "all": (
            "service, query and indexer benchmarks in one report",
            (_service_options, _query_options, _indexer_options),
        ),
    }
    for name, (help_text, option_sets) in commands.items():
        p = bsub.add_parser(name, help=help_text)
        for add_options in option_sets:
            add_options(p)
        p.add_argument("--results-dir", default=DEFAULT_RESULTS, help=f"default {DEFAULT_RESULTS}")
        parts = ("service", "query", "indexer") if name == "all" else (name,)
        p.set_defaults(func=lambda args, settings, parts=parts: run_parts(args, settings, parts))
