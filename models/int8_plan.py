"""How a query encoder's ONNX graph becomes int8, written beside its trained delta and committed.

The default (every MatMul per channel, embedding rows per row) suits e5-small. An EmbeddingGemma
student needs two choices of its own, which the registry's rebuild (``make demo``) must repeat without
the training data:

- ``keep_float``: MatMul nodes left in float32, by name fragment. Gemma's MLP ``down_proj`` reads the
  gated GELU output, whose outliers per-tensor dynamic activation quantization cannot hold: measured on
  400 train titles (K = 4 student), all MatMuls int8 give a mean cosine of 0.9891 to fp32 (min 0.956)
  and cost 1.1 nDCG@10 on the dev gate; leaving ``down_proj`` in float32 gives 0.9979 (min 0.9968) for
  3.31 instead of 2.79 ms a query (fp32: 9.93 ms).
- ``blockwise``: MatMul nodes whose weights are stored as 8-bit blocks of ``BLOCK_SIZE`` along the
  input (onnxruntime's MatMulNBits, int8 compute: activations are quantized per block too, so one
  outlier spoils only its block). Measured for the same ``down_proj`` (K = 4 student, 300 train
  titles): mean cosine to fp32 0.99555 against 0.99556 in float32, batch 1 3.48 -> 3.09 ms, batch 8
  17.92 -> 16.07 ms; every MatMul blockwise is slower than per-channel dynamic int8 (5.10 ms).
- ``vocabulary``: the word-embedding rows kept (models/vocabulary.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from models.vocabulary import KeptTokens, vocabulary_digest

# Beside a query delta ``NAME.safetensors``: ``NAME.int8.json``.
INT8_PLAN_SUFFIX = ".int8.json"
# Input channels per scale of a ``blockwise`` MatMul: onnxruntime's default, and the size its int8
# kernels are tuned for.
BLOCK_SIZE = 128


class Int8Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keep_float: list[str] = Field(default_factory=list, description="MatMul node-name fragments kept float.")
    blockwise: list[str] = Field(
        default_factory=list, description="MatMul node-name fragments stored as 8-bit weight blocks."
    )
    vocabulary: KeptTokens | None = None


def save_int8_plan(plan: Int8Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(plan.model_dump_json() + "\n", encoding="utf-8")
    os.replace(partial, path)


def load_int8_plan(path: Path, tokenizer_file: Path) -> Int8Plan:
    """The plan at ``path``; refused when its vocabulary lists the rows of another tokenizer."""
    plan = Int8Plan.model_validate_json(path.read_text(encoding="utf-8"))
    if plan.vocabulary is not None and plan.vocabulary.vocabulary_sha256 != vocabulary_digest(tokenizer_file):
        raise ValueError(f"{path} lists the embedding rows of another tokenizer than {tokenizer_file}")
    return plan
