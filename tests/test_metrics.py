import math

import pytest

from evaluation.metrics import map_at_k, mrr_at_k, ndcg_at_k, recall_at_k, score_run


def test_ndcg_single_relevant_at_rank_three() -> None:
    assert ndcg_at_k(["a", "b", "c"], {"c": 1}, 10) == pytest.approx(1 / math.log2(4))


def test_ndcg_graded_several_relevant() -> None:
    # gains 2 at rank 2, 1 at rank 3; ideal: 2 at rank 1, 1 at rank 2.
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["x", "a", "b"], {"a": 2, "b": 1}, 10) == pytest.approx(dcg / idcg)


def test_ndcg_cuts_at_k_and_ignores_zero_grades() -> None:
    assert ndcg_at_k(["x", "a"], {"a": 1}, 1) == 0.0
    assert ndcg_at_k(["z", "a"], {"z": 0, "a": 1}, 10) == pytest.approx(1 / math.log2(3))


def test_recall_mrr_map() -> None:
    ranked = ["a", "x", "b", "y"]
    qrels = {"a": 1, "b": 1, "c": 1}
    assert recall_at_k(ranked, qrels, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, qrels, 1) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "b"], qrels, 10) == pytest.approx(0.5)
    assert mrr_at_k(["x", "b"], qrels, 1) == 0.0
    # precision at hits: 1/1, 2/3; divided by min(|rel|, k) = 3
    assert map_at_k(ranked, qrels, 10) == pytest.approx((1 + 2 / 3) / 3)


def test_score_run_skips_queries_without_qrels_and_reports_percent() -> None:
    run = {"q1": ["a"], "q2": ["b"], "q3": ["c"]}
    qrels = {"q1": {"a": 1}, "q2": {"z": 1}, "q3": {"c": 0}}
    result = score_run(run, qrels)
    assert result["queries"] == 2  # q3 has no positive grade
    assert result["ndcg@10"] == pytest.approx(50.0)
    assert result["mrr@10"] == pytest.approx(50.0)


def test_duplicate_ids_in_a_ranking_do_not_inflate_recall() -> None:
    assert recall_at_k(["a", "a"], {"a": 1, "b": 1}, 10) == pytest.approx(0.5)
