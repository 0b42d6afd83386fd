"""The Kubernetes indexing jobs in deploy/k8s run commands the real CLI accepts, with matching shards."""

from __future__ import annotations

from pathlib import Path

import yaml

from medsearch.cli import build_parser

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def _job(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text(encoding="utf-8"))


def _args(job: dict) -> list[str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container["args"]]


def test_shard_workers_cover_every_part_and_parse() -> None:
    job = _job("indexer-shards-job.yaml")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    args = _args(job)
    shard = args[args.index("--shard") + 1]
    assert shard == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}"
    for i in range(spec["completions"]):
        concrete = [a.replace("$(JOB_COMPLETION_INDEX)", str(i)) for a in args]
        parsed = build_parser(concrete).parse_args(concrete)
        assert parsed.shard == f"{i}/{spec['completions']}" and not parsed.incremental


def test_finalize_is_the_same_build_without_a_shard() -> None:
    workers, final = _args(_job("indexer-shards-job.yaml")), _args(_job("indexer-finalize-job.yaml"))
    parsed = build_parser(final).parse_args(final)
    assert (
        parsed.shard is None
        and parsed.paths
        == build_parser(workers)
        .parse_args([a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in workers])
        .paths
    )
