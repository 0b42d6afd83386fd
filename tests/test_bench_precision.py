"""`medsearch bench precision` parts on a tiny model: rows, cosines, the table (no timing asserts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.precision import PrecisionBench, compare_precisions, precision_table
from bench.throughput import matmul_peak
from models.hf_encoder import HFEncoder
from models.manifest import read_manifest
from models.precision import FAST_PATHS
from models.precision_gate import GateResult

TEXTS = [
    "高血压患者能吃党参吗？",
    "孩子发烧38.5度，咳嗽有痰，应该吃什么药",
    "头痛",
    "糖尿病人饮食注意什么",
] * 3


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_matmul_peak_of_each_kind(kind: str) -> None:
    probe = matmul_peak(seconds=0.01, size=256, kind=kind)
    assert probe.kind == kind and probe.size == 256 and probe.iterations >= 3 and probe.peak_gflops > 0


def test_compare_precisions_rows_and_table(tiny_bert: Path) -> None:
    encoder = HFEncoder(tiny_bert, read_manifest(tiny_bert), device="cpu")
    fp32_model = encoder.model
    peaks = {kind: matmul_peak(seconds=0.01, size=256, kind=kind) for kind in ("fp32", "int8")}
    ticks = iter(range(100))
    rows = compare_precisions(
        encoder, FAST_PATHS["int8"](fp32_model), "int8", TEXTS, 4, 2, peaks, clock=lambda: float(next(ticks))
    )
    assert encoder.model is fp32_model
    assert [r.precision for r in rows] == ["fp32", "int8"]
    assert rows[0].min_cosine == pytest.approx(1.0) and rows[0].speedup == 1.0
    assert 0.99 < rows[1].min_cosine <= rows[1].mean_cosine <= 1.0 + 1e-9
    assert all(r.passes == 2 and r.documents_per_s == len(TEXTS) for r in rows)  # one tick per pass
    bench = PrecisionBench(
        encoder="tiny",
        device="cpu",
        threads=1,
        corpus="test",
        documents=len(TEXTS),
        tokens=100,
        max_tokens_seen=20,
        batch_size=4,
        peaks=list(peaks.values()),
        rows=rows,
        gate=GateResult(
            precision="int8", passed=True, min_cosine=1.0, mean_cosine=1.0, texts=12, threshold=0.999
        ),
    )
    table = precision_table(bench)
    assert "| int8 | 2 |" in table and "passed" in table
