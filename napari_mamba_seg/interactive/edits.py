"""Edit records and an undo stack for label arrays (numpy only).

Every correction tool returns an :class:`Edit`: the bounding box of the voxels it changes and their values before
and after, so an edit of a small lesion costs a few kilobytes even in a large volume. The caller applies it in place
(``edit.apply(layer.data)``) and keeps it on an :class:`UndoStack` to undo and redo it.

Applying or reverting an edit writes only the voxels the edit changes (those whose ``before`` and ``after`` values
differ), never the unchanged voxels of its bounding box, so a brush stroke made next to an edit survives undoing it.

Example:
    >>> import numpy as np
    >>> labels = np.zeros((4, 4), np.uint8)
    >>> new = labels.copy(); new[1:3, 1:3] = 2
    >>> edit = Edit.between(labels, new, "paint a square")
    >>> stack = UndoStack()
    >>> stack.apply(labels, edit)
    True
    >>> int(labels.sum()), int(stack.undo(labels).num_changed), int(labels.sum())
    (8, 4, 0)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["DEFAULT_UNDO_BYTES", "Edit", "UndoStack"]

DEFAULT_UNDO_BYTES = 256 * 2**20
"""Default memory cap of an :class:`UndoStack` (256 MiB of ``before`` + ``after`` arrays)."""


def _owned_read_only(array: Any) -> np.ndarray:
    """``array`` as a read-only numpy array that owns its memory (copied unless it already is one)."""
    if isinstance(array, np.ndarray) and array.flags.owndata and not array.flags.writeable:
        return array
    owned = np.array(array, copy=True)
    owned.flags.writeable = False
    return owned


def _check_region(region: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Return ``region`` as a tuple of concrete slices whose extents are ``shape``."""
    region = tuple(region)
    if len(region) != len(shape):
        raise ValueError(f"Edit region has {len(region)} slices but before/after have {len(shape)} axes")
    for dim, (piece, size) in enumerate(zip(region, shape, strict=True)):
        concrete = (
            isinstance(piece, slice)
            and isinstance(piece.start, (int, np.integer))
            and isinstance(piece.stop, (int, np.integer))
            and piece.step in (None, 1)
            and piece.start >= 0
        )
        if not concrete or piece.stop - piece.start != size:
            raise ValueError(
                f"Edit region axis {dim} must be slice(start, stop) with 0 <= start and stop - start = {size} "
                f"(the before/after extent), got {piece!r}"
            )
    return tuple(slice(int(piece.start), int(piece.stop)) for piece in region)


@dataclass(eq=False)
class Edit:
    """One change of a label array: the bounding box of the changed voxels and their values before and after.

    ``before`` and ``after`` are stored as read-only copies. Only the voxels where they differ are written by
    :meth:`apply` and :meth:`revert`.

    Attributes:
        region: One ``slice(start, stop)`` per axis of the label array: the box the edit covers.
        before: ``(stop - start per axis)`` the values in ``region`` before the edit.
        after: Same shape and dtype as ``before``: the values after the edit.
        description: What the edit did, for the user (e.g. an undo button's tooltip).
        array_shape: Shape of the label array the edit was recorded on; when set, :meth:`apply` and
            :meth:`revert` refuse arrays of another shape. None accepts any array the region fits.

    Raises:
        ValueError: ``before`` and ``after`` of different shapes or dtypes, a region that does not match them, or an
            ``array_shape`` the region does not fit.
    """

    region: tuple[slice, ...]
    before: np.ndarray
    after: np.ndarray
    description: str
    array_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        """Check the parts and store read-only copies of the arrays."""
        before, after = np.asarray(self.before), np.asarray(self.after)
        if before.shape != after.shape or before.dtype != after.dtype:
            raise ValueError(
                f"Edit before and after must have the same shape and dtype, got {before.shape} {before.dtype} and "
                f"{after.shape} {after.dtype}"
            )
        if before.dtype.kind not in "iu":
            raise ValueError(f"Edit arrays must hold integer labels, got dtype {before.dtype}")
        self.region = _check_region(self.region, before.shape)
        if self.array_shape is not None:
            self.array_shape = tuple(int(size) for size in self.array_shape)
            if len(self.array_shape) != len(self.region) or any(
                piece.stop > size for piece, size in zip(self.region, self.array_shape, strict=True)
            ):
                raise ValueError(f"Edit region {self.region} does not fit its array_shape {self.array_shape}")
        self.before = _owned_read_only(before)
        self.after = _owned_read_only(after)
        self.description = str(self.description)

    @classmethod
    def between(cls, old: Any, new: Any, description: str) -> Edit | None:
        """The edit that turns ``old`` into ``new``, cropped to the changed voxels; None when nothing changed.

        Args:
            old: ``(z, y, x)`` or ``(y, x)`` (any shape) integer labels before the change.
            new: Same shape: the labels after the change. Its values must fit ``old``'s dtype.
            description: What the change does, for the user.

        Returns:
            An :class:`Edit` with ``array_shape = old.shape``, or None when ``new`` equals ``old``.

        Raises:
            ValueError: Different shapes, non-integer labels, or values of ``new`` that ``old``'s dtype cannot hold.
        """
        old, new = np.asarray(old), np.asarray(new)
        if old.shape != new.shape:
            raise ValueError(f"Edit.between needs arrays of one shape, got old {old.shape} and new {new.shape}")
        if old.dtype.kind not in "iu" or new.dtype.kind not in "iu":
            raise ValueError(f"Edit.between needs integer labels, got dtypes {old.dtype} and {new.dtype}")
        if new.dtype != old.dtype:
            cast = new.astype(old.dtype)
            if not np.array_equal(cast, new):
                raise ValueError(
                    f"Edit.between: the new labels hold values that the labels' dtype {old.dtype} cannot store; "
                    "convert the labels to a wider integer type first"
                )
            new = cast
        region = _changed_box(old != new)
        if region is None:
            return None
        return cls(region, old[region], new[region], description, array_shape=tuple(old.shape))

    @property
    def dtype(self) -> np.dtype:
        """dtype of the recorded values."""
        return self.before.dtype

    @property
    def nbytes(self) -> int:
        """Memory held by ``before`` and ``after`` in bytes."""
        return int(self.before.nbytes + self.after.nbytes)

    @cached_property
    def changed(self) -> np.ndarray:
        """``(region extents)`` bool, True where the edit changes the voxel (``before != after``)."""
        changed = self.before != self.after
        changed.flags.writeable = False
        return changed

    @property
    def num_changed(self) -> int:
        """Number of voxels the edit changes."""
        return int(np.count_nonzero(self.changed))

    def inverse(self) -> Edit:
        """The edit that undoes this one (``before`` and ``after`` swapped)."""
        return Edit(self.region, self.after, self.before, f"undo {self.description}", array_shape=self.array_shape)

    def check_fits(self, labels: Any) -> None:
        """Raise a ValueError unless the edit can be written into ``labels``.

        Args:
            labels: The label array the edit is meant for (e.g. a napari Labels layer's ``data``).

        Raises:
            ValueError: Another dimensionality or shape than the edit was recorded on (e.g. the layer's data was
                replaced), a region outside the array, non-integer labels, or a dtype that cannot hold the values.
        """
        shape = tuple(getattr(labels, "shape", ()))
        what = f"edit {self.description!r}"
        if self.array_shape is not None and shape != self.array_shape:
            raise ValueError(
                f"{what} was recorded on labels of shape {self.array_shape}, but these labels have shape {shape}: "
                "the layer's data was replaced; clear its undo history (UndoStack.clear())"
            )
        if len(shape) != len(self.region) or any(
            piece.stop > size for piece, size in zip(self.region, shape, strict=True)
        ):
            raise ValueError(
                f"{what} covers region {self.region}, which does not fit labels of shape {shape}: the layer's data "
                "was replaced; clear its undo history (UndoStack.clear())"
            )
        dtype = np.dtype(getattr(labels, "dtype", np.int64))
        if dtype.kind not in "iu":
            raise ValueError(f"{what} writes integer labels, but the labels have dtype {dtype}")
        if dtype != self.dtype and self.before.size:
            info = np.iinfo(dtype)
            low = min(int(self.before.min()), int(self.after.min()))
            high = max(int(self.before.max()), int(self.after.max()))
            if low < info.min or high > info.max:
                raise ValueError(
                    f"{what} holds values from {low} to {high}, which labels of dtype {dtype} cannot store; the "
                    "layer's data was replaced; clear its undo history (UndoStack.clear())"
                )

    def apply(self, labels: Any) -> None:
        """Write the edit into ``labels`` in place (only the changed voxels).

        Args:
            labels: Writable integer label array of the shape the edit was recorded on.

        Raises:
            ValueError: See :meth:`check_fits`; nothing is written then.
        """
        self._write(labels, self.after)

    def revert(self, labels: Any) -> None:
        """Restore the values before the edit in ``labels`` in place (only the changed voxels).

        Raises:
            ValueError: See :meth:`check_fits`; nothing is written then.
        """
        self._write(labels, self.before)

    def _write(self, labels: Any, values: np.ndarray) -> None:
        self.check_fits(labels)
        flags = getattr(labels, "flags", None)
        if flags is not None and not flags.writeable:
            raise ValueError(f"edit {self.description!r}: the labels array is read-only; pass a writable array")
        current = np.asarray(labels[self.region])
        # Read-modify-write of the box (not a view), so array-likes whose indexing returns copies work too.
        labels[self.region] = np.where(self.changed, values, current).astype(current.dtype, copy=False)


def _changed_box(changed: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels of ``changed`` (any dimensionality), or None when there are none."""
    if changed.ndim == 0:
        raise ValueError("Edit.between needs arrays with at least one axis, got scalars")
    box = []
    for dim in range(changed.ndim):
        others = tuple(d for d in range(changed.ndim) if d != dim)
        hits = np.flatnonzero(changed.any(axis=others) if others else changed)
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


class UndoStack:
    """Undo and redo history of the edits of one label array, capped in memory.

    The caller applies an edit and pushes it (or calls :meth:`apply`, which does both). :meth:`undo` reverts the
    newest edit and moves it to the redo list; :meth:`redo` applies it again. Pushing a new edit clears the redo
    list. When the edits held (undo and redo lists together) exceed ``max_bytes``, the oldest ones are dropped; an
    edit larger than ``max_bytes`` on its own cannot be kept: pushing it clears the whole history (older edits could
    no longer be undone consistently) and returns False.

    Args:
        max_bytes: Memory cap of the recorded ``before`` + ``after`` arrays, in bytes (default 256 MiB).

    Raises:
        ValueError: ``max_bytes`` not a positive integer.
    """

    def __init__(self, max_bytes: int = DEFAULT_UNDO_BYTES) -> None:
        """Create an empty history."""
        if isinstance(max_bytes, (bool, np.bool_)) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer number of bytes, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self._undo: deque[Edit] = deque()
        self._redo: list[Edit] = []

    def push(self, edit: Edit) -> bool:
        """Record an edit that has just been applied; clears the redo list.

        Args:
            edit: The applied edit.

        Returns:
            True if the edit can be undone; False if it alone exceeds ``max_bytes`` (the history is then cleared).

        Raises:
            TypeError: ``edit`` is not an :class:`Edit` (e.g. None from a tool that changed nothing).
        """
        if not isinstance(edit, Edit):
            raise TypeError(f"UndoStack.push expects an Edit, got {type(edit).__name__}; skip None (nothing changed)")
        self._redo.clear()
        if edit.nbytes > self.max_bytes:
            self._undo.clear()
            return False
        self._undo.append(edit)
        while self.nbytes > self.max_bytes:
            self._undo.popleft()
        return True

    def apply(self, labels: Any, edit: Edit) -> bool:
        """Apply ``edit`` to ``labels`` in place and push it; returns what :meth:`push` returns.

        Raises:
            ValueError: The edit does not fit ``labels`` (nothing is written or recorded then).
        """
        edit.apply(labels)
        return self.push(edit)

    def undo(self, labels: Any) -> Edit | None:
        """Revert the newest edit in ``labels`` in place; returns it, or None when there is nothing to undo.

        Raises:
            ValueError: The edit does not fit ``labels`` (the layer's data was replaced); the history is unchanged.
        """
        if not self._undo:
            return None
        edit = self._undo[-1]
        edit.revert(labels)
        self._redo.append(self._undo.pop())
        return edit

    def redo(self, labels: Any) -> Edit | None:
        """Apply the newest undone edit to ``labels`` again; returns it, or None when there is nothing to redo.

        Raises:
            ValueError: The edit does not fit ``labels``; the history is unchanged.
        """
        if not self._redo:
            return None
        edit = self._redo[-1]
        edit.apply(labels)
        self._undo.append(self._redo.pop())
        return edit

    def clear(self) -> None:
        """Forget every edit (e.g. when the layer's data is replaced)."""
        self._undo.clear()
        self._redo.clear()

    @property
    def can_undo(self) -> bool:
        """True when :meth:`undo` has an edit to revert."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """True when :meth:`redo` has an edit to apply."""
        return bool(self._redo)

    @property
    def undo_description(self) -> str | None:
        """Description of the edit :meth:`undo` would revert, or None."""
        return self._undo[-1].description if self._undo else None

    @property
    def redo_description(self) -> str | None:
        """Description of the edit :meth:`redo` would apply, or None."""
        return self._redo[-1].description if self._redo else None

    @property
    def num_undo(self) -> int:
        """Number of edits that can be undone."""
        return len(self._undo)

    @property
    def num_redo(self) -> int:
        """Number of edits that can be redone."""
        return len(self._redo)

    @property
    def nbytes(self) -> int:
        """Memory held by the recorded edits (undo and redo lists), in bytes."""
        return sum(edit.nbytes for edit in self._undo) + sum(edit.nbytes for edit in self._redo)
