"""The text a document is encoded as: one layout for the index and for training.

The indexer encodes this text into the index, the evaluation into its vector cache, and alignment
trains the document side on it; a model trained on one layout and served another would lose quality
without a word, so every one of them calls this function.
"""

from __future__ import annotations


def document_text(title: str, text: str) -> str:
    """The title line, then the text; the text alone when there is no title."""
    return f"{title}\n{text}" if title else text
