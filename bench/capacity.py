"""`medsearch bench capacity`: the embedded store at 10k, 100k and 1M documents of EmbeddingGemma's shape.

For each size and each vector storage (float32 in RAM, int8 quantization, int8 with the originals on
disk) it measures, through the store code the service and the indexer use (store/edge.py):

- loading: documents/s of upserts of synthetic 768-d vectors (bench/synthetic.py) with payloads of
  real document size (corpus texts cycled), then the time ``optimize`` takes to build the HNSW graph
  and the quantized copy; the data directory's size on disk;
- serving, after the collection's files are evicted from the page cache (a cold start): the time to
  open it, the process' resident memory (anonymous: heap, graph, pinned int8 copy; file: mapped
  vectors and payload pages touched), and for each hnsw_ef the latency (p50, p99) and rate of
  top-10 searches with payloads at each concurrency (threads, as the service runs searches), with
  recall@10 against the exact neighbours.

Each build and each serving phase runs in a child process of its own, so memory figures start from
an interpreter with nothing else loaded and never accumulate across sizes. Results are written per
(size, storage) under the work directory as they complete: a rerun skips what was measured with the
same setup, so a 1M run can be done on its own and joins the report of the smaller ones.

Run as ``python -m bench.capacity JOB.json`` it is that child process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from bench.machine import cpu_model, process_status_kib
from bench.stats import LatencySummary, summarize
from bench.synthetic import QUERY_NOISE, TOP_K, Truth, VectorModel, documents, exact_truth, recall_at_k
from store.spec import CollectionSpec, VectorStorage

STORAGES: dict[str, VectorStorage] = {
    "float32": VectorStorage(),
    "int8": VectorStorage(quantization="int8"),
    "int8-on-disk": VectorStorage(quantization="int8", on_disk=True),
}
COLLECTION = "capacity"
UPSERT_BATCH = 256
WARMUP_SEARCHES = 20
MODEL_FILE = "vectors.npz"
MIB = 1024 * 1024


class CapacityError(RuntimeError):
    """A child process failed; the message names the phase and its exit status."""


class Setup(BaseModel):
    """What makes two runs comparable: a run measured with another setup is measured again."""

    vectors: str = Field(description="Where the vectors' distribution comes from")
    vectors_fingerprint: str
    dim: int
    seed: int
    queries: int
    query_noise: float
    ef: list[int]
    concurrency: list[int]
    corpus: str
    corpus_sha256: str
    payload_text_bytes: float = Field(description="Mean UTF-8 bytes of a document's title and text")
    search_threads: int | None = Field(
        default=None, description="The engine's search pool per shard; None: its default, one per CPU"
    )


class Memory(BaseModel):
    """/proc/self/status of the child, in MiB (None off Linux)."""

    rss_mib: float | None = None
    anon_mib: float | None = None
    file_mib: float | None = None
    peak_mib: float | None = None


class BuildFigures(BaseModel):
    load_s: float
    documents_per_s: float
    index_s: float = Field(description="optimize(): HNSW graph (and the quantized copy) built")
    segments: int
    disk_mib: float
    baseline: Memory = Field(description="The child before opening anything")
    after: Memory = Field(description="After the index was built (peak: the whole build)")


class SearchLevel(BaseModel):
    ef: int
    concurrency: int
    searches: int
    seconds: float
    searches_per_s: float
    latency: LatencySummary
    recall_at_10: float


class ServeFigures(BaseModel):
    open_s: float = Field(description="Opening the collection, its files evicted from the page cache")
    baseline: Memory
    opened: Memory
    after: Memory = Field(description="After every search level")
    levels: list[SearchLevel]


class CapacityRun(BaseModel):
    documents: int
    storage_name: str
    storage: VectorStorage
    setup: Setup
    build: BuildFigures
    serve: ServeFigures
    measured: datetime
    cpu_model: str


class CapacityBench(BaseModel):
    setup: Setup
    work_dir: str
    runs: list[CapacityRun]


class Job(BaseModel):
    """What a child process is asked to do."""

    phase: Literal["build", "serve"]
    work_dir: Path
    documents: int
    storage_name: str
    seed: int
    corpus: Path
    ef: list[int] = Field(default_factory=list)
    concurrency: list[int] = Field(default_factory=list)
    search_threads: int | None = None
    truth: Path | None = None
    result: Path


# --- measuring, in the child ---------------------------------------------------------------------


def memory() -> Memory:
    kib = process_status_kib("self", ("VmRSS", "RssAnon", "RssFile", "VmHWM")) or {}
    mib = {key: round(value / 1024, 1) for key, value in kib.items()}
    return Memory(
        rss_mib=mib.get("VmRSS"),
        anon_mib=mib.get("RssAnon"),
        file_mib=mib.get("RssFile"),
        peak_mib=mib.get("VmHWM"),
    )


def payloads(corpus: Path) -> list[tuple[str, str, dict[str, object]]]:
    """(title, text, metadata) of every document in ``corpus``, cycled through by the build."""
    from indexer.reader import Document, read_documents

    found = [(d.title, d.text, d.metadata) for d in read_documents(corpus) if isinstance(d, Document)]
    if not found:
        raise CapacityError(f"{corpus}: no documents")
    return found


def collection_root(work_dir: Path, documents_count: int, storage_name: str) -> Path:
    return work_dir / "collections" / f"{documents_count}-{storage_name}"


def capacity_spec(dim: int, storage: VectorStorage) -> CollectionSpec:
    return CollectionSpec(
        dim=dim,
        space="synthetic",
        encoder="synthetic",
        encoder_fingerprint="",
        keyword_fields=("department",),
        storage=storage,
    )


def disk_mib(root: Path) -> float:
    """Space the files take (allocated blocks, as du counts: sparse files count what they hold)."""
    return round(sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file()) / MIB, 1)


def evict_page_cache(root: Path) -> None:
    """Drop the files' pages from the page cache (flushed first), so opening reads them from disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build_phase(job: Job) -> BuildFigures:
    from store.base import DocumentPoint
    from store.edge import SHARD_DIR, EdgeStore

    baseline = memory()
    model = VectorModel.load(job.work_dir / MODEL_FILE)
    texts = payloads(job.corpus)
    root = collection_root(job.work_dir, job.documents, job.storage_name)
    shutil.rmtree(root, ignore_errors=True)
    store = EdgeStore(root)
    try:
        store.create_collection(COLLECTION, capacity_spec(model.dim, STORAGES[job.storage_name]))
        started = time.perf_counter()
        for first, chunk in documents(model, job.seed, job.documents):
            for start in range(0, len(chunk), UPSERT_BATCH):
                batch = []
                for offset, row in enumerate(chunk[start : start + UPSERT_BATCH]):
                    number = first + start + offset
                    title, text, metadata = texts[number % len(texts)]
                    batch.append(
                        DocumentPoint(
                            doc_id=f"doc-{number}",
                            vector=row.tolist(),
                            title=title,
                            text=text,
                            metadata=metadata,
                            content_hash=hashlib.sha256(f"{number}:{text}".encode()).hexdigest(),
                        )
                    )
                store.upsert(COLLECTION, batch)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        store.optimize(COLLECTION)
        index_s = time.perf_counter() - started
        after = memory()
    finally:
        store.close()
    return BuildFigures(
        load_s=round(load_s, 2),
        documents_per_s=round(job.documents / load_s, 1),
        index_s=round(index_s, 2),
        segments=sum(1 for p in (root / COLLECTION / SHARD_DIR / "segments").iterdir() if p.is_dir()),
        disk_mib=disk_mib(root),
        baseline=baseline,
        after=after,
    )


def _document_number(doc_id: str) -> int:
    return int(doc_id.removeprefix("doc-"))


def search_level(
    search: Callable[[np.ndarray], list[str]], truth: Truth, ef: int, concurrency: int
) -> SearchLevel:
    """Every query once, ``concurrency`` at a time; latency per search, recall of what came back."""

    def timed(query: np.ndarray) -> tuple[float, list[int]]:
        began = time.perf_counter()
        found = search(query)
        return (time.perf_counter() - began) * 1000, [_document_number(d) for d in found]

    started = time.perf_counter()
    if concurrency == 1:
        results = [timed(q) for q in truth.queries]
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(timed, truth.queries))
    seconds = time.perf_counter() - started
    return SearchLevel(
        ef=ef,
        concurrency=concurrency,
        searches=len(results),
        seconds=round(seconds, 3),
        searches_per_s=round(len(results) / seconds, 1),
        latency=summarize([ms for ms, _ in results]),
        recall_at_10=round(recall_at_k([found for _, found in results], truth.neighbours), 4),
    )


def serve_phase(job: Job) -> ServeFigures:
    from store.edge import EdgeStore

    assert job.truth is not None
    root = collection_root(job.work_dir, job.documents, job.storage_name)
    evict_page_cache(root)
    truth = Truth.load(job.truth)
    baseline = memory()
    started = time.perf_counter()
    store = EdgeStore(root, hnsw_ef=job.ef[0], search_threads=job.search_threads)
    store.count(COLLECTION)  # opens the shard
    open_s = time.perf_counter() - started
    opened = memory()
    levels = []
    try:
        for ef in job.ef:
            if ef != job.ef[0]:
                store.close()
                store = EdgeStore(root, hnsw_ef=ef, search_threads=job.search_threads)

            def search(query: np.ndarray, store: EdgeStore = store) -> list[str]:
                return [hit.doc_id for hit in store.search(COLLECTION, query, TOP_K)]

            for query in truth.queries[:WARMUP_SEARCHES]:
                search(query)
            levels += [search_level(search, truth, ef, c) for c in job.concurrency]
        after = memory()
    finally:
        store.close()
    return ServeFigures(open_s=round(open_s, 3), baseline=baseline, opened=opened, after=after, levels=levels)


def child_main(job_path: Path) -> int:
    job = Job.model_validate_json(job_path.read_text(encoding="utf-8"))
    figures: BuildFigures | ServeFigures = build_phase(job) if job.phase == "build" else serve_phase(job)
    job.result.write_text(figures.model_dump_json(indent=1), encoding="utf-8")
    return 0


# --- orchestrating, in the parent ----------------------------------------------------------------


def _child(job: Job, log: Callable[[str], None]) -> str:
    job_path = job.result.with_suffix(".job.json")
    job_path.write_text(job.model_dump_json(), encoding="utf-8")
    job.result.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.capacity", str(job_path)], check=False)
    if done.returncode != 0 or not job.result.is_file():
        raise CapacityError(
            f"the {job.phase} phase of {job.documents} documents ({job.storage_name}) exited with "
            f"{done.returncode}; its output is above"
        )
    log(f"{job.phase} {job.documents} {job.storage_name}: {time.perf_counter() - started:.0f} s")
    return job.result.read_text(encoding="utf-8")


def measure_capacity(
    sizes: Sequence[int],
    storage_names: Sequence[str],
    setup: Setup,
    model: VectorModel,
    corpus: Path,
    work_dir: Path,
    *,
    again: bool = False,
    keep_collections: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> CapacityBench:
    """Measure every (size, storage) not yet measured with ``setup`` in ``work_dir``; the bench holds
    those and the ones measured before."""
    runs_dir = work_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    model.save(work_dir / MODEL_FILE)
    runs = []
    for size in sizes:
        truth_path = work_dir / f"truth-{size}-{setup.vectors_fingerprint}-{setup.seed}-{setup.queries}.npz"
        for name in storage_names:
            result_path = runs_dir / f"{size}-{name}.json"
            if result_path.is_file() and not again:
                previous = CapacityRun.model_validate_json(result_path.read_text(encoding="utf-8"))
                if previous.setup == setup:
                    log(f"{size} documents, {name}: kept, measured {previous.measured:%Y-%m-%d %H:%M}")
                    runs.append(previous)
                    continue
            if not truth_path.is_file():
                log(f"{size} documents: exact top {TOP_K} of {setup.queries} queries")
                exact_truth(model, setup.seed, size, setup.queries).save(truth_path)
            log(f"{size} documents, {name}: building")
            build_job = Job(
                phase="build",
                work_dir=work_dir,
                documents=size,
                storage_name=name,
                seed=setup.seed,
                corpus=corpus,
                result=runs_dir / f"{size}-{name}.build.json",
            )
            build = BuildFigures.model_validate_json(_child(build_job, log))
            log(f"{size} documents, {name}: searching")
            serve_job = build_job.model_copy(
                update={
                    "phase": "serve",
                    "result": runs_dir / f"{size}-{name}.serve.json",
                    "ef": setup.ef,
                    "concurrency": setup.concurrency,
                    "search_threads": setup.search_threads,
                    "truth": truth_path,
                }
            )
            serve = ServeFigures.model_validate_json(_child(serve_job, log))
            run = CapacityRun(
                documents=size,
                storage_name=name,
                storage=STORAGES[name],
                setup=setup,
                build=build,
                serve=serve,
                measured=datetime.now(UTC),
                cpu_model=cpu_model(),
            )
            result_path.write_text(run.model_dump_json(indent=1), encoding="utf-8")
            if not keep_collections:
                shutil.rmtree(collection_root(work_dir, size, name), ignore_errors=True)
            runs.append(run)
    return CapacityBench(setup=setup, work_dir=str(work_dir), runs=runs)


# --- the report ----------------------------------------------------------------------------------


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _per_document(run: CapacityRun) -> str:
    """Serving RSS above the bare interpreter, in bytes per document."""
    after, baseline = run.serve.after.rss_mib, run.serve.baseline.rss_mib
    if after is None or baseline is None:
        return "-"
    return f"{(after - baseline) * MIB / run.documents:,.0f}"


def capacity_table(bench: CapacityBench) -> str:
    setup = bench.setup
    levels = setup.concurrency
    pool = f"{setup.search_threads} thread(s)" if setup.search_threads else "the default, one thread per CPU"
    header = [
        "documents",
        "storage",
        "load docs/s",
        "index s",
        "disk MiB",
        "serving RSS MiB (anon / file)",
        "RSS bytes/doc",
        "open s",
        "ef",
        "recall@10",
        *(f"c={c} p50 / p99 ms" for c in levels),
        *(f"c={c} searches/s" for c in levels if c > 1),
    ]
    lines = [
        "### Capacity (embedded store)",
        "",
        f"Vectors: {setup.dim}-d, {setup.vectors} (fingerprint {setup.vectors_fingerprint}), "
        f"seed {setup.seed}. "
        f"Payloads: {setup.corpus} cycled ({setup.payload_text_bytes:.0f} UTF-8 bytes of title + text on "
        f"average). {setup.queries} held-out queries, each a document plus noise of the documents' own "
        f"spread (x{setup.query_noise:g}); recall@10 against their exact top 10. Searches: top 10 with "
        "payloads through store/edge.py, threads at each concurrency; the engine's search pool: "
        f"{pool} per shard. Index s: HNSW graph (and quantized "
        "copy) built by optimize(). Serving RSS: the child process after every search level, its files "
        "evicted from the page cache before it opened them; bytes/doc: RSS above the bare interpreter.",
        "",
        "| " + " | ".join(header) + " |",
        "|---:|---|" + "---:|" * (len(header) - 2),
    ]
    for run in sorted(bench.runs, key=lambda r: (r.documents, list(STORAGES).index(r.storage_name))):
        after = run.serve.after
        first = True
        for ef in setup.ef:
            cells = [f"{run.documents:,}", run.storage_name]
            if first:
                cells += [
                    _cell(run.build.documents_per_s),
                    _cell(run.build.index_s, 1),
                    _cell(run.build.disk_mib),
                    f"{_cell(after.rss_mib)} ({_cell(after.anon_mib)} / {_cell(after.file_mib)})",
                    _per_document(run),
                    _cell(run.serve.open_s, 2),
                ]
            else:
                cells += [""] * 6
            first = False
            at = {level.concurrency: level for level in run.serve.levels if level.ef == ef}
            recall = at[levels[0]].recall_at_10 if levels[0] in at else None
            cells += [str(ef), _cell(recall, 3)]
            cells += [
                f"{at[c].latency.p50_ms:.2f} / {at[c].latency.p99_ms:.2f}" if c in at else "-" for c in levels
            ]
            cells += [_cell(at[c].searches_per_s) if c in at else "-" for c in levels if c > 1]
            lines.append("| " + " | ".join(cells) + " |")
    machines = sorted({run.cpu_model for run in bench.runs})
    lines += ["", f"Measured on: {'; '.join(machines)}." if machines else "Nothing measured."]
    return "\n".join(lines)


def load_setup_fields(corpus: Path) -> tuple[str, float]:
    """sha256 of the corpus file and the mean UTF-8 size of a document's title and text."""
    sizes = [len(title.encode()) + len(text.encode()) for title, text, _ in payloads(corpus)]
    return hashlib.sha256(corpus.read_bytes()).hexdigest(), round(sum(sizes) / len(sizes), 1)


def default_setup(
    model: VectorModel,
    corpus: Path,
    seed: int,
    queries: int,
    ef: list[int],
    concurrency: list[int],
    search_threads: int | None = None,
) -> Setup:
    digest, mean_bytes = load_setup_fields(corpus)
    return Setup(
        vectors=model.source,
        vectors_fingerprint=model.fingerprint(),
        dim=model.dim,
        seed=seed,
        queries=queries,
        query_noise=QUERY_NOISE,
        ef=ef,
        concurrency=concurrency,
        corpus=str(corpus),
        corpus_sha256=digest,
        payload_text_bytes=mean_bytes,
        search_threads=search_threads,
    )


if __name__ == "__main__":
    sys.exit(child_main(Path(sys.argv[1])))
