"""Review state: marking slices, the trusted mask fine-tuning trains on, the JSON round trip, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_mamba_seg.interactive import REVIEW_METADATA_KEY, ReviewState


def test_mark_unmark_and_counts() -> None:
    state = ReviewState.for_shape((6, 4, 5), axis=0)
    assert state.num_slices == 6 and state.remaining == 6 and state.reviewed == set()
    state.mark(2)
    state.mark(np.int64(4))
    state.mark(2)  # marking twice is harmless
    assert state.reviewed == {2, 4} and all(type(index) is int for index in state.reviewed)
    assert state.is_reviewed(2) and not state.is_reviewed(3)
    assert state.remaining == 4
    state.unmark(2)
    state.unmark(3)  # not reviewed: harmless
    assert state.reviewed == {4} and state.remaining == 5


def test_next_unreviewed_skips_reviewed_slices_and_wraps() -> None:
    state = ReviewState(axis=1, num_slices=5, reviewed={0, 1, 3})
    assert state.next_unreviewed() == 2
    assert state.next_unreviewed(after=2) == 4
    assert state.next_unreviewed(after=4) == 2  # wraps to the start
    assert state.next_unreviewed(after=4, wrap=False) is None
    state.mark(2)
    state.mark(4)
    assert state.remaining == 0 and state.next_unreviewed(after=1) is None


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_trusted_mask_is_true_exactly_on_reviewed_slices(axis: int) -> None:
    shape = (4, 5, 6)
    state = ReviewState.for_shape(shape, axis)
    state.mark(1)
    state.mark(3)
    mask = state.trusted_mask(shape)
    assert mask.shape == shape and mask.dtype == bool
    along = np.moveaxis(mask, axis, 0)
    for index in range(shape[axis]):
        assert along[index].all() == (index in (1, 3))
        assert along[index].any() == (index in (1, 3))
    mask[...] = False  # the mask is a writable array of its own, not a broadcast view
    assert state.trusted_mask(shape).sum() == 2 * mask.size // shape[axis]


def test_json_round_trip_through_layer_metadata() -> None:
    state = ReviewState(axis=2, num_slices=30, reviewed={29, 0, 7})
    metadata = {REVIEW_METADATA_KEY: state.to_dict()}
    restored = ReviewState.from_dict(json.loads(json.dumps(metadata))[REVIEW_METADATA_KEY])
    assert restored == state
    assert restored.to_dict() == {"axis": 2, "num_slices": 30, "reviewed": [0, 7, 29]}
    assert ReviewState.from_dict({**state.to_dict(), "note": "extra keys are ignored"}) == state


@pytest.mark.parametrize("index", [-1, 5, 1.0, True, "2", None])
def test_bad_slice_indices_are_refused(index) -> None:
    state = ReviewState(axis=0, num_slices=5)
    for method in (state.mark, state.unmark, state.is_reviewed):
        with pytest.raises(ValueError, match="slice index must be an integer from 0 to 4"):
            method(index)
    with pytest.raises(ValueError, match="reviewed slice must be an integer from 0 to 4"):
        ReviewState(axis=0, num_slices=5, reviewed={index})


def test_next_unreviewed_refuses_a_bad_start() -> None:
    with pytest.raises(ValueError, match="after must be an integer from -1 to 2"):
        ReviewState(axis=0, num_slices=3).next_unreviewed(after=3)


@pytest.mark.parametrize(
    ("axis", "shape", "message"),
    [(2, (5, 8), r"only 2 axes"), (0, (4, 8, 8), r"\(4 slices\)"), (0, (6, 8, 8), r"\(6 slices\)")],
)
def test_a_state_that_does_not_fit_the_labels_is_refused(axis: int, shape: tuple[int, ...], message: str) -> None:
    state = ReviewState(axis=axis, num_slices=5, reviewed={1})
    with pytest.raises(ValueError, match=rf"does not fit labels of shape.*{message}.*ReviewState.for_shape"):
        state.trusted_mask(shape)
    with pytest.raises(ValueError, match="does not fit"):
        state.check_fits(shape)
    fitting = [8, 8, 8]
    fitting[axis] = 5
    state.check_fits(tuple(fitting))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis": -1, "num_slices": 3}, "axis must be a non-negative integer"),
        ({"axis": 0.0, "num_slices": 3}, "axis must be a non-negative integer"),
        ({"axis": 0, "num_slices": 0}, "num_slices must be a positive integer"),
        ({"axis": 0, "num_slices": 3, "reviewed": 2}, "reviewed must be a set of slice indices"),
        ({"axis": 0, "num_slices": 3, "reviewed": "12"}, "reviewed must be a set of slice indices"),
    ],
)
def test_invalid_states_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReviewState(**kwargs)


def test_for_shape_refuses_an_axis_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"axis must be an integer from 0 to 2 for shape \(3, 4, 5\)"):
        ReviewState.for_shape((3, 4, 5), axis=3)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([0, 3, []], "must be a dict"),
        ({"axis": 0, "reviewed": []}, r"lacks \['num_slices'\]"),
        ({"axis": 0, "num_slices": 3, "reviewed": 1}, "reviewed must be a list"),
        ({"axis": 0, "num_slices": 3, "reviewed": [3]}, "from 0 to 2"),
        ({"axis": "0", "num_slices": 3, "reviewed": []}, "axis must be a non-negative integer"),
    ],
)
def test_from_dict_refuses_bad_records(record, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReviewState.from_dict(record)
