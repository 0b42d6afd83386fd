"""Export a local HF BERT-family encoder directory to ONNX for the query side, and quantize it.

The exported graph takes ``input_ids``/``attention_mask`` and returns pooled, normalized vectors, so the
serving runtime needs nothing but tokenizers + onnxruntime. Every export is checked against the PyTorch
model; an export that does not reproduce it is deleted, never shipped.
"""

from __future__ import annotations

import inspect
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from models.attention_masks import encoder_attention_mask
from models.dense import load_dense_stack
from models.embedding_table import compress_embedding_tables, trim_vocabulary
from models.hf_loading import load_hf_model
from models.int8_plan import BLOCK_SIZE, Int8Plan
from models.manifest import (
    ModelManifest,
    Pooling,
    fingerprint_of,
    hash_files,
    read_manifest,
    staged_model_dir,
    write_manifest,
)
from models.onnx_encoder import ONNX_FILE, OUTPUT_NAME, TOKENIZER_FILE, OnnxEncoder
from models.pooling import finish, pool
from models.projection import load_projection
from models.vocabulary import trim_tokenizer

PARITY_TEXTS: tuple[str, ...] = (
    "高血压能吃党参吗",
    "乙型肝炎检查需要空腹吗？",
    "孩子发烧38.5度，咳嗽有痰，应该吃什么药",
    "糖尿病患者可以吃水果吗,血糖一直偏高",
    "What are the early symptoms of type 2 diabetes?",
    "Can I take ibuprofen with high blood pressure medication?",
    "头痛 headache after 熬夜, 怎么办",
    "x",
)
MIN_PARITY_COSINE = 0.9999


class ExportParityError(RuntimeError):
    """The exported model does not reproduce the source model."""


class _PooledEncoder(torch.nn.Module):
    """The source model plus pooling and normalization, traced into one graph."""

    def __init__(
        self,
        model: torch.nn.Module,
        pooling: Pooling,
        dim: int,
        normalize: bool,
        projection: torch.nn.Linear | None = None,
        dense: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.projection = projection
        self.dense = dense
        self.pooling: Pooling = pooling
        self.dim = dim
        self.normalize = normalize
        self._takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Keyword arguments only: positional calls trip transformers' use_cache handling.
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": encoder_attention_mask(self.model.config, attention_mask),
        }
        if self._takes_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.model(**kwargs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        if self.dense is not None:
            pooled = self.dense(pooled)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return finish(pooled, self.dim, self.normalize)


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def _source_manifest(src_dir: Path, pooling: Pooling | None, space: str | None) -> ModelManifest:
    """The source directory's manifest, or one derived from its files for a plain HF directory."""
    if (src_dir / "manifest.json").is_file():
        return read_manifest(src_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src_dir)
    files = hash_files(src_dir)
    return ModelManifest(
        name=src_dir.name,
        role="document",
        format="hf",
        architecture=(config.architectures or [type(config).__name__])[0],
        pooling=pooling or "mean",
        max_tokens=min(int(getattr(config, "max_position_embeddings", 512)), 512),
        dim=int(config.hidden_size),
        space=space or f"{src_dir.name}@{fingerprint_of(files)[:12]}",
        files=files,
        fingerprint=fingerprint_of(files),
        source=str(src_dir),
    )


def export_query_encoder(
    src_dir: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    prompt: str | None = None,
    pooling: Pooling | None = None,
    space: str | None = None,
    parity_texts: Sequence[str] = PARITY_TEXTS,
    min_cosine: float = MIN_PARITY_COSINE,
    progress: Callable[[str], None] = print,
) -> ModelManifest:
    """Export ``src_dir`` to ``out_dir`` (model.onnx, tokenizer.json, manifest.json) as a query encoder.

    The manifest inherits the source's space, so the export is comparable with documents encoded by the
    source. ``prompt`` defaults to the source prompt with ``passage: `` swapped for ``query: `` (E5
    convention) and otherwise unchanged.
    """
    source = _source_manifest(src_dir, pooling, space)
    if source.decoder_only:
        raise ValueError(f"{src_dir}: decoder-only models are document encoders; export a BERT-family model")
    query_prompt = prompt if prompt is not None else source.prompt.replace("passage: ", "query: ")
    manifest = source.model_copy(
        update={
            "name": name or f"{source.name}-onnx",
            "role": "query",
            "format": "onnx",
            "prompt": query_prompt,
            "pooling": pooling or source.pooling,
            "quantization": None,
            "dense_layers": [],  # baked into the graph
            "figures": {},  # a card gives the export its own measured figures
            "source": f"exported from {source.name} ({source.fingerprint[:12]})",
            "derived_from": source.fingerprint,
        }
    )
    with staged_model_dir(out_dir) as work:
        progress(f"export: loading {src_dir}")
        hf_tokenizer = AutoTokenizer.from_pretrained(src_dir)
        hf_tokenizer.backend_tokenizer.save(str(work / TOKENIZER_FILE))
        model = load_hf_model(src_dir, attn_implementation="eager")
        # An aligned encoder may carry a projection into a wider document space (models.projection).
        projection = load_projection(src_dir)
        # A sentence-transformers embedder's Dense heads (a student cut from EmbeddingGemma) run
        # after pooling, inside the graph.
        dense = load_dense_stack(src_dir, source.dense_layers) if source.dense_layers else None
        wrapper = _PooledEncoder(
            model, manifest.pooling, manifest.dim, manifest.normalize, projection, dense
        ).eval()

        # Rows of different lengths, so the traced graph sees padding and keeps dynamic axes honest.
        example = hf_tokenizer(["一个例子 example", "x"], padding=True, return_tensors="pt")
        progress(f"export: tracing to ONNX ({manifest.pooling} pooling, dim {manifest.dim})")
        # The tracer warns about shape-dependent branches; the parity check below, on a batch of
        # different lengths, is what actually proves the graph generalizes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trace(wrapper, example["input_ids"], example["attention_mask"], work / ONNX_FILE)
        sealed = write_manifest(work, manifest)
        cosine = check_parity(work, wrapper, parity_texts)
        if cosine < min_cosine:
            raise ExportParityError(
                f"ONNX export of {src_dir} reproduces PyTorch only at cosine {cosine:.6f} < {min_cosine}"
            )
        progress(f"export: parity with PyTorch, min cosine {cosine:.6f} over {len(parity_texts)} texts")
        return sealed


def _trace(wrapper: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        wrapper,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=[OUTPUT_NAME],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            OUTPUT_NAME: {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )


def check_parity(onnx_dir: Path, wrapper: torch.nn.Module, texts: Sequence[str]) -> float:
    """Min cosine between the ONNX encoder and the PyTorch wrapper on the same token ids."""
    encoder = OnnxEncoder(onnx_dir, read_manifest(onnx_dir))
    feeds = encoder.tokenize(texts)
    with torch.no_grad():
        expected = wrapper(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        ).numpy()
    return min_row_cosine(encoder.encode(texts, batch_size=len(texts)), expected)


def _matmuls_named(graph: Path, fragments: Sequence[str]) -> list[str]:
    if not fragments:
        return []
    import onnx

    names = [n.name for n in onnx.load(str(graph)).graph.node if n.op_type == "MatMul"]
    chosen = [name for name in names if any(f in name for f in fragments)]
    missing = [f for f in fragments if not any(f in name for name in names)]
    if missing:
        raise ValueError(f"{graph}: no MatMul named like {missing[0]!r}")
    return chosen


def quantize_blockwise(graph: Path, nodes: Sequence[str]) -> None:
    """``nodes`` (MatMuls with constant weights) rewritten in place as 8-bit blocks of weights
    (MatMulNBits, int8 compute): the one mechanism onnxruntime ships for weight-only quantization."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(graph)),
        bits=8,
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_include=list(nodes),
    )
    quantizer.process()
    quantized = [n.name for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits"]
    if len(quantized) != len(nodes):
        raise ValueError(f"{graph}: {len(quantized)} of {len(nodes)} MatMuls became 8-bit blocks")
    quantizer.model.save_model_to_file(str(graph))


def quantize_int8(
    onnx_dir: Path,
    out_dir: Path,
    *,
    texts: Sequence[str] = PARITY_TEXTS,
    plan: Int8Plan | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[ModelManifest, float]:
    """Dynamic int8 of the MatMul weights per output channel, and int8 embedding tables with a scale
    per row; returns (manifest, min cosine vs fp32).

    Measured on e5-small: quantizing every op with onnxruntime's quantizer (embedding gather with one
    scale for the whole table) cost 1.4 nDCG@10 points, while MatMul-only per-channel keeps cosine
    ~0.997 against fp32 and costs about half of that. Per-row int8 tables (models/embedding_table.py)
    leave the mean cosine to fp32 on 500 cmedqa-im queries unchanged (0.9956) and shrink the graph
    from 388 to 114 MiB, which is most of the service's resident memory.

    ``plan`` (models/int8_plan.py) leaves named MatMuls in float or stores them as 8-bit weight
    blocks, and first trims the word-embedding
    table to the rows it lists (an LLM student's 262k-row table is 201 MB even in int8), and the
    tokenizer to the tokens it lists (models.vocabulary.trim_tokenizer).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = read_manifest(onnx_dir)
    with staged_model_dir(out_dir) as work:
        graph = onnx_dir / ONNX_FILE
        quantization = "int8-dynamic-matmul-per-channel+embeddings-int8-per-row"
        plan = plan or Int8Plan()
        kept = plan.vocabulary
        if kept is not None:
            graph = work / f"trimmed-{ONNX_FILE}"
            rows = trim_vocabulary(onnx_dir / ONNX_FILE, graph, kept.ids, kept.unknown_id)
            progress(f"quantize: word-embedding table trimmed to {rows} rows")
            quantization += f"+vocabulary-{rows}-rows"
        progress(f"quantize: int8 MatMul weights of {source.name}")
        matmuls = work / f"matmul-{ONNX_FILE}"
        floats = _matmuls_named(graph, plan.keep_float)
        if floats:
            progress(f"quantize: {len(floats)} MatMuls stay float32 ({', '.join(plan.keep_float)})")
            quantization += f"+float-{'-'.join(plan.keep_float)}"
        blocks = _matmuls_named(graph, plan.blockwise)
        quantize_dynamic(
            str(graph),
            str(matmuls),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*floats, *blocks],
        )
        if blocks:
            progress(f"quantize: {len(blocks)} MatMuls as 8-bit weight blocks ({', '.join(plan.blockwise)})")
            quantize_blockwise(matmuls, blocks)
            quantization += f"+blockwise-int8-{'-'.join(plan.blockwise)}"
        progress("quantize: int8 embedding tables, one scale per row")
        compress_embedding_tables(matmuls, work / ONNX_FILE)
        matmuls.unlink()
        if graph != onnx_dir / ONNX_FILE:
            graph.unlink()
        if kept is not None:
            tokens = trim_tokenizer(onnx_dir / TOKENIZER_FILE, work / TOKENIZER_FILE, kept.ids)
            progress(f"quantize: tokenizer trimmed to {tokens} tokens")
        else:
            shutil.copy2(onnx_dir / TOKENIZER_FILE, work / TOKENIZER_FILE)
        manifest = write_manifest(
            work,
            source.model_copy(
                update={
                    "name": f"{source.name}-int8",
                    "quantization": quantization,
                    "figures": {},  # measured for the fp32 graph; int8 gets its own from a card
                    "source": f"{source.source}; int8 of {source.name} ({source.fingerprint[:12]})",
                }
            ),
        )
        fp32 = OnnxEncoder(onnx_dir, source).encode(texts)
        int8 = OnnxEncoder(work, manifest).encode(texts)
        cosine = min_row_cosine(fp32, int8)
        progress(f"quantize: min cosine against fp32 {cosine:.4f}")
        return manifest, cosine
