"""Router -> batcher -> encoder: concurrent requests' queries are encoded together, ``workers`` runs
at a time.

Requests put their texts on a bounded queue and wait. Whenever one of ``workers`` encoder threads is
free, the batcher takes what is waiting (up to ``max_batch`` texts), lingers up to ``max_wait_s`` for
more while the batch is not full, and runs the encoder on that thread. So:

- concurrent queries share one ONNX call (one pass over the weights instead of one per query),
- at most ``workers`` encoder runs are in flight (one onnxruntime session, whose ``run`` is
  thread-safe): with single-threaded runs (MEDSEARCH_QUERY_THREADS=1) and one worker per core, load
  uses every core while a lone query still costs one single-threaded run, the cores are never
  oversubscribed, and the event loop's thread pool never fills with encodes (probes stay fast),
- the queue is bounded: past ``max_pending`` waiting texts a request is refused at once
  (``Overloaded`` -> 429 with Retry-After) instead of queueing without limit,
- a query already encoded recently is answered from an LRU cache without queueing.

``max_wait_s`` 0 turns lingering off: a batch is whatever queued while the previous run was busy,
so a lone query costs exactly one encoder run and load still batches itself. On the 2-core bench a
2 ms linger added ~3 ms to a lone query and no throughput (docs/results.md), which is why the
service runs without one. ``max_batch`` 1 turns batching off.

The knobs have no defaults here: the service's come from the settings (MEDSEARCH_BATCH_MAX_SIZE,
MEDSEARCH_BATCH_MAX_WAIT_MS, MEDSEARCH_QUEUE_MAX_PENDING, MEDSEARCH_QUERY_CACHE_SIZE,
MEDSEARCH_ENCODER_WORKERS;
docs/configuration.md), so they are written down once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from models.encoder import Encoder
from service.errors import EncoderFailure, Overloaded
from service.metrics import ServiceMetrics

T = TypeVar("T")


def _vectors(rows: np.ndarray) -> np.ndarray:
    return rows


@dataclass
class _Job:
    texts: list[str]  # the caller's texts the cache did not hold: encoded in this job's run
    rows: list[np.ndarray | None]  # the caller's rows in order, None where a text is in ``texts``
    then: Callable[[np.ndarray], Any]  # run on the encoder thread with the caller's (n, dim) vectors
    future: asyncio.Future[Any]
    queued_at: float


class VectorCache:
    """LRU of query text -> vector. Thread-safe; ``size`` 0 disables it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> np.ndarray | None:
        if not self.size:
            return None
        with self._lock:
            vector = self._items.get(text)
            if vector is not None:
                self._items.move_to_end(text)
            return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[text] = vector
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class EncodeBatcher:
    encoder: Encoder
    metrics: ServiceMetrics
    max_batch: int
    max_wait_s: float
    max_pending: int
    cache_size: int
    workers: int
    _queue: asyncio.Queue[_Job] = field(init=False)
    _pending: int = field(default=0, init=False)
    _worker: asyncio.Task[None] | None = field(default=None, init=False)
    _executor: ThreadPoolExecutor = field(init=False)
    _free: asyncio.Semaphore = field(init=False)
    _runs: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _cache: VectorCache = field(init=False)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_pending < 1 or self.max_wait_s < 0 or self.workers < 1:
            raise ValueError("max_batch, max_pending and workers must be positive, max_wait_s non-negative")
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="encoder")
        self._free = asyncio.Semaphore(self.workers)
        self._cache = VectorCache(self.cache_size)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="encode-batcher")

    async def stop(self) -> None:
        """Finish what is queued (graceful shutdown), then stop the worker and its thread."""
        while self._pending:
            await asyncio.sleep(0.005)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def pending(self) -> int:
        return self._pending

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) vectors; raises Overloaded when the queue is full."""
        return await self.encode_then(texts, _vectors)

    async def encode_then(self, texts: Sequence[str], then: Callable[[np.ndarray], T]) -> T:
        """``then(vectors)`` of the (len(texts), dim) vectors, run on the encoder thread right after the
        run that encoded them: an in-process search there costs no second thread hop. Raises
        Overloaded when the queue is full, and whatever ``then`` raises."""
        rows: list[np.ndarray | None] = [self._cache.get(t) for t in texts]
        missing = [t for t, row in zip(texts, rows, strict=True) if row is None]
        self.metrics.cache_hits.inc(len(texts) - len(missing))
        self.metrics.cache_misses.inc(len(missing))
        loop = asyncio.get_running_loop()
        if not missing:  # no encoder run: ``then`` still runs off the event loop
            return await loop.run_in_executor(self._executor, then, np.stack(cast(list[np.ndarray], rows)))
        if self._pending + len(missing) > self.max_pending:
            raise Overloaded(self._pending)
        future: asyncio.Future[Any] = loop.create_future()
        self._pending += len(missing)
        self.metrics.queue_depth.set(self._pending)
        await self._queue.put(_Job(missing, rows, then, future, time.perf_counter()))
        return cast(T, await future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A free encoder thread first, then the queue: while every thread is busy, arrivals pile
            # up into the next batch instead of each waiting for a run of its own.
            await self._free.acquire()
            jobs = [await self._queue.get()]
            size = len(jobs[0].texts)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                jobs.append(job)
                size += len(job.texts)
            run = loop.create_task(self._encode(jobs))
            self._runs.add(run)  # held until done: the loop keeps only weak references to tasks
            run.add_done_callback(self._runs.discard)

    def _run_jobs(self, jobs: list[_Job]) -> list[tuple[np.ndarray, Any, BaseException | None]]:
        """On an encoder thread: one run for every job's texts, then each job's ``then``."""
        began = time.perf_counter()
        for job in jobs:
            self.metrics.queue_wait.observe(began - job.queued_at)
        texts = [t for job in jobs for t in job.texts]
        vectors = np.asarray(self.encoder.encode(texts, len(texts)), dtype=np.float32)
        self.metrics.encode_latency.observe(time.perf_counter() - began)
        if vectors.shape[0] != len(texts) or not np.isfinite(vectors).all():
            raise EncoderFailure("the query encoder produced a non-finite vector")
        outcomes: list[tuple[np.ndarray, Any, BaseException | None]] = []
        start = 0
        for job in jobs:
            part = vectors[start : start + len(job.texts)]
            start += len(job.texts)
            fresh = iter(part)
            full = np.stack([row if row is not None else next(fresh) for row in job.rows])
            try:
                outcomes.append((part, job.then(full), None))
            except Exception as exc:  # this job's failure (its search, say) is its own
                outcomes.append((part, None, exc))
        return outcomes

    async def _encode(self, jobs: list[_Job]) -> None:
        texts = [t for job in jobs for t in job.texts]
        self.metrics.batch_size.observe(len(texts))
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_jobs, jobs)
        except Exception as exc:  # every waiting request gets the failure, none hangs
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            for job, (part, result, error) in zip(jobs, outcomes, strict=True):
                for text, vector in zip(job.texts, part, strict=True):
                    self._cache.put(text, vector)
                if job.future.done():  # a cancelled request (client gone) just drops its part
                    continue
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
        finally:
            self._pending -= len(texts)
            self.metrics.queue_depth.set(self._pending)
            self._free.release()
