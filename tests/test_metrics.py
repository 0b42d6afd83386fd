import math

import pytest

from evaluation.metrics import (
    RERANK_METRICS,
    average_ranks,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    pearson,
    rank,
    recall_at_k,
    score_run,
    spearman,
)
from evaluation.retrieval import reciprocal_rank_fusion


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


def test_map_divides_by_k_when_more_relevant_than_k() -> None:
    qrels = {d: 1 for d in "abcdefghijkl"}  # 12 relevant, k = 10
    assert map_at_k(list("abcdefghij"), qrels, 10) == pytest.approx(1.0)


def test_score_run_skips_queries_without_qrels_and_reports_percent() -> None:
    run = {"q1": {"a": 1.0}, "q2": {"b": 1.0}, "q3": {"c": 1.0}, "q4": {"a": 1.0}}
    qrels = {"q1": {"a": 1}, "q2": {"z": 1}, "q3": {"c": 0}}  # q4: no qrels at all
    result = score_run(run, qrels)
    assert result["queries"] == 2  # q3 has no positive grade, q4 no qrels
    assert result["ndcg@10"] == pytest.approx(50.0)
    assert result["mrr@10"] == pytest.approx(50.0)


def test_score_run_counts_a_query_without_results_as_a_miss() -> None:
    result = score_run({"q1": {"a": 1.0}, "q2": {}}, {"q1": {"a": 1}, "q2": {"b": 1}})
    assert result["queries"] == 2
    assert result["recall@100"] == pytest.approx(50.0)


def test_duplicate_ids_in_a_ranking_do_not_inflate_recall() -> None:
    assert recall_at_k(["a", "a"], {"a": 1, "b": 1}, 10) == pytest.approx(0.5)


# --- ties ---------------------------------------------------------------------------------------


def test_rank_breaks_ties_by_decreasing_doc_id_like_trec_eval() -> None:
    assert rank({"a": 0.5, "c": 0.9, "b": 0.5, "d": 0.1}) == ["c", "b", "a", "d"]


def test_tied_scores_give_the_same_figures_whatever_the_input_order() -> None:
    qrels = {"q": {"a": 1, "c": 1}}
    forward = score_run({"q": {"a": 0.5, "b": 0.5, "c": 0.2}}, qrels)
    backward = score_run({"q": {"c": 0.2, "b": 0.5, "a": 0.5}}, qrels)
    assert forward == backward
    # Order b, a, c: relevant at ranks 2 and 3.
    assert forward["mrr@10"] == pytest.approx(50.0)
    assert forward["map@10"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    idcg = 1 + 1 / math.log2(3)
    assert forward["ndcg@10"] == pytest.approx(100 * (1 / math.log2(3) + 1 / math.log2(4)) / idcg)


# --- reranking ----------------------------------------------------------------------------------


def test_rerank_metrics_over_candidate_orderings() -> None:
    run = {
        "q1": {"p1": 0.9, "n1": 0.8, "p2": 0.1},  # relevant at ranks 1 and 3
        "q2": {"n1": 0.7, "p1": 0.6},  # relevant at rank 2
    }
    qrels = {"q1": {"p1": 1, "p2": 1}, "q2": {"p1": 1}}
    result = score_run(run, qrels, RERANK_METRICS)
    assert set(result) == {"map@10", "mrr@10", "queries"}
    assert result["map@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert result["mrr@10"] == pytest.approx(100 * (1 + 1 / 2) / 2)


# --- fusion -------------------------------------------------------------------------------------


def test_reciprocal_rank_fusion_by_hand() -> None:
    lexical = {"q": {"a": 3.0, "b": 2.0}}
    dense = {"q": {"b": 0.9, "c": 0.8}}
    fused = reciprocal_rank_fusion([lexical, dense], k=60)["q"]
    assert fused == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 62})
    assert rank(fused) == ["b", "a", "c"]


# --- correlations -------------------------------------------------------------------------------


def test_average_ranks_share_the_mean_rank_on_ties() -> None:
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3]).tolist() == [3.0, 1.0, 3.0, 3.0]


def test_pearson_by_hand() -> None:
    # x - mean = (-1, 0, 1); y - mean = (-1, -1, 2): cov 3, |x| sqrt 2, |y| sqrt 6.
    assert pearson([1, 2, 3], [1, 1, 4]) == pytest.approx(3 / math.sqrt(2 * 6))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # no ordering to agree with


def test_spearman_with_ties_by_hand() -> None:
    # ranks x: 1, 2, 3, 4; ranks y (tie on 5): 1, 2.5, 2.5, 4.
    rx = [-1.5, -0.5, 0.5, 1.5]
    ry = [-1.5, 0.0, 0.0, 1.5]
    expected = sum(a * b for a, b in zip(rx, ry, strict=True)) / math.sqrt(
        sum(a * a for a in rx) * sum(b * b for b in ry)
    )
    assert spearman([0.1, 0.2, 0.3, 0.4], [1, 5, 5, 9]) == pytest.approx(expected)
    assert spearman([0.1, 0.2, 0.3], [10, 200, 3000]) == pytest.approx(1.0)  # monotone, not linear


def test_correlations_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])
