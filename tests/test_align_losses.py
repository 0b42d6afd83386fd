"""Alignment losses against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from models.align.losses import embedding_mse, group_positive_index, info_nce, score_distillation


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


QUERIES = _unit([[1.0, 0.0], [0.6, 0.8]])
DOCS = _unit([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])


def _hand_nce(
    queries: torch.Tensor, docs: torch.Tensor, positives: list[int], t: float, dropped: set[tuple[int, int]]
) -> float:
    total = 0.0
    for i, q in enumerate(queries.tolist()):
        sims = [sum(a * b for a, b in zip(q, d, strict=True)) / t for d in docs.tolist()]
        kept = [s for j, s in enumerate(sims) if (i, j) not in dropped]
        total += -(sims[positives[i]] - math.log(sum(math.exp(s) for s in kept)))
    return total / len(queries)


@pytest.mark.parametrize("temperature", [0.1, 0.02, 1.0])
def test_info_nce_is_cross_entropy_over_every_document(temperature: float) -> None:
    # Query 0's positive is row 0 (its own negative row 1), query 1's is row 2 (negative row 3):
    # each also sees the other's documents.
    got = info_nce(QUERIES, DOCS, torch.tensor([0, 2]), temperature)
    assert got.item() == pytest.approx(
        _hand_nce(QUERIES, DOCS, [0, 2], temperature, set()), rel=1e-4, abs=1e-6
    )


def test_info_nce_drops_excluded_pairs_but_never_the_positive() -> None:
    exclude = torch.tensor([[True, False, True, False], [False, False, True, False]])
    got = info_nce(QUERIES, DOCS, torch.tensor([0, 2]), 0.1, exclude)
    # (0, 0) and (1, 2) are the positives: excluded there has no effect; (0, 2) is dropped.
    assert got.item() == pytest.approx(_hand_nce(QUERIES, DOCS, [0, 2], 0.1, {(0, 2)}), rel=1e-5)
    assert got.item() < info_nce(QUERIES, DOCS, torch.tensor([0, 2]), 0.1).item()


def test_info_nce_gradient_flows_to_both_sides() -> None:
    queries = QUERIES.clone().requires_grad_(True)
    docs = DOCS.clone().requires_grad_(True)
    info_nce(queries, docs, torch.tensor([0, 2]), 0.1).backward()
    assert queries.grad is not None and docs.grad is not None
    assert queries.grad.abs().sum() > 0 and docs.grad.abs().sum() > 0


def test_info_nce_rejects_a_bad_temperature() -> None:
    with pytest.raises(ValueError):
        info_nce(QUERIES, DOCS, torch.tensor([0, 2]), 0.0)


def test_embedding_mse_is_the_mean_squared_distance() -> None:
    targets = _unit([[0.0, 1.0], [0.6, 0.8]])
    # Row 0: (1,0) vs (0,1) -> 2; row 1: identical -> 0.
    assert embedding_mse(QUERIES, targets).item() == pytest.approx(1.0)
    cos = (QUERIES * targets).sum(dim=-1)
    assert embedding_mse(QUERIES, targets).item() == pytest.approx((2 - 2 * cos).mean().item())


def test_group_positive_index() -> None:
    assert group_positive_index([3, 1, 2]).tolist() == [0, 3, 4]
    with pytest.raises(ValueError):
        group_positive_index([2, 0])


def test_score_distillation_is_the_kl_between_the_two_rankings_softmaxes() -> None:
    teacher = _unit([[1.0, 0.1], [0.1, 1.0], [0.7, 0.7], [-1.0, 0.2]])
    assert score_distillation(QUERIES, teacher, teacher, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    # Any rotation of the documents keeps their pairwise geometry but not these queries' rankings.
    rotated = teacher @ torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    t = 0.1
    hand = 0.0
    for q in QUERIES:
        p = torch.softmax(teacher @ q / t, dim=0)
        r = torch.softmax(rotated @ q / t, dim=0)
        hand += float((p * (p.log() - r.log())).sum())
    assert score_distillation(QUERIES, rotated, teacher, t).item() == pytest.approx(hand / 2, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        score_distillation(QUERIES, teacher, teacher, 0.0)
