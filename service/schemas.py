"""Request and response bodies of the HTTP API. Limits live here so OpenAPI documents them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from store.filters import Filter
from store.spec import CollectionSpec

MAX_TOP_K = 100
# Far above any real question (the query encoders read 64-512 tokens), low enough that an oversized
# body is refused before tokenization instead of being tokenized and then truncated.
MAX_QUERY_CHARS = 2048
MAX_FILTER_KEYS = 16
MAX_BATCH = 32  # queries per /search/batch or texts per /embed: one encoder batch


def _filter_form(value: Any) -> str:
    full = isinstance(value, Filter) or (isinstance(value, dict) and bool(CLAUSES & set(value)))
    return "conditions" if full else "matches"


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
        examples=["高血压能吃党参吗", "chest pain radiating to the left arm"],
    )
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K, description="Number of hits to return.", examples=[10])
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
        default=True,
        description="Return each hit's title and text; false returns ids, scores and metadata.",
        examples=[True, False],
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
    id: str = Field(description="The document id given at indexing time.", examples=["cmedqa-a-1042"])
    score: float = Field(
        description="Cosine similarity (higher is closer); in hybrid mode the reciprocal-rank fusion score.",
        examples=[0.8731],
    )
    title: str | None = Field(
        description="None when the request set with_text to false.",
        examples=["高血压用药", "Hypertension drugs"],
    )
    text: str | None = Field(
        description="The document's text; in a chunked collection, the text of its best-matching chunk. "
        "None when the request set with_text to false.",
        examples=[
            "高血压患者一般可以少量服用党参，但需监测血压。",
            "Patients with hypertension should monitor ...",
        ],
    )
    chunk: int | None = Field(
        description="In a collection of chunked long documents (see /info, spec.chunking): which chunk of "
        "the document matched best, from 0; each document appears once. None: a whole-document collection.",
        examples=[1, None],
    )
    metadata: dict[str, Any] = Field(
        description="The document's metadata as indexed.",
        examples=[
            {"department": "心血管科", "year": 2024},
            {"department": "cardiology", "source": "ward notes"},
        ],
    )


class SearchResponse(BaseModel):
    hits: list[SearchHit] = Field(description="Best first.")
    took_ms: float = Field(description="Server time for encoding plus search.", examples=[5.2])
    query_encoder: str = Field(
        description="The ONNX query encoder that encoded the query.",
        examples=["multilingual-e5-small-onnx-int8"],
    )
    document_encoder: str = Field(
        description="The encoder that produced the collection's vectors.", examples=["multilingual-e5-small"]
    )
    space: str = Field(description="The vector space both sides share.", examples=["multilingual-e5-small"])
    collection: str = Field(
        description="The collection searched (an alias on a server).", examples=["medsearch"]
    )


class BatchSearchResponse(BaseModel):
    results: list[SearchResponse] = Field(description="One per query, in request order.")


class EmbedResponse(BaseModel):
    vectors: list[list[float]] = Field(
        description="One unit vector per text, in request order.", examples=[[[0.0213, -0.0472, 0.0861]]]
    )
    space: str = Field(
        description="Vector space: these compare only with vectors of the same space.",
        examples=["multilingual-e5-small"],
    )
    encoder: str = Field(
        description="The query encoder's name.", examples=["multilingual-e5-small-onnx-int8"]
    )
    dim: int = Field(description="Vector dimension.", examples=[384])


class FieldError(BaseModel):
    field: str = Field(
        description="Path of the offending field in the body.", examples=["filter.must.0", "top_k"]
    )
    message: str = Field(
        description="Why it was refused (never echoes the rejected value).",
        examples=["Input should be less than or equal to 100", "'科室' is not a filterable field"],
    )


class ErrorResponse(BaseModel):
    error: str = Field(
        description="Machine-readable kind, e.g. invalid_request, store_unavailable.",
        examples=["invalid_request", "store_unavailable"],
    )
    message: str = Field(
        description="What went wrong, for people.",
        examples=[
            "filter.科室: '科室' is not a filterable field",
            "the vector store is unreachable; retry later",
        ],
    )
    details: list[FieldError] | None = Field(default=None, description="One entry per invalid field (422).")


# What a route behind an API key may answer besides its own (service/auth.py).
AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "API keys are on and the request has no valid key."},
    403: {"model": ErrorResponse, "description": "The key is valid but lacks the scope this route needs."},
}


class CollectionsResponse(BaseModel):
    served: str = Field(
        description="The collection this service searches (MEDSEARCH_COLLECTION).", examples=["medsearch"]
    )
    collections: list[CollectionInfo] = Field(description="The served collection, with its spec and size.")


class HealthResponse(BaseModel):
    status: str = Field(default="ok", description="Always ok: the process answers.", examples=["ok"])


class ReadyResponse(BaseModel):
    ready: bool = Field(description="A search would work now.", examples=[True])
    reasons: list[str] = Field(
        description="Why not ready; empty when ready.",
        examples=[
            [],
            ["vector store unreachable"],
            ["collection '病历' not found; build it with `medsearch index ...`"],
        ],
    )


class QueryEncoderInfo(BaseModel):
    name: str = Field(
        description="Directory name of the served query encoder.",
        examples=["multilingual-e5-small-onnx-int8"],
    )
    space: str = Field(description="The space it encodes into.", examples=["multilingual-e5-small"])
    fingerprint: str = Field(
        description="sha256 of the encoder.",
        examples=["acf93b1e98d9d62994582b5baa646b959111d448e63e4fdfd7ad49c679ccbc55"],
    )
    quantization: str | None = Field(
        description="How the weights were quantized; None: float.",
        examples=["int8-dynamic-matmul-per-channel+embeddings-int8-per-row"],
    )
    dim: int = Field(description="Vector dimension.", examples=[384])
    max_tokens: int = Field(description="Longer queries are truncated to this many tokens.", examples=[512])
    card: str = Field(
        description="Model card of the served pair (a repository path); empty if none.",
        examples=["docs/cards/care-embeddinggemma-300m.md"],
    )
    figures: dict[str, float] = Field(
        description="Measured quality of this encoder in its pair, from its card; empty if unmeasured.",
        examples=[{"cmedqa-im dev nDCG@10": 26.4}],
    )


class CollectionInfo(BaseModel):
    name: str = Field(description="Collection (or alias) name.", examples=["medsearch"])
    spec: CollectionSpec | None = Field(description="None while the store has not answered.")
    points: int | None = Field(description="None when the store is unreachable.", examples=[7244])
    version: str | None = Field(
        default=None,
        description="The collection the alias points at (the build being served); None when the name is "
        "a plain collection or the store is unreachable.",
        examples=["medsearch--v0003-5f1c2e9a"],
    )


class InfoResponse(BaseModel):
    query_encoder: QueryEncoderInfo = Field(description="The served query encoder.")
    collection: CollectionInfo = Field(description="The served collection.")
    pairing: Literal["symmetric", "asymmetric", "unknown"] = Field(
        description="symmetric: the query encoder is an export of the collection's document encoder.",
        examples=["symmetric", "asymmetric"],
    )
    pairing_note: str = Field(
        description="How queries and documents are paired, in words (English).",
        json_schema_extra={"x-language": "en"},
        examples=["Documents were encoded by 'multilingual-e5-small' ... Symmetric pair: ..."],
    )
