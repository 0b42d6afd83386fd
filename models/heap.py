"""Hand freed heap back to the operating system after loading a model (glibc's malloc_trim).

Parsing a tokenizer or an ONNX graph allocates far more than the result keeps: EmbeddingGemma's
trimmed tokenizer.json leaves 10 MiB of structures behind 138 MiB of freed parse buffers, which glibc
keeps in the process (its heap is trimmed only from the top). Serving holds that memory for nothing,
so the loaders release it once the files are parsed. Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_heap() -> bool:
    """Return freed heap pages to the OS; True when glibc released any."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
