"""Seconds per training step of each document-side mode and of the query side, on the real models.

    python -m models.align.probe --document var/models/gemma-3-270m \
        --query var/models/multilingual-e5-small --corpus ../shared/data/cmedqa-im/corpus.jsonl

Each step is a full optimizer step (forward, an InfoNCE loss, backward, AdamW) on ``--batch`` texts
truncated to exactly ``--tokens`` tokens; the frozen mode is a no-grad forward. One warm-up step,
then the median of ``--repeats``. Cached modes fill their lower-layer cache first (timed apart: that
is a one-off cost per text), after a warm-up forward on other texts. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from models.align.document_side import DocumentSideConfig, DocumentTower
from models.align.losses import info_nce
from models.align.query_side import QuerySideConfig, QueryTower
from models.documents import document_text
from models.manifest import read_manifest

DOCUMENT_MODES: dict[str, DocumentSideConfig] = {
    "frozen": DocumentSideConfig(),
    "top2-cached": DocumentSideConfig(mode="top_layers", trainable_layers=2, cache_lower_states=True),
    "top4-cached": DocumentSideConfig(mode="top_layers", trainable_layers=4, cache_lower_states=True),
    "top4-uncached": DocumentSideConfig(mode="top_layers", trainable_layers=4),
    "lora-all": DocumentSideConfig(mode="lora"),
    "lora-top4-cached": DocumentSideConfig(mode="lora", trainable_layers=4, cache_lower_states=True),
}


def _median_seconds(step: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median wall and process-CPU seconds per step. The machine's cores are shared with other jobs,
    so wall time swings with their load; CPU seconds (all threads) barely do, and CPU / threads is
    what an uncontended run would take at perfect thread scaling (a lower bound on its wall time)."""
    step()  # warm-up: allocator, thread pool, lazy initialization
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"step_s": round(statistics.median(wall), 3), "step_cpu_s": round(statistics.median(cpu), 3)}


def _train_step(
    embed: Callable[[], torch.Tensor], params: Sequence[torch.nn.Parameter]
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        vectors = embed()
        # Documents against a shifted copy of themselves: a realistic InfoNCE graph and backward.
        loss = info_nce(vectors, vectors.roll(1, dims=0).detach(), torch.arange(len(vectors)), 0.02)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def probe_document(
    model_dir: Path, mode: str, texts: Sequence[str], warm_up: Sequence[str], tokens: int, repeats: int
) -> dict[str, object]:
    """``warm_up`` texts go through first, so the timed cache fill is not the model's first forward."""
    config = DOCUMENT_MODES[mode].model_copy(update={"max_tokens": tokens})
    tower = DocumentTower(model_dir, config)
    lengths = [len(ids) for ids in tower.encoder.tokenize(texts)]
    result: dict[str, object] = {
        "side": "document",
        "mode": mode,
        "tokens": max(lengths),
        "min_tokens": min(lengths),
        "batch": len(texts),
    }
    tower.encode(warm_up, batch_size=len(warm_up))
    if tower.cache is not None:
        start, start_cpu = time.perf_counter(), time.process_time()
        tower.encode(texts, batch_size=len(texts))
        # Lower layers into the cache plus the top layers once: the one-off cost per text.
        result["cache_fill_s_per_text"] = round((time.perf_counter() - start) / len(texts), 3)
        result["cache_fill_cpu_s_per_text"] = round((time.process_time() - start_cpu) / len(texts), 3)
        hidden = tower.model.config.hidden_size
        result["cache_mb_per_text"] = round(sum(lengths) * hidden * 4 / len(texts) / 2**20, 2)
    params = list(tower.trainable_parameters().values())
    result["trainable_params"] = sum(p.numel() for p in params)
    if params:
        step = _train_step(lambda: tower.embed(texts), params)
    else:

        def step() -> None:
            tower.encode(texts, batch_size=len(texts))

    return result | _median_seconds(step, repeats)


def probe_query(model_dir: Path, queries: Sequence[str], output_dim: int, repeats: int) -> dict[str, object]:
    tower = QueryTower(model_dir, QuerySideConfig(output_dim=output_dim)).train()
    encoded = tower.tokenizer(tower.render(queries), truncation=True, max_length=tower.max_tokens)
    tokens = max(len(ids) for ids in encoded["input_ids"])
    step = _train_step(lambda: tower.embed(queries), list(tower.trainable_parameters().values()))
    return {
        "side": "query",
        "tokens": tokens,
        "batch": len(queries),
        "trainable_params": sum(p.numel() for p in tower.trainable_parameters().values()),
    } | _median_seconds(step, repeats)


def _read_texts(path: Path, count: int, min_chars: int, *, field: str = "text") -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for raw in fh:
            obj = json.loads(raw)
            text = document_text(obj.get("title") or "", obj[field]) if field == "text" else obj[field]
            if len(text) >= min_chars:
                texts.append(text)
            if len(texts) == count:
                break
    return texts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", type=Path, required=True)
    parser.add_argument("--query", type=Path)
    parser.add_argument("--corpus", type=Path, required=True, help="BEIR corpus.jsonl (long texts)")
    parser.add_argument("--queries", type=Path, help="BEIR queries.jsonl, for the query-side probe")
    parser.add_argument("--modes", nargs="+", default=list(DOCUMENT_MODES), choices=list(DOCUMENT_MODES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: default); 1 is steadiest on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(json.dumps({"threads": torch.get_num_threads(), "load_average": os.getloadavg()}), flush=True)
    # Documents long enough that each is cut to N tokens (Chinese runs ~0.7 Gemma tokens per character).
    texts = _read_texts(args.corpus, 2 * args.batch, int(1.6 * max(args.tokens)))
    if len(texts) < 2 * args.batch:
        parser.error(
            f"{args.corpus}: fewer than {2 * args.batch} texts long enough for {max(args.tokens)} tokens"
        )
    timed, warm_up = texts[: args.batch], texts[args.batch :]
    for tokens in args.tokens:
        for mode in args.modes:
            row = probe_document(args.document, mode, timed, warm_up, tokens, args.repeats)
            print(json.dumps(row), flush=True)
    if args.query is not None and args.queries is not None:
        dim = read_manifest(args.document).dim
        for batch in (args.batch, 4 * args.batch):
            queries = _read_texts(args.queries, batch, 1)
            print(json.dumps(probe_query(args.query, queries, dim, args.repeats)), flush=True)
    print(json.dumps({"load_average": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
