"""Read documents from BEIR ``corpus.jsonl`` or plain JSONL, line by line, never loading the whole file.

Accepted line shapes: BEIR ``{"_id", "title", "text", "metadata"}`` and plain ``{"id", "text", "title"?,
"metadata"?}``. A bad line becomes a ``Rejected`` naming the file and line; it never stops the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    title: str = ""
    metadata: dict[str, object] = field(default_factory=dict)
    path: Path = Path("-")
    line: int = 0

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Rejected:
    path: Path
    line: int
    reason: str
    raw: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def parse_line(raw: str, path: Path, line: int) -> Document | Rejected:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Rejected(path, line, f"invalid JSON: {exc.msg} at column {exc.colno}", raw)
    if not isinstance(obj, dict):
        return Rejected(path, line, f"expected a JSON object, got {type(obj).__name__}", raw)
    doc_id = obj.get("_id", obj.get("id"))
    # Ids are taken exactly as written: turning 1 into "1" or " 1" into "1" would make different
    # documents (in this file or across runs) overwrite one another without a word.
    if not isinstance(doc_id, str):
        found = "nothing" if doc_id is None else f"{type(doc_id).__name__} {json.dumps(doc_id)}"
        return Rejected(path, line, f"field 'id' (or '_id') must be a string, got {found}", raw)
    if not doc_id:
        return Rejected(path, line, "field 'id' is empty", raw)
    if doc_id != doc_id.strip():
        return Rejected(path, line, f"field 'id' {doc_id!r} has leading or trailing whitespace", raw)
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        return Rejected(path, line, "field 'text' is missing, empty or not a string", raw)
    title = obj.get("title") or ""
    if not isinstance(title, str):
        return Rejected(path, line, "field 'title' is not a string", raw)
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        return Rejected(path, line, "field 'metadata' is not an object", raw)
    return Document(doc_id=doc_id, text=text, title=title, metadata=metadata, path=path, line=line)


def read_documents(path: Path) -> Iterator[Document | Rejected]:
    """Yield one Document or Rejected per non-blank line of ``path``."""
    with path.open("rb") as fh:
        for line, raw_bytes in enumerate(fh, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Rejected(path, line, f"not valid UTF-8 at byte {exc.start}", repr(raw_bytes))
                continue
            if raw.strip():
                yield parse_line(raw, path, line)


def count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for raw in fh if raw.strip())
