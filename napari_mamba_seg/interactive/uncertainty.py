"""Which slice to review next: the model's own estimate of how many voxels it got wrong on each slice (numpy only).

A model that says a voxel is class k with probability p expects to be wrong there with probability ``1 - p``. Summed
over a slice, ``1 - max_k p_k`` is the number of wrong voxels the model expects on that slice (least-confidence
sampling, the simplest rule of active learning). Reviewing the slices in that order, highest first, brings the
reviewer to the slices that need the most correction before the ones that need none: `benchmarks/review_order.py`
measures how much of the real error the first slices cover, against going through the slices in order.

Example:
    >>> probabilities = np.zeros((2, 3, 4, 4), np.float32)
    >>> probabilities[0] = 1.0                      # certain background everywhere ...
    >>> probabilities[:, 1, :2, :2] = 0.5           # ... except 4 voxels of slice 1, a coin toss
    >>> expected_errors_per_slice(probabilities, axis=0).tolist()
    [0.0, 2.0, 0.0]
    >>> most_uncertain_unreviewed(ReviewState(0, 3, {1}), [0.0, 2.0, 0.5])
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.interactive._checks import check_axis
from napari_mamba_seg.interactive.review import ReviewState

__all__ = [
    "DEFAULT_SPREAD_MM",
    "SPREAD_FLOOR",
    "expected_errors_per_slice",
    "most_uncertain_unreviewed",
    "review_order",
    "slices_within",
]


DEFAULT_SPREAD_MM = 10.0
"""The Correct widget's spread: "Most uncertain" first looks more than 10 mm away from the reviewed slices.

Measured (BENCHMARKS.md, mr-tumour's 7 validation cases, 3 slices corrected then a fine-tune): by expected errors
alone the 3 slices were neighbours and the fine-tune gained +0.020 Dice; spread by 10 mm, +0.058; by 20 mm, +0.042."""

SPREAD_FLOOR = 0.1
"""A slice farther than ``spread`` from the chosen ones goes first only with at least this share of the highest
expected errors of the unreviewed slices."""


def expected_errors_per_slice(probabilities: Any, axis: int) -> np.ndarray:
    """The number of wrong voxels the model expects on each slice along ``axis``.

    Args:
        probabilities: ``(K, *spatial)`` class probabilities (each voxel's K values sum to 1), e.g.
            ``Prediction.probabilities``.
        axis: The slice axis, counted over the spatial axes (0 = the first spatial axis).

    Returns:
        ``(spatial[axis],)`` float64: per slice, the sum over its voxels of ``1 - max_k p_k``.

    Raises:
        ValueError: Not a ``(K, *spatial)`` array of at least 2 classes and 2 spatial axes, values outside [0, 1]
            or not finite, or ``axis`` out of range.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 3 or probabilities.shape[0] < 2 or probabilities.dtype.kind != "f":
        raise ValueError(
            "probabilities must be a float (K, *spatial) array with K >= 2 classes and 2 or 3 spatial axes (the "
            f"model's softmax, channels first), got shape {probabilities.shape} and dtype {probabilities.dtype}"
        )
    spatial_ndim = probabilities.ndim - 1
    axis = check_axis(axis, spatial_ndim)
    confidence = probabilities.max(axis=0)
    if not np.isfinite(confidence).all() or confidence.min() < 0 or confidence.max() > 1 + 1e-3:
        raise ValueError("probabilities must be finite values in [0, 1] (a softmax), not logits or scores")
    doubt = 1.0 - np.clip(confidence, 0.0, 1.0, dtype=np.float64)
    other_axes = tuple(a for a in range(spatial_ndim) if a != axis)
    return doubt.sum(axis=other_axes)


def slices_within(distance_mm: float, spacing: Sequence[float] | None, axis: int) -> int:
    """How many whole slices along ``axis`` lie within ``distance_mm`` of a slice (for ``spread``).

    Args:
        distance_mm: A distance in mm, >= 0.
        spacing: Voxel size in mm per axis (array order); None counts the distance in slices.
        axis: The slice axis.

    Raises:
        ValueError: A negative or non-finite distance, a bad spacing or an axis out of range.
    """
    if not np.isfinite(distance_mm) or distance_mm < 0:
        raise ValueError(f"distance_mm must be a finite distance >= 0, got {distance_mm!r}")
    if spacing is None:
        return int(np.floor(distance_mm + 1e-6))
    spacing = checked_spacing(spacing, (2, 3))
    axis = check_axis(axis, len(spacing))
    return int(np.floor(distance_mm / spacing[axis] + 1e-6))


def review_order(review: ReviewState, expected_errors: Sequence[float] | np.ndarray, *, spread: int = 0) -> list[int]:
    """The unreviewed slices, the most expected errors first (ties: the lower index first).

    With ``spread`` > 0 the order also spreads out: a slice within ``spread`` slices of a reviewed slice or of a
    slice earlier in the order comes after every slice farther away, unless that slice's expected errors are below
    :data:`SPREAD_FLOOR` of the highest (a slice the model is sure of is not worth a look for being far away); the
    slices that come after keep the order of their expected errors. Neighbouring slices look alike, so their errors
    are alike: the first slices of a spread order show more kinds of error, and fine-tuning learns more from them
    (`benchmarks/finetune_protocol.py --choose uncertain --spread-mm`).

    Args:
        review: The review state; its reviewed slices are left out.
        expected_errors: ``(num_slices,)`` per-slice scores along ``review.axis``, e.g. from
            :func:`expected_errors_per_slice`.
        spread: How many slices on each side of a chosen or reviewed slice come later; 0 = by score alone.

    Returns:
        Slice indices, possibly empty (every slice reviewed).

    Raises:
        ValueError: ``expected_errors`` does not have one finite value per slice of ``review``, or a negative
            ``spread``.
    """
    scores = np.asarray(expected_errors, dtype=np.float64)
    if scores.shape != (review.num_slices,) or not np.isfinite(scores).all():
        raise ValueError(
            f"expected_errors must give one finite value per slice ({review.num_slices} along axis {review.axis}), "
            f"got shape {scores.shape}: compute it with expected_errors_per_slice(probabilities, axis={review.axis})"
        )
    if isinstance(spread, bool) or not isinstance(spread, (int, np.integer)) or spread < 0:
        raise ValueError(f"spread must be a whole number of slices >= 0, got {spread!r}")
    by_score = sorted(
        (index for index in range(review.num_slices) if index not in review.reviewed),
        key=lambda index: (-scores[index], index),
    )
    if spread == 0:
        return by_score
    floor = SPREAD_FLOOR * scores[by_score[0]] if by_score else 0.0
    near = np.zeros(review.num_slices, bool)
    first, later = [], []
    for index in review.reviewed:  # the reviewed slices push their neighbours back from the start
        near[max(0, index - spread) : index + spread + 1] = True
    for index in by_score:
        if near[index] or scores[index] < floor:
            later.append(index)
        else:
            first.append(index)
            near[max(0, index - spread) : index + spread + 1] = True
    return first + later


def most_uncertain_unreviewed(
    review: ReviewState, expected_errors: Sequence[float] | np.ndarray, *, spread: int = 0
) -> int | None:
    """The first slice of :func:`review_order`, or None when every slice is reviewed.

    With ``spread`` > 0: the unreviewed slice with the most expected errors among those more than ``spread`` slices
    away from every reviewed slice, unless all of those have less than :data:`SPREAD_FLOOR` of the most expected
    errors of any unreviewed slice (then that slice).

    Raises:
        ValueError: As :func:`review_order`.
    """
    order = review_order(review, expected_errors, spread=spread)
    return order[0] if order else None
