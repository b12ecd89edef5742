"""AUC / UAUC / warm-cold metrics against hand-computed cases."""

import json
import math

import numpy as np
import pytest

from llmrec.metrics import auc, evaluate_predictions, json_safe, uauc


def test_auc_perfect_reversed_and_ties():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # every score tied: each of the 4 (pos, neg) pairs counts 1/2
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_hand_computed_pairs():
    # positives 0.8, 0.4; negatives 0.5, 0.1 -> pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auc([1, 1, 0], [0.9, 0.3, 0.3]) == pytest.approx(0.75)


def test_auc_one_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))


def test_uauc_is_unweighted_mean_over_users_with_both_classes():
    users = [1, 1, 1, 1, 2, 2, 2, 3, 3]
    labels = [1, 0, 1, 0, 1, 0, 0, 1, 1]
    scores = [0.9, 0.1, 0.2, 0.3, 0.5, 0.6, 0.1, 0.3, 0.4]
    # user 1: pos {0.9, 0.2}, neg {0.1, 0.3}: pairs 0.9>0.1, 0.9>0.3, 0.2>0.1, 0.2<0.3 -> 3/4
    # user 2: pos {0.5}, neg {0.6, 0.1}: 1/2
    # user 3: positives only -> skipped
    value, count = uauc(users, labels, scores, return_count=True)
    assert count == 2
    assert value == pytest.approx((0.75 + 0.5) / 2)
    # unweighted: the global AUC differs
    assert auc(labels, scores) != pytest.approx(value)


def test_uauc_order_independent_and_nan_without_users():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 5, 50)
    labels = rng.integers(0, 2, 50)
    scores = rng.normal(size=50)
    perm = rng.permutation(50)
    assert uauc(users, labels, scores) == pytest.approx(
        uauc(users[perm], labels[perm], scores[perm])
    )
    assert math.isnan(uauc([1, 2], [1, 0], [0.3, 0.2]))


def test_evaluate_predictions_warm_cold_split():
    users = [1, 1, 1, 1, 2, 2]
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.1, 0.2, 0.3, 0.4, 0.6]
    not_cold = [1, 1, 0, 0, 1, 1]
    m = evaluate_predictions(users, labels, scores, not_cold)
    assert m["rows"] == 6
    assert m["warm"]["rows"] == 4 and m["cold"]["rows"] == 2
    # warm rows: pos (0.9, 0.4), neg (0.1, 0.6) -> 0.9>0.1, 0.9>0.6, 0.4>0.1, 0.4<0.6 = 3/4
    assert m["warm"]["auc"] == pytest.approx(0.75)
    # warm UAUC: user 1 -> 1.0, user 2 -> 0.0
    assert m["warm"]["uauc"] == pytest.approx(0.5)
    # cold rows: one user with pos 0.2, neg 0.3 -> 0
    assert m["cold"]["auc"] == 0.0 and m["cold"]["uauc"] == 0.0
    assert m["auc"] == pytest.approx(auc(labels, scores))


def test_evaluate_predictions_rejects_bad_scores_and_lengths():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_predictions([1, 1], [0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="length"):
        evaluate_predictions([1, 1], [0, 1], [0.1])


def test_json_safe_writes_null_for_nan():
    text = json.dumps(json_safe({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)]}))
    assert json.loads(text) == {"a": None, "b": [1.5, 2]}
