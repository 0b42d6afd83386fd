"""Lever sweep for the frozen-EmbeddingGemma query alignment, on one GPU, from var/gpu/pack.npz.

Mirrors models.align.train.train_query_distillation (same batches, seeds, masks, losses, optimizer
groups, schedule, ridge start, selection on 300 held-out train queries every K steps, best step kept).
Dev is scored only at the step selection picked (and at the last step, for the curve); it never
chooses anything. Results go to $OUT/results.jsonl as each config ends; the config with the best
selection score leaves its trained weights in $OUT (fp16 chunks) for export on the CPU side.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
P = np.load(sys.argv[1] if len(sys.argv) > 1 else "var/gpu/pack.npz")
META = json.loads(str(P["meta"]))
PAD, EOS = int(P["pad"]), int(P["eos"])
QK = 32


def deq4(raw: np.ndarray, count: int) -> np.ndarray:
    blocks = np.frombuffer(
        raw.tobytes(), dtype=np.dtype([("d", "<f2"), ("qs", "u1", (16,))]), count=count // QK
    )
    qs = blocks["qs"]
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (nib * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


BASE = {}
for hf, shape in META["shapes"].items():
    if "w4:" + hf in P:
        BASE[hf] = torch.from_numpy(deq4(P["w4:" + hf], int(np.prod(shape))).reshape(shape))
    else:
        BASE[hf] = torch.from_numpy(np.array(P["w32:" + hf]))


def ragged(name: str) -> list[np.ndarray]:
    flat, off = P[f"{name}_flat"], P[f"{name}_off"]
    return [flat[off[i] : off[i + 1]].astype(np.int64) for i in range(len(off) - 1)]


TOK = {k: ragged(f"tok_{k}") for k in ("train", "pseudo", "extra", "sel", "dev")}
POS = {k: [list(map(int, r)) for r in ragged(f"pos_{k}")] for k in ("train", "sel", "dev")}


def unit8(name: str) -> torch.Tensor:
    v = torch.from_numpy(P[name + "_q"].astype(np.float32) * P[name + "_s"])
    return F.normalize(v, dim=-1).to(DEV)


CORPUS = unit8("corpus")
T_TRAIN = unit8("teacher_train")
T_PSEUDO = unit8("teacher_pseudo")
T_EXTRA = unit8("teacher_extra") if "teacher_extra_q" in P else torch.zeros((0, CORPUS.shape[1]), device=DEV)
N_DOCS = CORPUS.shape[0]
# Past this wall-clock time a run stops training early and is scored as it stands (marked "stopped").
DEADLINE = time.time() + float(os.environ.get("DEADLINE_S", "1e9"))


def collate(seqs: list[np.ndarray], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    cut = [s if len(s) <= max_tokens else np.concatenate([s[: max_tokens - 1], [EOS]]) for s in seqs]
    width = max(len(s) for s in cut)
    ids = np.full((len(cut), width), PAD, dtype=np.int64)
    mask = np.zeros((len(cut), width), dtype=np.int64)
    for i, s in enumerate(cut):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids).to(DEV), torch.from_numpy(mask).to(DEV)


class Tower(torch.nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        c = dict(META["config"])
        c["vocab_size"] = len(P["vocab"])
        c["pad_token_id"] = PAD
        config = BertConfig(
            **{k: v for k, v in c.items() if k not in ("architectures", "transformers_version", "dtype")}
        )
        config._attn_implementation = "sdpa"
        self.model = BertModel(config, add_pooling_layer=False)
        self.model.load_state_dict({k: v.clone() for k, v in BASE.items()}, strict=True)
        self.projection = torch.nn.Linear(384, CORPUS.shape[1], bias=False)
        self.max_tokens = cfg["max_tokens"]
        self.model.get_input_embeddings().requires_grad_(bool(cfg.get("train_embeddings")))

    def pooled(self, seqs: list[np.ndarray]) -> torch.Tensor:
        ids, mask = collate(seqs, self.max_tokens)
        hidden = self.model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def embed(self, seqs: list[np.ndarray]) -> torch.Tensor:
        return F.normalize(self.projection(self.pooled(seqs)), dim=-1)

    @torch.no_grad()
    def encode(self, seqs: list[np.ndarray], pooled_only: bool = False, bs: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        f = self.pooled if pooled_only else self.embed
        out = torch.cat([f(seqs[i : i + bs]) for i in range(0, len(seqs), bs)])
        self.train(was)
        return out


def batch_items(seed: int, step: int, n: int, bs: int) -> list[int]:
    per_epoch = n // bs
    perm = np.random.default_rng([seed, step // per_epoch]).permutation(n)
    off = (step % per_epoch) * bs
    return [int(i) for i in perm[off : off + bs]]


def scores(tower: Tower, split: str) -> dict[str, float]:
    vecs = tower.encode(TOK[split])
    top = (vecs @ CORPUS.T).topk(100, dim=-1).indices.cpu().numpy()
    ndcg, r100 = 0.0, 0.0
    for i, pos in enumerate(POS[split]):
        rel = set(pos)
        dcg = sum(1 / math.log2(r + 2) for r, doc in enumerate(top[i, :10]) if doc in rel)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), 10)))
        ndcg += dcg / idcg
        r100 += len(rel & set(top[i].tolist())) / len(rel)
    n = len(POS[split])
    return {"ndcg10": 100 * ndcg / n, "recall100": 100 * r100 / n}


def info_nce(v, docs, target, t, exclude):
    logits = v @ docs.T / t
    keep = torch.zeros_like(exclude)
    keep[torch.arange(len(target), device=DEV), target] = True
    logits = logits.masked_fill(exclude & ~keep, float("-inf"))
    return F.cross_entropy(logits, target)


def run(cfg: dict) -> dict:
    began = time.time()
    seed = 0
    torch.manual_seed(seed)
    tower = Tower(cfg).to(DEV)
    pseudo_seqs = {
        "none": [],
        "half": TOK["pseudo"][::2],
        "base": TOK["pseudo"],
        "base+extra": TOK["pseudo"] + TOK["extra"],
    }[cfg["pseudo"]]
    pseudo_t = {
        "none": T_PSEUDO[:0],
        "half": T_PSEUDO[::2],
        "base": T_PSEUDO,
        "base+extra": torch.cat([T_PSEUDO, T_EXTRA]),
    }[cfg["pseudo"]]
    train = TOK["train"]
    pos = POS["train"]
    # ridge start on frozen pooled features of the labelled queries
    feats = tower.encode(train, pooled_only=True)
    gram = feats.T @ feats + 1e-2 * torch.eye(feats.shape[1], device=DEV)
    w = torch.linalg.solve(gram, feats.T @ T_TRAIN).T
    with torch.no_grad():
        tower.projection.weight.copy_(w)
    named: dict[str, list[torch.nn.Parameter]] = {"query": [], "projection": []}
    for name, p in tower.named_parameters():
        if p.requires_grad:
            named["projection" if name.startswith("projection.") else "query"].append(p)
    rates = {"query": cfg["query_lr"], "projection": cfg["projection_lr"]}
    groups = []
    for part, params in named.items():
        for decay in (True, False):
            picked = [p for p in params if (p.ndim >= 2) == decay]
            if picked:
                groups.append({"params": picked, "lr": rates[part], "weight_decay": 0.01 if decay else 0.0})
    opt = torch.optim.AdamW(groups)
    steps, warm = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    best: dict[str, Any] = {"score": -1.0, "step": -1, "state": None}
    curve: dict[int, float] = {}

    def select(step: int) -> None:
        s = scores(tower, "sel")["ndcg10"]
        curve[step] = round(s, 2)
        if s > best["score"]:
            best.update(
                score=s,
                step=step,
                state={
                    k: v.detach().to("cpu", copy=True) for k, v in tower.named_parameters() if v.requires_grad
                },
            )

    select(0)
    tower.train()
    bs, pps, t, kt = cfg["batch_size"], cfg["pseudo_per_step"], cfg["temperature"], cfg["kl_temperature"]
    stopped = None
    for step in range(steps):
        if time.time() > DEADLINE:
            stopped = step
            select(step)
            break
        items = batch_items(seed, step, len(train), bs)
        rng = np.random.default_rng([seed, step])
        chosen = torch.tensor([pos[i][int(rng.integers(len(pos[i])))] for i in items], device=DEV)
        known = torch.zeros(len(items), N_DOCS, dtype=torch.bool, device=DEV)
        for r, i in enumerate(items):
            known[r, pos[i]] = True
        known |= CORPUS[chosen] @ CORPUS.T >= cfg["duplicate_cosine"]
        targets = T_TRAIN[items]
        if cfg.get("teacher_mask") is not None:
            # teacher false-negative masking: documents the teacher itself ranks above the labelled
            # positive (by a margin) are not pushed away
            tscore = targets @ CORPUS.T
            known |= tscore >= tscore.gather(1, chosen[:, None]) + cfg["teacher_mask"]
        v = tower.embed([train[i] for i in items])
        loss = info_nce(v, CORPUS, chosen, t, known)
        if cfg.get("teacher_hard"):
            # teacher-mined hard negatives: an extra softmax over the positive and the teacher's top-k
            # non-positive documents, at the same temperature
            tscore = (targets @ CORPUS.T).masked_fill(known, float("-inf"))
            hard = tscore.topk(cfg["teacher_hard"], dim=-1).indices
            cand = torch.cat([chosen[:, None], hard], dim=1)
            logits = torch.einsum("bd,bkd->bk", v, CORPUS[cand]) / t
            loss = loss + F.cross_entropy(logits, torch.zeros(len(items), dtype=torch.long, device=DEV))
        if pps:
            extra = batch_items(seed + 1, step, len(pseudo_seqs), pps)
            v = torch.cat([v, tower.embed([pseudo_seqs[i] for i in extra])])
            targets = torch.cat([targets, pseudo_t[extra]])
        student = F.log_softmax(v @ CORPUS.T / kt, dim=-1)
        wanted = F.log_softmax(targets @ CORPUS.T / kt, dim=-1)
        loss = loss + cfg["kl_weight"] * F.kl_div(student, wanted, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg["select_every"] == 0 or step + 1 == steps:
            select(step + 1)
            tower.train()
    final_dev = scores(tower, "dev")
    last = {k: v.detach().to("cpu", copy=True) for k, v in tower.named_parameters() if v.requires_grad}
    with torch.no_grad():
        for k, p in tower.named_parameters():
            if p.requires_grad:
                p.copy_(best["state"][k])
    dev = scores(tower, "dev")
    del last
    return {
        "name": cfg["name"],
        "config": cfg,
        "selection_best": round(best["score"], 2),
        "shipped_step": best["step"],
        "dev_at_selected": {k: round(v, 2) for k, v in dev.items()},
        "dev_at_last": {k: round(v, 2) for k, v in final_dev.items()},
        "selection_curve": curve,
        "stopped_at": stopped,
        "seconds": round(time.time() - began, 1),
        "state": best["state"],
    }


BASE_CFG: dict[str, Any] = dict(
    steps=300,
    warmup=30,
    select_every=50,
    batch_size=32,
    pseudo_per_step=32,
    temperature=0.02,
    kl_temperature=0.02,
    kl_weight=1.0,
    duplicate_cosine=0.95,
    query_lr=5e-5,
    projection_lr=1e-4,
    max_tokens=64,
    pseudo="base",
)
L = dict(steps=1000, warmup=100, select_every=100)
SWEEP: list[dict[str, Any]] = [
    dict(name="recipe-300"),
    dict(name="steps-1000", **L),
    dict(name="maxtok-128-1000", max_tokens=128, **L),
    dict(name="teacher-hard30-1000", teacher_hard=30, **L),
    dict(name="pseudo-none-1000", pseudo="none", pseudo_per_step=0, **L),
    dict(name="pseudo-half-1000", pseudo="half", **L),
    dict(name="pseudo-extra-1000", pseudo="base+extra", **L),
    dict(name="embeddings-1000", train_embeddings=True, **L),
    dict(name="steps-3000", steps=3000, warmup=300, select_every=250),
    dict(name="batch64-1000", batch_size=64, pseudo_per_step=64, **L),
    dict(name="lr1e-4-1000", query_lr=1e-4, projection_lr=2e-4, **L),
    dict(name="teacher-mask0-300", teacher_mask=0.0),
    dict(name="teacher-mask0-1000", teacher_mask=0.0, **L),
    dict(name="teacher-mask-0.03-300", teacher_mask=-0.03),
    dict(name="dup-0.90-300", duplicate_cosine=0.90),
    dict(name="dup-none-300", duplicate_cosine=2.0),
    dict(name="kl2-300", kl_weight=2.0),
    dict(name="t0.05-300", temperature=0.05, kl_temperature=0.05),
    dict(
        name="combo-3000",
        steps=3000,
        warmup=300,
        select_every=250,
        pseudo="base+extra",
        max_tokens=128,
        batch_size=64,
        pseudo_per_step=64,
    ),
    dict(name="steps-2000-extra", steps=2000, warmup=200, select_every=200, pseudo="base+extra"),
]


def save_state(res: dict, state: dict, directory: str) -> None:
    """fp16 chunks of <= 15 MB (the transfer limit is 16 MiB a file)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    chunk: dict[str, torch.Tensor] = {}
    size, n = 0, 0
    for k, v in sorted(state.items()):
        # model tensors as trained-minus-base (the committed delta's form); the projection as is
        base = BASE.get(k.removeprefix("model."))
        t = (v - base if base is not None else v).half().contiguous()
        if size + t.numel() * 2 > 15_000_000 and chunk:
            save_file(chunk, os.path.join(directory, f"best-{n}.safetensors"), metadata={"name": res["name"]})
            chunk, size, n = {}, 0, n + 1
        chunk[k] = t
        size += t.numel() * 2
    if chunk:
        save_file(chunk, os.path.join(directory, f"best-{n}.safetensors"), metadata={"name": res["name"]})
    with open(os.path.join(directory, "best.json"), "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    only = os.environ.get("ONLY")
    budget = float(os.environ.get("BUDGET_S", "1e9"))
    smoke = int(os.environ.get("SMOKE", "0"))
    state_dir = os.environ.get("STATE_DIR", OUT)
    t0 = time.time()
    best_run = None
    print(
        f"device {DEV}, vocab {len(P['vocab'])}, texts { ({k: len(v) for k, v in TOK.items()}) }",
        flush=True,
    )
    for spec in SWEEP:
        cfg = {**BASE_CFG, **spec}
        if only and cfg["name"] not in only.split(","):
            continue
        if "extra" in cfg["pseudo"] and not len(TOK["extra"]):
            continue
        if smoke:
            cfg.update(steps=smoke, warmup=1, select_every=smoke)
        if time.time() - t0 > budget:
            print("budget spent, skipping", cfg["name"], flush=True)
            continue
        res = run(cfg)
        state = res.pop("state")
        print(json.dumps(res), flush=True)
        with open(os.path.join(OUT, "results.jsonl"), "a") as fh:
            fh.write(json.dumps(res) + "\n")
        if best_run is None or res["selection_best"] > best_run[0]["selection_best"]:
            best_run = (res, state)
    if best_run is not None:
        save_state(*best_run, state_dir)
        print("best by selection:", best_run[0]["name"], best_run[0]["selection_best"], flush=True)
