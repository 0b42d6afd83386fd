"""The configuration reference (docs/configuration.md), generated from the Settings class so the
documentation cannot drift from the code: `python -m settings.reference > docs/configuration.md`."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic.fields import FieldInfo

from settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Every option is an environment variable read once, at start-up, by `settings/__init__.py`
(`Settings`). This page is generated from that class: regenerate it with
`python -m settings.reference > docs/configuration.md` (a test fails when the two differ).

| variable | default | meaning |
|---|---|---|
"""


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{json.dumps(value)}`" if isinstance(value, bool | list) else f"`{value}`"


def reference_markdown() -> str:
    prefix = str(Settings.model_config.get("env_prefix", ""))
    rows = []
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name.upper()}` | {_default(field)} | {meaning} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
