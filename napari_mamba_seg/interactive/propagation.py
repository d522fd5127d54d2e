"""Slice propagation and interpolation of label arrays (numpy + scipy only).

* :func:`propagate_slice` copies one slice's labels onto another slice, optionally adapted to the target slice by
  the model's class probabilities.
* :func:`interpolate_slices` fills the slices between two annotated slices by shape (signed-distance) interpolation,
  the "interpolate / fill between slices" tool of ITK-SNAP and 3D Slicer.

Both read the labels, never modify them, and return the :class:`~napari_mamba_seg.interactive.Edit` that makes the
change (None when nothing changes); the caller applies it in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.interactive._checks import (
    check_axis,
    check_class_in_probabilities,
    check_class_label,
    check_labels,
    check_probabilities,
    check_probability_values,
    check_slice_index,
    check_threshold,
    edit_in_region,
    full_connectivity,
    is_integer,
    plane,
    present_classes,
    slab,
)
from napari_mamba_seg.interactive.edits import Edit

__all__ = ["interpolate_slices", "propagate_slice"]


def propagate_slice(
    labels: Any,
    axis: int,
    source: int,
    target: int,
    *,
    probabilities: Any = None,
    threshold: float = 0.5,
    label: int | None = None,
    grow_voxels: int = 2,
) -> Edit | None:
    """Copy the labels of slice ``source`` onto slice ``target`` (e.g. the next slice), optionally model-guided.

    Without ``probabilities`` the target slice becomes a copy of the source slice (with ``label``: the target's
    voxels of that class are cleared to background, then the source's voxels of that class are written).

    With ``probabilities`` (model-guided), for each class k copied, the target slice gets class k on the voxels that
    are both

    * within ``grow_voxels`` voxels (8-connected dilation in the slice) of the source's class-k shape, and
    * class k for the model on the target slice: probability of k >= ``threshold``.

    So the copied shape shrinks where the model disagrees on the target slice and grows by at most ``grow_voxels``
    where the model sees more of the class next to it; nothing far from the copied shape is added. A voxel claimed
    by several classes takes the one with the highest probability. Every other voxel of the target slice becomes
    background (with ``label``: only the target's voxels of that class are cleared; other classes stay unless
    overwritten).

    Args:
        labels: ``(z, y, x)`` integer labels, 0 = background. Not modified.
        axis: The slice axis.
        source: Index of the slice to copy from, along ``axis``.
        target: Index of the slice to write, along ``axis``; not ``source``.
        probabilities: Optional softmax probabilities, channel 0 = background: ``(num_classes, z, y, x)`` (the whole
            volume, as ``Predictor.predict(..., return_probabilities=True)`` gives) or only the target slice
            ``(num_classes, *slice shape)``.
        threshold: Model-guided only: the probability from which the model counts a voxel as the class, in (0, 1].
        label: Propagate only this class; None propagates every class of the source slice.
        grow_voxels: Model-guided only: how far (in voxels) the copied shape may grow on the target slice, >= 0.

    Returns:
        The edit that writes the target slice, or None when it already holds the result.

    Raises:
        ValueError: Labels that are not 3D integers, an axis or slice index out of range, ``source == target``, a
            source slice without labels (or without ``label``), probabilities of the wrong shape, dtype or values,
            a class without a probability channel, a threshold outside (0, 1] or a negative ``grow_voxels``.
    """
    labels = check_labels(labels, ndims=(3,), purpose="slice propagation")
    axis = check_axis(axis, labels.ndim)
    size = labels.shape[axis]
    source = check_slice_index(source, size, name="source")
    target = check_slice_index(target, size, name="target")
    if source == target:
        raise ValueError(f"source and target are both slice {source}; pick another target slice")
    source_slice, target_slice = labels[plane(axis, source, 3)], labels[plane(axis, target, 3)]
    classes = _classes_on_source(source_slice, source, label, labels.dtype)

    if probabilities is None:
        new_slice = source_slice.copy() if label is None else _replace_class(target_slice, source_slice == label, label)
        how = "copy"
    else:
        threshold = check_threshold(threshold)
        if not is_integer(grow_voxels) or grow_voxels < 0:
            raise ValueError(f"grow_voxels must be a non-negative integer number of voxels, got {grow_voxels!r}")
        target_probabilities = _target_probabilities(probabilities, labels.shape, axis, target)
        for value in classes:
            check_class_in_probabilities(value, target_probabilities)
        new_slice = _guided_copy(
            source_slice, target_slice, target_probabilities, classes, label, threshold, int(grow_voxels)
        )
        how = f"model-guided copy (threshold {threshold:g}, grow {int(grow_voxels)})"

    which = "labels" if label is None else f"label {label}"
    description = f"propagate {which} from slice {source} to slice {target} along axis {axis} ({how})"
    region = slab(labels.shape, axis, target, target + 1)
    return edit_in_region(labels, region, np.expand_dims(new_slice, axis), description)


def _classes_on_source(source_slice: np.ndarray, source: int, label: Any, dtype: np.dtype) -> list[int]:
    if label is None:
        classes = present_classes(source_slice)
        if not classes:
            raise ValueError(f"source slice {source} has no labels to propagate; pick an annotated slice")
        return classes
    label = check_class_label(label, dtype=dtype)
    if not np.any(source_slice == label):
        there = present_classes(source_slice) or "none"
        raise ValueError(
            f"label {label} is not on source slice {source} (classes there: {there}); pick a slice where it is drawn"
        )
    return [label]


def _replace_class(target_slice: np.ndarray, new_mask: np.ndarray, label: int) -> np.ndarray:
    """``target_slice`` with its voxels of ``label`` cleared and ``new_mask`` set to ``label``."""
    new_slice = target_slice.copy()
    new_slice[new_slice == label] = 0
    new_slice[new_mask] = label
    return new_slice


def _target_probabilities(probabilities: Any, shape: tuple[int, ...], axis: int, target: int) -> np.ndarray:
    """``(num_classes, *slice shape)`` probabilities of the target slice (from the volume's or the slice's)."""
    slice_shape = tuple(size for dim, size in enumerate(shape) if dim != axis)
    probabilities = check_probabilities(probabilities, [shape, slice_shape], purpose="model-guided propagation")
    if probabilities.ndim == 4:
        probabilities = probabilities[(slice(None), *plane(axis, target, 3))]
    probabilities = np.asarray(probabilities)
    check_probability_values(probabilities, purpose=f"target slice {target}")
    return probabilities


def _guided_copy(
    source_slice: np.ndarray,
    target_slice: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[int],
    label: int | None,
    threshold: float,
    grow_voxels: int,
) -> np.ndarray:
    """The new target slice of a model-guided copy (see :func:`propagate_slice`)."""
    if label is None:
        new_slice = np.zeros_like(target_slice)
    else:
        new_slice = target_slice.copy()
        new_slice[new_slice == label] = 0
    best = np.full(target_slice.shape, -np.inf)
    structure = full_connectivity(2)
    for value in classes:
        allowed = source_slice == value
        if grow_voxels:
            allowed = ndimage.binary_dilation(allowed, structure=structure, iterations=grow_voxels)
        class_probability = probabilities[value]
        claim = allowed & (class_probability >= threshold) & (class_probability > best)
        new_slice[claim] = value
        best[claim] = class_probability[claim]
    return new_slice


def interpolate_slices(
    labels: Any,
    axis: int,
    start: int,
    end: int,
    label: int | None = None,
    *,
    spacing: Sequence[float] | None = None,
) -> Edit | None:
    """Fill the slices strictly between two annotated slices by shape interpolation.

    For each class k drawn on both slices, the signed distance to the class boundary is computed on each slice
    (:func:`scipy.ndimage.distance_transform_edt`; negative inside, in mm when ``spacing`` is given) and blended
    linearly along ``axis``: slice ``i`` gets ``(1 - t) * d_start + t * d_end`` with ``t = (i - start) / (end -
    start)``, and class k where that is below 0. The shape thus morphs from the one slice to the other (a small disk
    to a large one grows steadily; a shifted disk slides). This is the standard shape-based interpolation of ITK-SNAP
    and 3D Slicer.

    On the slices in between, the old voxels of each interpolated class are cleared to background and the
    interpolated shapes written (over any class); where shapes of several classes overlap, the class the voxel lies
    deepest in (most negative distance) wins. Classes on only one of the two slices are not interpolated and are
    left as they are; the edit's description names them.

    Args:
        labels: ``(z, y, x)`` integer labels, 0 = background. Not modified.
        axis: The slice axis.
        start: One annotated slice along ``axis``.
        end: The other annotated slice (either order); at least 2 slices from ``start``.
        label: Interpolate only this class (it must be on both slices); None interpolates every class that is on
            both slices.
        spacing: Optional voxel size in mm for each axis of ``labels``; the two in-plane sizes weigh the distances
            (matters only for anisotropic pixels). None uses voxel units.

    Returns:
        The edit that writes the slices in between, or None when they already hold the result.

    Raises:
        ValueError: Labels that are not 3D integers, an axis or slice index out of range, slices less than 2 apart,
            a label not on both slices, no class on both slices, or an invalid spacing.
    """
    labels = check_labels(labels, ndims=(3,), purpose="slice interpolation")
    axis = check_axis(axis, labels.ndim)
    start = check_slice_index(start, labels.shape[axis], name="start")
    end = check_slice_index(end, labels.shape[axis], name="end")
    start, end = min(start, end), max(start, end)
    if end - start < 2:
        raise ValueError(
            f"start and end (slices {start} and {end}) have no slice strictly between them; pick two annotated "
            "slices at least 2 apart"
        )
    in_plane = _in_plane_spacing(spacing, labels.ndim, axis)
    first, last = labels[plane(axis, start, 3)], labels[plane(axis, end, 3)]
    classes, one_sided = _classes_on_both(first, last, start, end, label)

    between = np.moveaxis(labels, axis, 0)[start + 1 : end].copy()  # (n, *slice shape)
    fractions = ((np.arange(start + 1, end) - start) / (end - start)).astype(np.float32)[:, None, None]
    deepest = np.full(between.shape, np.inf, np.float32)
    for value in classes:
        between[between == value] = 0
    for value in classes:
        distance_first = _signed_distance(first == value, in_plane)
        distance_last = _signed_distance(last == value, in_plane)
        blended = (1 - fractions) * distance_first + fractions * distance_last
        claim = (blended < 0) & (blended < deepest)
        between[claim] = value
        deepest[claim] = blended[claim]

    description = f"interpolate {_names(classes)} between slices {start} and {end} along axis {axis}"
    if one_sided:
        description += f" (not interpolated, on one slice only: {_names(one_sided)})"
    region = slab(labels.shape, axis, start + 1, end)
    return edit_in_region(labels, region, np.moveaxis(between, 0, axis), description)


def _classes_on_both(
    first: np.ndarray, last: np.ndarray, start: int, end: int, label: Any
) -> tuple[list[int], list[int]]:
    """The classes to interpolate and the classes on only one of the two slices."""
    on_first, on_last = set(present_classes(first)), set(present_classes(last))
    if label is not None:
        label = check_class_label(label)
        missing = [index for index, present in ((start, on_first), (end, on_last)) if label not in present]
        if missing:
            raise ValueError(
                f"label {label} is not drawn on slice {' and '.join(map(str, missing))}; draw it on both slices "
                f"{start} and {end} before interpolating"
            )
        return [label], []
    both = sorted(on_first & on_last)
    if not both:
        raise ValueError(
            f"no class is drawn on both slices {start} (classes {sorted(on_first) or 'none'}) and {end} (classes "
            f"{sorted(on_last) or 'none'}); draw the structure on both slices before interpolating"
        )
    return both, sorted(on_first ^ on_last)


def _names(classes: Sequence[int]) -> str:
    return ("label " if len(classes) == 1 else "labels ") + ", ".join(map(str, classes))


def _in_plane_spacing(spacing: Sequence[float] | None, ndim: int, axis: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = checked_spacing(spacing, ndim, axes="one per axis of the labels, array order")
    return tuple(v for dim, v in enumerate(values) if dim != axis)


def _signed_distance(mask: np.ndarray, sampling: tuple[float, ...] | None) -> np.ndarray:
    """``(*slice shape)`` signed distance to the boundary of ``mask``: negative inside, positive outside.

    The slice is padded with one background pixel, so a mask that fills the slice still has a boundary.
    """
    padded = np.pad(mask, 1)
    inside = ndimage.distance_transform_edt(padded, sampling=sampling)
    outside = ndimage.distance_transform_edt(~padded, sampling=sampling)
    return (outside - inside)[1:-1, 1:-1].astype(np.float32)
