"""Symmetric fine-tuning of a small BERT-family embedder on BEIR training qrels: the fair small baseline.

The asymmetric pair (a small query encoder aligned into an LLM's document space) is trained on the
training split; a fair symmetric baseline gets the same data. Here one set of weights (by default
multilingual-e5-small) encodes the queries (``query: ``) and the documents (its manifest prompt,
``passage: ``) and learns in-batch InfoNCE: each training query against its positive and the other
queries' positives of the batch, copies of its own positives masked (never negatives).

Phases, each reported with its seconds (and the selection figure where there is one):

1. data: the training split (dev/test are refused), a seeded set of its queries held out for selection;
2. base: nDCG@10 of the untrained weights on the selection queries over the whole corpus;
3. training: AdamW, linear warm-up then linear decay to zero, the embeddings (word, position, type)
   frozen, gradients clipped, deterministic from the seed (batch order, positives and dropout);
4. fine-tuned: nDCG@10 on the selection queries again;
5. build: a transformers document encoder directory (weights, tokenizer, manifest in a new space),
   written to a hidden staging directory and renamed into place, so a crash leaves nothing that looks
   built;
6. export: its ONNX query encoder (``models.export``), whose manifest records ``derived_from``, so the
   evaluation classifies the pair as symmetric-bert.

A JSON report (configuration, data fingerprints, figures, losses) is written beside the model
directory. Scoring lives above this package (``evaluation``), so it is passed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from transformers import AutoTokenizer

from models.align.data import BeirTrainData, load_beir_train
from models.align.losses import info_nce
from models.align.selection import PhaseReport, Scorer, selection_score, split_selection
from models.hf_loading import load_hf_model
from models.manifest import (
    MANIFEST_FILE,
    ModelManifest,
    check_replaceable,
    sha256_file,
    staged_model_dir,
    verify_manifest,
    write_manifest,
)
from models.pooling import finish, pool
from models.training_loop import LoopConfig, ParamGroup, run_loop

Log = Callable[[str], None]
DEFAULT_BASE = "multilingual-e5-small"
DEFAULT_NAME = "multilingual-e5-small-ft"
REPORT_SUFFIX = ".finetune.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json")


class FinetuneError(ValueError):
    """Input the fine-tuning cannot use (dataset, base model, sizes); the message says which."""


class FinetuneConfig(LoopConfig):
    """Everything a run depends on; recorded whole in the report."""

    name: str = Field(default=DEFAULT_NAME, description="Built document encoder, and its new space.")
    base_model: str = Field(default=DEFAULT_BASE, description="Built BERT-family document encoder.")
    dataset: Path = Field(description="BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    split: str = "train"
    query_field: str = "text"
    selection_queries: int = Field(default=300, ge=0, description="Held out of the training split.")
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=32, gt=1, description="Queries per step (and as many positives).")
    lr: float = Field(default=5e-5, gt=0)
    warmup_steps: int = Field(default=30, ge=0)
    temperature: float = Field(default=0.02, gt=0)
    query_prompt: str = Field(default="query: {text}", description="Must hold {text}; the export's prompt.")
    query_max_tokens: int = Field(default=64, gt=0, description="Truncation of training queries.")
    document_max_tokens: int = Field(
        default=256, gt=0, description="Truncation of training documents (scoring uses the manifest's)."
    )
    encode_batch_size: int = Field(default=32, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if "{text}" not in self.query_prompt:
            raise ValueError("query_prompt must hold {text}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name {self.name!r} is not a plain directory name")
        if self.name == self.base_model:
            raise ValueError(f"name {self.name!r} would replace the base model; choose another name")
        return self


@dataclass
class FinetuneResult:
    document: ModelManifest
    query_onnx: ModelManifest
    report_path: Path
    phases: list[PhaseReport] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


class SymmetricEncoder:
    """One BERT-family model for both sides, pooled and normalized as the transformers runtime does
    (right padding, the manifest's pooling and dim), so the figures measured here are those of the
    built encoder."""

    def __init__(self, model_dir: Path, manifest: ModelManifest) -> None:
        if manifest.decoder_only or manifest.format != "hf" or manifest.role != "document":
            raise FinetuneError(
                f"{model_dir}: the base must be a BERT-family transformers document encoder, not "
                f"{manifest.architecture} ({manifest.role}, {manifest.format})"
            )
        self.manifest = manifest
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.padding_side = "right"
        self.model: Any = load_hf_model(model_dir, attn_implementation="sdpa")
        embeddings = getattr(self.model, "embeddings", None)  # BERT-family layout: word, position, type
        frozen = embeddings if isinstance(embeddings, torch.nn.Module) else self.model.get_input_embeddings()
        frozen.requires_grad_(False)

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def embed(self, texts: Sequence[str], prompt: str, max_tokens: int) -> torch.Tensor:
        """(len(texts), dim) unit vectors, with gradients when the caller allows them."""
        encoded = self.tokenizer(
            [prompt.replace("{text}", text) for text in texts],
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        mask = encoded["attention_mask"]
        hidden = self.model(input_ids=encoded["input_ids"], attention_mask=mask).last_hidden_state
        return finish(pool(hidden, mask, self.manifest.pooling), self.manifest.dim, normalize=True)

    def encode(self, texts: Sequence[str], prompt: str, batch_size: int) -> np.ndarray:
        """No-grad vectors in eval mode at the manifest's truncation, in the caller's order."""
        out = np.zeros((len(texts), self.manifest.dim), dtype=np.float32)
        # Longest first: similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    vectors = self.embed([texts[i] for i in chunk], prompt, self.manifest.max_tokens)
                    out[chunk] = vectors.numpy()
        finally:
            self.model.train(was_training)
        return out


@dataclass
class _Data:
    beir: BeirTrainData
    train_ids: list[str]
    selection_ids: list[str]
    doc_ids: list[str]


def _load_data(config: FinetuneConfig, log: Log) -> _Data:
    if not config.dataset.is_dir():
        raise FinetuneError(f"dataset directory {config.dataset} not found (BEIR layout expected)")
    beir = load_beir_train(config.dataset, config.split, query_field=config.query_field)
    train_ids, selection_ids = split_selection(beir, config.selection_queries, config.seed)
    if len(train_ids) < config.batch_size:
        raise FinetuneError(
            f"{len(train_ids)} training queries (after holding {len(selection_ids)} out for selection) "
            f"cannot fill one batch of {config.batch_size}; lower --batch-size or --selection-queries"
        )
    log(
        f"finetune: {len(train_ids)} training queries, {len(selection_ids)} held out for selection, "
        f"{len(beir.corpus)} documents"
    )
    return _Data(beir, train_ids, selection_ids, list(beir.corpus))


def _score(encoder: SymmetricEncoder, config: FinetuneConfig, data: _Data, scorer: Scorer) -> float | None:
    """nDCG@10 of the selection queries over the whole corpus; None without selection queries."""
    if not data.selection_ids:
        return None
    beir = data.beir
    documents = encoder.encode(
        [beir.corpus[d] for d in data.doc_ids], encoder.manifest.prompt, config.encode_batch_size
    )
    queries = encoder.encode(
        [beir.queries[q] for q in data.selection_ids], config.query_prompt, config.encode_batch_size
    )
    relevant = {q: beir.positives[q] for q in data.selection_ids}
    return selection_score(scorer, data.selection_ids, queries, data.doc_ids, documents, relevant)


def train(
    encoder: SymmetricEncoder,
    config: FinetuneConfig,
    data: _Data,
    *,
    log: Log,
    progress: bool,
) -> list[float]:
    """``config.steps`` steps of in-batch InfoNCE; returns the loss of every step.

    Step s takes the queries of ``batch_items(seed, s, ...)`` and, per query, one of its positives
    drawn from a generator seeded by (seed, s); dropout draws from the torch RNG the loop seeds.
    """
    beir = data.beir
    every = max(1, config.steps // 10)

    def step_loss(step: int, items: list[int]) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, step])
        qids = [data.train_ids[i] for i in items]
        chosen = [beir.positives[q][int(rng.integers(len(beir.positives[q])))] for q in qids]
        # A document of the batch that is one of query i's positives is never its negative.
        exclude = torch.tensor([[doc in beir.positives[q] for doc in chosen] for q in qids])
        queries = encoder.embed([beir.queries[q] for q in qids], config.query_prompt, config.query_max_tokens)
        documents = encoder.embed(
            [beir.corpus[d] for d in chosen], encoder.manifest.prompt, config.document_max_tokens
        )
        return info_nce(queries, documents, torch.arange(len(qids)), config.temperature, exclude)

    losses: list[float] = []

    def report(steps: int, loss: float) -> None:
        losses.append(loss)
        if steps % every == 0 or steps == config.steps:
            window = losses[-every:]
            log(f"finetune: step {steps}/{config.steps}, mean loss {sum(window) / len(window):.4f}")

    result = run_loop(
        config,
        [ParamGroup(list(encoder.named_trainable().values()), config.lr)],
        len(data.train_ids),
        step_loss,
        desc="finetune",
        train_mode=[encoder.model],  # dropout on, as in any fine-tuning
        progress=progress,
        on_step=report,
    )
    return result.losses


def _source(base: ModelManifest, config: FinetuneConfig, data: _Data) -> str:
    return (
        f"{base.name} ({base.fingerprint[:12]}) fine-tuned by `medsearch models finetune-e5`: symmetric "
        f"in-batch InfoNCE (temperature {config.temperature:g}) on {config.dataset.name} {config.split} "
        f"qrels ({len(data.train_ids)} queries, {len(data.selection_ids)} held out for selection), "
        f"AdamW lr {config.lr:g}, batch {config.batch_size}, {config.steps} steps "
        f"({config.warmup_steps} warm-up), embeddings frozen, seed {config.seed}"
    )


def build_document_encoder(
    encoder: SymmetricEncoder,
    base_dir: Path,
    out_dir: Path,
    manifest: ModelManifest,
) -> ModelManifest:
    """The trained weights, the base's tokenizer files and ``manifest`` (sealed) in ``out_dir``."""
    with staged_model_dir(out_dir, manifest.name) as work:
        encoder.model.save_pretrained(work, safe_serialization=True)
        for path in sorted(base_dir.iterdir()):
            # Tokenizer and other side files; the weights and config are the ones just saved.
            keep = path.is_file() and path.name != MANIFEST_FILE and not path.name.endswith(_WEIGHT_SUFFIXES)
            if keep and not (work / path.name).exists():
                shutil.copy2(path, work / path.name)
        return write_manifest(work, manifest)


def _dataset_info(config: FinetuneConfig, data: _Data) -> dict[str, Any]:
    root = config.dataset
    files = {
        "corpus": root / "corpus.jsonl",
        "queries": root / "queries.jsonl",
        "qrels": root / "qrels" / f"{config.split}.tsv",
    }
    selection = "\n".join(sorted(data.selection_ids)).encode()
    return {
        "path": str(root.resolve()),
        "split": config.split,
        **{f"{key}_sha256": sha256_file(path) for key, path in files.items()},
        "documents": len(data.doc_ids),
        "training_queries": len(data.train_ids),
        "selection_queries": len(data.selection_ids),
        "selection_ids_sha256": hashlib.sha256(selection).hexdigest(),
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def finetune(
    config: FinetuneConfig,
    *,
    models_dir: Path,
    scorer: Scorer,
    log: Log = print,
    progress: bool = True,
    threads: int = 0,
) -> FinetuneResult:
    """Run every phase and build ``config.name`` and ``config.name``-onnx into ``models_dir``."""
    from models.export import export_query_encoder

    if threads:
        torch.set_num_threads(threads)
    phases: list[PhaseReport] = []

    def record(figures: PhaseReport) -> None:
        phases.append(figures)
        score = (
            "" if figures.selection_ndcg10 is None else f", selection nDCG@10 {figures.selection_ndcg10:.1f}"
        )
        log(f"finetune: {figures.phase} done in {figures.seconds:.1f} s{score}")

    began = time.perf_counter()
    data = _load_data(config, log)
    base_dir = models_dir / config.base_model
    base = verify_manifest(base_dir)
    out_dir = models_dir / config.name
    onnx_dir = models_dir / f"{config.name}-onnx"
    for target in (out_dir, onnx_dir):  # before the training, not after it
        check_replaceable(target, target.name)
    encoder = SymmetricEncoder(base_dir, base)
    record(PhaseReport("data and base model", time.perf_counter() - began))

    began = time.perf_counter()
    before = _score(encoder, config, data, scorer)
    record(PhaseReport("base", time.perf_counter() - began, selection_ndcg10=before))

    began = time.perf_counter()
    losses = train(encoder, config, data, log=log, progress=progress)
    record(PhaseReport("training", time.perf_counter() - began, steps=len(losses), last_loss=losses[-1]))

    began = time.perf_counter()
    after = _score(encoder, config, data, scorer)
    record(PhaseReport("fine-tuned", time.perf_counter() - began, selection_ndcg10=after))

    began = time.perf_counter()
    manifest = base.model_copy(
        update={
            "name": config.name,
            "space": config.name,  # new weights, new space: nothing encoded by the base compares
            "source": _source(base, config, data),
            "derived_from": base.fingerprint,
            "card": "",
            "figures": {},  # measured on dev by `medsearch eval`, not here
        }
    )
    document = build_document_encoder(encoder, base_dir, out_dir, manifest)
    log(f"finetune: {out_dir} ready, space {document.space!r}, fingerprint {document.fingerprint[:12]}")
    record(PhaseReport("build", time.perf_counter() - began))

    began = time.perf_counter()
    onnx = export_query_encoder(
        out_dir,
        onnx_dir,
        name=onnx_dir.name,
        prompt=config.query_prompt,
        progress=log,
    )
    record(PhaseReport("onnx export", time.perf_counter() - began))

    report_path = models_dir / f"{config.name}{REPORT_SUFFIX}"
    _write_json(
        report_path,
        {
            "config": json.loads(config.model_dump_json()),
            "base": {"name": base.name, "fingerprint": base.fingerprint},
            "dataset": _dataset_info(config, data),
            "selection_ndcg10": {"base": before, "fine_tuned": after},
            "phases": [asdict(p) for p in phases],
            "losses": losses,
            "document_encoder": {
                "name": document.name,
                "space": document.space,
                "fingerprint": document.fingerprint,
            },
            "query_encoder": {
                "name": onnx.name,
                "space": onnx.space,
                "fingerprint": onnx.fingerprint,
                "derived_from": onnx.derived_from,
            },
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    )
    log(f"finetune: report {report_path}")
    return FinetuneResult(document, onnx, report_path, phases, losses)
