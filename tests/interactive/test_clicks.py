"""Click refinement on probability maps with blobs of known shape."""

from __future__ import annotations

import numpy as np
import pytest
from label_shapes import applied, disk

from napari_mamba_seg.interactive import refine_with_clicks

SHAPE = (24, 48)
BLOB_A = disk(SHAPE, (12, 12), 4)
BLOB_B = disk(SHAPE, (12, 34), 5)


def _two_blobs(num_classes: int = 3, label: int = 1) -> np.ndarray:
    """``(num_classes, 24, 48)`` probabilities: class ``label`` 0.9 on blob A, 0.8 on blob B, background elsewhere."""
    probabilities = np.zeros((num_classes, *SHAPE), np.float32)
    probabilities[label][BLOB_A] = 0.9
    probabilities[label][BLOB_B] = 0.8
    probabilities[0] = 1 - probabilities[label]
    return probabilities


def test_a_positive_click_adds_the_blob_under_it() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[0:2, 0:2] = 2
    original = labels.copy()
    edit = refine_with_clicks(labels, _two_blobs(), [(12.4, 11.6)], [], 1)
    assert labels.tobytes() == original.tobytes()
    result = applied(labels, edit)
    expected = original.copy()
    expected[BLOB_A] = 1
    np.testing.assert_array_equal(result, expected)
    both = applied(labels, refine_with_clicks(labels, _two_blobs(), np.array([[12, 12], [12, 34]]), None, 1))
    np.testing.assert_array_equal(both == 1, BLOB_A | BLOB_B)


def test_a_positive_click_overwrites_other_classes() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[BLOB_B] = 2
    result = applied(labels, refine_with_clicks(labels, _two_blobs(), [(12, 34)], [], 1))
    np.testing.assert_array_equal(result == 1, BLOB_B)
    assert not (result == 2).any()


def test_a_negative_click_removes_the_component_under_it() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[BLOB_A] = 1
    labels[BLOB_B] = 1
    labels[20:23, 40:43] = 2
    result = applied(labels, refine_with_clicks(labels, _two_blobs(), [], [(13, 33)], 1))
    expected = labels.copy()
    expected[BLOB_B] = 0
    np.testing.assert_array_equal(result, expected)


def test_positive_and_negative_clicks_together() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[BLOB_B] = 1  # a false positive the user removes while adding the missed blob A
    result = applied(labels, refine_with_clicks(labels, _two_blobs(), [(12, 12)], [(12, 34)], 1))
    np.testing.assert_array_equal(result == 1, BLOB_A)


def test_a_click_below_the_threshold_grows_with_half_its_probability() -> None:
    probabilities = np.zeros((2, *SHAPE), np.float32)
    core, rim = disk(SHAPE, (12, 24), 3), disk(SHAPE, (12, 24), 6)
    probabilities[1][rim] = 0.2  # the rim: above 0.3 / 2
    probabilities[1][core] = 0.3  # the clicked core: below the threshold 0.5
    probabilities[1][disk(SHAPE, (12, 24), 9) & ~rim] = 0.1  # below 0.15: the region stops here
    probabilities[0] = 1 - probabilities[1]
    labels = np.zeros(SHAPE, np.uint8)
    edit = refine_with_clicks(labels, probabilities, [(12, 24)], [], 1)
    np.testing.assert_array_equal(applied(labels, edit) == 1, rim)
    assert "grown with threshold 0.15" in edit.description


def test_a_click_where_the_model_sees_nothing_adds_only_that_voxel() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    edit = refine_with_clicks(labels, _two_blobs(), [(2, 24)], [], 1)
    result = applied(labels, edit)
    assert result.sum() == 1 and result[2, 24] == 1
    assert "only the clicked voxel added" in edit.description
    lower = refine_with_clicks(labels, _two_blobs() * 0 + 0.01, [(2, 24)], [], 1, min_probability=0.001)
    assert lower.num_changed == labels.size  # with a lower floor the (flat) map grows everywhere


def test_clicks_in_slices_stay_in_their_slice_and_3d_clicks_do_not() -> None:
    tube = np.broadcast_to(BLOB_A, (5, *SHAPE))
    probabilities = np.zeros((2, 5, *SHAPE), np.float32)
    probabilities[1][tube] = 0.9
    probabilities[0] = 1 - probabilities[1]
    labels = np.zeros((5, *SHAPE), np.uint8)
    in_slice = applied(labels, refine_with_clicks(labels, probabilities, [(2, 12, 12)], [], 1, axis=0))
    np.testing.assert_array_equal(in_slice == 1, tube & (np.arange(5) == 2)[:, None, None])
    in_3d = applied(labels, refine_with_clicks(labels, probabilities, [(2, 12, 12)], [], 1))
    np.testing.assert_array_equal(in_3d == 1, tube)
    removed = applied(in_3d, refine_with_clicks(in_3d, probabilities, [], [(3, 12, 12)], 1, axis=0))
    np.testing.assert_array_equal(removed == 1, tube & (np.arange(5) != 3)[:, None, None])
    across_axis = applied(in_3d, refine_with_clicks(in_3d, probabilities, [], [(3, 12, 12)], 1, axis=2))
    assert not across_axis[:, :, 12].any() and across_axis[:, :, 11].any()


def test_contradictory_clicks_are_refused() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    with pytest.raises(ValueError, match=r"negative click 0 at \(13, 13\) would remove the region of positive click 1"):
        refine_with_clicks(labels, _two_blobs(), [(12, 34), (12, 12)], [(13, 13)], 1)


def test_a_negative_click_off_the_label_changes_nothing() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[BLOB_A] = 2
    assert refine_with_clicks(labels, _two_blobs(), [], [(12, 12)], 1) is None
    edit = refine_with_clicks(labels, _two_blobs(), [(12, 34)], [(12, 12)], 1)
    assert "negative click 0 is not on label 1: ignored" in edit.description
    assert refine_with_clicks(labels, _two_blobs(), [], [], 1) is None
    assert refine_with_clicks(labels, _two_blobs(), np.zeros((0, 2)), None, 1) is None  # an empty Points layer


@pytest.mark.parametrize(
    ("positive", "negative", "message"),
    [
        ([(24.0, 3.0)], [], r"positive click 0 at \(24.0, 3.0\) is outside the labels of shape \(24, 48\)"),
        ([(1, 1), (-0.6, 3)], [], r"positive click 1 at \(-0.6, 3.0\) is outside"),
        ([], [(3, 47.5)], r"negative click 0 at \(3.0, 47.5\) is outside"),
        ([], [(3, np.nan)], r"negative click 0 at \(3.0, nan\) is outside"),
        ([(1, 2, 3)], [], r"positive clicks must be a list of points with 2 coordinates each"),
        ([], [4, 5], r"negative clicks must be a list of points with 2 coordinates each"),
        ([(1, 2), (3,)], [], r"positive clicks must be a list of points with 2 coordinates each"),
        ([("a", 2)], [], r"positive clicks must be a list of points with 2 coordinates each"),
    ],
)
def test_clicks_outside_the_labels_are_refused(positive, negative, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        refine_with_clicks(np.zeros(SHAPE, np.uint8), _two_blobs(), positive, negative, 1)


def test_clicks_rounding_to_the_last_voxel_are_accepted() -> None:
    labels = np.zeros(SHAPE, np.uint8)
    edit = refine_with_clicks(labels, _two_blobs(), [(23.4, 47.49)], [], 1)
    assert applied(labels, edit)[23, 47] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": 3}, r"label=3 has no probability channel: the probabilities have 3 classes \(0 to 2\)"),
        ({"label": 0}, "label must be a positive integer class"),
        ({"label": 300}, "label=300 does not fit the labels' dtype uint8"),
        ({"probabilities": np.zeros((3, 24, 47), np.float32)}, r"must have shape \(num_classes, 24, 48\)"),
        ({"probabilities": np.zeros((3, 24, 48), np.int32)}, "must be floating point"),
        ({"probabilities": np.full((3, *SHAPE), 1.5, np.float32)}, r"finite values in \[0, 1\].*not logits"),
        ({"threshold": 0.0}, r"threshold must be a probability in \(0, 1\]"),
        ({"threshold": "0.5"}, r"threshold must be a probability in \(0, 1\]"),
        ({"min_probability": 2}, r"min_probability must be a probability in \(0, 1\]"),
        ({"axis": 0}, "the labels are 2D .* pass axis=None"),
        ({"labels": np.zeros(SHAPE, np.float32)}, "labels must be an integer array"),
    ],
)
def test_refine_with_clicks_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"labels": np.zeros(SHAPE, np.uint8), "probabilities": _two_blobs(), "label": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        refine_with_clicks(positive=[(12, 12)], negative=[], **arguments)


def test_refine_with_clicks_refuses_an_axis_out_of_range() -> None:
    labels = np.zeros((3, *SHAPE), np.uint8)
    probabilities = np.zeros((2, 3, *SHAPE), np.float32)
    with pytest.raises(ValueError, match="axis must be an integer from 0 to 2"):
        refine_with_clicks(labels, probabilities, [(1, 1, 1)], [], 1, axis=3)
