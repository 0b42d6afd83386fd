"""What the running service holds: settings, the query encoder, the store and the collection's spec.

The collection spec is re-read from the store by every readiness probe (and by a search when no
compatible spec is known, at most once per back-off interval), so the service recovers from a store
outage, or from a store that was down at start-up, without a restart. Readiness also opens the
collection (a count), so "ready" means a search would work: a shard locked by another process or a
collection that cannot be opened is not ready.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio

from models.encoder import Encoder
from models.loading import load_encoder
from models.manifest import ManifestError, ModelManifest, named_model_dir, read_manifest
from service.configured_store import open_configured_store
from service.errors import NotReady
from settings import Settings
from store.base import VectorStore
from store.errors import StoreError, StoreUnavailable
from store.sparse import Bm25Encoder, SparseVector
from store.spec import CollectionSpec

logger = logging.getLogger("medsearch.service")

BUILD_MODELS = "`medsearch models build`"
BUILD_INDEX = "`medsearch index ...`"
WARM_UP_TEXT = "warm-up"
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0


class StartupError(RuntimeError):
    """The service cannot start; the message says what is wrong and which command fixes it."""


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()


def compatibility_problem(query: ModelManifest, collection: str, spec: CollectionSpec) -> str | None:
    """Why vectors of ``query`` cannot be compared with ``collection``'s, or None when they can."""
    if query.space == spec.space and query.dim == spec.dim:
        return None
    return (
        f"query encoder {query.name!r} encodes into space {query.space!r} (dim {query.dim}) but "
        f"collection {collection!r} holds space {spec.space!r} (dim {spec.dim}) from document encoder "
        f"{spec.encoder!r}; serve a query encoder of space {spec.space!r} or reindex the collection"
    )


@dataclass(eq=False)
class ServingState:
    settings: Settings
    encoder: Encoder
    store: VectorStore
    # The spec last read from the store (compatible or not) and, if not, why.
    spec: CollectionSpec | None = None
    problem: str | None = None
    warmed: bool = False
    store_reachable: bool = True
    # Searches' store calls run on these threads only: a hanging store holds at most this many, and
    # probes (on anyio's default pool) still answer.
    store_calls: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(8))
    # While no servable spec is known, searches re-check the store at most once per back-off interval.
    _retry_at: float = field(default=0.0, repr=False)
    _backoff_s: float = field(default=0.0, repr=False)
    _last_failure: Exception | None = field(default=None, repr=False)

    @property
    def collection(self) -> str:
        return self.settings.collection

    @property
    def search_in_process(self) -> bool:
        """The embedded engine answers in a fraction of a millisecond: searched on the encoder thread
        right after the query's run (one thread hop per request). A server's round trip could hold
        an encoder thread, so those searches go to the store's own threads."""
        return self.settings.qdrant_url is None

    @property
    def query_manifest(self) -> ModelManifest:
        return self.encoder.manifest

    def warm_up(self) -> None:
        """One encode before serving: the first onnxruntime run allocates and is much slower."""
        self.encoder.encode([WARM_UP_TEXT])
        self.warmed = True

    def refresh(self) -> Readiness:
        """Re-read the collection spec from the store and re-check it (blocking: run off the loop)."""
        reasons: list[str] = []
        # A fresh look at the store supersedes whatever searches were told during the back-off.
        self._retry_at = 0.0
        if not self.warmed:
            reasons.append("query encoder not loaded")
        try:
            spec = self.store.get_collection(self.collection)
            if spec is not None:
                self.store.count(self.collection)  # opens the collection, as a search would
        except StoreUnavailable as exc:
            self._note_store(reachable=False, exc=exc)
            reasons.append("vector store unreachable")
            return Readiness(False, tuple(reasons))
        except StoreError as exc:
            logger.warning("reading collection %r failed: %s", self.collection, exc)
            reasons.append("vector store refused to describe the collection")
            return Readiness(False, tuple(reasons))
        self._note_store(reachable=True)
        self.spec = spec
        if spec is None:
            self.problem = f"collection {self.collection!r} not found; build it with {BUILD_INDEX}"
        else:
            self.problem = compatibility_problem(self.query_manifest, self.collection, spec)
        if self.problem is not None:
            reasons.append(self.problem)
        return Readiness(not reasons, tuple(reasons))

    def known_spec(self) -> CollectionSpec | None:
        """The compatible spec if one is known (no store call: safe on the event loop)."""
        return self.spec if self.problem is None else None

    def serving_spec(self) -> CollectionSpec:
        """The compatible collection spec, re-checked with the store when none is known.

        Raises StoreUnavailable when the store does not answer, NotReady for any other reason. After
        a failed check, searches get the same answer without a store call until the back-off
        interval (doubling from BACKOFF_MIN_S to BACKOFF_MAX_S) has passed: an outage costs the
        store one request per interval, not one per search.
        """
        known = self.known_spec()
        if known is not None:
            return known
        if self._last_failure is not None and time.monotonic() < self._retry_at:
            raise self._last_failure
        readiness = self.refresh()
        failure: Exception | None = None
        if not self.store_reachable:
            failure = StoreUnavailable(f"the store did not answer for collection {self.collection!r}")
        elif not readiness.ready or self.spec is None:
            failure = NotReady(readiness.reasons)
        if failure is None:
            self._backoff_s, self._last_failure = 0.0, None
            assert self.spec is not None
            return self.spec
        self._backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        self._last_failure = failure
        raise failure

    def spec_stale(self) -> None:
        """The store refused a search (e.g. the collection was deleted): re-read the spec next time."""
        self.spec = None
        self.problem = None

    def bm25_query(self, text: str) -> SparseVector:
        """The BM25 query vector of ``text`` for the served collection (which must have BM25 vectors)."""
        spec = self.spec.sparse if self.spec is not None else None
        if spec is None:
            raise NotReady(("the served collection has no BM25 vectors",))
        # Construction costs ~0.2 ms and follows the spec if the collection changes: no cache.
        return Bm25Encoder(spec).query(text)

    def store_failed(self, exc: StoreUnavailable) -> None:
        """A search could not reach the store: the collection may come back different, so re-check it."""
        self.spec_stale()
        self._note_store(reachable=False, exc=exc)

    def close(self) -> None:
        self.store.close()

    def _note_store(self, reachable: bool, exc: Exception | None = None) -> None:
        # Log transitions only: probes run every few seconds and would flood the log during an outage.
        if reachable and not self.store_reachable:
            logger.info("vector store reachable again")
        elif not reachable and self.store_reachable:
            logger.warning("vector store unreachable: %s", exc)
        self.store_reachable = reachable


def _store_location(settings: Settings) -> str:
    return settings.qdrant_url or str(settings.store_path)


def _read_query_manifest(settings: Settings) -> ModelManifest:
    models = settings.models_path
    if not models.is_dir():
        raise StartupError(f"models directory {models} does not exist; build it with {BUILD_MODELS}")
    try:
        query_dir = named_model_dir(models, settings.query_model)
    except ManifestError as exc:
        raise StartupError(f"MEDSEARCH_QUERY_MODEL: {exc}") from exc
    if not query_dir.is_dir():
        raise StartupError(
            f"query encoder {settings.query_model!r} not found in {models}; build it with {BUILD_MODELS}"
        )
    try:
        manifest = read_manifest(query_dir)
    except ManifestError as exc:
        raise StartupError(f"{exc}; rebuild it with {BUILD_MODELS}") from exc
    if manifest.role != "query":
        # A document encoder exported to ONNX may share the collection's space, yet it was never
        # trained on queries (no query prompt, document-length inputs): refuse it by role, not by space.
        raise StartupError(
            f"{query_dir} holds a {manifest.role} encoder ({manifest.name!r}); MEDSEARCH_QUERY_MODEL must "
            "name a query encoder (role 'query' in its manifest.json)"
        )
    if manifest.format != "onnx":
        # Other formats need torch, which the serving install does not have.
        raise StartupError(
            f"query encoder {manifest.name!r} has format {manifest.format!r}; the service serves ONNX "
            f"query encoders only (build one with {BUILD_MODELS})"
        )
    return manifest


def load_state(settings: Settings) -> ServingState:
    """Open everything the service needs, refusing to start on anything a restart would not fix.

    The collection is checked against the query manifest before the encoder is loaded, so a
    mismatch fails fast. An unreachable store is not fatal: the service starts not ready and
    checks the collection when the store answers.
    """
    manifest = _read_query_manifest(settings)
    try:
        store = open_configured_store(settings)
    except (StoreError, ValueError) as exc:
        raise StartupError(f"cannot open the vector store at {_store_location(settings)}: {exc}") from exc
    try:
        spec, reachable = _initial_spec(store, settings, manifest)
        encoder = _load_encoder(settings)
    except BaseException:
        store.close()
        raise
    return ServingState(
        settings=settings,
        encoder=encoder,
        store=store,
        spec=spec,
        store_reachable=reachable,
        store_calls=anyio.CapacityLimiter(settings.store_concurrency),
    )


def _initial_spec(
    store: VectorStore, settings: Settings, manifest: ModelManifest
) -> tuple[CollectionSpec | None, bool]:
    """The collection's spec and whether the store answered; StartupError when it cannot be served."""
    try:
        spec = store.get_collection(settings.collection)
    except StoreUnavailable as exc:
        logger.warning("vector store unreachable at start-up; serving once it answers: %s", exc)
        return None, False
    except StoreError as exc:
        # It answered and refused (wrong API key, unreadable collection spec): waiting will not help.
        raise StartupError(
            f"the vector store at {_store_location(settings)} refused to describe collection "
            f"{settings.collection!r}: {exc}; check MEDSEARCH_QDRANT_API_KEY, or rebuild the collection "
            f"with {BUILD_INDEX}"
        ) from exc
    if spec is None:
        raise StartupError(
            f"collection {settings.collection!r} not found in the store at {_store_location(settings)}; "
            f"build it with {BUILD_INDEX}"
        )
    problem = compatibility_problem(manifest, settings.collection, spec)
    if problem is not None:
        raise StartupError(f"refusing to serve: {problem}")
    return spec, True


def _load_encoder(settings: Settings) -> Encoder:
    model_dir = named_model_dir(settings.models_path, settings.query_model)
    try:
        return load_encoder(model_dir, threads=settings.query_threads)
    except ManifestError as exc:
        raise StartupError(f"{exc}; rebuild it with {BUILD_MODELS}") from exc
    except Exception as exc:
        # onnxruntime's errors (InvalidProtobuf, Fail...) derive from Exception alone; at start-up any
        # failure to open the model is a broken build, named with its fix, never a traceback.
        raise StartupError(
            f"query encoder {model_dir} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
            f"delete the directory and rebuild it with {BUILD_MODELS}"
        ) from exc
