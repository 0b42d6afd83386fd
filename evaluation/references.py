"""Reference figures measured outside this run, reported beside it so that every comparison is fair.

Some baselines cost too much to rerun with every evaluation (the symmetric fine-tuned e5-small takes
about an hour of training on 2 cores), yet a new pair is only worth serving if it beats them. Each
reference names the exact dataset files (the evaluation's combined fingerprint) and split it was
measured on, and how; an evaluation of those files reports it under ``references`` and in its table,
marked as not rerun. A run on other files or on a subset of the queries shows none.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

REFERENCES_FILE = Path(__file__).with_name("references.json")


class Reference(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    configuration: str
    kind: str
    dataset_fingerprint: str
    split: str
    metrics: dict[str, float]
    how: str
    measured: str


def load_references(path: Path | None = None) -> list[Reference]:
    rows = json.loads((path or REFERENCES_FILE).read_text(encoding="utf-8"))
    return [Reference.model_validate(row) for row in rows]


def references_for(fingerprint: str, split: str, path: Path | None = None) -> list[Reference]:
    """The references measured on exactly these files and this split."""
    return [r for r in load_references(path) if r.dataset_fingerprint == fingerprint and r.split == split]
