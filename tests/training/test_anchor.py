"""Where the fine-tune's anchor defers to the corrections (``deferred_to_corrections``): each rule checked against a
mask built slice by slice here, on random labels and predictions; and its distances in mm turned into pixels and
slices (``defer_extent``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_mamba_seg.training.anchor import DEFER_MARGIN, DEFER_REACH, defer_extent, deferred_to_corrections


def _cross_grown(mask: np.ndarray, margin: int) -> np.ndarray:
    """``mask`` grown by ``margin`` 4-connected steps, one step at a time by shifting (no scipy)."""
    grown = mask.copy()
    for _ in range(margin):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def _expected(labels, predicted, train, unreviewed, margin, reach) -> np.ndarray:
    """The rule written out slice by slice, review axis first."""
    expected = np.zeros(labels.shape, bool)
    for s in unreviewed:
        distance = min(abs(t - s) for t in train)
        for t in [t for t in train if abs(t - s) == distance]:
            changed = labels[t] != predicted[t]
            if distance <= reach:
                expected[s] |= _cross_grown(changed, margin)
            else:
                expected[s] |= _cross_grown(changed & (predicted[t] > 0), margin) & (predicted[s] > 0)
    return expected


def _random_study(seed: int, shape=(14, 20, 18)) -> tuple[np.ndarray, np.ndarray]:
    """Blobby random labels and predictions with 3 classes, so that corrections add, remove and relabel."""
    rng = np.random.default_rng(seed)
    smooth = [ndimage.gaussian_filter(rng.normal(size=shape), (0, 2, 2)) for _ in range(2)]
    labels = np.digitize(smooth[0], [0.05, 0.15]).astype(np.uint8)
    predicted = np.digitize(smooth[0] + 0.5 * smooth[1], [0.05, 0.15]).astype(np.uint8)
    return labels, predicted


@pytest.mark.parametrize(("seed", "margin", "reach"), [(0, 3, 6), (1, 0, 2), (2, 2, 0), (3, 1, 20)])
def test_the_deferred_voxels_follow_the_rule(seed, margin, reach) -> None:
    labels, predicted = _random_study(seed)
    train, unreviewed = [2, 5, 11], [0, 1, 3, 4, 7, 8, 9, 10, 12, 13]  # 6: held out
    deferred = deferred_to_corrections(labels, predicted, 0, train, unreviewed, margin=margin, reach=reach)
    expected = _expected(labels, predicted, train, unreviewed, margin, reach)
    np.testing.assert_array_equal(deferred, expected)
    assert deferred[[2, 5, 6, 11]].sum() == 0  # reviewed slices are never the anchor's
    assert 0 < deferred.sum() < deferred.size


def test_far_from_the_corrections_only_a_removed_foreground_the_parent_repeats_is_deferred() -> None:
    shape = (12, 16, 16)
    labels, predicted = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    predicted[:, 2:5, 2:5] = 1  # a false finding on every slice, removed on training slice 0
    labels[0, 10:13, 10:13] = 1  # an addition on training slice 0
    predicted[11, 2:4, 2:4] = 0  # the parent does not repeat all of it on slice 11
    deferred = deferred_to_corrections(labels, predicted, 0, [0], list(range(1, 12)), margin=0, reach=3)
    assert deferred[3, 10:13, 10:13].all() and not deferred[4, 10:13, 10:13].any()  # the addition: 3 slices
    assert deferred[8, 2:5, 2:5].all() and deferred[8].sum() == 9  # the removal: where the parent predicts it
    assert deferred[11].sum() == 9 - 4


def test_the_held_out_slices_corrections_are_not_seen() -> None:
    labels, predicted = _random_study(4)
    train, unreviewed = [2, 11], [0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 13]
    other = labels.copy()
    other[6] = (labels[6] + 1) % 3  # the held-out slice 6 corrected otherwise
    first = deferred_to_corrections(labels, predicted, 0, train, unreviewed)
    np.testing.assert_array_equal(first, deferred_to_corrections(other, predicted, 0, train, unreviewed))
    moved = labels.copy()
    moved[2] = (labels[2] + 1) % 3  # a training slice corrected otherwise: the deferral changes
    assert not np.array_equal(first, deferred_to_corrections(moved, predicted, 0, train, unreviewed))


@pytest.mark.parametrize("axis", [1, 2])
def test_the_review_axis_is_any_axis(axis) -> None:
    labels, predicted = _random_study(5, shape=(14, 14, 14))
    train, unreviewed = [3, 9], [0, 1, 2, 4, 5, 7, 8, 10, 11, 12, 13]
    along_first = deferred_to_corrections(labels, predicted, 0, train, unreviewed)
    labels_, predicted_ = np.moveaxis(labels, 0, axis), np.moveaxis(predicted, 0, axis)
    moved = deferred_to_corrections(labels_, predicted_, axis, train, unreviewed)
    np.testing.assert_array_equal(np.moveaxis(moved, axis, 0), along_first)


def test_bad_arguments_are_refused() -> None:
    labels, predicted = _random_study(6)
    with pytest.raises(ValueError, match="one shape"):
        deferred_to_corrections(labels, predicted[:-1], 0, [1], [0])
    with pytest.raises(ValueError, match=">= 0"):
        deferred_to_corrections(labels, predicted, 0, [1], [0], margin=-1)
    assert not deferred_to_corrections(labels, predicted, 0, [], [0, 1]).any()  # nothing to defer to


@pytest.mark.parametrize(
    ("spacing", "axis", "expected"),
    [
        ((0.98, 0.98, 3.27), 2, (3, 6)),  # the sarcoma studies the rule was tuned on: 3 pixels, 6 slices
        ((1.17, 1.17, 3.27), 2, (3, 6)),  # STS_019, coarser in-plane: the same
        ((1.0, 0.7, 0.7), 0, (4, 20)),  # a thin-slice breast MRI reviewed axially
        ((0.7, 1.0, 0.7), 1, (4, 20)),  # any axis
        ((3.0, 1.0, 1.0), 1, (2, 20)),  # in-plane: the mean of 3 mm and 1 mm
        ((2.5, 1.0, 1.0), 0, (3, 8)),  # 8 slices (20 mm) reach, the 9th (22.5 mm) does not
        ((4.0, 1.0, 1.0), 0, (3, 5)),  # a slice exactly 20 mm away is within reach
        ((25.0, 1.0, 1.0), 0, (3, 0)),  # slices thicker than the reach: only the removed-foreground rule is left
        ((0.5, 0.5), 0, (6, 40)),  # 2D studies too
        (None, 0, (DEFER_MARGIN, DEFER_REACH)),
    ],
)
def test_the_margin_and_reach_are_distances_in_mm(spacing, axis, expected) -> None:
    assert defer_extent(spacing, axis) == expected
    if spacing is not None:  # the rule itself: whole slices whose centre is within 20 mm, margin 3 mm rounded
        in_plane = np.mean([s for a, s in enumerate(spacing) if a != axis])
        reach = max(k for k in range(100) if k * spacing[axis] <= 20.0 + 1e-9)
        assert expected == (round(3.0 / in_plane), reach)


def test_bad_distances_and_spacings_are_refused() -> None:
    with pytest.raises(ValueError, match="margin_mm and reach_mm must be >= 0"):
        defer_extent((1.0, 1.0, 1.0), 0, reach_mm=-1)
    for bad in ((1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), (-1.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="spacing must be 2 or 3 positive finite voxel sizes"):
            defer_extent(bad, 0)
    with pytest.raises(ValueError, match="out of range"):
        defer_extent((1.0, 1.0, 1.0), 3)
