"""The encode batcher: concurrent queries share encoder runs, ``workers`` runs at a time, bounded queue,
cache."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from service.batcher import EncodeBatcher
from service.errors import EncoderFailure, Overloaded
from service.metrics import ServiceMetrics


class RecordingEncoder:
    """Deterministic vectors per text; records each call's batch and the peak of concurrent calls."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = delay_s
        self.gate = gate
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.calls.append(list(texts))
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        with self._lock:
            self.running -= 1
        return np.stack([vector(t) for t in texts])


def vector(text: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(text)) % 2**32)
    row = rng.standard_normal(8).astype(np.float32)
    return row / np.linalg.norm(row)


async def started(
    encoder: object,
    max_batch: int = 32,
    max_wait_s: float = 0.0,
    max_pending: int = 256,
    cache_size: int = 0,
    workers: int = 1,
) -> EncodeBatcher:
    batcher = EncodeBatcher(
        encoder,  # type: ignore[arg-type]
        ServiceMetrics(),
        max_batch,
        max_wait_s,
        max_pending,
        cache_size,
        workers,
    )
    batcher.start()
    return batcher


async def test_concurrent_queries_share_encoder_runs_and_runs_never_overlap() -> None:
    encoder = RecordingEncoder(delay_s=0.02)
    batcher = await started(encoder, max_wait_s=0.005, cache_size=0)
    texts = [f"q{i}" for i in range(24)]
    results = await asyncio.gather(*(batcher.encode([t]) for t in texts))
    await batcher.stop()
    for text, result in zip(texts, results, strict=True):
        np.testing.assert_allclose(result[0], vector(text))  # each caller gets its own row
    assert len(encoder.calls) < len(texts) / 2  # batched: far fewer runs than queries
    assert max(len(c) for c in encoder.calls) > 1
    assert encoder.peak == 1  # one encoder run at a time: no core oversubscription
    assert sorted(t for call in encoder.calls for t in call) == sorted(texts)


async def test_two_workers_run_two_batches_at_once_and_still_batch() -> None:
    encoder = RecordingEncoder(delay_s=0.02)
    batcher = await started(encoder, max_batch=4, workers=2)
    texts = [f"q{i}" for i in range(24)]
    results = await asyncio.gather(*(batcher.encode([t]) for t in texts))
    await batcher.stop()
    for text, result in zip(texts, results, strict=True):
        np.testing.assert_allclose(result[0], vector(text))
    assert encoder.peak == 2  # both threads busy under load, never more
    assert len(encoder.calls) < len(texts) / 2  # arrivals during busy runs still share a run
    assert sorted(t for call in encoder.calls for t in call) == sorted(texts)


async def test_a_free_worker_takes_its_share_of_the_queue_and_leaves_the_rest() -> None:
    """With both workers busy, six queries queue; the first free worker takes ceil(6 / 2) = 3 and
    leaves the rest to the other instead of encoding all six on one core."""
    gate = threading.Event()
    encoder = RecordingEncoder(gate=gate)
    batcher = await started(encoder, max_batch=16, workers=2)
    busy = [asyncio.ensure_future(batcher.encode([f"busy{i}"])) for i in range(2)]
    for _ in range(2000):  # each busy query on its own worker (a worker taking both fails here)
        if encoder.running == 2:
            break
        await asyncio.sleep(0.001)
    assert encoder.running == 2
    queued = [asyncio.ensure_future(batcher.encode([f"q{i}"])) for i in range(6)]
    await asyncio.sleep(0)  # every request is on the queue
    assert batcher.pending == 8
    gate.set()
    await asyncio.gather(*busy, *queued)
    await batcher.stop()
    later = encoder.calls[2:]
    assert sorted(t for call in later for t in call) == [f"q{i}" for i in range(6)]
    assert max(len(call) for call in later) == 3
    assert len(later) >= 2


async def test_batches_never_exceed_the_configured_size() -> None:
    encoder = RecordingEncoder(delay_s=0.01)
    batcher = await started(encoder, max_batch=4, max_wait_s=0.01, cache_size=0)
    await asyncio.gather(*(batcher.encode([f"q{i}"]) for i in range(20)))
    await batcher.stop()
    assert max(len(c) for c in encoder.calls) <= 4


async def test_a_lone_query_without_lingering_is_one_run() -> None:
    encoder = RecordingEncoder()
    batcher = await started(encoder, max_wait_s=0.0, cache_size=0)
    await batcher.encode(["only"])
    await batcher.stop()
    assert encoder.calls == [["only"]]


async def test_queue_is_bounded() -> None:
    gate = threading.Event()
    encoder = RecordingEncoder(gate=gate)
    batcher = await started(encoder, max_pending=3, max_wait_s=0.0, cache_size=0)
    waiting = [asyncio.ensure_future(batcher.encode([f"q{i}"])) for i in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded, match="3 queries waiting"):
        await batcher.encode(["one too many"])
    gate.set()
    assert len(await asyncio.gather(*waiting)) == 3
    await batcher.encode(["fits again"])  # capacity comes back as the queue drains
    await batcher.stop()


async def test_cache_answers_repeated_queries_and_counts_hits() -> None:
    encoder = RecordingEncoder()
    metrics = ServiceMetrics()
    batcher = EncodeBatcher(
        encoder,  # type: ignore[arg-type]
        metrics,
        max_batch=32,
        max_wait_s=0.0,
        max_pending=256,
        cache_size=2,
        workers=1,
    )
    batcher.start()
    first = await batcher.encode(["a"])
    again = await batcher.encode(["a", "b"])
    await batcher.encode(["c"])
    await batcher.encode(["a"])  # evicted by b and c (size 2): encoded again
    await batcher.stop()
    np.testing.assert_allclose(first[0], again[0])
    assert encoder.calls == [["a"], ["b"], ["c"], ["a"]]
    assert metrics.cache_hits._value.get() == 1
    assert metrics.cache_misses._value.get() == 4


async def test_cache_off_encodes_every_time() -> None:
    encoder = RecordingEncoder()
    batcher = await started(encoder, max_wait_s=0.0, cache_size=0)
    await batcher.encode(["a"])
    await batcher.encode(["a"])
    await batcher.stop()
    assert encoder.calls == [["a"], ["a"]]


class FailingEncoder(RecordingEncoder):
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        raise RuntimeError("onnxruntime failed")


class NaNEncoder(RecordingEncoder):
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return np.full((len(texts), 8), np.nan, dtype=np.float32)


@pytest.mark.parametrize(
    ("encoder", "error"), [(FailingEncoder(), RuntimeError), (NaNEncoder(), EncoderFailure)]
)
async def test_an_encoder_failure_reaches_every_waiting_request(
    encoder: RecordingEncoder, error: type[Exception]
) -> None:
    batcher = await started(encoder, max_wait_s=0.01, cache_size=8)
    results = await asyncio.gather(*(batcher.encode([f"q{i}"]) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, error) for r in results)
    assert batcher.pending == 0  # nothing stuck in the queue
    await batcher.stop()


async def test_stop_answers_what_is_queued_first() -> None:
    encoder = RecordingEncoder(delay_s=0.02)
    batcher = await started(encoder, max_batch=2, max_wait_s=0.0, cache_size=0)
    waiting = [asyncio.ensure_future(batcher.encode([f"q{i}"])) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.stop()
    assert all(w.done() and not w.exception() for w in waiting)
