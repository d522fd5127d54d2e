"""Argument checks and small array helpers shared by the correction tools (numpy + scipy only).

Every check raises a :class:`ValueError` whose message names the argument, the problem and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from napari_mamba_seg.interactive.edits import Edit
from napari_mamba_seg.interactive.edits import _changed_box as changed_box

# A label image larger than this many distinct values is scanned with np.unique instead of np.bincount.
_BINCOUNT_MAX_VALUE = 1 << 20


def is_integer(value: Any) -> bool:
    """True for Python and numpy integers (bools excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_labels(labels: Any, *, ndims: tuple[int, ...] = (2, 3), purpose: str = "") -> np.ndarray:
    """Return ``labels`` as an integer numpy array of an allowed dimensionality (no copy when it already is one).

    Args:
        labels: ``(z, y, x)`` or ``(y, x)`` integer class indices, 0 = background.
        ndims: The dimensionalities the caller accepts.
        purpose: What the caller does, for the message (e.g. ``"slice propagation"``).

    Raises:
        ValueError: Not an array, a non-integer dtype or a dimensionality outside ``ndims``.
    """
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be an integer array (0 = background, k = class k), got dtype {array.dtype}; convert it, "
            "e.g. np.rint(labels).astype(np.uint8)"
        )
    if array.ndim not in ndims:
        wanted = " or ".join({2: "2D (y, x)", 3: "3D (z, y, x)"}[n] for n in ndims)
        task = f" for {purpose}" if purpose else ""
        raise ValueError(f"labels must be {wanted}{task}, got shape {array.shape}")
    return array


def check_axis(axis: Any, ndim: int) -> int:
    """Return the slice axis as an int in ``[0, ndim)``.

    Raises:
        ValueError: Not an integer, or out of range (negative axes are refused: pass the positive index).
    """
    if not is_integer(axis) or not 0 <= int(axis) < ndim:
        raise ValueError(f"axis must be an integer from 0 to {ndim - 1} (the slice axis of the labels), got {axis!r}")
    return int(axis)


def check_slice_axis(axis: Any, labels: np.ndarray) -> int | None:
    """Check an optional slice axis: None, or a valid axis of 3D labels.

    Raises:
        ValueError: An axis out of range, or an axis given for 2D labels (which are a single slice).
    """
    if axis is None:
        return None
    if labels.ndim != 3:
        raise ValueError(
            f"axis={axis!r} selects 2D slices of 3D labels, but the labels are 2D (shape {labels.shape}): they are "
            "one slice already; pass axis=None"
        )
    return check_axis(axis, labels.ndim)


def check_slice_index(index: Any, size: int, *, name: str) -> int:
    """Return a slice index in ``[0, size)``.

    Raises:
        ValueError: Not an integer or out of range; the message names the argument.
    """
    if not is_integer(index) or not 0 <= int(index) < size:
        raise ValueError(f"{name} must be a slice index from 0 to {size - 1}, got {index!r}")
    return int(index)


def check_class_label(label: Any, *, name: str = "label", dtype: np.dtype | None = None) -> int:
    """Return a class label: a positive integer (0 is the background) that fits ``dtype``.

    Raises:
        ValueError: Not a positive integer, or too large for the labels' dtype.
    """
    if not is_integer(label) or int(label) <= 0:
        raise ValueError(f"{name} must be a positive integer class (0 is the background), got {label!r}")
    if dtype is not None and int(label) > np.iinfo(dtype).max:
        raise ValueError(
            f"{name}={label} does not fit the labels' dtype {dtype} (max {np.iinfo(dtype).max}); convert the labels "
            "to a wider integer type first"
        )
    return int(label)


def present_classes(labels: np.ndarray) -> list[int]:
    """The non-zero values present in ``labels``, sorted.

    Args:
        labels: Integer array of any shape.
    """
    if labels.size == 0:
        return []
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < _BINCOUNT_MAX_VALUE:
        counts = np.bincount(labels.ravel(), minlength=high + 1)
        return [int(value) for value in np.flatnonzero(counts) if value != 0]
    return [int(value) for value in np.unique(labels) if value != 0]


def check_present_label(label: Any, labels: np.ndarray, *, name: str = "label", where: str = "the labels") -> int:
    """Return ``label`` after checking that it is a positive integer present in ``labels``.

    Raises:
        ValueError: Not a positive integer, or absent; the message lists the classes that are present.
    """
    label = check_class_label(label, name=name)
    if not np.any(labels == label):
        present = present_classes(labels)
        raise ValueError(
            f"{name}={label} is not present in {where} (classes present: {present or 'none'}); pick one of them or "
            f"pass {name}=None to process every class"
        )
    return label


def classes_to_process(labels: np.ndarray, label: Any, *, where: str = "the labels") -> list[int]:
    """``[label]`` after checking it is present, or every non-zero class of ``labels`` when ``label`` is None."""
    if label is None:
        return present_classes(labels)
    return [check_present_label(label, labels, where=where)]


def check_threshold(threshold: Any, *, name: str = "threshold") -> float:
    """Return a probability threshold in ``(0, 1]``.

    Raises:
        ValueError: Not a number in ``(0, 1]``.
    """
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a probability in (0, 1], got {threshold!r}")
    value = float(threshold)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a probability in (0, 1], got {threshold!r}")
    return value


def check_probabilities(probabilities: Any, spatial_shapes: Sequence[tuple[int, ...]], *, purpose: str) -> np.ndarray:
    """Return class probabilities ``(num_classes, *spatial)`` as a float array (no copy).

    Args:
        probabilities: ``(num_classes, *spatial)`` softmax probabilities, channel 0 = background.
        spatial_shapes: The spatial shapes the caller accepts (e.g. the labels' shape, or one slice's shape).
        purpose: What they are for, for the message.

    Raises:
        ValueError: Not floating point, or a shape that is none of the accepted ones.
    """
    array = np.asarray(probabilities)
    if array.dtype.kind != "f":
        raise ValueError(
            f"probabilities for {purpose} must be floating point (softmax output), got dtype {array.dtype}"
        )
    if array.ndim < 1 or tuple(array.shape[1:]) not in [tuple(shape) for shape in spatial_shapes] or array.shape[0] < 2:
        accepted = " or ".join(f"(num_classes, {', '.join(map(str, shape))})" for shape in spatial_shapes)
        raise ValueError(
            f"probabilities for {purpose} must have shape {accepted} with num_classes >= 2 (channel 0 = background), "
            f"got {array.shape}; compute them on the same grid as the labels (Predictor return_probabilities=True)"
        )
    return array


def check_class_in_probabilities(label: int, probabilities: np.ndarray, *, name: str = "label") -> None:
    """Raise a ValueError when class ``label`` has no probability channel."""
    if label >= probabilities.shape[0]:
        raise ValueError(
            f"{name}={label} has no probability channel: the probabilities have {probabilities.shape[0]} classes "
            f"(0 to {probabilities.shape[0] - 1}); use the model that knows class {label}"
        )


def check_probability_values(values: np.ndarray, *, purpose: str) -> None:
    """Raise a ValueError when ``values`` are not finite probabilities in ``[0, 1]`` (a small tolerance allowed)."""
    if not values.size:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"probabilities for {purpose} must be finite values in [0, 1] (softmax output), got NaN or infinite values"
        )
    if values.min() < -1e-6 or values.max() > 1 + 1e-6:
        raise ValueError(
            f"probabilities for {purpose} must be finite values in [0, 1] (softmax output), got values from "
            f"{values.min():g} to {values.max():g}; pass softmax probabilities, not logits"
        )


def full_connectivity(ndim: int) -> np.ndarray:
    """Structuring element connecting every neighbour (8 in 2D, 26 in 3D)."""
    return ndimage.generate_binary_structure(ndim, ndim)


def face_connectivity(ndim: int) -> np.ndarray:
    """Structuring element connecting face neighbours only (4 in 2D, 6 in 3D)."""
    return ndimage.generate_binary_structure(ndim, 1)


def within_slices(structure: np.ndarray, axis: int) -> np.ndarray:
    """``structure`` with its neighbours along ``axis`` removed, so components never cross slices of that axis."""
    planar = structure.copy()
    index = [slice(None)] * structure.ndim
    for offset in (0, 2):
        index[axis] = offset
        planar[tuple(index)] = False
    return planar


def plane(axis: int, index: int, ndim: int) -> tuple[slice | int, ...]:
    """Numpy index of slice ``index`` along ``axis`` (drops that axis)."""
    return (slice(None),) * axis + (index,) + (slice(None),) * (ndim - axis - 1)


def slab(shape: tuple[int, ...], axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """Region (concrete slices) of slices ``start..stop-1`` along ``axis`` (keeps that axis)."""
    return tuple(slice(start, stop) if dim == axis else slice(0, size) for dim, size in enumerate(shape))


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest region (concrete slices) holding every True voxel of ``mask``, or None when it has none."""
    return changed_box(mask)


def edit_in_region(
    labels: np.ndarray, region: tuple[slice, ...], new_block: np.ndarray, description: str
) -> Edit | None:
    """The edit that writes ``new_block`` into ``labels[region]``, or None when it changes nothing.

    Args:
        labels: The full label array (not modified).
        region: Concrete slices (start and stop set) of ``labels``.
        new_block: The new values of ``labels[region]``, same shape.
        description: The edit's description.
    """
    edit = Edit.between(labels[region], new_block, description)
    if edit is None:
        return None
    shifted = tuple(
        slice(outer.start + inner.start, outer.start + inner.stop)
        for outer, inner in zip(region, edit.region, strict=True)
    )
    return Edit(shifted, edit.before, edit.after, description, array_shape=tuple(labels.shape))
