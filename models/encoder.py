"""The encoder interface shared by every runtime, and the one place that picks a runtime.

An encoder is three steps with a typed value between them: tokenize -> run -> pool/normalize. The
ONNX runtime bakes pooling into the graph; the transformers runtime pools in torch. Callers only see
``encode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from models.manifest import ModelManifest, read_manifest

Device = Literal["auto", "cpu", "cuda"]
# "query": a document encoder with a query prompt of its own (an LLM embedder) encoding queries.
EncodeMode = Literal["document", "query"]


class Encoder(Protocol):
    manifest: ModelManifest

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Return a float32 array of shape (len(texts), manifest.dim), one row per text, in order."""
        ...


def load_encoder(
    model_dir: Path, threads: int = 0, device: Device = "auto", mode: EncodeMode = "document"
) -> Encoder:
    """Open the encoder in ``model_dir`` with the runtime its manifest names.

    torch is imported only for ``format == "hf"``: the service, which loads ONNX query encoders,
    never imports it.
    """
    manifest = read_manifest(model_dir)
    if manifest.format == "onnx":
        from models.onnx_encoder import OnnxEncoder

        return OnnxEncoder(model_dir, manifest=manifest, threads=threads)
    from models.hf_encoder import HFEncoder

    return HFEncoder(model_dir, manifest=manifest, threads=threads, device=device, mode=mode)
