"""Teacher vectors for an extra pseudo-query set (clauses of corpus answers), for the pseudo-size lever."""

import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

from models.align.data import load_beir_train
from models.align.frozen import teacher_query_vectors
from models.align.pseudo import corpus_sentences, question_bodies
from models.align.selection import split_selection

d = Path("../shared/data/cmedqa-im")
data = load_beir_train(d, "train")
train_ids, sel = split_selection(data, 300, 0)
docs = [data.corpus[k] for k in data.corpus]
have = set(corpus_sentences(docs, 15000, 8, 60, 0)) | set(
    question_bodies(d / "queries.jsonl", set(train_ids), "question", 96)
)
clause = re.compile(r"[，,。！？!?；;\n]")
pool = sorted({c.strip() for t in docs for c in clause.split(t) if 10 <= len(c.strip()) <= 40} - have)
random.Random(1).shuffle(pool)
texts = pool[: int(sys.argv[1])]
print("clause pool", len(pool), "taking", len(texts), flush=True)
out = Path("var/align/extra-pseudo")
out.mkdir(parents=True, exist_ok=True)
(out / "texts.json").write_text(json.dumps(texts, ensure_ascii=False))
t = time.time()
v = teacher_query_vectors(
    Path("var/models/embeddinggemma-300m"), texts, out, batch_size=32, log=print, threads=2
)
np.save(out / "vectors.npy", v.astype(np.float16))
print("done", v.shape, time.time() - t, flush=True)
