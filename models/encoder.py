"""The encoder interface shared by every runtime (``models.loading`` picks the runtime).

An encoder is three steps with a typed value between them: tokenize -> run -> pool/normalize. The
ONNX runtime bakes pooling into the graph; the transformers runtime pools in torch. Callers only see
``encode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from models.manifest import ModelManifest

Device = Literal["auto", "cpu", "cuda"]
# "query": a document encoder with a query prompt of its own (an LLM embedder) encoding queries.
EncodeMode = Literal["document", "query"]
# Arithmetic of the transformers runtime (models/precision.py); declared here so the CLI needs no torch.
Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "int8")


class Encoder(Protocol):
    manifest: ModelManifest

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Return a float32 array of shape (len(texts), manifest.dim), one row per text, in order."""
        ...


@runtime_checkable
class Chunkable(Protocol):
    """An encoder that can say how it counts tokens, so long documents can be split to fit it
    (indexer/chunking.py). Optional: ``isinstance(encoder, Chunkable)`` tells whether one can."""

    manifest: ModelManifest

    @property
    def text_budget(self) -> int:
        """Tokens of document text one input holds: ``manifest.max_tokens`` less what the prompt
        template and the special tokens (EOS included) take."""
        ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character span ``(start, end)`` in ``text`` of each token of the raw text (no prompt, no
        special tokens, no truncation), in order."""
        ...
