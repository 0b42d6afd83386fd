"""Every option of the product, read from the environment (prefix MEDSEARCH_) in one place."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDSEARCH_", extra="ignore")

    home: Path = Field(default=Path("var"), description="Root for built models and the embedded store.")
    models_dir: Path | None = Field(default=None, description="Built encoders; default HOME/models.")
    query_model: str = Field(
        default="embeddinggemma-300m-k4-query-onnx-int8", description="Query encoder directory."
    )
    document_model: str = Field(
        default="embeddinggemma-300m",
        description="Document encoder directory used by the indexer (e.g. multilingual-e5-small).",
    )
    collection: str = Field(
        default="medsearch",
        description="The alias the service reads and full builds switch (a plain collection name works too).",
    )
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server URL (or ':memory:'); unset = embedded engine."
    )
    qdrant_api_key: SecretStr | None = Field(default=None, description="Qdrant API key (server backend).")
    qdrant_path: Path | None = Field(default=None, description="Embedded store data; default HOME/qdrant.")
    qdrant_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds a Qdrant server call may take before it counts as down."
    )
    spec_refresh_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between re-reads of the collection's spec (alias switches); 0: never.",
    )
    store_concurrency: int = Field(
        default=8, ge=1, description="Searches in flight to the store; a hanging store holds no more threads."
    )
    hnsw_ef: int | None = Field(
        default=None,
        ge=1,
        description="HNSW candidates per search: higher is closer to exact, slower. Unset: the store's "
        "default, chosen by measurement (DEFAULT_HNSW_EF in store/qdrant.py).",
    )
    search_threads: int = Field(
        default=1,
        ge=0,
        description="Threads of the embedded engine's search pool per collection (segments searched in "
        "parallel). 1: a search costs one thread beside the encoder's; 0: the engine's default, one per "
        "CPU. A Qdrant server sizes its own.",
    )

    host: str = Field(default="127.0.0.1", description="Listen address (0.0.0.0 in the container image).")
    port: int = Field(default=8000, ge=0, le=65535, description="Listen port (0: any free port).")
    threads: int = Field(
        default=0, ge=0, description="Encoder threads of batch jobs (index, eval); 0 = runtime default."
    )
    query_threads: int = Field(
        default=1,
        ge=0,
        description=(
            "Query encoder threads in the service. 1 leaves the other cores to HTTP, the store and the "
            "next batch (batching supplies the parallelism); 0 = runtime default (all cores)."
        ),
    )
    encoder_workers: int = Field(
        default=2,
        ge=1,
        description=(
            "Query encoder runs in flight at once (threads sharing one session). Keep workers x "
            "MEDSEARCH_QUERY_THREADS at or under the cores: one worker per core uses them all under load."
        ),
    )
    max_body_bytes: int = Field(default=64 * 1024, gt=0, description="Larger request bodies get 413.")
    log_queries: bool = Field(default=False, description="Log query text. Patient data: keep off.")
    batch_max_size: int = Field(
        default=16,
        ge=1,
        description="Most queries in one encoder run (smaller runs shorten the wait of a late arrival).",
    )
    batch_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description=(
            "How long a batch lingers for more queries once the encoder is free; 0: a batch is the "
            "thread's share (waiting / MEDSEARCH_ENCODER_WORKERS) of what queued during the previous "
            "run (natural batching). MEDSEARCH_BATCH_MAX_SIZE=1 turns batching off."
        ),
    )
    queue_max_pending: int = Field(
        default=256, ge=1, description="Queries waiting for the encoder before requests get 429."
    )
    query_cache_size: int = Field(default=1024, ge=0, description="LRU of query vectors; 0: off.")
    request_timeout_s: float = Field(default=10.0, gt=0, description="Per-request deadline (then 504).")
    api_keys: SecretStr | None = Field(
        default=None, description="Comma-separated 'scope:key' (scopes: search, admin); unset: API open."
    )
    api_keys_file: Path | None = Field(default=None, description="File of 'scope:key' lines (# comments).")
    protect_metrics: bool = Field(default=False, description="/metrics needs an admin key.")
    cors_origins: list[str] = Field(
        default=[], description="Browser origins allowed to call the API (JSON list); empty: CORS off."
    )

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def store_path(self) -> Path:
        return self.qdrant_path or self.home / "qdrant"
