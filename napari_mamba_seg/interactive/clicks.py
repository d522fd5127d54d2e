"""Click refinement of label arrays from the model's class probabilities (numpy + scipy only).

The caller computes the probabilities with the model (``Predictor.predict(..., return_probabilities=True)``) and
passes the clicks of a napari Points layer; :func:`refine_with_clicks` returns the
:class:`~napari_mamba_seg.interactive.Edit` to apply. No model is called here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from napari_mamba_seg.interactive._checks import (
    check_class_in_probabilities,
    check_class_label,
    check_labels,
    check_probabilities,
    check_probability_values,
    check_slice_axis,
    check_threshold,
    full_connectivity,
    plane,
)
from napari_mamba_seg.interactive.edits import Edit

__all__ = ["DEFAULT_MIN_CLICK_PROBABILITY", "refine_with_clicks"]

DEFAULT_MIN_CLICK_PROBABILITY = 0.05
"""Below this probability at a positive click, the model gives no support: only the clicked voxel is added."""


def refine_with_clicks(
    labels: Any,
    probabilities: Any,
    positive: Any,
    negative: Any,
    label: int,
    *,
    axis: int | None = None,
    threshold: float = 0.5,
    min_probability: float = DEFAULT_MIN_CLICK_PROBABILITY,
) -> Edit | None:
    """Add the model's region of ``label`` at positive clicks, remove the drawn region of ``label`` at negative ones.

    Clicks are voxel coordinates in array order (floats from a napari Points layer's ``data`` in data coordinates);
    each is rounded to the nearest voxel. With ``axis`` given, every region is taken in the click's own 2D slice
    along ``axis``; otherwise in 3D (in the image for 2D labels). Components are fully connected (8 in 2D, 26 in
    3D).

    Positive click, with ``p`` the probability of ``label`` at the click: the connected region of voxels whose
    probability of ``label`` is >= ``threshold`` that contains the click becomes ``label`` (over any class). When
    ``p < threshold`` (the model missed it), the region is grown from the click with the lower threshold ``p / 2``:
    the connected voxels at least half as likely as the clicked one. When ``p < min_probability`` the model gives no
    support there and only the clicked voxel is set (the description says so; draw it with the brush instead).

    Negative click (applied after every positive one): the connected component of ``label`` containing the click
    becomes background. A negative click on a voxel that is not ``label`` changes nothing (the description says so).
    A negative click whose component holds a positive click is a contradiction and raises an error.

    Args:
        labels: ``(z, y, x)`` or ``(y, x)`` integer labels, 0 = background. Not modified.
        probabilities: ``(num_classes, *labels.shape)`` softmax probabilities, channel 0 = background.
        positive: ``(n, labels.ndim)`` coordinates (array or list of points) of the positive clicks; may be empty.
        negative: ``(m, labels.ndim)`` coordinates of the negative clicks; may be empty.
        label: The class to refine (> 0, with a probability channel).
        axis: Work in the click's 2D slice along this axis (3D labels only); None works in 3D.
        threshold: Probability from which the model counts a voxel as ``label``, in (0, 1].
        min_probability: Below this probability at a positive click only the clicked voxel is added, in (0, 1].

    Returns:
        The edit, or None when the clicks change nothing (or there are none).

    Raises:
        ValueError: Non-integer labels, probabilities of the wrong shape, dtype or values, a bad label, axis or
            threshold, a click with the wrong number of coordinates or outside the labels (the message names it),
            or a negative click that would remove a positive click's region.
    """
    labels = check_labels(labels)
    probabilities = check_probabilities(probabilities, [labels.shape], purpose="click refinement")
    label = check_class_label(label, dtype=labels.dtype)
    check_class_in_probabilities(label, probabilities)
    axis = check_slice_axis(axis, labels)
    threshold = check_threshold(threshold)
    min_probability = check_threshold(min_probability, name="min_probability")
    positive_voxels = _click_voxels(positive, labels.shape, "positive")
    negative_voxels = _click_voxels(negative, labels.shape, "negative")

    class_probability = probabilities[label]
    result = labels.copy()
    notes = []
    for number, voxel in enumerate(positive_voxels):
        region, note = _positive_region(class_probability, voxel, axis, threshold, min_probability)
        result[region] = label
        if note:
            notes.append(f"positive click {number}: {note}")
    for number, voxel in enumerate(negative_voxels):
        if result[voxel] != label:
            notes.append(f"negative click {number} is not on label {label}: ignored")
            continue
        region = _component_at(result == label, voxel, axis)
        for positive_number, positive_voxel in enumerate(positive_voxels):
            if region[positive_voxel]:
                raise ValueError(
                    f"negative click {number} at {voxel} would remove the region of positive click {positive_number} "
                    f"at {positive_voxel} (they are in one connected region of label {label}); move or delete one of "
                    "the two clicks"
                )
        result[region] = 0

    where = f" in slices along axis {axis}" if axis is not None else ""
    description = f"clicks on label {label}{where}: {len(positive_voxels)} positive, {len(negative_voxels)} negative"
    if notes:
        description += " (" + "; ".join(notes) + ")"
    return Edit.between(labels, result, description)


def _click_voxels(points: Any, shape: tuple[int, ...], kind: str) -> list[tuple[int, ...]]:
    """Round click coordinates to voxel indices; refuse clicks that are not points of ``shape``'s grid."""
    if points is None:
        return []
    expected = (
        f"{kind} clicks must be a list of points with {len(shape)} coordinates each (array order, like the labels of "
        f"shape {shape})"
    )
    try:
        array = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{expected}, got {points!r}") from error
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != len(shape):
        raise ValueError(f"{expected}, got an array of shape {array.shape}")
    voxels = []
    for number, point in enumerate(array):
        voxel = np.floor(point + 0.5)
        if not np.all(np.isfinite(point)) or np.any(voxel < 0) or np.any(voxel >= shape):
            raise ValueError(
                f"{kind} click {number} at {tuple(float(c) for c in point)} is outside the labels of shape {shape}; "
                "delete it or click inside the image (in the layer's data coordinates)"
            )
        voxels.append(tuple(int(c) for c in voxel))
    return voxels


def _positive_region(
    class_probability: np.ndarray,
    voxel: tuple[int, ...],
    axis: int | None,
    threshold: float,
    min_probability: float,
) -> tuple[np.ndarray | tuple[int, ...], str]:
    """The voxels a positive click adds (a full-size bool mask, or the click's index) and a note for the user."""
    probability = float(class_probability[voxel])
    check_probability_values(np.array([probability]), purpose=f"the click at {voxel}")
    if probability >= threshold:
        return _component_at(class_probability >= threshold, voxel, axis), ""
    if probability < min_probability:
        return voxel, f"probability {probability:.3g} below {min_probability:g}, only the clicked voxel added"
    lowered = probability / 2
    region = _component_at(class_probability >= lowered, voxel, axis)
    return region, f"probability {probability:.3g} below the threshold, grown with threshold {lowered:.3g}"


def _component_at(mask: np.ndarray, voxel: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Full-size bool mask of the fully connected component of ``mask`` holding ``voxel`` (in its slice if axis).

    ``mask[voxel]`` must be True.
    """
    region = np.zeros(mask.shape, bool)
    if axis is None:
        index: tuple[Any, ...] = (slice(None),) * mask.ndim
        local = voxel
    else:
        index = plane(axis, voxel[axis], mask.ndim)
        local = tuple(c for dim, c in enumerate(voxel) if dim != axis)
    part = mask[index]
    components, _ = ndimage.label(part, structure=full_connectivity(part.ndim))
    region[index] = components == components[local]
    return region
