"""Freed heap goes back to the OS after a model is loaded (models.heap)."""

from __future__ import annotations

import pytest

from models.heap import _libc, release_free_heap


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        line = next(line for line in fh if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(_libc() is None, reason="not glibc: malloc_trim does not exist")
def test_freed_heap_below_a_live_block_is_returned() -> None:
    # 2 KiB blocks come from malloc's heap (above Python's small-object allocator, below mmap's
    # threshold); the last one stays alive, so the heap cannot shrink from its top by itself.
    blocks = [bytes(2048) for _ in range(100_000)]
    keep = blocks[-1]
    del blocks
    before = _rss_mib()
    assert release_free_heap()
    assert before - _rss_mib() > 100  # ~200 MiB were freed but still resident
    assert keep
