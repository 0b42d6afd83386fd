"""Metadata filters: the one shape both backends map onto Qdrant's must / should / must_not.

A filter is checked against the collection's declared fields before it reaches the engine: keyword
fields match strings, integer fields match integers or ranges, date fields take ranges of ISO 8601
dates. Anything else (an undeclared key, a range on a keyword, a string for an integer) is refused
with the path of the offending condition, so a typo never silently matches nothing or scans the
whole collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from store.errors import StoreError
from store.spec import CollectionSpec

FieldKind = Literal["keyword", "integer", "date"]
Scalar = str | int
MAX_CONDITIONS = 16
MAX_ANY = 64


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gt: Scalar | None = Field(default=None, description="greater than", examples=[2019, "2024-01-01"])
    gte: Scalar | None = Field(
        default=None, description="greater than or equal", examples=[2020, "2024-01-01T00:00:00Z"]
    )
    lt: Scalar | None = Field(default=None, description="less than", examples=[2025, "2025-01-01"])
    lte: Scalar | None = Field(default=None, description="less than or equal", examples=[2024, "2024-12-31"])

    def bounds(self) -> dict[str, Scalar]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Condition(BaseModel):
    """One test on one metadata field: exactly one of ``match``, ``any`` and ``range``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(
        min_length=1,
        max_length=128,
        description="A filterable metadata field (see /info).",
        examples=["department", "year"],
    )
    match: Scalar | None = Field(
        default=None,
        description="Exact value (keyword or integer fields).",
        examples=["心血管科", "cardiology", 2024],
    )
    any: list[Scalar] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ANY,
        description="Matches if the field equals any of these.",
        examples=[["心血管科", "神经内科"], ["cardiology", "neurology"]],
    )
    range: Range | None = Field(
        default=None, description="Bounds for integer fields, or ISO 8601 dates for date fields."
    )

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        given = [name for name in ("match", "any", "range") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of match, any, range (got {given or 'none'})")
        if self.range is not None and not self.range.bounds():
            raise ValueError("range needs at least one of gt, gte, lt, lte")
        return self


class Filter(BaseModel):
    """Hits must satisfy every ``must``, at least one ``should`` (when any), and no ``must_not``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    must: list[Condition] = Field(
        default_factory=list, max_length=MAX_CONDITIONS, description="Conditions that must all hold."
    )
    should: list[Condition] = Field(
        default_factory=list,
        max_length=MAX_CONDITIONS,
        description="At least one of these must hold (ignored when empty).",
    )
    must_not: list[Condition] = Field(
        default_factory=list, max_length=MAX_CONDITIONS, description="None of these may hold."
    )

    @classmethod
    def exact(cls, matches: Mapping[str, Scalar]) -> Filter:
        """Every key equal to its value: the short form ``{"department": "cardiology"}``."""
        return cls(must=[Condition(key=k, match=v) for k, v in sorted(matches.items())])

    def clauses(self) -> dict[str, list[Condition]]:
        return {"must": self.must, "should": self.should, "must_not": self.must_not}

    def is_empty(self) -> bool:
        return not (self.must or self.should or self.must_not)


FilterLike = Filter | Mapping[str, Scalar]


def as_filter(value: FilterLike | None) -> Filter | None:
    if value is None:
        return None
    result = value if isinstance(value, Filter) else Filter.exact(value)
    return None if result.is_empty() else result


def field_kinds(spec: CollectionSpec) -> dict[str, FieldKind]:
    kinds: dict[str, FieldKind] = {key: "keyword" for key in spec.keyword_fields}
    kinds.update({key: "integer" for key in spec.integer_fields})
    kinds.update({key: "date" for key in spec.date_fields})
    return kinds


def parse_date(value: object) -> datetime:
    """An ISO 8601 date or date-time; a date alone means its midnight (UTC when no zone is given)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 date string, got {value!r}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        pass
    try:
        return datetime.combine(date.fromisoformat(value), datetime.min.time())
    except ValueError:
        raise ValueError(
            f"{value!r} is not an ISO 8601 date (e.g. 2024-05-01 or 2024-05-01T08:30:00Z)"
        ) from None


def value_problem(kind: FieldKind, value: object) -> str | None:
    """Why ``value`` is not a value of a ``kind`` field (None: it is)."""
    if kind == "date":
        try:
            parse_date(value)
        except ValueError as exc:
            return str(exc)
        return None
    wanted = str if kind == "keyword" else int
    if isinstance(value, wanted) and not isinstance(value, bool):
        return None
    return f"compares with {wanted.__name__} values, got {value!r}"


def metadata_problem(kinds: Mapping[str, FieldKind], metadata: Mapping[str, object]) -> str | None:
    """Why a document's metadata cannot be filtered as declared (None: it can).

    Qdrant would store a wrongly typed value without indexing it, and the document would then
    silently fail every filter on that key: the indexer rejects the document instead.
    """
    for key, kind in kinds.items():
        if key in metadata and (problem := value_problem(kind, metadata[key])) is not None:
            return f"metadata.{key} (declared {kind} field): {problem}"
    return None


def _condition_problem(condition: Condition, kinds: Mapping[str, FieldKind]) -> str | None:
    kind = kinds.get(condition.key)
    if kind is None:
        return f"{condition.key!r} is not a filterable field; declared: {sorted(kinds)}"
    values: list[object] = []
    if condition.match is not None:
        values = [condition.match]
    elif condition.any is not None:
        values = list(condition.any)
    if kind == "date":
        if condition.range is None:
            return f"date field {condition.key!r} takes a range of ISO 8601 dates, not match/any"
        values = list(condition.range.bounds().values())
    elif condition.range is not None:
        if kind != "integer":
            return f"range needs an integer or date field; {condition.key!r} is a keyword field"
        values = list(condition.range.bounds().values())
    for value in values:
        if (problem := value_problem(kind, value)) is not None:
            return f"{kind} field {condition.key!r}: {problem}"
    return None


def filter_problems(spec: CollectionSpec, value: FilterLike | None) -> list[tuple[str, str]]:
    """(path inside the filter, message) for every condition this collection cannot apply."""
    checked = as_filter(value)
    if checked is None:
        return []
    kinds = field_kinds(spec)
    problems = []
    for clause, conditions in checked.clauses().items():
        for i, condition in enumerate(conditions):
            problem = _condition_problem(condition, kinds)
            if problem is not None:
                problems.append((f"{clause}.{i}", problem))
    return problems


class FilterError(StoreError):
    """A filter the collection cannot apply. ``field`` names the condition (``filter.must.0``) or, in
    the short form, its key (``filter.department``); ``detail`` says why. Its message is composed here
    from the request alone, so it is safe to show to whoever sent the filter."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def checked_filter(spec: CollectionSpec, value: FilterLike | None) -> Filter | None:
    """The filter in its full form if the collection can apply it; else FilterError naming the first
    condition that cannot."""
    try:
        full = as_filter(value)
    except ValidationError as exc:  # the short form's keys only meet Condition's rules here
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise FilterError("filter", f"{where}: {error['msg']}") from None
    problems = filter_problems(spec, full)
    if problems:
        path, message = problems[0]
        if not isinstance(value, Filter) and full is not None:  # the short form: name the key
            path = full.must[int(path.split(".")[1])].key
        raise FilterError(f"filter.{path}", message)
    return full
