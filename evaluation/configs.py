"""Which configurations one evaluation compares, derived from the manifests of the built encoders.

Nothing here names a model: every (query encoder, document encoder) pair whose manifests agree on
``space`` and ``dim`` is a dense configuration, classified by the query encoder's lineage:

- ``symmetric-bert``: the query encoder is an export of that very document encoder
  (``derived_from`` equals the document encoder's fingerprint; fp32 and int8 exports alike);
- ``asymmetric``: any other query encoder in the space, e.g. a small encoder aligned into an LLM's
  document space (the CARE setup);
- ``symmetric-llm``: an LLM document encoder also encoding the queries, which is what the
  asymmetric design avoids at query time. It exists for every decoder-only document encoder and for
  every document encoder with a ``query_prompt`` of its own (an LLM embedder such as EmbeddingGemma);
  the queries are encoded with that query prompt (``query_mode`` "query") when there is one, with the
  document prompt otherwise, and the documents always with the document prompt;
- ``bm25``: the lexical baseline; ``hybrid-rrf``: reciprocal-rank fusion of BM25 and the default pair.

The default configuration is the pair the service serves with the current settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.encoder import EncodeMode
from models.manifest import ManifestError, ModelManifest, built_models

Kind = Literal["asymmetric", "symmetric-bert", "symmetric-llm", "bm25", "hybrid-rrf"]
DENSE_KINDS: tuple[Kind, ...] = ("asymmetric", "symmetric-bert", "symmetric-llm")
DEFAULT = "default"
BM25 = "bm25"
HYBRID = "hybrid-rrf"


class ConfigError(ValueError):
    """A requested configuration does not exist among the built encoders."""


@dataclass(frozen=True)
class BuiltModel:
    path: Path
    manifest: ModelManifest


@dataclass(frozen=True)
class Configuration:
    name: str
    kind: Kind
    query: BuiltModel | None = None  # None for bm25 / hybrid
    document: BuiltModel | None = None

    @property
    def dense(self) -> bool:
        return self.kind in DENSE_KINDS

    @property
    def query_mode(self) -> EncodeMode:
        """How the query side is opened: "query" (its own query prompt) for a symmetric-llm document
        encoder that has one; "document" (the manifest's prompt) for every other encoder."""
        if (
            self.kind == "symmetric-llm"
            and self.query is not None
            and self.query.manifest.query_prompt is not None
        ):
            return "query"
        return "document"


def dense_name(kind: Kind, query: ModelManifest, document: ModelManifest) -> str:
    if kind == "symmetric-llm":
        return f"{kind}:{document.name}"
    return f"{kind}:{query.name}/{document.name}"


def encodes_own_queries(document: ModelManifest) -> bool:
    """A document encoder that can stand in as its own query encoder: a decoder-only LLM (queries
    get the document prompt) or an embedder with a query prompt of its own."""
    return document.role == "document" and (document.decoder_only or document.query_prompt is not None)


def pair_kind(query: ModelManifest, document: ModelManifest) -> Kind:
    """symmetric-bert for an export of the document encoder itself, asymmetric for anything else."""
    if query.derived_from and query.derived_from == document.fingerprint:
        return "symmetric-bert"
    return "asymmetric"


def scan_models(models_dir: Path) -> tuple[list[BuiltModel], list[str]]:
    """Every built encoder under ``models_dir`` and a warning per directory without a valid manifest."""
    if not models_dir.is_dir():
        raise ConfigError(f"models directory {models_dir} not found; build it with: medsearch models build")
    built: list[BuiltModel] = []
    warnings: list[str] = []
    for path, found in built_models(models_dir):
        if isinstance(found, ManifestError):
            warnings.append(f"skipping {path.name}: {found}")
        else:
            built.append(BuiltModel(path, found))
    return built, warnings


def discover(models: Sequence[BuiltModel], *, lexical: bool = True) -> list[Configuration]:
    """Every configuration the built encoders allow, in a stable order (dense by document encoder)."""
    queries = [m for m in models if m.manifest.role == "query"]
    documents = [m for m in models if m.manifest.role == "document"]
    configs: list[Configuration] = []
    for doc in documents:
        for query in queries:
            q, d = query.manifest, doc.manifest
            if q.space == d.space and q.dim == d.dim:
                kind = pair_kind(q, d)
                configs.append(Configuration(dense_name(kind, q, d), kind, query, doc))
        if encodes_own_queries(doc.manifest):
            kind = "symmetric-llm"
            configs.append(Configuration(dense_name(kind, doc.manifest, doc.manifest), kind, doc, doc))
    if lexical:
        configs.append(Configuration(BM25, "bm25"))
        configs.append(Configuration(HYBRID, "hybrid-rrf"))
    return configs


def lineage_warnings(models: Sequence[BuiltModel]) -> list[str]:
    """Query encoders whose lineage is unrecorded: they are classified asymmetric, maybe wrongly."""
    return [
        f"{m.manifest.name}: manifest has no derived_from (built before lineage was recorded?); "
        "classified as asymmetric. Rebuild it to record which model it was exported from."
        for m in models
        if m.manifest.role == "query" and not m.manifest.derived_from
    ]


def find_default(
    configs: Sequence[Configuration], query_dir: Path, document_dir: Path
) -> Configuration | None:
    """The dense configuration the service serves: the configured query encoder over the configured
    document encoder (directories compared resolved, so a path or a name both work)."""
    for config in configs:
        if (
            config.kind in ("asymmetric", "symmetric-bert")
            and config.query is not None
            and config.document is not None
            and config.query.path.resolve() == query_dir.resolve()
            and config.document.path.resolve() == document_dir.resolve()
        ):
            return config
    return None


def select(
    configs: Sequence[Configuration], wanted: Sequence[str], default: Configuration | None
) -> list[Configuration]:
    """Configurations named in ``wanted`` (exact names, kinds, or ``default``); all when empty.

    The hybrid needs the default pair, so it is dropped when there is none.
    """
    available = [c for c in configs if c.kind != "hybrid-rrf" or default is not None]
    if not wanted:
        return available
    chosen: dict[str, Configuration] = {}
    for name in wanted:
        if name == DEFAULT:
            if default is None:
                raise ConfigError(
                    "no default configuration: the configured query and document models are not both "
                    "built in one space"
                )
            matches = [default]
        else:
            matches = [c for c in available if name in (c.name, c.kind)]
        if not matches:
            known = ", ".join(
                dict.fromkeys([DEFAULT, *(c.kind for c in available), *(c.name for c in available)])
            )
            raise ConfigError(f"no configuration {name!r}; known: {known}")
        chosen.update((c.name, c) for c in matches)
    return [c for c in available if c.name in chosen]
