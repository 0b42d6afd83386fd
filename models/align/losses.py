"""Alignment losses over L2-normalized embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor,
    documents: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of each query's positive against every document in the batch.

    ``documents`` (N, D) holds every group's positive and given negatives, so each query also sees the
    other queries' documents as negatives (in-batch). ``positive_index`` (B,) says which row is query
    i's positive; ``exclude`` (B, N), True where a document must not count as a negative for a query
    (a copy of its positive elsewhere in the batch).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logits = queries @ documents.T / temperature
    if exclude is not None:
        rows = torch.arange(len(positive_index), device=logits.device)
        keep_positive = torch.zeros_like(exclude)
        keep_positive[rows, positive_index] = True
        logits = logits.masked_fill(exclude & ~keep_positive, float("-inf"))
    return F.cross_entropy(logits, positive_index)


def embedding_mse(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared L2 distance (2 - 2 cos for unit vectors).

    Summed over dimensions rather than averaged, so its scale does not shrink with the embedding size
    and it stays comparable with the InfoNCE term.
    """
    return (queries - targets).pow(2).sum(dim=-1).mean()


def score_distillation(
    queries: torch.Tensor, documents: torch.Tensor, teacher_documents: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL divergence from the teacher's to the student's softmax over the batch's documents, per query.

    ``queries`` (B, D) score both ``documents`` (N, D, the student's) and ``teacher_documents``
    (N, D): the student learns to rank the documents for these queries as the teacher does, which is
    what retrieval with a fixed query encoder needs, whatever the geometry of the rest of the space.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    student = F.log_softmax(queries @ documents.T / temperature, dim=-1)
    teacher = F.log_softmax(queries @ teacher_documents.T / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def group_positive_index(group_sizes: Sequence[int]) -> torch.Tensor:
    """Row of each group's positive when groups ``[positive, *negatives]`` are stacked in order."""
    if any(size < 1 for size in group_sizes):
        raise ValueError("every group needs its positive")
    offsets = torch.tensor([0, *group_sizes[:-1]], dtype=torch.long)
    return offsets.cumsum(dim=0)
