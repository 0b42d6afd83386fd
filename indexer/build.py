"""One indexing run end to end, as a scheduler sees it: a report and an exit status.

Full build (the default): a new version collection is loaded beside the served one, validated, and
only then the alias is switched to it; the last ``keep`` versions stay for rollback. Rerun after a
crash, it continues the same version. Sharded (``--shard i/N``): each worker loads its part of the
same version and stops; the run without ``--shard`` afterwards completes whatever a worker left
undone, validates and switches.

Incremental: the served collection is updated in place, changed documents re-encoded and
documents gone from the input deleted, within a guard.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from indexer import versions
from indexer.pipeline import DeleteGuard, IndexSummary, Partition, Retry, index_files, measure_corpus
from indexer.planning import FilterFields, IndexingError, StorageChoice, chunking_of, planned_spec
from models.encoder import Encoder
from store.base import VectorStore
from store.errors import StoreError, StoreUnavailable

DEFAULT_CHUNK_OVERLAP = 32


class ExitCode(enum.IntEnum):
    """What a scheduler can do about a run."""

    OK = 0
    INPUT = 1  # rejected lines: fix the input (nothing was switched or deleted)
    USAGE = 2  # bad arguments or configuration
    RETRY = 3  # the store was unreachable or documents failed to write: rerun later, it resumes
    REFUSED = 4  # validation failed or a guard refused: a person must look


class Report(BaseModel):
    """The final JSON report of a run."""

    mode: Literal["full", "incremental", "shard"]
    alias: str
    collection: str = Field(description="The collection written (a version, or the served one)")
    resumed: bool = False
    shard: str | None = None
    indexed: int = 0
    skipped: int = 0
    deleted: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_samples: list[str] = Field(
        default_factory=list, description="The first rejected lines: file:line: reason (never their text)"
    )
    failed: int = 0
    seconds: float = 0.0
    docs_per_s: float = 0.0
    validation: dict[str, object] | None = None
    switched_from: str | None = None
    switched: bool = False
    up_to_date: bool = Field(default=False, description="This very build is already served: nothing done")
    pruned: list[str] = Field(default_factory=list)
    error: str | None = None
    exit_code: int = 0

    def absorb(self, summary: IndexSummary) -> None:
        self.indexed, self.skipped, self.deleted = summary.indexed, summary.skipped, summary.deleted
        self.accepted, self.rejected, self.failed = (
            summary.accepted,
            summary.rejected_count,
            len(summary.failed),
        )
        self.rejected_samples = [str(r) for r in summary.rejected]
        self.seconds = round(summary.seconds, 3)
        self.docs_per_s = round(summary.indexed / summary.seconds, 2) if summary.seconds > 0 else 0.0


@dataclass(frozen=True)
class RunOptions:
    fields: FilterFields | None = None
    sparse: bool | None = None
    # --quantization / --vectors-on-disk; unset: a full build keeps the served version's storage, an
    # incremental run the collection's (asking it for another is refused).
    storage: StorageChoice = field(default_factory=StorageChoice)
    batch_size: int = 16
    rejects_path: Path | None = None
    retry: Retry = field(default_factory=Retry)
    keep: int = 3
    # Long documents are split into chunks the encoder reads whole, consecutive ones sharing this
    # many tokens; None: whole documents (truncated by the encoder). Incremental runs keep the
    # collection's choice.
    chunk_overlap: int | None = DEFAULT_CHUNK_OVERLAP
    partition: Partition | None = None  # --shard i/N
    allow_space_change: bool = False
    accept_rejects: bool = False
    delete_guard: DeleteGuard = field(default_factory=DeleteGuard)
    on_progress: Callable[[int, int], None] | None = None


def _finish(report: Report, summary: IndexSummary | None, code: ExitCode, error: str | None = None) -> Report:
    if summary is not None:
        report.absorb(summary)
    report.exit_code = int(code)
    report.error = error
    return report


def _outcome(summary: IndexSummary, accept_rejects: bool) -> tuple[ExitCode, str | None]:
    if summary.failed:
        return ExitCode.RETRY, f"{len(summary.failed)} documents failed to encode or write"
    if summary.rejected_count and not accept_rejects:
        return ExitCode.INPUT, f"{summary.rejected_count} input lines rejected"
    return ExitCode.OK, None


def full_build(
    paths: Sequence[Path], encoder: Encoder, store: VectorStore, alias: str, options: RunOptions
) -> Report:
    """Load a new version of ``alias`` (or continue it), validate it and switch the alias to it."""
    mode: Literal["full", "shard"] = "shard" if options.partition else "full"
    report = Report(mode=mode, alias=alias, collection="")
    if options.partition:
        report.shard = f"{options.partition.index}/{options.partition.count}"
    summary: IndexSummary | None = None
    try:
        versions.check_alias_name(store, alias)
        current = versions.served(store, alias)
        before = store.get_collection(current) if current else None
        fields = (
            options.fields if options.fields is not None else (FilterFields.of(before) if before else None)
        )
        sparse = (
            options.sparse
            if options.sparse is not None
            else (before is not None and before.sparse is not None)
        )
        # BM25 statistics are measured on this corpus, never inherited from the previous version.
        chunking = chunking_of(encoder, options.chunk_overlap)
        storage = options.storage.applied_to(before.storage if before is not None else None)
        spec = planned_spec(None, encoder, fields, sparse, lambda: measure_corpus(paths), chunking, storage)
        name, report.resumed = versions.version_for(store, alias, versions.build_identity(spec, paths))
        report.collection = name
        if name == current and options.partition is None:
            # Validated when it was switched to; reopening it could also collide with the service,
            # which holds the embedded engine's served shard.
            report.up_to_date = True
            return _finish(report, None, ExitCode.OK)
        store.create_collection(name, spec, bulk=True)
        summary = index_files(
            paths,
            encoder,
            store,
            name,
            fields=FilterFields.of(spec),
            sparse=spec.sparse is not None,
            batch_size=options.batch_size,
            rejects_path=options.rejects_path,
            retry=options.retry,
            on_progress=options.on_progress,
            partition=options.partition,
        )
        code, error = _outcome(summary, options.accept_rejects)
        if code != ExitCode.OK or options.partition is not None:
            return _finish(report, summary, code, error)  # a shard worker leaves validation to the final run
        store.optimize(name)
        validation = versions.validate(store, name, summary.accepted, summary.sample_ids)
        report.validation = {
            "count": validation.count,
            "expected": validation.expected,
            "sample": validation.sample,
            "sample_found": validation.sample_found,
            "problems": validation.problems,
        }
        if not validation.ok:
            return _finish(report, summary, ExitCode.REFUSED, "; ".join(validation.problems))
        report.switched_from = versions.switch(
            store, alias, name, allow_space_change=options.allow_space_change
        )
        report.switched = True
        report.pruned = versions.prune(store, alias, options.keep)
        return _finish(report, summary, ExitCode.OK)
    except StoreUnavailable as exc:
        return _finish(report, summary, ExitCode.RETRY, str(exc))
    except (versions.VersionError, IndexingError, StoreError) as exc:
        return _finish(report, summary, ExitCode.REFUSED, str(exc))


def incremental(
    paths: Sequence[Path], encoder: Encoder, store: VectorStore, alias: str, options: RunOptions
) -> Report:
    """Update the collection ``alias`` serves (or a plain collection of that name) in place."""
    target = versions.served(store, alias) or alias
    report = Report(mode="incremental", alias=alias, collection=target)
    try:
        if store.get_collection(target) is None:
            raise IndexingError(f"{alias!r} does not exist: build it first (without --incremental)")
        summary = index_files(
            paths,
            encoder,
            store,
            target,
            fields=options.fields,
            sparse=options.sparse,
            batch_size=options.batch_size,
            rejects_path=options.rejects_path,
            retry=options.retry,
            on_progress=options.on_progress,
            delete_missing=options.delete_guard,
            storage=options.storage,
        )
    except StoreUnavailable as exc:
        return _finish(report, None, ExitCode.RETRY, str(exc))
    except (IndexingError, StoreError) as exc:
        return _finish(report, None, ExitCode.REFUSED, str(exc))
    code, error = _outcome(summary, options.accept_rejects)
    if code == ExitCode.OK and summary.deletes_refused is not None:
        code, error = ExitCode.REFUSED, summary.deletes_refused
    return _finish(report, summary, code, error)
