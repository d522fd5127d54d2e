"""Dice and HD95 against hand-computable cases and an independent brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from napari_mamba_seg.training import confusion_matrix, dice_per_class, hd95, surface_distances


def _numpy_dice(prediction: np.ndarray, target: np.ndarray, k: int, keep: np.ndarray | None = None) -> float:
    if keep is not None:
        prediction, target = prediction[keep], target[keep]
    p, t = prediction == k, target == k
    total = p.sum() + t.sum()
    return float("nan") if total == 0 else 2 * np.logical_and(p, t).sum() / total


def test_dice_per_class_matches_a_direct_count_with_and_without_an_ignore_mask():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 4, (7, 9, 11))
    prediction = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    ignore = rng.random(target.shape) < 0.3
    np.testing.assert_allclose(
        dice_per_class(prediction, target, 4), [_numpy_dice(prediction, target, k) for k in range(4)]
    )
    np.testing.assert_allclose(
        dice_per_class(prediction, target, 4, ignore=ignore),
        [_numpy_dice(prediction, target, k, ~ignore) for k in range(4)],
    )
    counts = confusion_matrix(prediction, target, 4)
    assert counts.sum() == target.size and counts[2, 1] == np.sum((prediction == 2) & (target == 1))


def test_dice_conventions_identical_disjoint_and_absent_classes():
    target = np.zeros((5, 5), int)
    target[1:3, 1:3] = 1
    assert dice_per_class(target, target, 3)[1] == 1.0
    shifted = np.zeros_like(target)
    shifted[3:5, 3:5] = 1
    dice = dice_per_class(shifted, target, 3)
    assert dice[1] == 0.0
    assert math.isnan(dice[2])  # class 2 absent from both: undefined
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        dice_per_class(target + 3, target, 3)


@pytest.mark.parametrize(("axis", "offset"), [(0, 2), (2, 3)])
def test_hd95_of_two_offset_plates_is_the_offset_in_mm_with_anisotropic_spacing(axis, offset):
    spacing = (2.0, 0.7, 0.5)
    a = np.zeros((12, 12, 12), bool)
    b = np.zeros_like(a)
    plate = [slice(2, 10)] * 3
    plate[axis] = slice(3, 4)
    a[tuple(plate)] = True
    plate[axis] = slice(3 + offset, 4 + offset)
    b[tuple(plate)] = True
    # every voxel of a one-voxel plate is a surface voxel, and its nearest voxel of the other plate is straight across
    assert hd95(a, b, spacing) == pytest.approx(offset * spacing[axis])
    assert hd95(a, b, spacing, percentile=100) == pytest.approx(offset * spacing[axis])


def test_hd95_of_offset_cubes_matches_a_brute_force_surface_distance():
    spacing = (2.0, 0.7, 0.7)
    a = np.zeros((10, 14, 14), bool)
    b = np.zeros_like(a)
    a[2:6, 3:9, 3:9] = True
    b[3:7, 5:11, 4:10] = True

    def surface_points(mask):
        inner = mask.copy()
        inner[1:-1, 1:-1, 1:-1] = (
            mask[1:-1, 1:-1, 1:-1]
            & mask[:-2, 1:-1, 1:-1]
            & mask[2:, 1:-1, 1:-1]
            & mask[1:-1, :-2, 1:-1]
            & mask[1:-1, 2:, 1:-1]
            & mask[1:-1, 1:-1, :-2]
            & mask[1:-1, 1:-1, 2:]
        )
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    distances = cdist(pa, pb)
    expected = np.percentile(np.concatenate([distances.min(axis=1), distances.min(axis=0)]), 95)
    assert hd95(a, b, spacing) == pytest.approx(expected)
    np.testing.assert_allclose(np.sort(surface_distances(a, b, spacing)), np.sort(distances.min(axis=1)))
    assert hd95(a, b, spacing) > 0


def test_hd95_identical_and_empty_masks():
    mask = np.zeros((8, 8, 8), bool)
    mask[2:5, 2:6, 3:7] = True
    assert hd95(mask, mask, (2.0, 1.0, 1.0)) == 0.0
    empty = np.zeros_like(mask)
    assert math.isnan(hd95(empty, empty))
    assert hd95(mask, empty) == math.inf
    assert hd95(empty, mask) == math.inf
