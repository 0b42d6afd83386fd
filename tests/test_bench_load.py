"""The load generator: request and error counts against a loopback server that fails every third
search, the real app in process, loopback-only targets and the service memory readings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.queries import QUESTIONS
from bench.service_load import (
    NotLoopback,
    find_pid_by_port,
    measure_service,
    read_memory_kib,
    require_loopback,
    run_level,
)
from bench.spawn import free_port
from service.app import create_app
from service.state import ServingState
from settings import Settings
from store.factory import open_store
from tests.servers import uvicorn_thread
from tests.test_service import COLLECTION, HashEncoder, build_collection


class EveryThirdSearchFails:
    """ASGI app: /search answers 500 on every third call, 200 otherwise; it counts what it saw."""

    def __init__(self) -> None:
        self.searches = 0
        self.probes = 0
        self.embedded: list[dict[str, Any]] = []
        self.queries: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload = 200, b"{}"
        if scope["path"] == "/search":
            self.searches += 1
            self.queries.append(json.loads(body)["query"])
            status = 500 if self.searches % 3 == 0 else 200
        elif scope["path"] == "/embeddings":
            self.embedded.append(json.loads(body))
        elif scope["path"] == "/healthz":
            self.probes += 1
        elif scope["path"] == "/info":
            payload = b'{"query_encoder": {"name": "fake"}}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def test_counts_requests_and_errors_over_loopback() -> None:
    app = EveryThirdSearchFails()
    with uvicorn_thread(app, lifespan="off") as url:
        result = await measure_service(url, QUESTIONS, levels=[1, 4], duration_s=0.3, warmup=0)
    total = sum(level.requests for level in result.levels)
    assert total == app.searches > 0
    assert sum(level.errors for level in result.levels) == app.searches // 3
    first, second = result.levels
    # Each level counts its own requests; its 500s are exactly the server's every-third failures.
    assert first.errors == first.requests // 3
    assert second.errors == (first.requests + second.requests) // 3 - first.requests // 3
    for level in result.levels:
        assert level.error_kinds == ({"500": level.errors} if level.errors else {})
        assert len(level.samples_ms) == level.requests - level.errors
        assert level.healthz is not None  # probed on its own connection while the level ran
        assert level.latency is not None and level.latency.count == len(level.samples_ms)
        assert level.requests_per_s == pytest.approx(level.requests / level.seconds)
    assert sum(level.healthz.count for level in result.levels if level.healthz) == app.probes > 0
    assert [level.concurrency for level in result.levels] == [1, 4]
    assert result.info == {"query_encoder": {"name": "fake"}}
    # The queries rotate through the built-in list (in order while only one worker sends).
    assert app.queries[: first.requests] == [QUESTIONS[i % len(QUESTIONS)] for i in range(first.requests)]
    # No --pid: the listener on the port is found (this process), and its memory sampled.
    assert result.memory is not None
    assert result.memory.pid == os.getpid()
    assert result.memory.hwm_kib >= result.memory.max_sampled_rss_kib > 0
    assert all(level.max_rss_kib for level in result.levels)


async def test_unreachable_service_counts_connection_errors() -> None:
    port = free_port()  # nothing listens there
    level = await run_level(f"http://127.0.0.1:{port}", QUESTIONS, concurrency=2, duration_s=0.1)
    assert level.requests == level.errors > 0
    assert set(level.error_kinds) == {"ConnectionRefusedError"}
    assert level.latency is None


async def test_real_app_in_process_answers_every_request(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, collection=COLLECTION, query_model="hash-query")
    store = open_store(None, settings.store_path)
    build_collection(store, HashEncoder())
    state = ServingState(settings=settings, encoder=HashEncoder(), store=store)
    app = create_app(settings, state)
    try:
        with uvicorn_thread(app) as url:
            level = await run_level(
                url, QUESTIONS, concurrency=4, duration_s=0.3, top_k=3, service_pid=os.getpid()
            )
            metrics = httpx.get(f"{url}/metrics", trust_env=False).text
    finally:
        store.close()
    assert level.errors == 0
    assert level.requests == len(level.samples_ms) > 0
    # The server runs in this process: both CPU figures are this process's time over the level.
    assert level.client_cpu_ms is not None and level.service_cpu_ms is not None
    assert level.client_cpu_ms > 0 and level.service_cpu_ms > 0
    assert f'medsearch_http_requests_total{{route="/search",status="200"}} {float(level.requests)}' in metrics


def test_targets_are_loopback_only() -> None:
    assert require_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert require_loopback("http://localhost:8000") == "http://localhost:8000"
    assert require_loopback("http://[::1]:8000") == "http://[::1]:8000"
    for url in ("http://10.0.0.7:8000", "http://example.org", "http://0.0.0.0:8000"):
        with pytest.raises(NotLoopback):
            require_loopback(url)


def test_memory_readings_come_from_proc() -> None:
    reading = read_memory_kib(os.getpid())
    assert reading is not None
    rss, hwm = reading
    assert 0 < rss <= hwm
    assert read_memory_kib(2**22 + 12345) is None  # above pid_max: no such process
    assert find_pid_by_port(free_port()) is None


async def test_compared_server_gets_the_same_levels_on_its_embeddings_endpoint() -> None:
    from bench.report import compared_table

    ours, theirs = EveryThirdSearchFails(), EveryThirdSearchFails()
    with uvicorn_thread(ours, lifespan="off") as url, uvicorn_thread(theirs, lifespan="off") as other:
        result = await measure_service(
            url, QUESTIONS, levels=[1, 2], duration_s=0.2, warmup=0, compare=(other, "e5-int8", "query: ")
        )
    assert result.compared is not None
    assert [level.concurrency for level in result.compared.levels] == [1, 2]
    sent = theirs.embedded
    assert len(sent) == sum(level.requests for level in result.compared.levels) > 0
    assert all(body["model"] == "e5-int8" and body["input"][0].startswith("query: ") for body in sent)
    assert {body["input"][0].removeprefix("query: ") for body in sent} <= set(QUESTIONS)
    assert theirs.searches == 0
    table = "\n".join(compared_table(result))
    ratio = result.levels[0].requests_per_s / result.compared.levels[0].requests_per_s
    assert f"| {ratio:.2f}x |" in table


def test_breakdown_reads_the_level_from_metrics_deltas() -> None:
    from bench.service_load import breakdown, read_totals

    def exposition(
        runs: int, batch: int, encode_s: float, searches: int, search_s: float, req_s: float
    ) -> str:
        search = '{route="/v1/search",status="200"}'
        return "\n".join(
            [
                "# TYPE medsearch_encode_duration_seconds histogram",
                f"medsearch_encode_duration_seconds_count {runs}",
                f"medsearch_encode_duration_seconds_sum {encode_s}",
                "# TYPE medsearch_encode_batch_size histogram",
                f"medsearch_encode_batch_size_count {runs}",
                f"medsearch_encode_batch_size_sum {batch}",
                "# TYPE medsearch_search_duration_seconds histogram",
                f"medsearch_search_duration_seconds_count {searches}",
                f"medsearch_search_duration_seconds_sum {search_s}",
                "# TYPE medsearch_http_request_duration_seconds histogram",
                f"medsearch_http_request_duration_seconds_count{search} {searches}",
                f"medsearch_http_request_duration_seconds_sum{search} {req_s}",
                'medsearch_http_request_duration_seconds_count{route="/healthz",status="200"} 99',
                'medsearch_http_request_duration_seconds_sum{route="/healthz",status="200"} 99.0',
                "",
            ]
        )

    before = read_totals(exposition(2, 2, 0.02, 2, 0.002, 0.04))
    after = read_totals(exposition(12, 42, 0.52, 42, 0.042, 0.84))
    b = breakdown(before, after, client_mean_ms=25.0)
    assert b is not None
    assert (b.encoder_runs, b.mean_batch) == (10, 4.0)
    assert b.encode_ms_per_run == pytest.approx(50.0)
    assert b.search_ms == pytest.approx(1.0)
    assert b.server_ms == pytest.approx(20.0)  # /healthz is not counted
    assert b.outside_ms == pytest.approx(5.0)
    assert b.validate_ms is None and b.serialize_ms is None  # an older service: no such metrics
    stage = "medsearch_request_validate_duration_seconds"
    staged = breakdown(
        read_totals(exposition(2, 2, 0.02, 2, 0.002, 0.04) + f"{stage}_count 2\n{stage}_sum 0.001\n"),
        read_totals(exposition(12, 42, 0.52, 42, 0.042, 0.84) + f"{stage}_count 42\n{stage}_sum 0.011\n"),
        client_mean_ms=25.0,
    )
    assert staged is not None and staged.validate_ms == pytest.approx(0.25)
    assert breakdown(after, after, 25.0) is None


async def test_the_served_encoder_is_timed_alone_before_the_levels() -> None:
    from bench.service_load import RawEncode, time_raw_encode

    app = EveryThirdSearchFails()
    asked: list[str] = []

    def raw(name: str) -> RawEncode | None:
        asked.append(name)
        # Nothing has been searched yet when the encoder is timed: the levels come after.
        assert app.searches == 0
        return RawEncode(model=name, threads=1, latency=time_raw_encode(len, QUESTIONS, repeats=7, warmup=2))

    with uvicorn_thread(app, lifespan="off") as url:
        result = await measure_service(url, QUESTIONS, levels=[1], duration_s=0.1, warmup=0, raw_encoder=raw)
        missing = await measure_service(
            url, QUESTIONS, levels=[1], duration_s=0.1, warmup=0, raw_encoder=lambda name: None
        )
    assert asked == ["fake"]  # the name /info gave
    assert result.raw_encode is not None and result.raw_encode.latency.count == 7
    assert missing.raw_encode is None and "(fake) is not in this machine's models" in missing.raw_encode_note


def test_raw_encode_times_each_call_after_the_warm_up() -> None:
    from bench.service_load import time_raw_encode

    ticks = iter(range(100))
    calls: list[str] = []
    summary = time_raw_encode(
        calls.append, ["a", "b", "c"], repeats=4, warmup=2, clock=lambda: next(ticks) / 1000
    )
    assert calls == ["a", "b", "a", "b", "c", "a"]  # warm-up, then the timed cycle from the start
    assert summary.count == 4 and summary.p50_ms == pytest.approx(1.0)
