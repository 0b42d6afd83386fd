"""Document vectors for an evaluation, cached on disk by (encoder identity, source fingerprint).

Encoding a corpus with an LLM document encoder takes many minutes on CPU, so its vectors are written
under ``Settings.home / "cache"`` and a second run (say, with a new query encoder) reads them instead
of loading the document encoder at all. Vectors are written in parts as they are produced, so an
interrupted run resumes where it stopped; ``meta.json`` is written last and marks a complete entry.

The key covers what changes a vector: the weights' fingerprint and the manifest fields applied to the
text (prompt, pooling, truncation, dimension, normalization), plus the sha256 of the source file.
An encoder without a fingerprint has no identity to key on and is never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from models.encoder import Encoder
from models.manifest import ModelManifest

# Bump when the text given to the encoder for a document changes shape.
CACHE_VERSION = 1
META_FILE = "meta.json"
PART_SUFFIX = ".npz"


@dataclass(frozen=True)
class Vectors:
    ids: list[str]
    matrix: np.ndarray  # (len(ids), dim) float32, in source order

    def rows(self) -> dict[str, int]:
        return {doc_id: i for i, doc_id in enumerate(self.ids)}


def cache_key(manifest: ModelManifest, source_fingerprint: str) -> str:
    identity = [
        CACHE_VERSION,
        manifest.fingerprint,
        manifest.prompt,
        manifest.pooling,
        manifest.max_tokens,
        manifest.dim,
        manifest.normalize,
        source_fingerprint,
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def cache_dir(root: Path, manifest: ModelManifest, source_fingerprint: str) -> Path:
    return root / "document-vectors" / f"{manifest.name}-{cache_key(manifest, source_fingerprint)[:24]}"


def _part_path(directory: Path, index: int) -> Path:
    return directory / f"part-{index:06d}{PART_SUFFIX}"


def _write_part(path: Path, ids: list[str], matrix: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, ids=np.asarray(ids, dtype=str), vectors=matrix.astype(np.float32, copy=False))
    os.replace(tmp, path)


def _read_part(path: Path) -> tuple[list[str], np.ndarray]:
    with np.load(path, allow_pickle=False) as part:
        return [str(i) for i in part["ids"]], np.asarray(part["vectors"], dtype=np.float32)


def _read_parts(directory: Path) -> list[tuple[list[str], np.ndarray]]:
    parts = []
    index = 0
    while (path := _part_path(directory, index)).is_file():
        parts.append(_read_part(path))
        index += 1
    return parts


def _load_complete(directory: Path) -> Vectors | None:
    """The complete entry in ``directory``; None when there is none or it is damaged."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        parts = _read_parts(directory)
    except (OSError, ValueError, KeyError):
        return None
    ids = [doc_id for part_ids, _ in parts for doc_id in part_ids]
    if not parts or len(ids) != meta.get("count") or len(parts) != meta.get("parts"):
        return None
    return Vectors(ids, np.concatenate([m for _, m in parts]))


def largest_cached(cache_root: Path, encoder: str) -> Vectors | None:
    """The largest complete entry of document vectors made by the encoder named ``encoder``, whatever
    its source; None when there is none. For the statistics of an encoder's vectors (bench capacity
    draws synthetic ones like them), never for retrieval, which must match its source."""
    best: Vectors | None = None
    for directory in sorted((cache_root / "document-vectors").glob(f"{encoder}-*")):
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("encoder") != encoder or (best is not None and meta.get("count", 0) <= len(best.ids)):
            continue
        best = _load_complete(directory) or best
    return best


def _resume(directory: Path, stream: Iterator[tuple[str, str]]) -> list[tuple[list[str], np.ndarray]] | None:
    """The parts already on disk, consuming their documents from ``stream``; None when they are not
    exactly the first documents of this stream, in order (then nothing can be reused)."""
    try:
        parts = _read_parts(directory)
    except (OSError, ValueError, KeyError):
        return None
    for part_ids, _ in parts:
        if [doc_id for doc_id, _ in islice(stream, len(part_ids))] != part_ids:
            return None
    return parts


def _chunks(items: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    while chunk := list(islice(items, size)):
        yield chunk


def encode_stream(
    texts: Iterable[tuple[str, str]], encoder: Encoder, *, chunk: int = 256, batch_size: int = 16
) -> Vectors:
    """Encode (id, text) pairs chunk by chunk, holding only one chunk of text at a time."""
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    for part in _chunks(iter(texts), chunk):
        ids.extend(doc_id for doc_id, _ in part)
        blocks.append(encoder.encode([text for _, text in part], batch_size=batch_size))
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, encoder.manifest.dim), dtype=np.float32)
    return Vectors(ids, matrix.astype(np.float32, copy=False))


def cached_vectors(
    cache_root: Path | None,
    manifest: ModelManifest,
    source_fingerprint: str,
    texts: Callable[[], Iterator[tuple[str, str]]],
    encoder: Callable[[], Encoder],
    *,
    chunk: int = 256,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> Vectors:
    """Vectors of every (id, text) that ``texts()`` yields, from the cache or encoded and cached.

    ``encoder()`` is called only when something must be encoded, so a complete cache entry never
    loads the model. ``on_progress(done)`` reports the number of texts covered so far.
    """
    if cache_root is None or not manifest.fingerprint:
        return encode_stream(texts(), encoder(), chunk=chunk, batch_size=batch_size)
    directory = cache_dir(cache_root, manifest, source_fingerprint)
    complete = _load_complete(directory)
    if complete is not None:
        if on_progress:
            on_progress(len(complete.ids))
        return complete
    stream = texts()
    parts = _resume(directory, stream) if not (directory / META_FILE).exists() else None
    if parts is None:
        shutil.rmtree(directory, ignore_errors=True)
        stream = texts()
        parts = []
    directory.mkdir(parents=True, exist_ok=True)
    done = sum(len(ids) for ids, _ in parts)
    if on_progress and done:
        on_progress(done)
    model: Encoder | None = None
    for part in _chunks(stream, chunk):
        model = model or encoder()
        matrix = model.encode([text for _, text in part], batch_size=batch_size)
        part_ids = [doc_id for doc_id, _ in part]
        _write_part(_part_path(directory, len(parts)), part_ids, matrix)
        parts.append((part_ids, np.asarray(matrix, dtype=np.float32)))
        done += len(part)
        if on_progress:
            on_progress(done)
    ids = [doc_id for part_ids, _ in parts for doc_id in part_ids]
    meta = {
        "encoder": manifest.name,
        "encoder_fingerprint": manifest.fingerprint,
        "source_sha256": source_fingerprint,
        "count": len(ids),
        "parts": len(parts),
        "dim": manifest.dim,
    }
    if not ids:
        raise ValueError("nothing to encode: the source is empty")
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Vectors(ids, np.concatenate([m for _, m in parts]))
