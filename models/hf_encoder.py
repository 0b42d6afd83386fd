"""The transformers runtime: document encoders of any architecture (decoder-only LLMs and BERT-family).

Steps: render the manifest prompt (the query prompt in query mode) -> tokenize and truncate (plus EOS
for last-token pooling) -> pad (left for last-token pooling, right otherwise) -> run -> pool -> Dense
layers (sentence-transformers embedders) -> keep the first ``dim`` dims -> normalize. Padding is
done here, not by the tokenizer, so the layout is explicit and testable.

``precision`` chooses the arithmetic (models/precision.py): float32 by default; a fast path (bf16,
int8) replaces the float32 model only after it passed the quality gate (models/precision_gate.py),
otherwise the encoder stays float32 and says why in one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoTokenizer

from models.dense import load_dense_stack, output_width
from models.encoder import Device, EncodeMode, Precision
from models.hf_loading import load_hf_model
from models.manifest import ManifestError, ModelManifest
from models.pooling import finish, pool
from models.precision import FAST_PATHS, FastPrecision, fast_path_for, native_cpu_bf16
from models.precision_gate import GATE_BATCH_SIZE, GATE_TEXTS, GateResult, check
from models.projection import load_projection

logger = logging.getLogger("medsearch.models")

PaddingSide = Literal["left", "right"]

# Batch invariance (same vector alone or in any batch) is what the index relies on; SDPA keeps it
# (tests/test_hf_encoder.py checks) and, unlike eager, never materializes the (seq x seq) attention.
# Padded slots may come out non-finite under SDPA (a left pad attends to nothing) but never reach a
# pooled value: last-token pooling reads the final, real column, and mean pooling pads on the right.
ATTN_IMPLEMENTATION = "sdpa"

# On CUDA, batches of at least this many documents (length-sorted, so padding stays small): a GPU is
# only busy with large batches, and batch invariance makes the vectors independent of the size.
CUDA_BATCH_SIZE = 128


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64, 1 = real token
    position_ids: torch.Tensor  # (batch, seq) int64, 0 at each row's first real token


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, side: PaddingSide) -> Batch:
    """Pad token id lists to one length; positions count real tokens only, so left padding
    does not shift a sequence's positions."""
    if not ids:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(input_ids=input_ids, attention_mask=mask, position_ids=positions)


def _pick_device(device: Device) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class HFEncoder:
    """``Encoder`` over a local transformers directory (config, safetensors, tokenizer, manifest)."""

    def __init__(
        self,
        model_dir: Path,
        manifest: ModelManifest,
        threads: int = 0,
        device: Device = "auto",
        mode: EncodeMode = "document",
        precision: Precision = "fp32",
    ) -> None:
        if manifest.format != "hf":
            raise ManifestError(f"{model_dir}: format {manifest.format!r} is not a transformers directory")
        if threads > 0:
            torch.set_num_threads(threads)
        self.manifest = manifest
        self.device = _pick_device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model: Any = load_hf_model(model_dir, ATTN_IMPLEMENTATION).to(self.device)
        self.dense = load_dense_stack(model_dir, manifest.dense_layers).to(self.device)
        # An aligned query encoder's projection into a wider document space (models/projection.py).
        projection = load_projection(model_dir)
        if projection is not None:
            self.dense.append(projection.requires_grad_(False).to(self.device))
        width = output_width(self.dense, int(self.model.config.get_text_config().hidden_size))
        if manifest.dim > width:
            raise ManifestError(f"{model_dir}: manifest dim {manifest.dim} > output width {width}")
        if mode == "query" and manifest.query_prompt is None:
            raise ManifestError(f"{model_dir}: {manifest.name} has no query prompt; it cannot encode queries")
        self.mode = mode
        self.padding_side: PaddingSide = "left" if manifest.pooling == "last_token" else "right"
        self.eos_id: int | None = None
        if manifest.pooling == "last_token":
            if self.tokenizer.eos_token_id is None:
                raise ManifestError(f"{model_dir}: last_token pooling needs a tokenizer with an EOS token")
            self.eos_id = int(self.tokenizer.eos_token_id)
        pad_id = self.tokenizer.pad_token_id
        # Padded slots are masked out, so any id works; EOS is the usual stand-in for decoders.
        self.pad_id = int(pad_id if pad_id is not None else (self.eos_id or 0))
        self.min_batch_size = CUDA_BATCH_SIZE if self.device.type == "cuda" else 1
        # The precision in use after the gate, and the gate's figures (None: nothing was gated).
        self.precision: str = "fp32"
        self.gate: GateResult | None = None
        candidate = fast_path_for(precision, self.device, native_cpu_bf16())
        if candidate is not None:
            self._try_fast_path(candidate)

    def _try_fast_path(self, candidate: FastPrecision) -> None:
        """Encode the gate sample in float32, then with ``candidate``; keep the faster model only if
        every vector is within the gate's cosine of float32."""
        reference = self.encode(GATE_TEXTS, batch_size=GATE_BATCH_SIZE)
        fp32 = self.model
        self.model = FAST_PATHS[candidate](fp32)
        self.gate = check(candidate, reference, self.encode(GATE_TEXTS, batch_size=GATE_BATCH_SIZE))
        if self.gate.passed:
            self.precision = candidate
            logger.info("%s: %s; encoding in %s", self.manifest.name, self.gate.summary(), candidate)
        else:
            self.model = fp32
            logger.warning("%s: %s; falling back to float32", self.manifest.name, self.gate.summary())

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: prompt rendered, truncated to ``max_tokens``, EOS last for last-token
        pooling (the text is cut, never the EOS)."""
        render = self.manifest.render_query if self.mode == "query" else self.manifest.render
        rendered = [render(text) for text in texts]
        limit = self.manifest.max_tokens
        encoded = self.tokenizer(rendered, truncation=True, max_length=limit, add_special_tokens=True)
        ids: list[list[int]] = [list(row) for row in encoded["input_ids"]]
        if self.eos_id is None:
            return ids
        eos = self.eos_id
        return [row if row and row[-1] == eos else [*row[: limit - 1], eos] for row in ids]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model actually sees per text (after prompt, truncation and EOS)."""
        return [len(row) for row in self.tokenize(texts)]

    @property
    def text_budget(self) -> int:
        """Tokens of text one input holds: ``max_tokens`` less the prompt's and the special tokens'
        (EOS included), measured on an empty text. A prompt that merges with the text's first token
        makes this one token too cautious, never too generous."""
        return self.manifest.text_budget(self.count_tokens([""])[0])

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the raw text's tokens (no prompt, no special tokens, no truncation)."""
        if not self.tokenizer.is_fast:
            raise ManifestError(f"{self.manifest.name}: token spans need a fast (Rust) tokenizer")
        encoded = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
        )
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    def collate(self, ids: Sequence[Sequence[int]]) -> Batch:
        return pad_batch(ids, self.pad_id, self.padding_side)

    @torch.inference_mode()
    def _embed(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        batch = self.collate(ids)
        inputs = {
            "input_ids": batch.input_ids.to(self.device),
            "attention_mask": batch.attention_mask.to(self.device),
        }
        if self.padding_side == "left":
            # Models derive positions from the column index; left padding would shift them.
            inputs["position_ids"] = batch.position_ids.to(self.device)
        hidden = self.model(**inputs).last_hidden_state.float()
        pooled = self.dense(pool(hidden, inputs["attention_mask"], self.manifest.pooling))
        return finish(pooled, self.manifest.dim, self.manifest.normalize).cpu()

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        out = np.zeros((len(texts), self.manifest.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        batch_size = max(batch_size, self.min_batch_size)
        # Longest first: similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self._embed([ids[i] for i in chunk]).numpy()
        return out
