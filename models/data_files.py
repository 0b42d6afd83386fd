"""Line readers of dataset files (JSONL objects, BEIR qrels TSV) shared by training and evaluation.

Every problem is a ``DatasetError`` whose message starts with ``file:line``, so a CLI prints it as
one line and the user knows where to look. The indexer reads its corpus with its own reader
(indexer/reader.py: a bad line is set aside and the run goes on) but parses each line with
``decode_line`` and ``parse_object`` here, so a line is judged with the same words everywhere.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and line."""


class LineError(ValueError):
    """Why one line cannot be read, without its place: the caller names the file and line."""


def decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(f"not valid UTF-8 at byte {exc.start}") from exc


def parse_object(raw: str) -> dict[str, Any]:
    """The JSON object on one line."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_json_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) for every non-blank line; any other line is a ``DatasetError``."""
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    with path.open("rb") as fh:
        for line, raw in enumerate(fh, start=1):
            where = f"{path}:{line}"
            try:
                text = decode_line(raw)
                if text.strip():
                    yield where, parse_object(text)
            except LineError as exc:
                raise DatasetError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class QrelsRow:
    where: str  # file:line
    query_id: str
    corpus_id: str
    score: int


def read_qrels(path: Path) -> Iterator[QrelsRow]:
    """Every row of a BEIR ``qrels/<split>.tsv`` (the header, when there is one, skipped)."""
    if not path.is_file():
        raise DatasetError(f"{path} not found (expected qrels/<split>.tsv in BEIR layout)")
    with path.open(encoding="utf-8", newline="") as fh:
        for line, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or (line == 1 and row[0] == "query-id"):
                continue
            where = f"{path}:{line}"
            if len(row) < 3:
                raise DatasetError(f"{where}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                score = int(row[2])
            except ValueError as exc:
                raise DatasetError(f"{where}: score {row[2]!r} is not an integer") from exc
            yield QrelsRow(where, row[0], row[1], score)


def field_value(obj: dict[str, Any], name: str) -> object:
    """A top-level key, or ``metadata.KEY``; None when absent."""
    if name.startswith("metadata."):
        metadata = obj.get("metadata")
        return metadata.get(name.removeprefix("metadata.")) if isinstance(metadata, dict) else None
    return obj.get(name)


def text_field(obj: dict[str, Any], name: str, where: str) -> str:
    """A non-blank string field (``name`` as in ``field_value``)."""
    value = field_value(obj, name)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {name!r} is missing, empty or not a string")
    return value


def text_list(obj: dict[str, Any], name: str, where: str, *, required: bool) -> tuple[str, ...]:
    """A list of non-blank strings; () when absent and not ``required``."""
    value = obj.get(name)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise DatasetError(f"{where}: field {name!r} must be a list of non-empty strings")
    if required and not value:
        raise DatasetError(f"{where}: field {name!r} is empty")
    return tuple(value)
