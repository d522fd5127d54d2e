"""Clean-up of label arrays: fill holes, remove small islands, keep the largest component (numpy + scipy only).

Each function reads the labels, never modifies them, and returns the :class:`~napari_mamba_seg.interactive.Edit`
that makes the change (None when there is nothing to change); the caller applies it in place.

Connectivity:

* holes are background regions enclosed by a class with **face** connectivity of the background (4-connected in 2D,
  6 in 3D), as :func:`scipy.ndimage.binary_fill_holes`: a gap that touches the outside only through a corner is a
  hole;
* islands and components of a class use **full** connectivity (8 in 2D, 26 in 3D): voxels touching by a corner
  belong to one component, so nothing thin but connected is cut off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from napari_mamba_seg.interactive._checks import (
    bounding_box,
    check_labels,
    check_slice_axis,
    classes_to_process,
    face_connectivity,
    full_connectivity,
    is_integer,
    within_slices,
)
from napari_mamba_seg.interactive.edits import Edit

__all__ = ["fill_holes", "keep_largest_component", "remove_small_islands"]


def fill_holes(labels: Any, label: int | None = None, axis: int | None = None) -> Edit | None:
    """Fill the holes of each class: background voxels enclosed by the class become that class.

    A hole of class k is a background region (of voxels that are not class k) that does not reach the border of the
    array (of the slice, when ``axis`` is given). Only background (0) voxels are filled; voxels of other classes inside
    a hole are kept. A background voxel in holes of several classes (one class nested in another, e.g. a gap inside
    a lesion inside the breast) takes the class whose hole around it is smallest: the innermost one.

    Args:
        labels: ``(z, y, x)`` or ``(y, x)`` integer labels, 0 = background. Not modified.
        label: The class to fill; None fills every class present.
        axis: Fill each 2D slice along this axis separately (3D labels only); None fills in 3D (cavities enclosed in
            3D) or, for 2D labels, in the image.

    Returns:
        The edit that fills the holes, or None when there is none.

    Raises:
        ValueError: Non-integer labels, a label that is not a positive class present in the labels, or an axis out of
            range (or given for 2D labels).
    """
    labels = check_labels(labels)
    axis = check_slice_axis(axis, labels)
    classes = classes_to_process(labels, label)
    structure = face_connectivity(labels.ndim)
    if axis is not None:
        structure = within_slices(structure, axis)
    border_axes = [dim for dim in range(labels.ndim) if dim != axis]

    boxes = {value: bounding_box(labels == value) for value in classes}  # holes of a class lie inside its box
    if not boxes:
        return None
    result = labels.copy()
    union = _union_box(list(boxes.values()))
    size_type = np.int32 if labels.size < np.iinfo(np.int32).max else np.int64
    innermost = np.full(_box_shape(union), np.iinfo(size_type).max, size_type)  # smallest hole seen per voxel
    for value, box in boxes.items():
        inner = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union, strict=True))
        hole_sizes = _hole_sizes(labels[box] == value, structure, border_axes).astype(size_type, copy=False)
        fill = (hole_sizes > 0) & (labels[box] == 0) & (hole_sizes < innermost[inner])
        result[box][fill] = value
        innermost[inner][fill] = hole_sizes[fill]
    where = f", per slice along axis {axis}" if axis is not None else (" in 3D" if labels.ndim == 3 else "")
    return Edit.between(labels, result, f"fill holes of {_which(label)}{where}")


def remove_small_islands(labels: Any, min_voxels: int, label: int | None = None) -> Edit | None:
    """Set the connected components of a class smaller than ``min_voxels`` to background.

    Args:
        labels: ``(z, y, x)`` or ``(y, x)`` integer labels, 0 = background. Not modified.
        min_voxels: Components with fewer voxels than this are removed (0 or 1 removes nothing).
        label: The class to clean; None cleans every class present.

    Returns:
        The edit that removes the islands, or None when there is none.

    Raises:
        ValueError: ``min_voxels`` not a non-negative integer, non-integer labels, or a label that is not a positive
            class present in the labels.
    """
    labels = check_labels(labels)
    if not is_integer(min_voxels) or min_voxels < 0:
        raise ValueError(
            f"min_voxels must be a non-negative integer (components with fewer voxels are removed), got "
            f"{min_voxels!r}; convert a volume in mm³ with round(volume / prod(spacing))"
        )
    classes = classes_to_process(labels, label)
    result = labels.copy()
    for value in classes:
        box = bounding_box(labels == value)
        components, sizes = _components(labels[box] == value)
        small = sizes < min_voxels
        small[0] = False  # component 0 is the rest of the box
        result[box][small[components]] = 0
    return Edit.between(labels, result, f"remove islands under {int(min_voxels)} voxels of {_which(label)}")


def keep_largest_component(labels: Any, label: int | None = None) -> Edit | None:
    """Keep only the largest connected component of each class; its other components become background.

    Of components of equal (largest) size, the first in C order (lowest flat index of its first voxel) is kept.

    Args:
        labels: ``(z, y, x)`` or ``(y, x)`` integer labels, 0 = background. Not modified.
        label: The class to clean; None cleans every class present.

    Returns:
        The edit that removes the smaller components, or None when every class is already one component.

    Raises:
        ValueError: Non-integer labels, or a label that is not a positive class present in the labels.
    """
    labels = check_labels(labels)
    classes = classes_to_process(labels, label)
    result = labels.copy()
    for value in classes:
        box = bounding_box(labels == value)
        components, sizes = _components(labels[box] == value)
        sizes[0] = -1
        drop = np.ones(sizes.shape, bool)
        drop[0] = False
        drop[int(np.argmax(sizes))] = False
        result[box][drop[components]] = 0
    return Edit.between(labels, result, f"keep the largest component of {_which(label)}")


def _which(label: int | None) -> str:
    return "every class" if label is None else f"label {int(label)}"


def _union_box(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest region holding every one of ``boxes``."""
    per_axis = zip(*boxes, strict=True)
    return tuple(slice(min(p.start for p in pieces), max(p.stop for p in pieces)) for pieces in per_axis)


def _box_shape(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(piece.stop - piece.start for piece in box)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the fully connected components of ``mask``; returns ``(component ids, voxels per id)`` (id 0 = rest)."""
    components, count = ndimage.label(mask, structure=full_connectivity(mask.ndim))
    return components, np.bincount(components.ravel(), minlength=count + 1)


def _hole_sizes(mask: np.ndarray, structure: np.ndarray, border_axes: list[int]) -> np.ndarray:
    """Per voxel: the size of the hole of ``mask`` it lies in, 0 outside holes.

    Args:
        mask: ``(*box)`` bool: the class inside its bounding box (voxels outside the box are not the class).
        structure: Connectivity of the background (within slices for per-slice filling).
        border_axes: Axes whose two faces are open to the outside (every axis but the slice axis).
    """
    components, count = ndimage.label(~mask, structure=structure)
    open_ids = [np.unique(np.take(components, [0, -1], axis=dim)) for dim in border_axes]
    is_hole = np.ones(count + 1, bool)
    is_hole[0] = False
    is_hole[np.concatenate(open_ids)] = False
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    lookup = np.where(is_hole, sizes, 0).astype(np.int32 if mask.size < np.iinfo(np.int32).max else np.int64)
    return lookup[components]
