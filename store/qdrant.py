"""What both backends send to Qdrant, written once: filters, points and the search's HNSW depth.

The embedded engine (qdrant-edge) and qdrant-client (a server) model the same Qdrant concepts with
classes of their own. Each backend supplies its classes' constructors (a ``QdrantModels``); how a
medsearch filter, chunk selection or document point becomes those models lives here, so the two
backends cannot drift apart in what they ask Qdrant for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

from store import schema
from store.base import DocumentPoint, point_id
from store.filters import Condition, FieldKind, Filter, Scalar, field_kinds, parse_date
from store.sparse import BM25_VECTOR, SparseVector
from store.spec import CollectionSpec

# HNSW candidates per search. Measured on cmedqa-im (7,244 e5-small vectors, 300 queries, top 10
# against exact search): ef 64 recall 0.976 in 0.50 ms, 128 0.989 in 0.61 ms, 256 0.995 in 0.87 ms;
# exact 1.9 ms. MEDSEARCH_HNSW_EF overrides it.
DEFAULT_HNSW_EF = 256
# HNSW graph degree: Qdrant's default, which both backends build with.
HNSW_M = 16
# Scalar int8 quantization (CollectionSpec.storage.quantization). Each dimension's range is set by its
# 0.99 quantile (Qdrant's documented choice: a few outliers would otherwise widen every step), the
# int8 copy is pinned in RAM, and a search rescores the best top_k x OVERSAMPLING candidates with the
# original vectors, so the final scores (and the order of the top_k) are float32 cosines.
INT8_QUANTILE = 0.99
INT8_OVERSAMPLING = 2.0

ConditionT = TypeVar("ConditionT")
FilterT = TypeVar("FilterT")
SparseT = TypeVar("SparseT")
PointT = TypeVar("PointT")
# A point's vectors: the dense one alone, or named ("" dense, BM25_VECTOR sparse).
Vectors = list[float] | dict[str, list[float] | SparseT]


class QdrantModels(ABC, Generic[ConditionT, FilterT, SparseT, PointT]):
    """One client library's constructors for Qdrant's models, and the mapping onto them."""

    @abstractmethod
    def match(self, key: str, value: Scalar) -> ConditionT: ...

    @abstractmethod
    def match_any(self, key: str, values: list[str]) -> ConditionT: ...

    @abstractmethod
    def number_range(self, key: str, bounds: Mapping[str, float]) -> ConditionT: ...

    @abstractmethod
    def date_range(self, key: str, bounds: Mapping[str, datetime]) -> ConditionT: ...

    @abstractmethod
    def filter(
        self,
        must: list[ConditionT] | None = None,
        should: list[ConditionT] | None = None,
        must_not: list[ConditionT] | None = None,
    ) -> FilterT: ...

    @abstractmethod
    def sparse(self, vector: SparseVector) -> SparseT: ...

    @abstractmethod
    def point(self, id: str, vectors: Vectors[SparseT], payload: dict[str, Any]) -> PointT: ...

    def condition(self, condition: Condition, kind: FieldKind) -> ConditionT:
        key = schema.metadata_path(condition.key)
        if condition.match is not None:
            return self.match(key, condition.match)
        if condition.any is not None:
            # Keyword or integer values alike: both libraries' stubs only name the keyword case.
            return self.match_any(key, cast(list[str], list(condition.any)))
        assert condition.range is not None  # Condition holds exactly one test
        bounds = condition.range.bounds()
        if kind == "date":
            return self.date_range(key, {k: parse_date(v) for k, v in bounds.items()})
        return self.number_range(key, {k: float(v) for k, v in bounds.items()})

    def query_filter(self, spec: CollectionSpec, where: Filter | None) -> FilterT | None:
        """``where`` (already checked against ``spec``) as the backend's filter."""
        if where is None:
            return None
        kinds = field_kinds(spec)

        def conditions(clause: list[Condition]) -> list[ConditionT] | None:
            return [self.condition(c, kinds[c.key]) for c in clause] or None

        return self.filter(conditions(where.must), conditions(where.should), conditions(where.must_not))

    def documents(self, doc_ids: list[str]) -> FilterT:
        """Every point (every chunk) of ``doc_ids``."""
        return self.filter(must=[self.match_any(schema.DOC_ID_KEY, doc_ids)])

    def chunks_from(self, doc_ids: list[str], first: int) -> FilterT:
        """The chunks of ``doc_ids`` numbered ``first`` and above."""
        return self.filter(
            must=[
                self.match_any(schema.DOC_ID_KEY, doc_ids),
                self.number_range(schema.CHUNK_KEY, {"gte": float(first)}),
            ]
        )

    def point_of(self, point: DocumentPoint) -> PointT:
        vectors: Vectors[SparseT] = list(point.vector)
        if point.sparse is not None:
            vectors = {"": list(point.vector), BM25_VECTOR: self.sparse(point.sparse)}
        return self.point(point_id(point.doc_id, point.chunk), vectors, schema.payload_of(point))

    def points(self, points: Sequence[DocumentPoint]) -> list[PointT]:
        return [self.point_of(p) for p in points]


def dense_vectors(records: Iterable[tuple[Mapping[str, Any] | None, object]]) -> dict[str, list[float]]:
    """doc_id -> dense vector of retrieved (payload, vector) records; the vector alone or named ""."""
    found: dict[str, list[float]] = {}
    for payload, vector in records:
        dense = vector.get("") if isinstance(vector, dict) else vector
        if payload and "doc_id" in payload and dense is not None:
            found[str(payload["doc_id"])] = [float(x) for x in cast(list[float], dense)]
    return found
