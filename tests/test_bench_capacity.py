"""`medsearch bench capacity` on a tiny collection: the report's fields, recall in range, reuse of what
a work directory holds. Figures are produced, never judged: no timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bench.capacity import STORAGES, CapacityRun
from bench.report import BenchReport
from bench.synthetic import VectorModel, documents, exact_truth, fallback_model, fitted_model, recall_at_k
from evaluation.vectors import largest_cached
from medsearch.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_synthetic_vectors_follow_the_fitted_distribution_and_the_truth_is_exact() -> None:
    rng = np.random.default_rng(3)
    real = rng.standard_normal((4000, 24)) * np.linspace(2.0, 0.1, 24) + 1.5
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    model = fitted_model(real, "test")
    drawn = np.concatenate([chunk for _, chunk in documents(model, 0, 5000)])
    assert drawn.shape == (5000, 24)
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(drawn.mean(axis=0), real.mean(axis=0), atol=0.02)
    # The first documents are the same whatever the size: a child regenerates the parent's vectors.
    smaller = np.concatenate([chunk for _, chunk in documents(model, 0, 100)])
    np.testing.assert_array_equal(smaller, drawn[:100])

    truth = exact_truth(model, 0, 5000, 30)
    brute = np.argsort(-(truth.queries @ drawn.T), axis=1)[:, :10]
    assert (truth.neighbours == brute).mean() > 0.99  # ties aside
    assert recall_at_k([list(row) for row in brute], truth.neighbours) > 0.99
    assert recall_at_k([[] for _ in brute], truth.neighbours) == 0.0


def test_the_fallback_has_embeddinggemmas_shape(tmp_path: Path) -> None:
    model = fallback_model()
    drawn = np.concatenate([chunk for _, chunk in documents(model, 0, 2000)])
    pairs = drawn[:500] @ drawn[500:1000].T
    assert 0.4 < float(pairs.mean()) < 0.52  # EmbeddingGemma's cmedqa-im documents: 0.46
    model.save(tmp_path / "m.npz")
    assert VectorModel.load(tmp_path / "m.npz").fingerprint() == model.fingerprint()


def test_the_largest_complete_cache_entry_of_the_encoder_is_read(tmp_path: Path) -> None:
    from evaluation.vectors import cached_vectors
    from tests.test_index_build import HashDocuments

    encoder = HashDocuments()
    for n in (3, 5):
        texts = [(f"d{i}", f"text {i}") for i in range(n)]
        cached_vectors(tmp_path, encoder.manifest, f"source-{n}", lambda t=texts: iter(t), lambda: encoder)
    found = largest_cached(tmp_path, encoder.manifest.name)
    assert found is not None and len(found.ids) == 5
    assert largest_cached(tmp_path, "another-encoder") is None


@pytest.fixture
def bare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("MEDSEARCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path / "home"))
    return tmp_path


def test_capacity_end_to_end_on_a_tiny_collection(
    bare_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = bare_home / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps(
                {"_id": f"d{i}", "text": f"高血压患者的饮食建议 {i}", "metadata": {"department": "心血管科"}}
            )
            + "\n"
            for i in range(7)
        ),
        encoding="utf-8",
    )
    results, work = bare_home / "results", bare_home / "work"
    argv = [
        "bench",
        "capacity",
        "--sizes",
        "300",
        "--storage",
        "float32,int8-on-disk",
        "--ef",
        "64",
        "--concurrency",
        "1,2",
        "--queries",
        "20",
        "--corpus",
        str(corpus),
        "--work-dir",
        str(work),
        "--results-dir",
        str(results),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "### Capacity (embedded store)" in out and "CPU flags:" in out
    assert "fallback distribution" in err  # no cached document vectors in this home
    (json_path,) = results.glob("*.json")
    assert sorted(p.suffix for p in results.iterdir()) == [".json", ".md", ".png"]
    assert (results / json_path.with_suffix(".png").name).read_bytes().startswith(PNG_MAGIC)
    report = BenchReport.model_validate_json(json_path.read_text(encoding="utf-8"))
    capacity = report.capacity
    assert capacity is not None
    assert (
        capacity.setup.dim == 768 and capacity.setup.queries == 20 and capacity.setup.payload_text_bytes > 0
    )
    assert [(r.documents, r.storage_name) for r in capacity.runs] == [(300, "float32"), (300, "int8-on-disk")]
    for run in capacity.runs:
        assert run.storage == STORAGES[run.storage_name]
        assert run.build.documents_per_s > 0 and run.build.disk_mib > 0 and run.build.segments >= 1
        assert run.serve.after.rss_mib is not None and run.serve.after.rss_mib > 0
        assert [(level.ef, level.concurrency) for level in run.serve.levels] == [(64, 1), (64, 2)]
        for level in run.serve.levels:
            assert level.searches == 20 and level.latency.count == 20
            assert 0.0 <= level.recall_at_10 <= 1.0
    # Collections are deleted once measured; the results stay and a rerun reuses them.
    assert not any((work / "collections").iterdir())
    saved = CapacityRun.model_validate_json((work / "runs" / "300-float32.json").read_text(encoding="utf-8"))
    assert saved.setup.search_threads == 1  # the service's search pool (MEDSEARCH_SEARCH_THREADS)
    assert main([*argv, "--storage", "float32"]) == 0
    assert "300 documents, float32: kept" in capsys.readouterr().err
    (newest, *_) = sorted(results.glob("*.json"), reverse=True)
    again = BenchReport.model_validate_json(newest.read_text(encoding="utf-8")).capacity
    assert again is not None and again.runs == [saved]
    # Another search pool is another setup: measured again, not reused.
    assert main([*argv, "--storage", "float32", "--search-threads", "0"]) == 0
    assert "300 documents, float32: building" in capsys.readouterr().err
    rerun = CapacityRun.model_validate_json((work / "runs" / "300-float32.json").read_text(encoding="utf-8"))
    assert rerun.setup.search_threads is None


def test_capacity_refuses_unknown_storage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "capacity", "--storage", "int4"])
    assert "expected some of float32" in capsys.readouterr().err
