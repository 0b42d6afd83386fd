"""What one evaluation produces: a result per configuration, the JSON document and the markdown table.

JSON layout (one object)::

    {
      "<configuration name>": {"kind", "query_encoder", "query_fingerprint", "document_encoder",
                               "document_fingerprint", "space", "ndcg@10", "recall@10", "recall@100",
                               "mrr@10", "map@10", "queries", "reranking": {...}, "sts": {...}, ...},
      "default": {... the entry of the configuration the service serves by default ...},
      "dataset": {"path", "split", "fingerprint", "corpus_sha256", ...},
      "run": {"mode", "tasks", "top_k", ...},
      "machine": {"platform", "python", "cpu_count", ...},
      "references": {"<configuration name>": {"kind", "ndcg@10", ..., "how", "measured"}}
    }

``references`` (evaluation/references.py) holds baselines measured outside this run on the same files
and split; they are never rerun and the table marks them so.

Configuration names always contain a kind prefix or are ``bm25``/``hybrid-rrf``, so they never collide
with the reserved keys ``default``, ``dataset``, ``run`` and ``machine``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from evaluation.configs import DEFAULT
from evaluation.references import Reference

RESERVED_KEYS = (DEFAULT, "dataset", "run", "machine", "references")
RETRIEVAL_COLUMNS = (
    ("nDCG@10", "ndcg@10"),
    ("R@10", "recall@10"),
    ("R@100", "recall@100"),
    ("MRR@10", "mrr@10"),
    ("MAP@10", "map@10"),
)
RERANK_COLUMNS = (("rerank MAP@10", "map@10"), ("rerank MRR@10", "mrr@10"))


class ConfigResult(BaseModel):
    configuration: str
    kind: str
    query_encoder: str | None = None
    query_fingerprint: str | None = None
    document_encoder: str | None = None
    document_fingerprint: str | None = None
    space: str | None = None
    method: dict[str, Any] | None = Field(default=None, description="How a non-dense ranking is made.")
    retrieval: dict[str, float] | None = None
    reranking: dict[str, float] | None = None
    sts: dict[str, dict[str, float]] = Field(default_factory=dict)
    seconds: float = 0.0

    def entry(self) -> dict[str, Any]:
        """The JSON object of this configuration: retrieval metrics flat, other tasks nested."""
        body: dict[str, Any] = self.model_dump(exclude={"retrieval", "reranking", "sts", "method", "seconds"})
        if self.method is not None:
            body["method"] = self.method
        body.update(self.retrieval or {})
        if self.reranking is not None:
            body["reranking"] = self.reranking
        if self.sts:
            body["sts"] = self.sts
        body["seconds"] = round(self.seconds, 3)
        return body


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def document(
    results: Sequence[ConfigResult],
    default_name: str | None,
    dataset: Mapping[str, Any],
    run: Mapping[str, Any],
    references: Sequence[Reference] = (),
) -> dict[str, Any]:
    out: dict[str, Any] = {r.configuration: r.entry() for r in results}
    clash = sorted(set(out) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"configuration names clash with reserved keys: {clash}")
    if default_name is not None and default_name in out:
        out[DEFAULT] = out[default_name]
    out["dataset"] = dict(dataset)
    out["run"] = dict(run)
    out["machine"] = machine()
    if references:
        out["references"] = {
            r.configuration: {"kind": r.kind, **r.metrics, "how": r.how, "measured": r.measured}
            for r in references
        }
    return out


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown_table(
    results: Sequence[ConfigResult], default_name: str | None, references: Sequence[Reference] = ()
) -> str:
    """One line per configuration; the headline metric (nDCG@10) first, a dash where a task was not run."""
    sts_sets = list(dict.fromkeys(name for r in results for name in r.sts))
    header = ["configuration", "kind"]
    header += [title for title, _ in RETRIEVAL_COLUMNS]
    if any(r.reranking for r in results):
        header += [title for title, _ in RERANK_COLUMNS]
    for name in sts_sets:
        header += [f"STS ρ {name}", f"STS r {name}"]
    header.append("queries")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        label = f"{r.configuration} (default)" if r.configuration == default_name else r.configuration
        cells = [label, r.kind]
        cells += [_cell((r.retrieval or {}).get(key)) for _, key in RETRIEVAL_COLUMNS]
        if any(x.reranking for x in results):
            cells += [_cell((r.reranking or {}).get(key)) for _, key in RERANK_COLUMNS]
        for name in sts_sets:
            scores = r.sts.get(name, {})
            cells += [_cell(scores.get("spearman")), _cell(scores.get("pearson"))]
        queries = (r.retrieval or r.reranking or {}).get("queries")
        cells.append("–" if queries is None else str(int(queries)))
        lines.append("| " + " | ".join(cells) + " |")
    for ref in references:
        cells = [f"{ref.configuration} (reference, not rerun)", ref.kind]
        cells += [_cell(ref.metrics.get(key)) for _, key in RETRIEVAL_COLUMNS]
        cells += ["–"] * (len(header) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
