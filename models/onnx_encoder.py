"""Query-time encoder: HF ``tokenizers`` + onnxruntime only (no torch).

Pooling and L2 normalization live inside the exported graph, so this runtime only tokenizes and runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.heap import release_free_heap
from models.manifest import ManifestError, ModelManifest

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "embedding"


def build_session(model_path: Path, threads: int = 0) -> ort.InferenceSession:
    """The one place an onnxruntime session is made: CPU provider, pinned thread counts."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    # One request runs one graph at a time; parallelism across requests comes from the server's threads.
    options.inter_op_num_threads = 1
    # Worker threads would otherwise spin-wait after each run, burning the cores the event loop, the
    # store and the other requests need (a 16-token query finishes long before the spin ends).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


class OnnxEncoder:
    def __init__(self, model_dir: Path, manifest: ModelManifest, threads: int = 0) -> None:
        if manifest.format != "onnx":
            raise ManifestError(f"{model_dir}: manifest format is {manifest.format!r}, not 'onnx'")
        for required in (ONNX_FILE, TOKENIZER_FILE):
            if not (model_dir / required).is_file():
                raise ManifestError(f"{model_dir}: {required} is missing")
        self.manifest = manifest
        self.model_dir = model_dir
        self._tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE, manifest.max_tokens)
        release_free_heap()  # after each parse, so the next one reuses the pages instead of adding
        self._session = build_session(model_dir / ONNX_FILE, threads)
        release_free_heap()
        self._inputs = {i.name for i in self._session.get_inputs()}

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids, right-padded, with exactly the inputs the graph declares."""
        encodings = self._tokenizer.encode_batch([self.manifest.render(t) for t in texts])
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: value for name, value in feeds.items() if name in self._inputs}

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch([self.manifest.render(t) for t in texts])]

    @property
    def text_budget(self) -> int:
        """Tokens of text one input holds: ``max_tokens`` less the prompt's and the special tokens'."""
        return self.manifest.text_budget(self.count_tokens([""])[0])

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the raw text's tokens (no prompt, no special tokens, no truncation)."""
        return [
            (int(start), int(end))
            for start, end in self._untruncated.encode(text, add_special_tokens=False).offsets
        ]

    @functools.cached_property
    def _untruncated(self) -> Tokenizer:
        # A copy, loaded on first use (the service never splits text): the query path's tokenizer
        # truncates, and switching that setting back and forth would race with concurrent queries.
        tokenizer = Tokenizer.from_file(str(self.model_dir / TOKENIZER_FILE))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.manifest.dim), dtype=np.float32)
        parts = []
        for start in range(0, len(texts), batch_size):
            feeds = self.tokenize(texts[start : start + batch_size])
            (vectors,) = self._session.run([OUTPUT_NAME], feeds)
            parts.append(np.asarray(vectors, dtype=np.float32))
        return np.concatenate(parts)
