"""Read documents from BEIR ``corpus.jsonl`` or plain JSONL, line by line, never loading the whole file.

Inputs may be gzip-compressed (``.gz``), a directory (its ``*.jsonl`` and ``*.jsonl.gz`` files, in
name order) or ``-`` (standard input, copied to a private temporary file first: a run reads its
input more than once, to measure BM25 statistics and to identify the build).

Accepted line shapes: BEIR ``{"_id", "title", "text", "metadata"}`` and plain ``{"id", "text", "title"?,
"metadata"?}``. A bad line becomes a ``Rejected`` naming the file and line; it never stops the run.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from models.data_files import LineError, decode_line, parse_object

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz")
STDIN = "-"


class InputError(ValueError):
    """An input named on the command line cannot be read."""


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
        obj = parse_object(raw)
    except LineError as exc:
        return Rejected(path, line, str(exc), raw)
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
    with open_input(path) as fh:
        for line, raw_bytes in enumerate(fh, start=1):
            try:
                raw = decode_line(raw_bytes)
            except LineError as exc:
                yield Rejected(path, line, str(exc), repr(raw_bytes))
                continue
            if raw.strip():
                yield parse_line(raw, path, line)


def count_lines(path: Path) -> int:
    with open_input(path) as fh:
        return sum(1 for raw in fh if raw.strip())


def total_lines(paths: Sequence[Path]) -> int:
    return sum(count_lines(p) for p in paths)


def open_input(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def resolve_inputs(names: Sequence[str], spool_dir: Path | None = None) -> list[Path]:
    """The files to read for the inputs named on the command line (see the module docstring)."""
    paths: list[Path] = []
    for name in names:
        if name == STDIN:
            paths.append(spool_stdin(spool_dir))
            continue
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
            if not found:
                raise InputError(f"directory {path} holds no {' or '.join(INPUT_SUFFIXES)} files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"input file not found: {path}")
    return paths


def spool_stdin(directory: Path | None, stream: BinaryIO | None = None) -> Path:
    """Standard input copied to a file readable by its owner only (it holds patient text)."""
    fd, name = tempfile.mkstemp(prefix="medsearch-stdin-", suffix=".jsonl", dir=directory)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(stream or sys.stdin.buffer, out)
    return Path(name)
