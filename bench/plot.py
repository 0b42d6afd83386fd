"""The PNG: service latency CDF per concurrency level, encoder latency by input length, and the store's
capacity curves (serving memory and search latency against the number of documents)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.capacity import CapacityBench
    from bench.query_latency import QueryEncoderBench
    from bench.service_load import ServiceBench


def _service_panel(ax: Any, service: ServiceBench) -> None:
    for level in service.levels:
        samples = sorted(level.samples_ms)
        if samples:
            fractions = [(i + 1) / len(samples) for i in range(len(samples))]
            ax.step(samples, fractions, where="post", label=f"concurrency {level.concurrency}")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("POST /search latency CDF")
    ax.legend()


def _encoder_panel(ax: Any, bench: QueryEncoderBench) -> None:
    from matplotlib.ticker import ScalarFormatter

    for encoder in bench.encoders:
        tokens = [x.tokens for x in encoder.lengths]
        (line,) = ax.plot(
            tokens, [x.latency.p50_ms for x in encoder.lengths], marker="o", label=f"{encoder.name} p50"
        )
        ax.plot(tokens, [x.latency.p95_ms for x in encoder.lengths], linestyle="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x.tokens for e in bench.encoders for x in e.lengths}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_yscale("log")
    ax.set_xlabel("input tokens")
    ax.set_ylabel("latency (ms, log); dashed: p95")
    ax.set_title("Encoder latency, batch 1")
    ax.legend(fontsize="small")


def _by_storage(capacity: CapacityBench) -> dict[str, list[Any]]:
    series: dict[str, list[Any]] = {}
    for run in sorted(capacity.runs, key=lambda r: r.documents):
        series.setdefault(run.storage_name, []).append(run)
    return series


def _capacity_memory_panel(ax: Any, capacity: CapacityBench) -> None:
    for name, runs in _by_storage(capacity).items():
        sizes = [r.documents for r in runs]
        (line,) = ax.plot(sizes, [r.serve.after.rss_mib for r in runs], marker="o", label=f"{name} RSS")
        ax.plot(sizes, [r.build.disk_mib for r in runs], marker="x", linestyle=":", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("documents (log)")
    ax.set_ylabel("MiB (log); dotted: disk")
    ax.set_title("Embedded store: serving RSS and disk")
    ax.legend(fontsize="small")


def _capacity_latency_panel(ax: Any, capacity: CapacityBench) -> None:
    top = max(capacity.setup.concurrency)
    ef = capacity.setup.ef[len(capacity.setup.ef) // 2]
    for name, runs in _by_storage(capacity).items():
        levels = [next(v for v in r.serve.levels if v.ef == ef and v.concurrency == top) for r in runs]
        sizes = [r.documents for r in runs]
        (line,) = ax.plot(sizes, [v.latency.p50_ms for v in levels], marker="o", label=f"{name} p50")
        ax.plot(sizes, [v.latency.p99_ms for v in levels], linestyle="--", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("documents (log)")
    ax.set_ylabel("ms (log); dashed: p99")
    ax.set_title(f"Top-10 search at concurrency {top}, ef {ef}")
    ax.legend(fontsize="small")


def plot_latency(
    service: ServiceBench | None,
    encoders: QueryEncoderBench | None,
    title: str,
    path: Path,
    capacity: CapacityBench | None = None,
) -> bool:
    """Write the figure to ``path``; False (nothing written) when the run measured nothing to plot."""
    panels: list[Callable[[Any], None]] = []
    if service is not None and any(level.samples_ms for level in service.levels):
        panels.append(lambda ax: _service_panel(ax, service))
    if encoders is not None and encoders.encoders:
        panels.append(lambda ax: _encoder_panel(ax, encoders))
    if capacity is not None and capacity.runs:
        panels.append(lambda ax: _capacity_memory_panel(ax, capacity))
        panels.append(lambda ax: _capacity_latency_panel(ax, capacity))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, draw in zip(axes[0], panels, strict=True):
        draw(ax)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
