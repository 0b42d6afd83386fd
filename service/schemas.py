"""Request and response bodies of the HTTP API. Limits live here so OpenAPI documents them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from store.base import CollectionSpec
from store.filters import Filter

MAX_TOP_K = 100
# Far above any real question (the query encoders read 64-512 tokens), low enough that an oversized
# body is refused before tokenization instead of being tokenized and then truncated.
MAX_QUERY_CHARS = 2048
MAX_FILTER_KEYS = 16
MAX_BATCH = 32  # queries per /search/batch or texts per /embed: one encoder batch


def _filter_form(value: Any) -> str:
    if isinstance(value, Filter):
        return "conditions"
    if isinstance(value, dict) and CLAUSES & set(value):
        return "conditions"
    return "matches"


# Two spellings of one filter, told apart by their keys rather than tried in turn, so a mistake is
# reported once, against the form the client meant.
CLAUSES = {"must", "should", "must_not"}
FILTER_FORMS = ("conditions", "matches")
SearchFilter = Annotated[
    Annotated[Filter, Tag("conditions")]
    | Annotated[dict[str, str | int], Field(max_length=MAX_FILTER_KEYS), Tag("matches")],
    Discriminator(_filter_form),
]


class SearchRequest(BaseModel):
    # strict: "5" is not a top_k and 1 is not a query; clients get a 422 instead of a guess.
    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description="Free text. Text beyond the query encoder's token limit is truncated, not rejected.",
        examples=["chest pain radiating to the left arm"],
    )
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K, description="Number of hits to return.")
    filter: SearchFilter | None = Field(
        default=None,
        description=(
            "Metadata conditions on the collection's declared fields (keyword, integer and date fields; "
            "see /info): `must` (all), `should` (at least one), `must_not` (none), each a list of "
            "`{key, match | any | range}`. Short form: an object of exact matches, "
            '`{"department": "心血管科"}` meaning all of them must match.'
        ),
        examples=[
            {"department": "心血管科"},
            {
                "must": [{"key": "department", "any": ["心血管科", "cardiology"]}],
                "should": [{"key": "year", "range": {"gte": 2020}}],
                "must_not": [{"key": "updated", "range": {"lt": "2015-01-01"}}],
            },
        ],
    )

    score_threshold: float | None = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="Leave out hits whose cosine score is below this (applied by the store).",
        examples=[0.5],
    )
    mode: Literal["dense", "hybrid"] = Field(
        default="dense",
        description=(
            "dense: the query encoder's vector alone. hybrid: dense and BM25 candidates fused by "
            "reciprocal rank in Qdrant (needs a collection indexed with --sparse bm25; see /info). "
            "Hybrid favours exact terms (drug names, codes); on cmedqa-im it ranks below dense, so it "
            "is opt-in. Scores are then RRF scores, not cosines."
        ),
        examples=["dense", "hybrid"],
    )
    with_text: bool = Field(
        default=True, description="Return each hit's title and text; false returns ids, scores and metadata."
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain non-whitespace text")
        return value


class BatchSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    queries: list[SearchRequest] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description="Searches answered together; each as the body of POST /search.",
        examples=[[{"query": "高血压能吃党参吗", "top_k": 3}, {"query": "chest pain after exercise"}]],
    )


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description="Query texts to encode (the query prompt is applied, as for /search).",
        examples=[["糖尿病人能吃西瓜吗", "headache and fever for three days"]],
    )


class SearchHit(BaseModel):
    id: str = Field(description="The document id given at indexing time.")
    score: float = Field(description="Cosine similarity; higher is closer.")
    title: str | None = Field(description="None when the request set with_text to false.")
    text: str | None = Field(description="None when the request set with_text to false.")
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    took_ms: float = Field(description="Server time for encoding plus search.")
    query_encoder: str
    document_encoder: str
    space: str
    collection: str


class BatchSearchResponse(BaseModel):
    results: list[SearchResponse] = Field(description="One per query, in request order.")


class EmbedResponse(BaseModel):
    vectors: list[list[float]] = Field(description="One unit vector per text, in request order.")
    space: str = Field(description="Vector space: these compare only with vectors of the same space.")
    encoder: str
    dim: int


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable kind, e.g. invalid_request, store_unavailable.")
    message: str
    details: list[FieldError] | None = None
    reasons: list[str] | None = None


class CollectionsResponse(BaseModel):
    served: str = Field(description="The collection this service searches (MEDSEARCH_COLLECTION).")
    collections: list[CollectionInfo] = Field(description="The served collection, with its spec and size.")


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    reasons: list[str]


class QueryEncoderInfo(BaseModel):
    name: str
    space: str
    fingerprint: str
    quantization: str | None
    dim: int
    max_tokens: int
    card: str = Field(description="Model card of the served pair (a repository path); empty if none.")
    figures: dict[str, float] = Field(
        description="Measured quality of this encoder in its pair, from its card; empty if unmeasured."
    )


class CollectionInfo(BaseModel):
    name: str
    spec: CollectionSpec | None = Field(description="None while the store has not answered.")
    points: int | None = Field(description="None when the store is unreachable.")


class InfoResponse(BaseModel):
    query_encoder: QueryEncoderInfo
    collection: CollectionInfo
    pairing: Literal["symmetric", "asymmetric", "unknown"] = Field(
        description="symmetric: the query encoder is an export of the collection's document encoder."
    )
    pairing_note: str
