"""Router -> batcher -> encoder: concurrent requests' queries are encoded together, ``workers`` runs
at a time.

Requests put their texts on a bounded queue and wait. Each of ``workers`` encoder threads takes its
share of what is waiting as soon as it is free (see below; up to ``max_batch`` texts), lingers up
to ``max_wait_s`` for more while the batch is not full and nothing is left for the others, runs the
encoder, runs each request's follow-up (``encode_then``: the embedded store's search) and hands the
results to the event loop. The threads feed themselves: the
event loop only enqueues and is told when results are ready, so a free thread never waits for the
loop (HTTP, validation) to hand it the next batch, and a lone query wakes the thread that ran the
last one. Against a batching task on the loop feeding a thread pool, in one sitting: p50 at
concurrency 1 6.19 / 5.52 -> 5.36 / 5.45 ms, req/s at 32 406 / 437 -> 492 / 463, at 8 unchanged
(docs/results.md). So:

- concurrent queries share one ONNX call (one pass over the weights instead of one per query),
- a run takes at most its share of the waiting texts, ceil(waiting / ``workers``), and leaves the
  rest to the next thread that is free: a thread that took everything would encode the whole load
  on one core while the others idle. In a closed loop of 8 clients, taking everything settled into
  runs of 1 and runs of 6-8 (the clients of a big run come back together); the share keeps runs of
  1-3 on both cores (req/s at 8: +7 and +12% in an interleaved A/B, docs/results.md),
- at most ``workers`` encoder runs are in flight (one onnxruntime session, whose ``run`` is
  thread-safe): with single-threaded runs (MEDSEARCH_QUERY_THREADS=1) and one worker per core, load
  uses every core while a lone query still costs one single-threaded run, the cores are never
  oversubscribed, and the event loop's thread pool never fills with encodes (probes stay fast),
- the queue is bounded: past ``max_pending`` waiting texts a request is refused at once
  (``Overloaded`` -> 429 with Retry-After) instead of queueing without limit,
- a query encoded recently is not encoded again: its vector comes from an LRU cache (its follow-up
  still runs on an encoder thread, never on the event loop).

``max_wait_s`` 0 turns lingering off: a batch is whatever queued while the previous run was busy,
so a lone query costs exactly one encoder run and load still batches itself. On the 2-core bench a
2 ms linger added ~3 ms to a lone query and no throughput (docs/results.md), which is why the
service runs without one. ``max_batch`` 1 turns batching off.

The knobs have no defaults here: the service's come from the settings (MEDSEARCH_BATCH_MAX_SIZE,
MEDSEARCH_BATCH_MAX_WAIT_MS, MEDSEARCH_QUEUE_MAX_PENDING, MEDSEARCH_QUERY_CACHE_SIZE,
MEDSEARCH_ENCODER_WORKERS; docs/configuration.md), so they are written down once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from models.encoder import Encoder
from service.errors import EncoderFailure, Overloaded
from service.metrics import ServiceMetrics

T = TypeVar("T")
# While lingering for a fuller batch (max_wait_s > 0), the queue is looked at this often.
LINGER_POLL_S = 0.0002


def _vectors(rows: np.ndarray) -> np.ndarray:
    return rows


@dataclass
class _Job:
    texts: list[str]  # the caller's texts the cache did not hold: encoded in this job's run
    rows: list[np.ndarray | None]  # the caller's rows in order, None where a text is in ``texts``
    then: Callable[[np.ndarray], Any]  # run on the encoder thread with the caller's (n, dim) vectors
    future: asyncio.Future[Any]
    queued_at: float


# Per job of a run: (its fresh vectors, then's result, then's exception).
_Outcome = tuple[np.ndarray, Any, BaseException | None]


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
    _jobs: deque[_Job] = field(default_factory=deque, init=False)
    _queued_texts: int = field(default=0, init=False)  # texts of the jobs in ``_jobs``; under the lock
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # Idle encoder threads' wake-up events, the latest idle on top: a lone query goes to the thread
    # that ran the previous one, whose core still caches the weights (FIFO wake-ups alternated the
    # threads and cost 0.4-1.0 ms a query at concurrency 1).
    _idle: list[threading.Event] = field(default_factory=list, init=False)
    _stopping: bool = field(default=False, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    # Texts queued or in a run; changed on the event loop only (enqueue, delivery).
    _pending: int = field(default=0, init=False)
    _cache: VectorCache = field(init=False)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_pending < 1 or self.max_wait_s < 0 or self.workers < 1:
            raise ValueError("max_batch, max_pending and workers must be positive, max_wait_s non-negative")
        self._cache = VectorCache(self.cache_size)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._work, name=f"encoder_{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        """Finish what is queued (graceful shutdown), then stop the encoder threads."""
        while self._pending:
            await asyncio.sleep(0.005)
        with self._lock:
            self._stopping = True
            idle, self._idle = self._idle, []
        for wake in idle:
            wake.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    @property
    def pending(self) -> int:
        return self._pending

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) vectors; raises Overloaded when the queue is full."""
        return await self.encode_then(texts, _vectors)

    async def encode_then(self, texts: Sequence[str], then: Callable[[np.ndarray], T]) -> T:
        """``then(vectors)`` of the (len(texts), dim) vectors, run on the encoder thread right after the
        run that encoded them: an in-process search there costs no second thread hop. Raises
        Overloaded when the queue is full, and whatever ``then`` raises. Texts the cache holds are
        not encoded again; ``then`` still runs on an encoder thread, never on the event loop."""
        rows: list[np.ndarray | None] = [self._cache.get(t) for t in texts]
        missing = [t for t, row in zip(texts, rows, strict=True) if row is None]
        self.metrics.cache_hits.inc(len(texts) - len(missing))
        self.metrics.cache_misses.inc(len(missing))
        if self._pending + len(missing) > self.max_pending:
            raise Overloaded(self._pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending += len(missing)
        self.metrics.queue_depth.set(self._pending)
        with self._lock:
            self._jobs.append(_Job(missing, rows, then, future, time.perf_counter()))
            self._queued_texts += len(missing)
            wake = self._idle.pop() if self._idle else None
        if wake is not None:
            wake.set()
        return cast(T, await future)

    # --- on the encoder threads ------------------------------------------------------------------

    def _work(self) -> None:
        wake = threading.Event()
        while True:
            jobs = self._next_batch(wake)
            if jobs is None:
                return
            if not jobs:
                continue
            try:
                outcomes: list[_Outcome] | BaseException = self._run_jobs(jobs)
            except Exception as exc:  # every waiting request gets the failure, none hangs
                outcomes = exc
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._deliver, jobs, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _next_batch(self, wake: threading.Event) -> list[_Job] | None:
        """This thread's share of what is waiting (at least one job, at most ``max_batch`` texts),
        then, when nothing is left for the others, what arrives while it lingers up to ``max_wait_s``
        and the batch is not full; sleeps on ``wake`` while nothing waits; None once stopping with
        nothing left."""
        while True:
            with self._lock:
                if self._jobs:
                    break
                if self._stopping:
                    return None
                wake.clear()
                self._idle.append(wake)
            wake.wait()
        jobs: list[_Job] = []
        size = 0
        with self._lock:  # the share of what waits now: another thread may have taken some since
            share = min(self.max_batch, -(-self._queued_texts // self.workers))
            while self._jobs and (not jobs or size + len(self._jobs[0].texts) <= share):
                size += self._take(jobs)
            drained = not self._jobs
        if not drained or self.max_wait_s <= 0 or not jobs:
            return jobs  # empty when another thread took what woke this one
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch and not self._stopping:
            with self._lock:
                if self._jobs:
                    size += self._take(jobs)
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, LINGER_POLL_S))
        return jobs

    def _take(self, jobs: list[_Job]) -> int:
        """Move the oldest waiting job to ``jobs``; its text count. Called under the lock."""
        job = self._jobs.popleft()
        self._queued_texts -= len(job.texts)
        jobs.append(job)
        return len(job.texts)

    def _run_jobs(self, jobs: list[_Job]) -> list[_Outcome]:
        """One encoder run for every job's texts, then each job's ``then``."""
        began = time.perf_counter()
        for job in jobs:
            self.metrics.queue_wait.observe(began - job.queued_at)
        texts = [t for job in jobs for t in job.texts]
        if texts:
            self.metrics.batch_size.observe(len(texts))
            vectors = np.asarray(self.encoder.encode(texts, len(texts)), dtype=np.float32)
            self.metrics.encode_latency.observe(time.perf_counter() - began)
            if vectors.shape[0] != len(texts) or not np.isfinite(vectors).all():
                raise EncoderFailure("the query encoder produced a non-finite vector")
        else:  # every text came from the cache: only the follow-ups run
            vectors = np.empty((0, 0), dtype=np.float32)
        outcomes: list[_Outcome] = []
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

    # --- back on the event loop ------------------------------------------------------------------

    def _deliver(self, jobs: list[_Job], outcomes: list[_Outcome] | BaseException) -> None:
        for i, job in enumerate(jobs):
            self._pending -= len(job.texts)
            error: BaseException | None
            if isinstance(outcomes, BaseException):
                result, error = None, outcomes
            else:
                part, result, error = outcomes[i]
                for text, vector in zip(job.texts, part, strict=True):
                    self._cache.put(text, vector)
            if job.future.done():  # a cancelled request (client gone) just drops its part
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        self.metrics.queue_depth.set(self._pending)
