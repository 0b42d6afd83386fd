"""The Grafana dashboard queries only metrics the service really exports, with their real labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.metrics import ServiceMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "medsearch.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every series the service's registry can expose."""
    series: dict[str, set[str]] = {}
    for collector in vars(ServiceMetrics()).values():
        if isinstance(collector, MetricWrapperBase):
            labels = set(collector._labelnames)
            for suffix in SUFFIXES[collector._type]:
                series[collector._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_every_query_names_an_exported_series_with_its_labels() -> None:
    series = exported()
    problems = []
    for expr in expressions():
        labels_here = {"instance", "job"}
        for name, selector in re.findall(r"\b(medsearch_\w+)(\{[^}]*\})?", expr):
            if name not in series:
                problems.append(f"{name} is not exported: {expr}")
                continue
            labels_here |= series[name]
            unknown = set(re.findall(r"(\w+)\s*[=!]~?", selector)) - series[name]
            problems.extend(f"{name} has no label {label!r}: {expr}" for label in sorted(unknown))
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            unknown = {k.strip() for k in grouping.split(",")} - labels_here
            problems.extend(f"grouping by unknown label {label!r}: {expr}" for label in sorted(unknown))
    assert problems == []
    assert len(expressions()) >= 9


def test_the_dashboard_covers_latency_traffic_errors_stages_cache_and_queue() -> None:
    text = " ".join(expressions())
    for metric in (
        "medsearch_http_request_duration_seconds_bucket",
        "medsearch_http_requests_total",
        "medsearch_errors_total",
        "medsearch_encode_duration_seconds",
        "medsearch_search_duration_seconds",
        "medsearch_query_cache_hits_total",
        "medsearch_encode_queue_depth",
    ):
        assert metric in text


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus() -> None:
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/medsearch.yml").read_text())
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    uid = datasources["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} == {"medsearch-api", "qdrant"}
