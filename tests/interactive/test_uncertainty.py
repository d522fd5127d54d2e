"""Which slice to review next: per-slice expected errors, and the review order they give."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mamba_seg.interactive import (
    SPREAD_FLOOR,
    ReviewState,
    expected_errors_per_slice,
    most_uncertain_unreviewed,
    review_order,
    slices_within,
)


def _softmax(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int = 3) -> np.ndarray:
    return rng.dirichlet(np.full(num_classes, 0.7), size=shape).astype(np.float32).transpose(-1, *range(len(shape)))


@pytest.mark.parametrize(("shape", "axis"), [((5, 6, 7), 0), ((5, 6, 7), 1), ((5, 6, 7), 2), ((6, 7), 1)])
def test_expected_errors_are_the_sum_of_the_doubt_on_each_slice(shape, axis) -> None:
    probabilities = _softmax(np.random.default_rng(0), shape)
    scores = expected_errors_per_slice(probabilities, axis)
    doubt = 1.0 - probabilities.max(axis=0).astype(np.float64)
    brute = [np.take(doubt, index, axis=axis).sum() for index in range(shape[axis])]
    np.testing.assert_allclose(scores, brute, rtol=1e-12)


def test_the_expected_errors_are_the_mean_errors_when_the_labels_follow_the_probabilities() -> None:
    rng = np.random.default_rng(1)
    probabilities = _softmax(rng, (4, 16, 16), num_classes=2)
    prediction = probabilities.argmax(axis=0)
    draws = 4000
    truth = rng.random((draws, *prediction.shape)) < probabilities[1]  # labels drawn from the model's own belief
    mean_errors = (truth != prediction).sum(axis=(2, 3)).mean(axis=0)
    scores = expected_errors_per_slice(probabilities, 0)
    np.testing.assert_allclose(mean_errors, scores, rtol=0.02)


def test_certain_slices_score_zero_and_a_uniform_guess_the_most() -> None:
    probabilities = np.zeros((4, 3, 5, 5), np.float32)
    probabilities[0] = 1.0
    probabilities[:, 2] = 0.25  # slice 2: four classes, no idea
    np.testing.assert_allclose(expected_errors_per_slice(probabilities, 0), [0.0, 0.0, 25 * 0.75])


def test_the_review_order_leaves_out_reviewed_slices_most_errors_first() -> None:
    review = ReviewState(0, 6, {1, 4})
    scores = [3.0, 9.0, 0.0, 3.0, 8.0, 5.0]
    assert review_order(review, scores) == [5, 0, 3, 2]  # 0 and 3 tie: the lower index first
    assert most_uncertain_unreviewed(review, scores) == 5
    review.mark(5)
    assert most_uncertain_unreviewed(review, scores) == 0
    assert most_uncertain_unreviewed(ReviewState(0, 6, set(range(6))), scores) is None


@pytest.mark.parametrize(
    ("probabilities", "axis", "message"),
    [
        (np.ones((1, 4, 4, 4), np.float32), 0, "K >= 2 classes"),
        (np.ones((2, 4), np.float32), 0, r"2 or 3 spatial axes"),
        (np.ones((2, 4, 4, 4), np.int64), 0, "float"),
        (np.full((2, 4, 4, 4), 3.0, np.float32), 0, "not logits"),
        (np.full((2, 4, 4, 4), np.nan, np.float32), 0, "finite"),
        (np.full((2, 4, 4, 4), 0.5, np.float32), 3, "axis must be an integer from 0 to 2"),
    ],
)
def test_bad_probabilities_are_refused(probabilities, axis, message) -> None:
    with pytest.raises(ValueError, match=message):
        expected_errors_per_slice(probabilities, axis)


@pytest.mark.parametrize("scores", [[1.0, 2.0], [1.0, 2.0, np.nan, 0.0], np.zeros((4, 1))])
def test_scores_that_do_not_fit_the_review_are_refused(scores) -> None:
    with pytest.raises(ValueError, match=r"one finite value per slice \(4 along axis 0\).*expected_errors_per_slice"):
        review_order(ReviewState(0, 4), scores)


def test_a_spread_order_puts_the_neighbours_of_chosen_and_reviewed_slices_last() -> None:
    scores = [0.0, 9.0, 8.5, 8.0, 1.0, 7.0, 2.0, 6.0, 0.5, 0.0]
    review = ReviewState(0, 10)
    # 9 is far from the others but the model is sure of it (0 < 10 % of 9.0): by score, at the end
    assert review_order(review, scores, spread=1) == [1, 3, 5, 7, 2, 6, 4, 8, 0, 9]
    brute = []  # the rule, spelled out: the best slice not within 1 of a pick and above the floor, until none is left
    left = [i for i in sorted(range(10), key=lambda i: -scores[i]) if scores[i] >= SPREAD_FLOOR * max(scores)]
    while any(all(abs(i - j) > 1 for j in brute) for i in left):
        brute.append(next(i for i in left if all(abs(i - j) > 1 for j in brute)))
        left.remove(brute[-1])
    assert review_order(review, scores, spread=1)[: len(brute)] == brute
    assert review_order(ReviewState(0, 6), [0.0, 9.0, 0.0, 0.0, 1.0, 0.0], spread=1)[:2] == [1, 4]  # 1.0 >= 0.9
    review.mark(1)  # a reviewed slice pushes its neighbours back too
    assert most_uncertain_unreviewed(review, scores, spread=1) == 3
    assert most_uncertain_unreviewed(review, scores, spread=2) == 5
    assert most_uncertain_unreviewed(review, scores, spread=0) == 2
    assert most_uncertain_unreviewed(ReviewState(0, 3, {1}), [5.0, 1.0, 4.0], spread=5) == 0  # all near: by score
    assert sorted(review_order(review, scores, spread=3)) == [0, *range(2, 10)]  # every unreviewed slice once
    with pytest.raises(ValueError, match="spread must be a whole number of slices >= 0"):
        review_order(review, scores, spread=-1)


@pytest.mark.parametrize(
    ("distance", "spacing", "axis", "expected"),
    [
        (10.0, (3.27, 0.7, 0.7), 0, 3),
        (20.0, (3.27, 0.7, 0.7), 0, 6),
        (10.0, (1.0, 2.5, 1.0), 1, 4),
        (6.0, (3.0, 1.0, 1.0), 0, 2),
        (2.0, (3.0, 1.0, 1.0), 0, 0),
        (4.0, None, 0, 4),
    ],
)
def test_slices_within_a_distance(distance, spacing, axis, expected) -> None:
    assert slices_within(distance, spacing, axis) == expected


def test_bad_distances_are_refused() -> None:
    with pytest.raises(ValueError, match="distance_mm must be a finite distance >= 0"):
        slices_within(-1.0, (1.0, 1.0, 1.0), 0)
    with pytest.raises(ValueError, match="spacing must be 2 or 3 positive finite"):
        slices_within(1.0, (1.0, 0.0, 1.0), 0)
    with pytest.raises(ValueError, match="axis must be an integer from 0 to 2"):
        slices_within(1.0, (1.0, 1.0, 1.0), 3)
