"""What every `medsearch` subcommand module shares: the one-line CLI error."""

from __future__ import annotations

import sys


def fail(message: str) -> int:
    """Print a CLI error and return the exit code for bad input or a missing prerequisite."""
    print(f"medsearch: error: {message}", file=sys.stderr)
    return 2
