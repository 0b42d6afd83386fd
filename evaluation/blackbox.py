"""Black-box evaluation: the same retrieval metrics computed from a running service's POST /search.

Only HTTP is used: GET /info says which pair is served, and each query is one POST /search with
top_k 100. The service's collection must hold exactly the dataset's corpus; anything else (another
corpus, a partial index) is refused before the figures could mislead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from evaluation.configs import Kind
from evaluation.metrics import Run

SERVICE_TOP_K = 100
DEFAULT_CONCURRENCY = 4


class ServiceError(RuntimeError):
    """The service answered unexpectedly, or does not serve this dataset's corpus."""


@dataclass(frozen=True)
class ServedPair:
    kind: Kind
    query_encoder: str
    query_fingerprint: str
    document_encoder: str
    document_fingerprint: str
    space: str
    collection: str
    points: int | None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.query_encoder}/{self.document_encoder}"


def served_pair(info: Mapping[str, Any]) -> ServedPair:
    """What GET /info says is served; ``kind`` follows the service's own pairing verdict."""
    try:
        query = info["query_encoder"]
        collection = info["collection"]
        spec = collection["spec"]
        if spec is None:
            raise ServiceError("the service has not read its collection yet (store unreachable?)")
        kind: Kind = "symmetric-bert" if info["pairing"] == "symmetric" else "asymmetric"
        return ServedPair(
            kind=kind,
            query_encoder=query["name"],
            query_fingerprint=query["fingerprint"],
            document_encoder=spec["encoder"],
            document_fingerprint=spec["encoder_fingerprint"],
            space=spec["space"],
            collection=collection["name"],
            points=collection["points"],
        )
    except (KeyError, TypeError) as exc:
        raise ServiceError(f"unexpected /info answer (missing {exc})") from exc


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)[:200]


async def fetch_pair(client: httpx.AsyncClient, corpus_size: int) -> ServedPair:
    response = await client.get("/info")
    if response.status_code != 200:
        raise ServiceError(f"GET /info answered {response.status_code}: {_message(response)}")
    pair = served_pair(response.json())
    if pair.points is not None and pair.points != corpus_size:
        raise ServiceError(
            f"collection {pair.collection!r} holds {pair.points} documents but the dataset's corpus has "
            f"{corpus_size}; index exactly this corpus into it (medsearch index DATASET/corpus.jsonl) "
            "into a fresh collection"
        )
    return pair


async def search_run(
    client: httpx.AsyncClient,
    queries: Mapping[str, str],
    corpus_ids: Collection[str],
    *,
    top_k: int = SERVICE_TOP_K,
    concurrency: int = DEFAULT_CONCURRENCY,
    mode: str = "dense",
) -> Run:
    """qid -> {doc id: score} from POST /search in ``mode``, ``concurrency`` requests in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(qid: str, text: str) -> tuple[str, dict[str, float]]:
        async with gate:
            response = await client.post("/search", json={"query": text, "top_k": top_k, "mode": mode})
        if response.status_code != 200:
            raise ServiceError(
                f"POST /search for query {qid!r} answered {response.status_code}: {_message(response)}"
            )
        hits = {hit["id"]: float(hit["score"]) for hit in response.json()["hits"]}
        unknown = [doc for doc in hits if doc not in corpus_ids]
        if unknown:
            raise ServiceError(
                f"the service returned documents that are not in the dataset's corpus (e.g. {unknown[0]!r}); "
                "its collection holds another corpus"
            )
        return qid, hits

    results = await asyncio.gather(*(one(qid, text) for qid, text in queries.items()))
    return dict(results)
