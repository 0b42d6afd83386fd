"""Load generator for a running service: fixed-duration closed loops of concurrent /search requests.

Each concurrency level runs ``concurrency`` workers, each on its own keep-alive connection, sending
one request after the other until the level's deadline; a worker stops by itself at the deadline
(plus at most one request's timeout). Latency is measured per successful (200) response; anything
else counts as an error by kind. The service process's memory is sampled from /proc while the levels
run, and both processes' CPU time is read before and after each level.

The requests go through bench/http_client.py, not httpx: on the 2-core bench machine the load
generator shares the cores with the service, and httpx spent 0.95-1.05 ms of CPU per request there
against 0.11-0.12 ms (600 sequential searches each, uvloop, 2026-12-03). With httpx the generator
took a third of the machine at concurrency 8 and the service's throughput was capped by it. The
levels run on uvloop when it is installed (it is, with the service).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from bench.http_client import HttpConnection
from bench.machine import process_cpu_s, process_status_kib
from bench.stats import LatencySummary, summarize

T = TypeVar("T")
Clock = Callable[[], float]
# One request of a load level: (connection, query text) -> (status, body).
Send = Callable[[HttpConnection, str], Awaitable[tuple[int, bytes]]]
PROBE_INTERVAL_S = 0.05


def search_request(top_k: int) -> Send:
    def send(connection: HttpConnection, query: str) -> Awaitable[tuple[int, bytes]]:
        return connection.post_json("/search", {"query": query, "top_k": top_k})

    return send


def embeddings_request(model: str, prefix: str) -> Send:
    """OpenAI-style POST /embeddings (infinity, TEI and others); ``prefix`` is the query prompt the
    other server does not add itself, so both sides encode the same text."""

    def send(connection: HttpConnection, query: str) -> Awaitable[tuple[int, bytes]]:
        return connection.post_json("/embeddings", {"model": model, "input": [prefix + query]})

    return send


class NotLoopback(ValueError):
    """The load generator only targets services on this machine."""


class LoadLevel(BaseModel):
    concurrency: int
    seconds: float
    requests: int
    errors: int
    error_kinds: dict[str, int]
    requests_per_s: float
    latency: LatencySummary | None
    max_rss_kib: int | None = None
    samples_ms: list[float]
    # GET /healthz every PROBE_INTERVAL_S on its own connection while the level ran: a probe that
    # waits behind searches (event loop blocked, threads exhausted) shows here.
    healthz: LatencySummary | None = None
    breakdown: TimeBreakdown | None = None
    # CPU milliseconds per request over the level: the load generator's process (every thread: the
    # workers, the probe, the memory sampler) and the service's, when its pid is known. On a machine
    # the two share, req/s <= cores x 1000 / (their sum).
    client_cpu_ms: float | None = None
    service_cpu_ms: float | None = None


class MemoryPeak(BaseModel):
    pid: int
    hwm_kib: int  # VmHWM at the end: the process's peak resident set since it started
    max_sampled_rss_kib: int  # highest VmRSS seen while the levels ran
    samples: int


class TimeBreakdown(BaseModel):
    """Where a level's time went, from the service's own /metrics (sums and counts over the level)."""

    encoder_runs: int
    mean_batch: float  # queries per encoder run
    encode_ms_per_run: float  # tokenize + ONNX run of one batch
    search_ms: float  # one store search (HNSW + payload)
    server_ms: float  # a /search inside the app (middleware to response)
    outside_ms: float  # client-measured mean minus server_ms: HTTP, uvicorn, the load generator
    # Per request; None against a service that does not export them.
    validate_ms: float | None = None  # arrival in the app to the handler: body, routing, validation
    queue_wait_ms: float | None = None  # waiting for a free encoder thread
    serialize_ms: float | None = None  # the response to JSON


# (metric family, sample suffix, label filter) -> value, read from the exposition text.
Totals = dict[str, float]


def read_totals(text: str) -> Totals:
    from prometheus_client.parser import text_string_to_metric_families

    totals: Totals = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith(("_sum", "_count")):
                continue
            route = sample.labels.get("route")
            if route is not None and (not route.endswith("/search") or sample.labels.get("status") != "200"):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def breakdown(before: Totals, after: Totals, client_mean_ms: float) -> TimeBreakdown | None:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    runs = delta("medsearch_encode_duration_seconds_count")
    searches = delta("medsearch_search_duration_seconds_count")
    requests = delta("medsearch_http_request_duration_seconds_count")
    if runs <= 0 or searches <= 0 or requests <= 0:
        return None
    server_ms = delta("medsearch_http_request_duration_seconds_sum") / requests * 1000

    def per_request_ms(family: str) -> float | None:
        count = delta(f"{family}_count")
        return delta(f"{family}_sum") / count * 1000 if count > 0 else None

    return TimeBreakdown(
        encoder_runs=int(runs),
        mean_batch=delta("medsearch_encode_batch_size_sum") / runs,
        encode_ms_per_run=delta("medsearch_encode_duration_seconds_sum") / runs * 1000,
        search_ms=delta("medsearch_search_duration_seconds_sum") / searches * 1000,
        server_ms=server_ms,
        outside_ms=client_mean_ms - server_ms,
        validate_ms=per_request_ms("medsearch_request_validate_duration_seconds"),
        queue_wait_ms=per_request_ms("medsearch_encode_queue_wait_seconds"),
        serialize_ms=per_request_ms("medsearch_response_serialize_duration_seconds"),
    )


async def _totals(client: httpx.AsyncClient) -> Totals | None:
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None  # e.g. /metrics behind an admin key: the breakdown is left out
    try:
        return read_totals(response.text)
    except ValueError:
        return None  # not a Prometheus exposition


class ComparedServer(BaseModel):
    """Another embedding server measured with the same queries, levels and duration (encode only)."""

    url: str
    model: str
    prefix: str
    levels: list[LoadLevel]


class RawEncode(BaseModel):
    """The served query encoder run back to back on the same queries, in the bench process, while
    the service is idle: the floor a /search at concurrency 1 is compared with."""

    model: str
    threads: int
    latency: LatencySummary


# The served model's name (from /info) -> its raw encode figures, or None when it is not on this machine.
RawEncoder = Callable[[str], RawEncode | None]
RAW_ENCODES = 400
RAW_WARMUP = 20


def time_raw_encode(
    encode: Callable[[str], object],
    queries: Sequence[str],
    repeats: int = RAW_ENCODES,
    warmup: int = RAW_WARMUP,
    clock: Clock = time.perf_counter,
) -> LatencySummary:
    """``warmup`` untimed then ``repeats`` timed calls of ``encode``, cycling through ``queries``."""
    for i in range(warmup):
        encode(queries[i % len(queries)])
    samples = []
    for i in range(repeats):
        query = queries[i % len(queries)]
        start = clock()
        encode(query)
        samples.append((clock() - start) * 1000)
    return summarize(samples)


class ServiceBench(BaseModel):
    url: str
    spawned: bool
    duration_s: float
    top_k: int
    levels: list[LoadLevel]
    memory: MemoryPeak | None
    memory_note: str = ""
    info: dict[str, Any] | None = None
    compared: ComparedServer | None = None
    raw_encode: RawEncode | None = None
    raw_encode_note: str = ""


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """``main`` on uvloop when it is installed (with the service it is), else on asyncio's own loop."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(main)
    return uvloop.run(main)


def require_loopback(url: str) -> str:
    """``url`` without a trailing slash, if its host is this machine; NotLoopback otherwise."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise NotLoopback(f"{url}: the load generator targets loopback addresses only (127.0.0.1, ::1)")
    return url.rstrip("/")


def read_memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in KiB from /proc, or None when the process or /proc is gone."""
    fields = process_status_kib(pid, ("VmRSS", "VmHWM"))
    if fields is None or len(fields) != 2:
        return None
    return fields["VmRSS"], fields["VmHWM"]


def find_pid_by_port(port: int) -> int | None:
    """The process listening on TCP ``port``, via psutil when it is installed."""
    try:
        import psutil
    except ModuleNotFoundError:
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


class MemorySampler:
    """Samples a process's VmRSS every ``interval_s`` until ``stop`` is set."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.max_rss_kib = 0
        self.level_max_rss_kib = 0
        self.samples = 0
        self.stop = asyncio.Event()

    def sample(self) -> None:
        memory = read_memory_kib(self.pid)
        if memory is None:
            return
        self.samples += 1
        self.max_rss_kib = max(self.max_rss_kib, memory[0])
        self.level_max_rss_kib = max(self.level_max_rss_kib, memory[0])

    async def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            try:
                await asyncio.wait_for(self.stop.wait(), self.interval_s)
            except TimeoutError:
                continue

    def peak(self) -> MemoryPeak | None:
        memory = read_memory_kib(self.pid)
        if memory is None or not self.samples:
            return None
        return MemoryPeak(
            pid=self.pid,
            hwm_kib=memory[1],
            max_sampled_rss_kib=max(self.max_rss_kib, memory[0]),
            samples=self.samples,
        )


async def run_level(
    url: str,
    queries: Sequence[str],
    concurrency: int,
    duration_s: float,
    top_k: int = 10,
    clock: Clock = time.perf_counter,
    probe: httpx.AsyncClient | None = None,
    send: Send | None = None,
    timeout_s: float = 30.0,
    service_pid: int | None = None,
) -> LoadLevel:
    """``concurrency`` workers POST /search (or ``send``) to ``url`` in closed loops, one connection
    each, until ``duration_s`` has passed; with ``probe``, /healthz is timed on that client meanwhile."""
    request = send or search_request(top_k)
    if concurrency < 1 or duration_s <= 0 or not queries:
        raise ValueError("need concurrency >= 1, a positive duration and at least one query")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    turn = itertools.count()
    deadline = clock() + duration_s

    async def worker() -> None:
        connection = HttpConnection(url, timeout_s)
        try:
            while clock() < deadline:
                query = queries[next(turn) % len(queries)]
                start = clock()
                try:
                    status, _ = await request(connection, query)
                except (OSError, TimeoutError) as exc:  # refused, reset, closed mid-response, timed out
                    errors[type(exc).__name__] += 1
                    continue
                elapsed_ms = (clock() - start) * 1000
                if status == 200:
                    latencies.append(elapsed_ms)
                else:
                    errors[str(status)] += 1
        finally:
            connection.close()

    probes: list[float] = []

    async def prober(client: httpx.AsyncClient) -> None:
        while clock() < deadline:
            start = clock()
            try:
                ok = (await client.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                probes.append((clock() - start) * 1000)
            else:
                errors["healthz"] += 1
            await asyncio.sleep(PROBE_INTERVAL_S)

    started = clock()
    client_cpu = time.process_time()
    service_cpu = process_cpu_s(service_pid) if service_pid is not None else None
    tasks = [worker() for _ in range(concurrency)] + ([prober(probe)] if probe is not None else [])
    await asyncio.gather(*tasks)
    seconds = clock() - started
    client_cpu = time.process_time() - client_cpu
    service_after = process_cpu_s(service_pid) if service_pid is not None else None
    requests = len(latencies) + sum(n for kind, n in errors.items() if kind != "healthz")

    def per_request_ms(cpu_s: float | None) -> float | None:
        return cpu_s / requests * 1000 if cpu_s is not None and requests else None

    return LoadLevel(
        concurrency=concurrency,
        seconds=seconds,
        requests=requests,
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        requests_per_s=requests / seconds if seconds > 0 else 0.0,
        latency=summarize(latencies) if latencies else None,
        samples_ms=[round(x, 3) for x in latencies],
        healthz=summarize(probes) if probes else None,
        client_cpu_ms=per_request_ms(client_cpu),
        service_cpu_ms=per_request_ms(
            service_after - service_cpu if service_cpu is not None and service_after is not None else None
        ),
    )


async def measure_compared(
    url: str,
    model: str,
    prefix: str,
    queries: Sequence[str],
    levels: Sequence[int],
    duration_s: float,
    timeout_s: float,
    warmup: int,
    on_level: Callable[[int], None] | None = None,
) -> ComparedServer:
    """The same closed-loop levels against another server's /embeddings (loopback only)."""
    base = require_loopback(url)
    send = embeddings_request(model, prefix)
    port = urlsplit(base).port or 80
    pid = find_pid_by_port(port)
    connection = HttpConnection(base, timeout_s)
    try:
        for _ in range(warmup):
            await send(connection, queries[0])
    finally:
        connection.close()
    results = []
    for concurrency in levels:
        if on_level is not None:
            on_level(concurrency)
        results.append(
            await run_level(
                base, queries, concurrency, duration_s, send=send, timeout_s=timeout_s, service_pid=pid
            )
        )
    return ComparedServer(url=base, model=model, prefix=prefix, levels=results)


async def _service_info(client: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        response = await client.get("/info")
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None  # recorded as unknown: the load figures do not depend on it
    return body if isinstance(body, dict) else None


async def measure_service(
    url: str,
    queries: Sequence[str],
    levels: Sequence[int],
    duration_s: float,
    *,
    top_k: int = 10,
    timeout_s: float = 30.0,
    warmup: int = 5,
    pid: int | None = None,
    spawned: bool = False,
    on_level: Callable[[int], None] | None = None,
    compare: tuple[str, str, str] | None = None,
    raw_encoder: RawEncoder | None = None,
) -> ServiceBench:
    """Run every concurrency level against ``url`` (loopback only), sampling ``pid``'s memory, or
    the memory of whichever process listens on the URL's port when ``pid`` is None. With
    ``raw_encoder``, the served query encoder is first timed on its own (the service idle)."""
    base = require_loopback(url)
    if pid is None:
        port = urlsplit(base).port or 80
        pid = find_pid_by_port(port)
        note = "" if pid is not None else f"no process found listening on port {port}; pass --pid"
    else:
        note = ""
    sampler = MemorySampler(pid) if pid is not None else None
    if sampler is not None and read_memory_kib(sampler.pid) is None:
        note = f"cannot read /proc/{sampler.pid}/status"
        sampler = None
    # trust_env=False: a proxy from the environment must never carry loopback traffic elsewhere.
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, trust_env=False) as probe:
        info = await _service_info(probe)
        warm = HttpConnection(base, timeout_s)
        try:
            for _ in range(warmup):
                await warm.post_json("/search", {"query": queries[0], "top_k": top_k})
        finally:
            warm.close()
        raw, raw_note = None, ""
        if raw_encoder is not None:
            served = ((info or {}).get("query_encoder") or {}).get("name")
            raw = raw_encoder(served) if isinstance(served, str) else None
            if raw is None:
                known = served or "unknown: no /info"
                raw_note = f"the served query encoder ({known}) is not in this machine's models"
        sampling = asyncio.create_task(sampler.run()) if sampler is not None else None
        results = []
        try:
            for concurrency in levels:
                if on_level is not None:
                    on_level(concurrency)
                if sampler is not None:
                    sampler.level_max_rss_kib = 0
                before = await _totals(probe)
                level = await run_level(
                    base,
                    queries,
                    concurrency,
                    duration_s,
                    top_k,
                    probe=probe,
                    timeout_s=timeout_s,
                    service_pid=pid,
                )
                after = await _totals(probe)
                if before is not None and after is not None and level.latency is not None:
                    level.breakdown = breakdown(before, after, level.latency.mean_ms)
                if sampler is not None:
                    sampler.sample()
                    level.max_rss_kib = sampler.level_max_rss_kib
                results.append(level)
        finally:
            if sampler is not None and sampling is not None:
                sampler.stop.set()
                await sampling
    compared = None
    if compare is not None:
        compared = await measure_compared(*compare, queries, levels, duration_s, timeout_s, warmup, on_level)
    return ServiceBench(
        compared=compared,
        url=base,
        spawned=spawned,
        duration_s=duration_s,
        top_k=top_k,
        levels=results,
        memory=sampler.peak() if sampler is not None else None,
        memory_note=note,
        info=info,
        raw_encode=raw,
        raw_encode_note=raw_note,
    )
