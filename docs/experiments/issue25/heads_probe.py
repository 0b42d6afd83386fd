"""Probe: do linear heads on both sides (query head after the served tower, document head after
EmbeddingGemma) pay for the k4 pair? Features frozen: the served int8 tower's query vectors and the
cached EmbeddingGemma document vectors. Heads start at the identity and are trained with InfoNCE of the
train labels against the whole corpus; scored on the 300 held-out *train* selection queries (never dev).

    python docs/experiments/issue25/heads_probe.py [STEPS LR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsearch.align_cli import corpus_vectors_from_cache, ndcg10
from models.align.data import load_beir_train
from models.align.negatives import rank_dense
from models.align.selection import split_selection
from models.loading import load_encoder

DATASET = Path("../shared/data/cmedqa-im")
QUERY_MODEL = Path("var/models/embeddinggemma-300m-k4-query-onnx-int8")
DOCUMENT_MODEL = Path("var/models/embeddinggemma-300m")


def main(steps: int = 600, lr: float = 1e-3, temperature: float = 0.02, batch: int = 64) -> None:
    data = load_beir_train(DATASET, "train")
    train_ids, selection = split_selection(data, 300, 0)
    doc_ids = list(data.corpus)
    row = {d: i for i, d in enumerate(doc_ids)}
    docs = corpus_vectors_from_cache(Path("var/cache"), DATASET / "corpus.jsonl", 0)(
        DOCUMENT_MODEL, doc_ids, [data.corpus[d] for d in doc_ids]
    )
    labelled = [q for q in train_ids if any(d in row for d in data.positives[q])]
    encoder = load_encoder(QUERY_MODEL)
    queries = torch.from_numpy(encoder.encode([data.queries[q] for q in labelled]))
    held = encoder.encode([data.queries[q] for q in selection])
    relevant = {q: data.positives[q] for q in selection}
    base = ndcg10(rank_dense(selection, held, doc_ids, docs, 100), relevant)
    print(f"no heads: selection nDCG@10 {base:.2f}", flush=True)

    documents = torch.from_numpy(np.asarray(docs, dtype=np.float32))
    dim = documents.shape[1]
    query_head = torch.nn.Parameter(torch.eye(dim))
    doc_head = torch.nn.Parameter(torch.eye(dim))
    optimizer = torch.optim.AdamW([query_head, doc_head], lr=lr, weight_decay=0.0)
    positives = [[row[d] for d in data.positives[q] if d in row] for q in labelled]
    generator = np.random.default_rng(0)
    for step in range(1, steps + 1):
        items = generator.choice(len(labelled), batch, replace=False)
        q = F.normalize(queries[items] @ query_head.T, dim=-1)
        d = F.normalize(documents @ doc_head.T, dim=-1)
        scores = q @ d.T / temperature
        mask = torch.zeros_like(scores, dtype=torch.bool)
        target = torch.tensor([positives[i][generator.integers(len(positives[i]))] for i in items])
        for r, i in enumerate(items):
            mask[r, positives[i]] = True
        mask[torch.arange(batch), target] = False
        loss = F.cross_entropy(scores.masked_fill(mask, -1e4), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                hq = F.normalize(torch.from_numpy(held) @ query_head.T, dim=-1).numpy()
                hd = F.normalize(documents @ doc_head.T, dim=-1).numpy()
            score = ndcg10(rank_dense(selection, hq, doc_ids, hd, 100), relevant)
            print(f"step {step}: loss {loss.item():.3f}, selection nDCG@10 {score:.2f}", flush=True)


if __name__ == "__main__":
    import sys

    main(steps=int(sys.argv[1]), lr=float(sys.argv[2])) if len(sys.argv) == 3 else main()
