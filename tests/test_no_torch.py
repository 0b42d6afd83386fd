"""The service stack must import and answer without torch or transformers installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Runs in a fresh interpreter where importing torch/transformers fails, as in the slim serving image.
SCRIPT = r"""
import asyncio, importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)")
        return None

sys.meta_path.insert(0, Block())

import httpx
from settings import Settings
from service.app import create_app

async def main():
    app = create_app(Settings())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        answer = await client.post("/search", json={"query": "高血压能吃党参吗", "top_k": 2})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers"})
    hits = len(answer.json().get("hits", []))
    print(json.dumps({"status": answer.status_code, "hits": hits, "loaded": loaded}))

asyncio.run(main())
"""


def test_service_answers_without_torch(tiny_bert: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    from indexer.pipeline import index_files
    from models.loading import load_encoder
    from store.factory import open_store

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        json.dumps({"id": "a", "text": "高血压病人可以口服党参"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"id": "b", "text": "感冒发烧多喝水"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    store = open_store(None, tmp_path / "qdrant")
    try:
        assert index_files([corpus], load_encoder(tiny_bert), store, "medsearch").ok
    finally:
        store.close()

    env = {
        "MEDSEARCH_HOME": str(tmp_path),
        "MEDSEARCH_MODELS_DIR": str(tiny_onnx.parent),
        "MEDSEARCH_QUERY_MODEL": tiny_onnx.name,
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "hits": 2, "loaded": []}
