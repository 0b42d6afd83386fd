"""One benchmark run as a document: JSON (every figure and raw sample), a markdown summary, a PNG."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from bench.capacity import CapacityBench, capacity_table
from bench.machine import MachineInfo
from bench.plot import plot_latency
from bench.precision import PrecisionBench, precision_table
from bench.query_latency import QueryEncoderBench
from bench.service_load import LoadLevel, ServiceBench
from bench.throughput import IndexerBench


class BenchReport(BaseModel):
    created: datetime
    commit: str
    machine: MachineInfo
    service: ServiceBench | None = None
    query_encoders: QueryEncoderBench | None = None
    indexer: IndexerBench | None = None
    precision: PrecisionBench | None = None
    capacity: CapacityBench | None = None


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    png: Path | None


def now() -> datetime:
    return datetime.now(UTC)


def file_stem(report: BenchReport) -> str:
    return f"bench-{report.created:%Y%m%d-%H%M%S}-{report.commit}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _cpu(level: LoadLevel) -> str:
    return f"{_ms(level.service_cpu_ms)} / {_ms(level.client_cpu_ms)}"


def _overhead(service: ServiceBench) -> list[str]:
    raw = service.raw_encode
    if raw is None:
        return [f"Raw encode not measured: {service.raw_encode_note}.", ""] if service.raw_encode_note else []
    lines = [
        f"Raw encode of `{raw.model}` ({raw.threads} thread(s), {raw.latency.count} back-to-back encodes "
        "of the same queries in the bench process, the service idle): "
        f"p50 {_ms(raw.latency.p50_ms)} ms, p99 {_ms(raw.latency.p99_ms)} ms."
    ]
    lone = min(service.levels, key=lambda level: level.concurrency, default=None)
    if lone is not None and lone.latency is not None:
        lat = lone.latency
        over = lat.p50_ms - raw.latency.p50_ms
        lines[0] += (
            f" /search at concurrency {lone.concurrency}: p50 = raw p50 + {_ms(over)} ms; "
            f"p99 / p50 = {lat.p99_ms / lat.p50_ms:.2f}."
        )
    return [*lines, ""]


def service_table(service: ServiceBench) -> str:
    info = service.info or {}
    encoder = (info.get("query_encoder") or {}).get("name", "unknown")
    lines = [
        f"### Service load ({service.url}{', spawned' if service.spawned else ''})",
        "",
        f"POST /search top_k={service.top_k}, closed loop, {service.duration_s:g} s per level; "
        f"query encoder `{encoder}`.",
        "",
        "| concurrency | requests | errors | req/s | p50 ms | p95 ms | p99 ms | max RSS MiB "
        "| /healthz p50 / p99 ms | CPU ms/request: service / load generator |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in service.levels:
        lat = level.latency
        cells = [_ms(lat.p50_ms), _ms(lat.p95_ms), _ms(lat.p99_ms)] if lat else ["-", "-", "-"]
        probe = f"{_ms(level.healthz.p50_ms)} / {_ms(level.healthz.p99_ms)}" if level.healthz else "-"
        lines.append(
            f"| {level.concurrency} | {level.requests} | {level.errors} | {level.requests_per_s:.1f} | "
            f"{' | '.join(cells)} | {_mib(level.max_rss_kib)} | {probe} | {_cpu(level)} |"
        )
    lines += [
        "",
        "The CPU column is each process's user + system time over the level divided by its requests: "
        "where the two share the machine's cores, req/s cannot pass cores x 1000 / (their sum).",
        "",
        *_overhead(service),
    ]
    timed = [level for level in service.levels if level.breakdown is not None]
    if timed:
        lines += [
            "Where the time goes (means from the service's /metrics over each level; per request except "
            "the encoder run, which every query of its batch waits for; 'outside app' is HTTP parsing and "
            "writing in uvicorn, the network and the load generator):",
            "",
            "| concurrency | encoder runs | queries/run | body + validation ms | queue wait ms "
            "| encode ms/run | search ms | serialization ms | in app ms | outside app ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for level in timed:
            b = level.breakdown
            assert b is not None
            optional = [_ms(b.validate_ms), _ms(b.queue_wait_ms)]
            lines.append(
                f"| {level.concurrency} | {b.encoder_runs} | {b.mean_batch:.1f} | {' | '.join(optional)} "
                f"| {_ms(b.encode_ms_per_run)} | {_ms(b.search_ms)} "
                f"| {_ms(b.serialize_ms) if b.serialize_ms is not None else '-'} | {_ms(b.server_ms)} "
                f"| {_ms(b.outside_ms)} |"
            )
        lines.append("")
    if service.compared is not None:
        lines += [*compared_table(service), ""]
    if service.memory is not None:
        lines.append(
            f"Service pid {service.memory.pid}: peak RSS (VmHWM) {_mib(service.memory.hwm_kib)} MiB, "
            f"highest sampled VmRSS {_mib(service.memory.max_sampled_rss_kib)} MiB."
        )
    else:
        lines.append(f"Service memory not measured: {service.memory_note or 'no pid'}.")
    return "\n".join(lines)


def query_table(bench: QueryEncoderBench) -> str:
    encoders = bench.encoders
    lengths = sorted({length.tokens for e in encoders for length in e.lengths})
    header = ["tokens", *(f"{e.name} p50 / p95 ms" for e in encoders)]
    pairs = sorted({(r.llm, r.query_encoder) for r in bench.ratios})
    header += [f"{llm} ÷ {query}" for llm, query in pairs]
    lines = [
        "### Query encoders (batch 1)",
        "",
        f"Median and p95 of {bench.repeats} encodes after {bench.warmup} warm-up, cycling through "
        f"{bench.inputs_per_length} inputs of exactly that many tokens per encoder (its own tokenizer, "
        "specials included). Ratio columns: LLM median ÷ query-encoder median.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for tokens in lengths:
        cells = [str(tokens)]
        for encoder in encoders:
            found = next((x for x in encoder.lengths if x.tokens == tokens), None)
            cells.append(f"{_ms(found.latency.p50_ms)} / {_ms(found.latency.p95_ms)}" if found else "-")
        for llm, query in pairs:
            ratio = next(
                (r for r in bench.ratios if (r.llm, r.query_encoder, r.tokens) == (llm, query, tokens)), None
            )
            cells.append(f"{ratio.median_ratio:.1f}×" if ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def indexer_table(bench: IndexerBench) -> str:
    peak = bench.peak
    lines = [
        "### Indexer (document encoders)",
        "",
        f"{bench.formula}. Peak: best float32 {peak.size}×{peak.size} matmul on {peak.device} "
        f"({peak.backend}, {peak.threads} threads) = {peak.peak_gflops:.1f} GFLOP/s.",
        "",
        "| encoder | device | tokens | docs | batch | docs/s | tokens/s | P (M) | est. GFLOP/s | % of peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in bench.rows:
        share = f"{100 * row.fraction_of_peak:.0f}%" if row.fraction_of_peak is not None else "-"
        lines.append(
            f"| {row.encoder} | {row.device} | {row.tokens} | {row.documents} | {row.batch_size} | "
            f"{row.documents_per_s:.1f} | {row.tokens_per_s:.0f} | {row.matmul_params / 1e6:.1f} | "
            f"{row.estimated_gflops:.1f} | {share} |"
        )
    return "\n".join(lines)


def compared_table(service: ServiceBench) -> list[str]:
    other = service.compared
    assert other is not None
    lines = [
        f"Side by side: {other.url} POST /embeddings, model `{other.model}` (encode only, prefix "
        f"{other.prefix!r}), same queries and levels. Ratio = our /search req/s over theirs.",
        "",
        "| concurrency | ours req/s | ours p50 ms | theirs req/s | theirs p50 ms | errors (theirs) | ratio "
        "| CPU ms/request, ours / theirs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours = {level.concurrency: level for level in service.levels}
    for theirs in other.levels:
        mine = ours.get(theirs.concurrency)
        if mine is None:
            continue
        ratio = mine.requests_per_s / theirs.requests_per_s if theirs.requests_per_s else float("nan")
        p50 = [_ms(level.latency.p50_ms) if level.latency else "-" for level in (mine, theirs)]
        lines.append(
            f"| {theirs.concurrency} | {mine.requests_per_s:.1f} | {p50[0]} | {theirs.requests_per_s:.1f} "
            f"| {p50[1]} | {theirs.errors} | {ratio:.2f}x "
            f"| {_ms(mine.service_cpu_ms)} / {_ms(theirs.service_cpu_ms)} |"
        )
    return lines


def title(report: BenchReport) -> str:
    """The run's heading, in the markdown and on the figure."""
    return f"medsearch bench {report.created:%Y-%m-%d %H:%M} UTC, commit {report.commit}"


def markdown(report: BenchReport) -> str:
    m = report.machine
    versions = ", ".join(f"{k} {v}" for k, v in m.packages.items() if v)
    parts = [
        f"## {title(report)}",
        "",
        f"{m.cpu_model}, {m.cores_usable}/{m.cores_logical} cores usable, {m.ram_gib} GiB RAM, "
        f"Python {m.python}, {versions}.",
        "",
        f"CPU flags: {' '.join(m.cpu_flags) or 'not read'}.",
    ]
    if report.service is not None:
        parts += ["", service_table(report.service)]
    if report.query_encoders is not None:
        parts += ["", query_table(report.query_encoders)]
    if report.indexer is not None:
        parts += ["", indexer_table(report.indexer)]
    if report.precision is not None:
        parts += ["", precision_table(report.precision)]
    if report.capacity is not None:
        parts += ["", capacity_table(report.capacity)]
    return "\n".join(parts) + "\n"


def write_report(report: BenchReport, results_dir: Path) -> ReportFiles:
    """``bench-<date>-<time>-<commit>.{json,md,png}`` in ``results_dir``; no PNG when the run has no
    latency to plot."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / file_stem(report)
    json_path = stem.with_suffix(".json")
    json_path.write_text(report.model_dump_json(indent=1) + "\n", encoding="utf-8")
    md_path = stem.with_suffix(".md")
    text = markdown(report)
    md_path.write_text(text, encoding="utf-8")
    png_path = stem.with_suffix(".png")
    if not plot_latency(report.service, report.query_encoders, title(report), png_path, report.capacity):
        return ReportFiles(json=json_path, markdown=md_path, png=None)
    md_path.write_text(text + f"\n![latency]({png_path.name})\n", encoding="utf-8")
    return ReportFiles(json=json_path, markdown=md_path, png=png_path)
