"""Results files (JSON, markdown, PNG) and `medsearch bench` end to end on tiny models, with the
service spawned as a subprocess. Figures are produced, never judged: no timing is asserted."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.machine import git_commit, machine_info
from bench.queries import QUESTIONS
from bench.query_latency import EncoderLatency, LengthLatency, QueryEncoderBench, latency_ratios
from bench.report import BenchReport, file_stem, markdown, write_report
from bench.service_load import LoadLevel, MemoryPeak, RawEncode, ServiceBench
from bench.stats import summarize
from medsearch.cli import main
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def encoder(name: str, side: str, medians: dict[int, float]) -> EncoderLatency:
    lengths = [
        LengthLatency(tokens=t, latency=summarize([m, m, 2 * m]), samples_ms=[m, m, 2 * m])
        for t, m in medians.items()
    ]
    return EncoderLatency.model_validate(
        {
            "name": name,
            "side": side,
            "format": "onnx",
            "quantization": None,
            "architecture": "x",
            "lengths": lengths,
        }
    )


def synthetic_report() -> BenchReport:
    samples = [1.0, 2.0, 3.0, 4.0]
    level = LoadLevel(
        concurrency=8,
        seconds=2.0,
        requests=5,
        errors=1,
        error_kinds={"503": 1},
        requests_per_s=2.5,
        latency=summarize(samples),
        samples_ms=samples,
        max_rss_kib=204800,
        service_cpu_ms=4.5,
        client_cpu_ms=0.125,
    )
    encoders = [
        encoder("small", "query", {8: 2.0, 16: 4.0}),
        encoder("llm", "llm-as-query", {8: 30.0, 16: 100.0}),
    ]
    return BenchReport(
        created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        commit="abc1234",
        machine=machine_info(),
        service=ServiceBench(
            url="http://127.0.0.1:8000",
            spawned=False,
            duration_s=2.0,
            top_k=10,
            levels=[level],
            memory=MemoryPeak(pid=42, hwm_kib=409600, max_sampled_rss_kib=307200, samples=10),
            raw_encode=RawEncode(model="small", threads=1, latency=summarize([1.0, 1.5, 2.0])),
        ),
        query_encoders=QueryEncoderBench(
            repeats=3,
            warmup=1,
            inputs_per_length=2,
            threads=0,
            encoders=encoders,
            ratios=latency_ratios(encoders),
        ),
    )


def test_ratios_are_llm_median_over_query_median() -> None:
    report = synthetic_report()
    assert report.query_encoders is not None
    ratios = {(r.llm, r.query_encoder, r.tokens): r.median_ratio for r in report.query_encoders.ratios}
    assert ratios == {("llm", "small", 8): 15.0, ("llm", "small", 16): 25.0}


def test_results_files_are_written(tmp_path: Path) -> None:
    report = synthetic_report()
    files = write_report(report, tmp_path / "results")
    assert files.json.name == "bench-20260102-030405-abc1234.json" == file_stem(report) + ".json"
    assert BenchReport.model_validate_json(files.json.read_text(encoding="utf-8")) == report
    assert files.png is not None and files.png.read_bytes().startswith(PNG_MAGIC)
    text = files.markdown.read_text(encoding="utf-8")
    assert text.startswith(markdown(report))
    assert f"![latency]({files.png.name})" in text
    assert "| 8 | 5 | 1 | 2.5 | 2.50 | 3.85 | 3.97 | 200 | - | 4.50 / 0.12 |" in text
    assert "peak RSS (VmHWM) 400 MiB" in text
    # The one level (8 in flight) is the lowest: its p50 2.50 against the raw encode's 1.50.
    assert (
        "p50 1.50 ms, p99 1.99 ms. /search at concurrency 8: p50 = raw p50 + 1.00 ms; p99 / p50 = 1.59."
        in text
    )
    assert "| 8 | 2.00 / 3.80 | 30.00 / 57.00 | 15.0× |" in text
    assert report.machine.cpu_model in text


def test_run_without_latency_writes_no_png(tmp_path: Path) -> None:
    report = synthetic_report().model_copy(update={"service": None, "query_encoders": None})
    files = write_report(report, tmp_path)
    assert files.png is None
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]


def test_machine_and_commit_are_recorded() -> None:
    info = machine_info()
    assert info.cores_logical >= info.cores_usable >= 1
    assert info.packages["onnxruntime"] and info.python.count(".") == 2
    commit = git_commit(REPO)
    assert commit != "unknown" and len(commit.split("-")[0]) >= 7
    assert git_commit(Path("/")) == "unknown"


def test_bench_refuses_non_loopback_and_absent_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "service", "--url", "http://10.1.2.3:8000"]) == 2
    assert "loopback addresses only" in capsys.readouterr().err
    from bench.spawn import free_port

    assert main(["bench", "service", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "pass --spawn" in capsys.readouterr().err


@pytest.fixture
def served_home(tmp_path: Path, tiny_bert: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home whose collection was indexed by tiny-bert, served by its ONNX export (same space)."""
    from indexer.pipeline import index_files
    from models.loading import load_encoder
    from store.factory import open_store

    for key in [k for k in os.environ if k.startswith("MEDSEARCH_")]:
        monkeypatch.delenv(key)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": str(i), "text": q}, ensure_ascii=False) + "\n" for i, q in enumerate(QUESTIONS)
        ),
        encoding="utf-8",
    )
    store = open_store(None, tmp_path / "qdrant")
    try:
        summary = index_files([corpus], load_encoder(tiny_bert, device="cpu"), store, "bench")
        assert summary.ok
    finally:
        store.close()  # the embedded store admits one process: the spawned service
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(tiny_onnx.parent))
    monkeypatch.setenv("MEDSEARCH_QUERY_MODEL", tiny_onnx.name)
    monkeypatch.setenv("MEDSEARCH_COLLECTION", "bench")
    return tmp_path


def test_bench_all_with_spawned_service(
    served_home: Path, tiny_gemma: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = served_home / "results"
    argv = ["bench", "all", "--spawn", "--duration", "0.3", "--concurrency", "1,2", "--warmup", "1"]
    argv += ["--query-lengths", "16,32", "--repeats", "3", "--query-warmup", "1", "--inputs", "2"]
    argv += ["--llm", str(tiny_gemma), "--doc-lengths", "16,32", "--docs", "4", "--batch-size", "2"]
    argv += [
        "--corpus",
        str(REPO / "data/demo/corpus.jsonl"),
        "--probe-seconds",
        "0.05",
        "--probe-size",
        "64",
    ]
    assert main([*argv, "--results-dir", str(results)]) == 0
    out, err = capsys.readouterr()

    for heading in ("### Service load", "### Query encoders (batch 1)", "### Indexer (document encoders)"):
        assert heading in out
    assert "tiny-gemma ÷ tiny-bert-onnx" in out
    (json_path,) = results.glob("*.json")
    assert sorted(p.suffix for p in results.iterdir()) == [".json", ".md", ".png"]
    report = BenchReport.model_validate_json(json_path.read_text(encoding="utf-8"))

    service = report.service
    assert service is not None and service.spawned
    assert [level.concurrency for level in service.levels] == [1, 2]
    for level in service.levels:
        assert level.requests == len(level.samples_ms) > 0
        assert level.errors == 0
    assert service.info is not None and service.info["query_encoder"]["name"] == "tiny-bert-onnx"
    assert service.memory is not None and service.memory.hwm_kib > 0
    with pytest.raises(ProcessLookupError):
        os.kill(service.memory.pid, 0)  # the spawned service was stopped and reaped

    query = report.query_encoders
    assert query is not None
    assert [(e.name, e.side) for e in query.encoders] == [
        ("tiny-bert-onnx", "query"),
        ("tiny-gemma", "llm-as-query"),
    ]
    assert all(
        [x.tokens for x in e.lengths] == [16, 32] and x.latency.count == 3
        for e in query.encoders
        for x in e.lengths
    )
    assert [r.tokens for r in query.ratios] == [16, 32]

    indexer = report.indexer
    assert indexer is not None
    assert [(r.encoder, r.tokens) for r in indexer.rows] == [("tiny-bert", 16), ("tiny-bert", 32)]
    for row in indexer.rows:
        assert row.documents == 4
        assert row.tokens_per_s == pytest.approx(row.documents_per_s * row.tokens)
        per_token = 2 * row.matmul_params + 4 * 2 * row.tokens * 32
        assert row.flops_per_token == per_token
        assert row.estimated_gflops == pytest.approx(row.tokens_per_s * per_token / 1e9)
        assert row.fraction_of_peak == pytest.approx(row.estimated_gflops / indexer.peak.peak_gflops)

    # Query text is patient-like data: it appears in no output and no results file.
    written = "".join(p.read_text(encoding="utf-8") for p in results.glob("*.[jm][sd]*"))
    for question in QUESTIONS:
        assert question not in out + err + written


def test_what_was_measured_before_a_failure_is_written(
    tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medsearch.bench_cli import run_parts
    from medsearch.cli import build_parser
    from settings import Settings

    argv = ["bench", "all", "--query-model", str(tiny_onnx), "--query-lengths", "16", "--repeats", "2"]
    argv += ["--corpus", str(tmp_path / "missing.jsonl"), "--results-dir", str(tmp_path)]
    args = build_parser(argv).parse_args(argv)
    (tmp_path / "models").mkdir()  # no LLM built: the query part runs without a ratio
    assert run_parts(args, Settings(home=tmp_path), ("query", "indexer")) == 2
    out, err = capsys.readouterr()
    assert "missing.jsonl not found" in err
    assert "### Query encoders" in out
    (json_path,) = tmp_path.glob("*.json")
    report = BenchReport.model_validate_json(json_path.read_text(encoding="utf-8"))
    assert report.query_encoders is not None and report.indexer is None


def test_query_bench_runs_llm_embedders_as_query_encoders_with_their_query_prompt(
    tmp_path: Path,
    tiny_onnx: Path,
    tiny_gemma: Path,
    tiny_embedder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models.encoder import EncodeMode, Encoder
    from models.loading import load_encoder

    models = tmp_path / "models"
    models.mkdir()
    for path in (tiny_onnx, tiny_gemma, tiny_embedder):
        (models / path.name).symlink_to(path)
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(models))
    opened: list[tuple[str, EncodeMode]] = []

    def recording(
        path: Path, threads: int = 0, device: Any = "auto", mode: EncodeMode = "document"
    ) -> Encoder:
        opened.append((path.name, mode))
        return load_encoder(path, threads, device, mode)

    # The command imports load_encoder when it runs, so the patched one is what it uses.
    monkeypatch.setattr("models.loading.load_encoder", recording)
    results = tmp_path / "results"
    argv = ["bench", "query", "--query-lengths", "20,32", "--repeats", "2", "--query-warmup", "0"]
    assert main([*argv, "--inputs", "2", "--results-dir", str(results)]) == 0

    # Every LLM document encoder is measured as a query encoder: the decoder-only one with its
    # document prompt, the embedder (not decoder-only) with its query prompt.
    assert opened == [("tiny-bert-onnx", "document"), ("tiny-embedder", "query"), ("tiny-gemma", "document")]
    (json_path,) = results.glob("*.json")
    query = BenchReport.model_validate_json(json_path.read_text(encoding="utf-8")).query_encoders
    assert query is not None
    assert [(e.name, e.side, [x.tokens for x in e.lengths]) for e in query.encoders] == [
        ("tiny-bert-onnx", "query", [20, 32]),
        # Its query prompt and specials alone are 26 tokens (the document prompt's 18 would fit 20).
        ("tiny-embedder", "llm-as-query", [32]),
        ("tiny-gemma", "llm-as-query", [20, 32]),
    ]
    assert sorted((r.llm, r.tokens) for r in query.ratios) == [
        ("tiny-embedder", 32),
        ("tiny-gemma", 20),
        ("tiny-gemma", 32),
    ]
