"""Edit records and the undo stack: exact crops, bit-for-bit apply/revert/undo/redo, the byte cap, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mamba_seg.interactive import Edit, UndoStack


def _random_change(rng: np.random.Generator, labels: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``labels`` with random values written in ``box`` (at least its corners changed)."""
    new = labels.copy()
    new[box] = rng.integers(0, 4, size=new[box].shape)
    corner_low = tuple(piece.start for piece in box)
    corner_high = tuple(piece.stop - 1 for piece in box)
    for corner in (corner_low, corner_high):
        new[corner] = labels[corner] + 5  # certainly changed: the box is the exact bounding box
    return new


def test_between_crops_to_the_changed_voxels() -> None:
    old = np.zeros((6, 10, 12), np.uint8)
    old[0, 0, 0] = 3
    new = old.copy()
    new[2, 4, 5] = 1
    new[3, 6, 9] = 2
    edit = Edit.between(old, new, "two voxels")
    assert edit.region == (slice(2, 4), slice(4, 7), slice(5, 10))
    assert edit.array_shape == (6, 10, 12)
    np.testing.assert_array_equal(edit.before, old[2:4, 4:7, 5:10])
    np.testing.assert_array_equal(edit.after, new[2:4, 4:7, 5:10])
    assert edit.num_changed == 2
    assert edit.nbytes == 2 * 2 * 3 * 5
    assert edit.dtype == np.uint8
    assert edit.description == "two voxels"


def test_between_returns_none_when_nothing_changed() -> None:
    labels = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    assert Edit.between(labels, labels.copy(), "nothing") is None


def test_edit_arrays_are_private_read_only_copies() -> None:
    old = np.zeros((5, 5), np.int16)
    new = old.copy()
    new[1:3, 1:3] = 7
    edit = Edit.between(old, new, "square")
    new[1, 1] = 9  # changing the caller's arrays afterwards does not change the record
    old[1, 1] = 4
    assert int(edit.after[0, 0]) == 7 and int(edit.before[0, 0]) == 0
    with pytest.raises(ValueError, match="read-only"):
        edit.after[0, 0] = 1


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_apply_and_revert_restore_arrays_bit_for_bit(dtype: type) -> None:
    rng = np.random.default_rng(0)
    old = rng.integers(0, 4, size=(7, 9, 11)).astype(dtype)
    new = _random_change(rng, old, (slice(1, 5), slice(2, 8), slice(3, 6)))
    edit = Edit.between(old, new, "random")
    labels = old.copy()
    edit.apply(labels)
    assert labels.dtype == dtype
    assert labels.tobytes() == new.tobytes()
    edit.revert(labels)
    assert labels.tobytes() == old.tobytes()
    edit.apply(labels)
    edit.inverse().apply(labels)  # applying the inverse reverts
    assert labels.tobytes() == old.tobytes()


def test_apply_and_revert_write_only_the_changed_voxels() -> None:
    old = np.zeros((8, 8), np.uint8)
    new = old.copy()
    new[1, 1] = 1
    new[6, 6] = 1
    edit = Edit.between(old, new, "two corners")
    labels = new.copy()
    labels[3, 4] = 5  # a brush stroke inside the edit's box, on a voxel the edit does not change
    edit.revert(labels)
    expected = old.copy()
    expected[3, 4] = 5
    np.testing.assert_array_equal(labels, expected)


class _CopyOnReadArray:
    """An array-like whose indexing returns copies (as zarr or dask-backed data do)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key):
        return self.data[key].copy()

    def __setitem__(self, key, value) -> None:
        self.data[key] = value


def test_apply_works_on_array_likes_that_return_copies() -> None:
    old = np.zeros((4, 6, 6), np.uint8)
    new = old.copy()
    new[1:3, 2:4, 2:5] = 2
    edit = Edit.between(old, new, "block")
    wrapped = _CopyOnReadArray(old.copy())
    edit.apply(wrapped)
    np.testing.assert_array_equal(wrapped.data, new)
    edit.revert(wrapped)
    np.testing.assert_array_equal(wrapped.data, old)


def test_edit_refuses_labels_of_another_shape_and_writes_nothing() -> None:
    old = np.zeros((4, 8, 8), np.uint8)
    new = old.copy()
    new[1, 2, 3] = 1
    edit = Edit.between(old, new, "voxel")
    replaced = np.zeros((4, 8, 9), np.uint8)  # the layer's data was replaced by a larger array
    with pytest.raises(ValueError, match=r"recorded on labels of shape \(4, 8, 8\).*\(4, 8, 9\).*UndoStack.clear"):
        edit.apply(replaced)
    assert not replaced.any()
    with pytest.raises(ValueError, match="recorded on labels of shape"):
        edit.revert(np.zeros((8, 8), np.uint8))


def test_edit_without_array_shape_refuses_a_region_outside_the_array() -> None:
    edit = Edit((slice(2, 6), slice(0, 3)), np.zeros((4, 3), np.uint8), np.ones((4, 3), np.uint8), "block")
    with pytest.raises(ValueError, match="does not fit labels of shape"):
        edit.apply(np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="does not fit labels of shape"):
        edit.apply(np.zeros((5, 5, 5), np.uint8))
    labels = np.zeros((6, 3), np.uint8)
    edit.apply(labels)
    assert labels[2:6].all() and not labels[:2].any()


def test_edit_refuses_values_the_labels_cannot_store() -> None:
    edit = Edit((slice(0, 1),), np.array([0], np.int32), np.array([300], np.int32), "big label")
    with pytest.raises(ValueError, match="cannot store"):
        edit.apply(np.zeros(3, np.uint8))
    labels = np.zeros(3, np.int16)  # another dtype that holds the values is fine
    edit.apply(labels)
    assert labels.tolist() == [300, 0, 0]


def test_edit_refuses_read_only_and_float_labels() -> None:
    edit = Edit((slice(0, 1),), np.array([0], np.uint8), np.array([1], np.uint8), "voxel")
    frozen = np.zeros(3, np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        edit.apply(frozen)
    with pytest.raises(ValueError, match="integer labels"):
        edit.apply(np.zeros(3, np.float32))


@pytest.mark.parametrize(
    ("region", "before", "after", "message"),
    [
        ((slice(0, 2),), np.zeros(2, np.uint8), np.zeros(3, np.uint8), "same shape and dtype"),
        ((slice(0, 2),), np.zeros(2, np.uint8), np.zeros(2, np.int16), "same shape and dtype"),
        ((slice(0, 2),), np.zeros(2, np.float32), np.zeros(2, np.float32), "integer labels"),
        ((slice(0, 3),), np.zeros(2, np.uint8), np.zeros(2, np.uint8), "stop - start = 2"),
        ((slice(None, 2),), np.zeros(2, np.uint8), np.zeros(2, np.uint8), "slice"),
        ((slice(0, 2), slice(0, 1)), np.zeros(2, np.uint8), np.zeros(2, np.uint8), "2 slices but"),
    ],
)
def test_edit_constructor_refuses_inconsistent_parts(region, before, after, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Edit(region, before, after, "bad")


def test_edit_constructor_refuses_a_region_outside_its_array_shape() -> None:
    with pytest.raises(ValueError, match="does not fit its array_shape"):
        Edit((slice(3, 5),), np.zeros(2, np.uint8), np.ones(2, np.uint8), "x", array_shape=(4,))


def test_between_refuses_bad_arrays() -> None:
    with pytest.raises(ValueError, match="one shape"):
        Edit.between(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), "x")
    with pytest.raises(ValueError, match="integer labels"):
        Edit.between(np.zeros(3, np.float64), np.zeros(3, np.float64), "x")
    with pytest.raises(ValueError, match="cannot store"):
        Edit.between(np.zeros(3, np.uint8), np.array([0, 256, 0]), "x")
    with pytest.raises(ValueError, match="at least one axis"):
        Edit.between(np.array(0), np.array(1), "x")
    edit = Edit.between(np.zeros(3, np.uint8), np.array([0, 255, 0], np.int64), "wider dtype, values fit")
    assert edit.dtype == np.uint8 and edit.after.tolist() == [255]


def _three_edits(shape: tuple[int, ...] = (4, 16, 16)) -> tuple[list[np.ndarray], list[Edit]]:
    """States s0..s3 and the edits between consecutive states (each a different box)."""
    rng = np.random.default_rng(1)
    states = [rng.integers(0, 3, size=shape).astype(np.uint8)]
    boxes = [
        (slice(0, 2), slice(0, 8), slice(0, 8)),
        (slice(1, 4), slice(4, 12), slice(6, 16)),
        (slice(0, 4), slice(10, 16), slice(2, 9)),
    ]
    edits = []
    for number, box in enumerate(boxes):
        states.append(_random_change(rng, states[-1], box))
        edits.append(Edit.between(states[-2], states[-1], f"edit {number}"))
    return states, edits


def test_undo_and_redo_restore_every_state_bit_for_bit() -> None:
    states, edits = _three_edits()
    labels = states[0].copy()
    stack = UndoStack()
    assert not stack.can_undo and not stack.can_redo
    assert stack.undo(labels) is None and stack.redo(labels) is None
    for number, edit in enumerate(edits):
        assert stack.apply(labels, edit) is True
        assert labels.tobytes() == states[number + 1].tobytes()
    assert stack.undo_description == "edit 2" and stack.redo_description is None
    for number in (2, 1, 0):
        assert stack.undo(labels) is edits[number]
        assert labels.tobytes() == states[number].tobytes()
    assert not stack.can_undo and stack.can_redo and stack.num_redo == 3
    assert stack.undo(labels) is None
    for number in (0, 1, 2):
        assert stack.redo(labels) is edits[number]
        assert labels.tobytes() == states[number + 1].tobytes()
    assert stack.redo(labels) is None
    assert stack.nbytes == sum(edit.nbytes for edit in edits)


def test_a_new_push_clears_the_redo_list() -> None:
    states, edits = _three_edits()
    labels = states[0].copy()
    stack = UndoStack()
    stack.apply(labels, edits[0])
    stack.apply(labels, edits[1])
    stack.undo(labels)
    assert stack.can_redo
    other = labels.copy()
    other[0, 0, 0] += 1
    stack.apply(labels, Edit.between(labels, other, "brush"))
    assert not stack.can_redo and stack.redo(labels) is None
    assert stack.num_undo == 2 and stack.undo_description == "brush"


def test_undo_stack_drops_the_oldest_edits_past_max_bytes() -> None:
    old = np.zeros((10, 10), np.uint8)
    labels = old.copy()
    edits = []
    for row in range(4):  # four edits of one changed row each: 2 * 10 bytes
        new = labels.copy()
        new[row] = row + 1
        edits.append(Edit.between(labels, new, f"row {row}"))
        labels = new
    assert all(edit.nbytes == 20 for edit in edits)
    stack = UndoStack(max_bytes=45)  # room for two edits
    work = old.copy()
    for edit in edits:
        assert stack.apply(work, edit) is True
        assert stack.nbytes <= 45
    assert stack.num_undo == 2 and stack.nbytes == 40
    assert stack.undo(work) is edits[3] and stack.undo(work) is edits[2]
    assert stack.undo(work) is None  # rows 0 and 1 can no longer be undone
    expected = old.copy()
    expected[0], expected[1] = 1, 2
    np.testing.assert_array_equal(work, expected)


def test_an_edit_larger_than_max_bytes_clears_the_history() -> None:
    states, edits = _three_edits()
    stack = UndoStack(max_bytes=edits[0].nbytes)
    labels = states[0].copy()
    assert stack.apply(labels, edits[0]) is True
    big = Edit.between(labels, labels + 1, "everything")
    assert big.nbytes > stack.max_bytes
    assert stack.apply(labels, big) is False
    assert not stack.can_undo and not stack.can_redo and stack.nbytes == 0
    np.testing.assert_array_equal(labels, states[1] + 1)  # it was applied all the same


def test_undo_on_replaced_labels_raises_and_keeps_the_history() -> None:
    states, edits = _three_edits()
    labels = states[0].copy()
    stack = UndoStack()
    stack.apply(labels, edits[0])
    with pytest.raises(ValueError, match="was replaced"):
        stack.undo(np.zeros((4, 16, 17), np.uint8))
    assert stack.can_undo and not stack.can_redo
    stack.undo(labels)
    with pytest.raises(ValueError, match="was replaced"):
        stack.redo(np.zeros((2, 16, 16), np.uint8))
    assert stack.can_redo and not stack.can_undo
    stack.clear()
    assert not stack.can_undo and not stack.can_redo


@pytest.mark.parametrize("max_bytes", [0, -5, 1.5, True, "1 MB"])
def test_undo_stack_refuses_a_bad_max_bytes(max_bytes) -> None:
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        UndoStack(max_bytes=max_bytes)


def test_undo_stack_refuses_pushing_something_else_than_an_edit() -> None:
    with pytest.raises(TypeError, match="expects an Edit, got NoneType"):
        UndoStack().push(None)
