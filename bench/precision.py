"""Document encoding in float32 against a fast path (bf16, int8) on real corpus documents.

Both models live in one process and take turns on the same documents (fp32, fast, fp32, fast, ...),
so other load on the machine falls on both alike; the best and the median pass are reported. Speed:
documents/s and real tokens/s (padding excluded). Quality: the cosine of each document's fast-path
vector to its float32 vector over the whole sample, and the quality gate on its fixed texts, as
``HFEncoder`` runs it. Hardware use: useful FLOP/s (the formula of ``bench.throughput``, per document
at its own length) as a fraction of the peak of the matching arithmetic, measured in the same run by
``matmul_peak``: float32 matmul for fp32, bf16 matmul for bf16, a dynamic int8 linear (activation
quantization included) for int8.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel

from bench.throughput import PeakProbe, attention_shape, flops_per_token, matmul_params
from models.precision_gate import GateResult

if TYPE_CHECKING:
    from models.hf_encoder import HFEncoder

Kind = Literal["fp32", "bf16", "int8"]
Clock = Callable[[], float]


class PrecisionRow(BaseModel):
    precision: str
    passes: int
    best_seconds: float
    median_seconds: float
    documents_per_s: float  # best pass
    tokens_per_s: float  # best pass, real tokens
    median_documents_per_s: float
    estimated_gflops: float
    peak_gflops: float
    fraction_of_peak: float
    speedup: float  # fp32 best seconds / this best seconds
    min_cosine: float  # to fp32, over the sample
    mean_cosine: float


class PrecisionBench(BaseModel):
    encoder: str
    device: str
    threads: int
    corpus: str
    documents: int
    tokens: int
    max_tokens_seen: int
    batch_size: int
    peaks: list[PeakProbe]
    rows: list[PrecisionRow]
    gate: GateResult


def sample_flops(encoder: HFEncoder, lengths: Sequence[int]) -> float:
    """Useful FLOPs to encode documents of these token lengths (no padding counted)."""
    params = matmul_params(encoder.model)
    shape = attention_shape(encoder.model.config)
    return sum(n * flops_per_token(params, shape.layers, n, shape.width) for n in lengths)


def compare_precisions(
    encoder: HFEncoder,
    fast_model: object,
    fast: Kind,
    texts: Sequence[str],
    batch_size: int,
    repeats: int,
    peaks: dict[str, PeakProbe],
    clock: Clock = time.perf_counter,
) -> list[PrecisionRow]:
    """Encode ``texts`` ``repeats`` times with each model, alternating; one row per precision.
    ``encoder`` holds the float32 model; it holds it again on return."""
    from models.precision_gate import row_cosines

    lengths = encoder.count_tokens(texts)
    flops = sample_flops(encoder, lengths)
    fp32_model = encoder.model
    models = {"fp32": fp32_model, fast: fast_model}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    vectors: dict[str, np.ndarray] = {}
    try:
        for model in models.values():  # untimed: first calls allocate and pick kernels
            encoder.model = model
            encoder.encode(texts[:batch_size], batch_size=batch_size)
        for _ in range(repeats):
            for name, model in models.items():
                encoder.model = model
                start = clock()
                vectors[name] = encoder.encode(texts, batch_size=batch_size)
                seconds[name].append(clock() - start)
    finally:
        encoder.model = fp32_model
    rows = []
    for name in models:
        best, median = min(seconds[name]), statistics.median(seconds[name])
        cosines = row_cosines(vectors["fp32"], vectors[name])
        rate = flops / best / 1e9
        peak = peaks[name].peak_gflops
        rows.append(
            PrecisionRow(
                precision=name,
                passes=len(seconds[name]),
                best_seconds=best,
                median_seconds=median,
                documents_per_s=len(texts) / best,
                tokens_per_s=sum(lengths) / best,
                median_documents_per_s=len(texts) / median,
                estimated_gflops=rate,
                peak_gflops=peak,
                fraction_of_peak=rate / peak,
                speedup=min(seconds["fp32"]) / best,
                min_cosine=float(cosines.min()),
                mean_cosine=float(cosines.mean()),
            )
        )
    return rows


def precision_table(bench: PrecisionBench) -> str:
    peaks = ", ".join(f"{p.kind} {p.size}² {p.peak_gflops:.1f}" for p in bench.peaks)
    gate = bench.gate
    lines = [
        f"### Document encoding by precision ({bench.encoder}, {bench.device}, {bench.threads} threads)",
        "",
        f"{bench.documents} documents of {bench.corpus} ({bench.tokens} tokens, longest "
        f"{bench.max_tokens_seen}), batch {bench.batch_size}, passes alternating in one process. "
        f"Matching peaks (GFLOP/s, same run): {peaks}. Quality gate: {gate.precision} "
        f"{'passed' if gate.passed else 'FAILED'}, min cosine {gate.min_cosine:.5f} "
        f"(mean {gate.mean_cosine:.5f}) over {gate.texts} fixed texts, threshold {gate.threshold}.",
        "",
        "| precision | passes | docs/s best | docs/s median | tokens/s | × fp32 | est. GFLOP/s "
        "| matching peak | % of peak | cos min | cos mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in bench.rows:
        lines.append(
            f"| {r.precision} | {r.passes} | {r.documents_per_s:.2f} | {r.median_documents_per_s:.2f} | "
            f"{r.tokens_per_s:.0f} | {r.speedup:.2f} | {r.estimated_gflops:.1f} | {r.peak_gflops:.1f} | "
            f"{100 * r.fraction_of_peak:.0f}% | {r.min_cosine:.5f} | {r.mean_cosine:.5f} |"
        )
    return "\n".join(lines)
