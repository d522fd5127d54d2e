"""Slice propagation (plain and model-guided) and shape interpolation between slices, on disks of known radii."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from label_shapes import applied, disk

from napari_mamba_seg.interactive import interpolate_slices, propagate_slice

SLICE = (32, 32)
CENTER = (16, 16)


def _volume(num_slices: int = 6) -> np.ndarray:
    """Empty ``(num_slices, 32, 32)`` uint8 labels."""
    return np.zeros((num_slices, *SLICE), np.uint8)


def _probabilities(class_masks: dict[int, np.ndarray], num_classes: int = 3, high: float = 0.9) -> np.ndarray:
    """``(num_classes, 32, 32)`` slice probabilities: ``high`` for class k on its mask, the rest on background."""
    probabilities = np.zeros((num_classes, *SLICE), np.float32)
    for value, mask in class_masks.items():
        probabilities[value][mask] = high
    probabilities[0] = 1 - probabilities[1:].sum(axis=0)
    return probabilities


# --------------------------------------------------------------------------------------------- propagate_slice


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_slice_propagated_onto_an_empty_slice_is_copied(axis: int) -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    source = np.moveaxis(labels, axis, 0)
    source[5][disk((20, 20), (8, 9), 4)] = 2
    source[5][0:2, 0:3] = 1
    original = labels.copy()
    edit = propagate_slice(labels, axis, 5, 6)
    assert labels.tobytes() == original.tobytes()
    assert edit.region[axis] == slice(6, 7)  # only the target slice is recorded
    result = np.moveaxis(applied(labels, edit), axis, 0)
    np.testing.assert_array_equal(result[6], result[5])
    np.testing.assert_array_equal(np.delete(result, 6, axis=0), np.delete(np.moveaxis(original, axis, 0), 6, axis=0))
    assert propagate_slice(applied(labels, edit), axis, 5, 6) is None  # already a copy


def test_propagation_replaces_the_target_slice() -> None:
    labels = _volume()
    labels[1][disk(SLICE, CENTER, 5)] = 1
    labels[3, 0:4, 0:4] = 2  # old content of the target is replaced by the copy
    result = applied(labels, propagate_slice(labels, 0, 1, 3))
    np.testing.assert_array_equal(result[3], labels[1])


def test_propagating_one_label_leaves_the_other_classes_of_the_target() -> None:
    labels = _volume()
    labels[0][disk(SLICE, CENTER, 5)] = 2
    labels[0, 0:3, 0:3] = 1
    labels[1, 28:, 28:] = 1
    labels[1, 0:2, 20:30] = 2  # old class-2 voxels of the target: cleared
    result = applied(labels, propagate_slice(labels, 0, 0, 1, label=2))
    np.testing.assert_array_equal(result[1] == 2, disk(SLICE, CENTER, 5))
    np.testing.assert_array_equal(result[1] == 1, labels[1] == 1)


def test_model_guided_propagation_follows_the_model_near_the_copied_shape() -> None:
    labels = _volume()
    labels[2][disk(SLICE, CENTER, 6)] = 1
    far_blob = disk(SLICE, (4, 4), 2)

    smaller = _probabilities({1: disk(SLICE, CENTER, 4) | far_blob})
    result = applied(labels, propagate_slice(labels, 0, 2, 3, probabilities=smaller))
    np.testing.assert_array_equal(result[3] == 1, disk(SLICE, CENTER, 4))  # shrinks; the far blob is not added

    slightly_larger = _probabilities({1: disk(SLICE, CENTER, 7) | far_blob})
    result = applied(labels, propagate_slice(labels, 0, 2, 3, probabilities=slightly_larger))
    np.testing.assert_array_equal(result[3] == 1, disk(SLICE, CENTER, 7))  # grows by 1 voxel, within 2

    much_larger = _probabilities({1: disk(SLICE, CENTER, 14)})
    grown = applied(labels, propagate_slice(labels, 0, 2, 3, probabilities=much_larger, grow_voxels=2))[3] == 1
    assert grown[disk(SLICE, CENTER, 8)].all()  # every voxel within 2 of the copied disk is added ...
    assert not grown[~disk(SLICE, CENTER, 6 + 2 * np.sqrt(2) + 1e-6)].any()  # ... and nothing farther
    unchanged = applied(labels, propagate_slice(labels, 0, 2, 3, probabilities=much_larger, grow_voxels=0))[3]
    np.testing.assert_array_equal(unchanged, labels[2])


def test_model_guided_propagation_uses_the_threshold() -> None:
    labels = _volume()
    labels[0][disk(SLICE, CENTER, 6)] = 1
    probabilities = _probabilities({1: disk(SLICE, CENTER, 6)}, high=0.6)
    assert (applied(labels, propagate_slice(labels, 0, 0, 1, probabilities=probabilities))[1] == 1).sum() > 0
    edit = propagate_slice(labels, 0, 0, 1, probabilities=probabilities, threshold=0.7)
    assert edit is None  # the model is below 0.7 everywhere: the (empty) target stays empty


def test_model_guided_propagation_gives_contested_voxels_to_the_most_probable_class() -> None:
    labels = _volume()
    labels[0][disk(SLICE, (16, 10), 5)] = 1
    labels[0][disk(SLICE, (16, 22), 5)] = 2
    probabilities = np.zeros((3, *SLICE), np.float32)
    probabilities[1][:, :16] = 0.6  # left half leans to class 1, right half to class 2, both above 0.4
    probabilities[2][:, :16] = 0.4
    probabilities[1][:, 16:] = 0.4
    probabilities[2][:, 16:] = 0.6
    result = applied(labels, propagate_slice(labels, 0, 0, 1, probabilities=probabilities, threshold=0.4))[1]
    near_1 = disk(SLICE, (16, 10), 5 + 2)
    near_2 = disk(SLICE, (16, 22), 5 + 2)
    contested = near_1 & near_2
    assert contested.any()
    assert (result[contested & (np.indices(SLICE)[1] < 16)] == 1).all()
    assert (result[contested & (np.indices(SLICE)[1] >= 16)] == 2).all()


def test_volume_and_slice_probabilities_give_the_same_result() -> None:
    labels = _volume()
    labels[4][disk(SLICE, CENTER, 6)] = 2
    target_probabilities = _probabilities({2: disk(SLICE, (17, 15), 6)})
    volume_probabilities = np.zeros((3, *labels.shape), np.float32)
    volume_probabilities[0] = 1
    volume_probabilities[:, 3] = target_probabilities
    from_slice = propagate_slice(labels, 0, 4, 3, probabilities=target_probabilities)
    from_volume = propagate_slice(labels, 0, 4, 3, probabilities=volume_probabilities)
    np.testing.assert_array_equal(applied(labels, from_slice), applied(labels, from_volume))
    assert from_slice.num_changed > 0


def _annotated() -> np.ndarray:
    labels = _volume()
    labels[1][disk(SLICE, CENTER, 5)] = 1
    return labels


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 1, 1), {}, "source and target are both slice 1"),
        ((0, 1, 6), {}, "target must be a slice index from 0 to 5"),
        ((0, -1, 2), {}, "source must be a slice index from 0 to 5"),
        ((3, 1, 2), {}, "axis must be an integer from 0 to 2"),
        ((0, 0, 2), {}, "source slice 0 has no labels to propagate"),
        ((0, 1, 2), {"label": 2}, r"label 2 is not on source slice 1 \(classes there: \[1\]\)"),
        ((0, 1, 2), {"label": 0}, "label must be a positive integer"),
        ((0, 1, 2), {"probabilities": np.zeros((3, 6, 32, 31), np.float32)}, r"must have shape \(num_classes, 6"),
        ((0, 1, 2), {"probabilities": np.zeros((1, 32, 32), np.float32)}, "num_classes >= 2"),
        ((0, 1, 2), {"probabilities": np.zeros((3, 32, 32), np.int64)}, "must be floating point"),
        ((0, 1, 2), {"probabilities": np.full((3, 32, 32), 2.0)}, r"finite values in \[0, 1\]"),
        ((0, 1, 2), {"probabilities": np.full((3, 32, 32), np.nan)}, r"finite values in \[0, 1\]"),
        ((0, 1, 2), {"probabilities": np.zeros((3, 32, 32)), "threshold": 0}, r"threshold must be .* \(0, 1\]"),
        ((0, 1, 2), {"probabilities": np.zeros((3, 32, 32)), "threshold": 1.5}, r"threshold must be .* \(0, 1\]"),
        ((0, 1, 2), {"probabilities": np.zeros((3, 32, 32)), "grow_voxels": -1}, "grow_voxels must be"),
    ],
)
def test_propagate_slice_refuses_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        propagate_slice(_annotated(), *args, **kwargs)


def test_propagate_slice_refuses_a_class_without_probability_channel_and_2d_or_float_labels() -> None:
    labels = _annotated()
    labels[1, 0, 0] = 3
    with pytest.raises(ValueError, match="label=3 has no probability channel: the probabilities have 3 classes"):
        propagate_slice(labels, 0, 1, 2, probabilities=_probabilities({}))
    with pytest.raises(ValueError, match=r"labels must be 3D \(z, y, x\) for slice propagation"):
        propagate_slice(labels[1], 0, 1, 2)
    with pytest.raises(ValueError, match="labels must be an integer array"):
        propagate_slice(labels.astype(float), 0, 1, 2)


# ----------------------------------------------------------------------------------------- interpolate_slices


def _strictly_increasing(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def _areas(labels: np.ndarray, value: int = 1) -> list[int]:
    return [int((plane == value).sum()) for plane in labels]


def test_interpolating_a_small_to_a_large_disk_grows_the_area_monotonically() -> None:
    labels = np.zeros((9, 40, 40), np.uint8)
    labels[0][disk((40, 40), (20, 20), 3)] = 1
    labels[8][disk((40, 40), (20, 20), 15)] = 1
    original = labels.copy()
    edit = interpolate_slices(labels, 0, 0, 8)
    assert labels.tobytes() == original.tobytes()
    assert edit.region[0] == slice(1, 8)
    result = applied(labels, edit)
    areas = _areas(result)
    assert areas[0] == original[0].sum() and areas[8] == original[8].sum()
    assert _strictly_increasing(areas), areas
    for index in range(1, 8):  # concentric disks: the radius is interpolated linearly
        radius = np.sqrt(areas[index] / np.pi)
        assert abs(radius - (3 + 12 * index / 8)) < 0.75, (index, radius)
        assert (result[index] == 1)[20, 20]


def test_interpolating_a_shifted_disk_slides_it_and_either_order_gives_the_same() -> None:
    labels = np.zeros((5, 32, 48), np.int32)
    labels[0][disk((32, 48), (16, 20), 8)] = 2
    labels[4][disk((32, 48), (16, 28), 8)] = 2
    forward = applied(labels, interpolate_slices(labels, 0, 0, 4))
    backward = applied(labels, interpolate_slices(labels, 0, 4, 0))
    np.testing.assert_array_equal(forward, backward)
    centres = [np.argwhere(plane == 2)[:, 1].mean() for plane in forward]
    assert _strictly_increasing(centres), centres
    assert abs(centres[2] - 24) < 1e-9  # symmetric: exactly half way


def test_interpolation_along_another_axis_and_with_isotropic_spacing() -> None:
    labels = np.zeros((30, 7, 30), np.uint8)
    labels[:, 1][disk((30, 30), (15, 15), 4)] = 1
    labels[:, 5][disk((30, 30), (15, 15), 10)] = 1
    plain = interpolate_slices(labels, 1, 1, 5)
    assert plain.region[1] == slice(2, 5)
    result = applied(labels, plain)
    areas = _areas(np.moveaxis(result, 1, 0))
    assert _strictly_increasing(areas[1:6]), areas
    scaled = interpolate_slices(labels, 1, 1, 5, spacing=(2.0, 2.0, 2.0))  # same metric up to a scale
    np.testing.assert_array_equal(applied(labels, scaled), result)


def test_interpolation_with_anisotropic_pixels_uses_the_spacing() -> None:
    labels = np.zeros((3, 21, 21), np.uint8)
    labels[0, 10, 10] = 1  # a point ...
    labels[2][5:16, 5:16] = 1  # ... to a square
    plain = applied(labels, interpolate_slices(labels, 0, 0, 2))[1] == 1
    stretched = applied(labels, interpolate_slices(labels, 0, 0, 2, spacing=(1.0, 1.0, 3.0)))[1] == 1
    rows, columns = np.ptp(np.argwhere(stretched), axis=0) + 1
    assert rows > columns  # x pixels are 3 times wider: the shape grows less along x
    plain_rows, plain_columns = np.ptp(np.argwhere(plain), axis=0) + 1
    assert plain_rows == plain_columns


def test_interpolation_replaces_the_class_between_and_leaves_other_classes() -> None:
    labels = np.zeros((5, 24, 24), np.uint8)
    labels[0][disk((24, 24), (12, 12), 5)] = 1
    labels[4][disk((24, 24), (12, 12), 5)] = 1
    labels[2, 0:3, 0:3] = 1  # a stray class-1 blob between: replaced by the interpolation
    labels[2, 20:, 20:] = 3  # class 3 between, not on the end slices: left alone
    labels[0, 0, 23] = 2  # class 2 on one end slice only: not interpolated
    edit = interpolate_slices(labels, 0, 0, 4)
    assert "not interpolated, on one slice only: label 2" in edit.description
    result = applied(labels, edit)
    for index in (1, 2, 3):
        np.testing.assert_array_equal(result[index] == 1, disk((24, 24), (12, 12), 5))
    assert (result[2, 20:, 20:] == 3).all()
    assert not (result[1:4] == 2).any()


def test_interpolating_one_label_leaves_the_other_interpolable_classes() -> None:
    labels = np.zeros((5, 24, 24), np.uint8)
    for index in (0, 4):
        labels[index][disk((24, 24), (8, 8), 4)] = 1
        labels[index][disk((24, 24), (16, 16), 4)] = 2
    result = applied(labels, interpolate_slices(labels, 0, 0, 4, label=2))
    assert not (result[1:4] == 1).any()
    np.testing.assert_array_equal(result[2] == 2, disk((24, 24), (16, 16), 4))


def test_interpolating_a_class_that_fills_both_slices_fills_the_slices_between() -> None:
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[0] = labels[3] = 1
    result = applied(labels, interpolate_slices(labels, 0, 0, 3))
    assert (result == 1).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 1, 2), {}, "slices 1 and 2\\) have no slice strictly between them"),
        ((0, 1, 7), {}, "end must be a slice index from 0 to 5"),
        ((0, 1, 4), {"label": 2}, "label 2 is not drawn on slice 4; draw it on both slices 1 and 4"),
        ((0, 0, 4), {}, r"no class is drawn on both slices 0 \(classes none\) and 4 \(classes \[1\]\)"),
        ((0, 1, 4), {"spacing": (1.0, 1.0)}, "spacing must be 3 positive finite voxel sizes"),
        ((0, 1, 4), {"spacing": (1.0, 0.0, 1.0)}, "spacing must be 3 positive finite voxel sizes"),
        ((0, 1, 4), {"spacing": 1.0}, "spacing must be 3 positive finite voxel sizes"),
    ],
)
def test_interpolate_slices_refuses_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    labels = _volume()
    labels[1][disk(SLICE, CENTER, 5)] = 2
    labels[4][disk(SLICE, CENTER, 3)] = 1
    labels[1, 0, 0] = 1
    with pytest.raises(ValueError, match=message):
        interpolate_slices(labels, *args, **kwargs)


def test_interpolate_slices_refuses_2d_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must be 3D \(z, y, x\) for slice interpolation"):
        interpolate_slices(np.zeros((8, 8), np.uint8), 0, 0, 4)
