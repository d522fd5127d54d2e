"""Clean-up tools on shapes with known answers: holes, islands of known sizes, spheres of known radii."""

from __future__ import annotations

import numpy as np
import pytest
from label_shapes import applied, ball, disk
from scipy import ndimage

from napari_mamba_seg.interactive import fill_holes, keep_largest_component, remove_small_islands


def _disk_with_hole() -> tuple[np.ndarray, np.ndarray]:
    """(labels with class 1 = a disk r=8 minus a disk r=3, the mask of the hole)."""
    outer = disk((24, 24), (12, 12), 8)
    hole = disk((24, 24), (12, 12), 3)
    return (outer & ~hole).astype(np.uint8), hole


def test_fill_holes_fills_exactly_the_hole_of_a_disk() -> None:
    labels, hole = _disk_with_hole()
    original = labels.copy()
    edit = fill_holes(labels)
    assert labels.tobytes() == original.tobytes()  # the input is never modified
    result = applied(labels, edit)
    np.testing.assert_array_equal(result, disk((24, 24), (12, 12), 8).astype(np.uint8))
    assert edit.num_changed == int(hole.sum())
    assert fill_holes(result) is None  # nothing left to fill


def test_fill_holes_matches_scipy_on_random_blobs() -> None:
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((12, 30, 30)), 1.5) > 0.5
    labels = mask.astype(np.int32) * 4
    result = applied(labels, fill_holes(labels, label=4))
    np.testing.assert_array_equal(result == 4, ndimage.binary_fill_holes(mask))
    per_slice = applied(labels, fill_holes(labels, label=4, axis=0))
    expected = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    np.testing.assert_array_equal(per_slice == 4, expected)


def _tube(shape: tuple[int, int, int] = (8, 20, 20)) -> np.ndarray:
    """A hollow tube along axis 0, open at both ends: a ring (r 3..6) in every slice."""
    ring = disk(shape[1:], (10, 10), 6) & ~disk(shape[1:], (10, 10), 3)
    return np.broadcast_to(ring, shape).astype(np.uint8)


def test_fill_holes_per_slice_fills_a_tube_that_has_no_3d_cavity() -> None:
    labels = _tube()
    assert fill_holes(labels) is None  # open at both ends: no cavity in 3D
    assert fill_holes(labels, axis=1) is None  # slices along y cut the tube's wall into bars: no hole
    result = applied(labels, fill_holes(labels, axis=0))
    np.testing.assert_array_equal(result, np.broadcast_to(disk((20, 20), (10, 10), 6), labels.shape))


def test_fill_holes_in_3d_fills_the_cavity_of_a_hollow_ball() -> None:
    outer, inner = ball((15, 15, 15), (7, 7, 7), 6), ball((15, 15, 15), (7, 7, 7), 3)
    labels = (outer & ~inner).astype(np.uint8) * 2
    result = applied(labels, fill_holes(labels))
    np.testing.assert_array_equal(result, outer.astype(np.uint8) * 2)


def test_fill_holes_keeps_other_classes_and_gives_nested_gaps_to_the_innermost_class() -> None:
    shape = (40, 40)
    breast = disk(shape, (20, 20), 16) & ~disk(shape, (20, 20), 9)  # class 1: a thick ring
    lesion = disk(shape, (20, 20), 7) & ~disk(shape, (20, 20), 2)  # class 2 inside it, with its own hole
    labels = np.zeros(shape, np.uint8)
    labels[breast] = 1
    labels[lesion] = 2
    result = applied(labels, fill_holes(labels))
    gap_between = disk(shape, (20, 20), 9) & ~disk(shape, (20, 20), 7)  # enclosed by the breast only
    gap_inside = disk(shape, (20, 20), 2)  # enclosed by the lesion (and the breast): innermost = lesion
    assert (result[gap_between] == 1).all()
    assert (result[gap_inside] == 2).all()
    assert (result[lesion] == 2).all()  # the lesion inside the breast's hole is kept
    only_lesion = applied(labels, fill_holes(labels, label=2))
    assert (only_lesion[gap_inside] == 2).all() and (only_lesion[gap_between] == 0).all()


def _islands() -> np.ndarray:
    """Class 1 islands of 3, 5 and 9 pixels, a class 2 island of 4 pixels, and a diagonal pair (2 pixels)."""
    labels = np.zeros((20, 20), np.int16)
    labels[1, 1:4] = 1  # 3
    labels[5, 1:6] = 1  # 5
    labels[10:13, 10:13] = 1  # 9
    labels[16:18, 2:4] = 2  # 4
    labels[15, 15] = labels[16, 16] = 1  # 2, connected by a corner
    return labels


def test_remove_small_islands_removes_exactly_the_components_below_the_size() -> None:
    labels = _islands()
    original = labels.copy()
    result = applied(labels, remove_small_islands(labels, 5))
    assert labels.tobytes() == original.tobytes()
    expected = labels.copy()
    expected[1, 1:4] = 0
    expected[16:18, 2:4] = 0
    expected[15, 15] = expected[16, 16] = 0
    np.testing.assert_array_equal(result, expected)


def test_remove_small_islands_counts_corner_neighbours_as_connected() -> None:
    labels = _islands()
    result = applied(labels, remove_small_islands(labels, 2, label=1))
    assert result[15, 15] == 1 and result[16, 16] == 1  # a 2-pixel component, not two 1-pixel ones
    assert remove_small_islands(labels, 2) is None


def test_remove_small_islands_with_a_label_leaves_other_classes() -> None:
    labels = _islands()
    result = applied(labels, remove_small_islands(labels, 5, label=1))
    assert (result[16:18, 2:4] == 2).all()
    assert result[1, 1:4].sum() == 0
    assert remove_small_islands(labels, 0) is None
    assert remove_small_islands(labels, 1) is None


def test_keep_largest_component_keeps_the_larger_sphere_of_each_class() -> None:
    shape = (20, 20, 30)
    labels = np.zeros(shape, np.uint8)
    big, small = ball(shape, (10, 10, 8), 5), ball(shape, (10, 10, 22), 3)
    labels[big] = 1
    labels[small] = 1
    labels[2:4, 2:4, 13:15] = 3  # class 3: one component, kept whole
    original = labels.copy()
    result = applied(labels, keep_largest_component(labels))
    assert labels.tobytes() == original.tobytes()
    expected = labels.copy()
    expected[small] = 0
    np.testing.assert_array_equal(result, expected)
    assert keep_largest_component(result) is None
    assert keep_largest_component(labels, label=3) is None


def test_keep_largest_component_keeps_the_first_of_equal_components() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[1:3, 1:3] = 1
    labels[6:8, 6:8] = 1
    result = applied(labels, keep_largest_component(labels, label=1))
    assert result[1:3, 1:3].all() and not result[6:8, 6:8].any()


ALL_CLEANUPS = [
    lambda labels, **kw: fill_holes(labels, **kw),
    lambda labels, **kw: remove_small_islands(labels, 3, **kw),
    lambda labels, **kw: keep_largest_component(labels, **kw),
]


@pytest.mark.parametrize("cleanup", ALL_CLEANUPS, ids=["fill_holes", "remove_small_islands", "keep_largest"])
def test_cleanups_refuse_bad_labels(cleanup) -> None:
    labels = _islands()
    with pytest.raises(ValueError, match=r"label=7 is not present in the labels \(classes present: \[1, 2\]\)"):
        cleanup(labels, label=7)
    for bad_label in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="label must be a positive integer class"):
            cleanup(labels, label=bad_label)
    with pytest.raises(ValueError, match=r"labels must be an integer array.*float32.*astype"):
        cleanup(labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"labels must be 2D \(y, x\) or 3D \(z, y, x\)"):
        cleanup(labels[None, None])


def test_cleanups_do_nothing_on_empty_labels() -> None:
    empty = np.zeros((4, 5, 6), np.uint8)
    assert fill_holes(empty) is None
    assert remove_small_islands(empty, 10) is None
    assert keep_largest_component(empty) is None


@pytest.mark.parametrize("min_voxels", [-1, 2.5, "3", None])
def test_remove_small_islands_refuses_a_bad_min_voxels(min_voxels) -> None:
    with pytest.raises(ValueError, match="min_voxels must be a non-negative integer"):
        remove_small_islands(_islands(), min_voxels)


def test_fill_holes_refuses_a_bad_axis() -> None:
    labels = _tube()
    for axis in (3, -1, 1.0):
        with pytest.raises(ValueError, match="axis must be an integer from 0 to 2"):
            fill_holes(labels, axis=axis)
    with pytest.raises(ValueError, match=r"labels are 2D.*pass axis=None"):
        fill_holes(labels[0], axis=0)
