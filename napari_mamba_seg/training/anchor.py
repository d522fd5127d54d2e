"""Where the fine-tune's anchor must not rehearse the parent: the places its corrections showed it wrong.

The anchor (``FineTuneSettings.anchor``) shows the model its parent's own prediction on the unreviewed slices, so that
a few corrections do not shift the whole study. But the parent tends to repeat an error over neighbouring slices: a
muscle taken for tumour on the corrected slice is taken for tumour on the ten slices beside it too. Rehearsing those
slices teaches the error back, against the one corrected slice, and the anchor wins. So on each unreviewed slice the
anchor leaves out (does not trust) the in-plane positions where the nearest training slice was corrected, grown by
``margin`` pixels:

- *within* ``reach`` slices of that training slice, every corrected position (foreground added or removed: the
  lesion's shape there is the correction's to teach);
- *beyond* it, the positions where a false foreground was removed and the parent still predicts foreground (it
  repeats the call the clinician undid); an addition does not reach that far, since a lesion ends.

Only training slices count: the held-out slices' corrections stay unseen, so that they judge the fine-tune fairly.

The margin and the reach are distances in the body, 3 mm and 20 mm (:func:`defer_extent` turns them into pixels and
slices with the study's spacing): 3 pixels and 6 slices on the 0.98 × 0.98 × 3.27 mm sarcoma studies they were tuned
on, 4 pixels and 20 slices on a 0.7 × 0.7 × 1 mm breast MRI. Without a spacing they are 3 pixels and 6 slices.
On issue 7's protocol (BENCHMARKS.md) this took the one case below 0.70 Dice from a gain of +0.061 to +0.181 (its
false tumour in the muscle next to the corrected slice, repeated over 15 slices, is no longer rehearsed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.interactive.uncertainty import slices_within

__all__ = [
    "DEFER_MARGIN",
    "DEFER_MARGIN_MM",
    "DEFER_REACH",
    "DEFER_REACH_MM",
    "defer_extent",
    "deferred_to_corrections",
]

DEFER_MARGIN_MM = 3.0
"""Distance in mm by which a corrected region grows (in-plane) where the anchor defers to it."""

DEFER_REACH_MM = 20.0
"""Distance in mm from a training slice (along the review axis) over which every one of its corrected positions is
deferred to."""

DEFER_MARGIN = 3
"""The margin in pixels when the study has no spacing."""

DEFER_REACH = 6
"""The reach in slices when the study has no spacing."""


def defer_extent(
    spacing: Sequence[float] | None,
    axis: int,
    *,
    margin_mm: float = DEFER_MARGIN_MM,
    reach_mm: float = DEFER_REACH_MM,
) -> tuple[int, int]:
    """The ``(margin in pixels, reach in slices)`` of :func:`deferred_to_corrections` for a study's voxel size.

    The margin is ``margin_mm`` over the mean in-plane spacing, rounded; the reach is the number of whole slices
    within ``reach_mm`` (a slice counts when its centre is within reach). Without a spacing:
    ``(DEFER_MARGIN, DEFER_REACH)``.

    Args:
        spacing: Voxel size in mm per spatial axis (array order), or None.
        axis: The review axis.
        margin_mm: The margin in mm, >= 0.
        reach_mm: The reach in mm, >= 0.

    Raises:
        ValueError: A negative distance, a spacing that is not positive and finite, or an axis out of range.
    """
    if margin_mm < 0 or reach_mm < 0:
        raise ValueError(f"margin_mm and reach_mm must be >= 0, got {margin_mm} and {reach_mm}")
    if spacing is None:
        return DEFER_MARGIN, DEFER_REACH
    spacing = checked_spacing(spacing, (2, 3))
    if not -len(spacing) <= axis < len(spacing):
        raise ValueError(f"axis {axis} is out of range for a {len(spacing)}D spacing")
    axis %= len(spacing)
    in_plane = [s for a, s in enumerate(spacing) if a != axis]
    margin = round(margin_mm / float(np.mean(in_plane)))
    reach = slices_within(reach_mm, spacing, axis)
    return margin, reach


def deferred_to_corrections(
    labels: np.ndarray,
    predicted: np.ndarray,
    axis: int,
    train_slices: Sequence[int],
    unreviewed: Sequence[int],
    *,
    margin: int = DEFER_MARGIN,
    reach: int = DEFER_REACH,
) -> np.ndarray:
    """The voxels of the unreviewed slices where the anchor defers to the corrections (see the module's docstring).

    Args:
        labels: ``(*spatial)`` the corrected labels (trusted on ``train_slices``).
        predicted: ``(*spatial)`` the parent's prediction (the anchor's labels).
        axis: The review axis (slices are taken along it).
        train_slices: The reviewed slices the fine-tune trains on (not the held-out ones).
        unreviewed: The slices the anchor covers.
        margin: Pixels by which each corrected region grows (in-plane), >= 0 (:func:`defer_extent` gives it for a
            distance in mm).
        reach: Slices from a training slice within which every corrected position is deferred, >= 0 (likewise).

    Returns:
        ``(*spatial)`` bool, True where the anchor must not count; False on every slice not in ``unreviewed``. A slice
        as far from two training slices takes both into account.

    Raises:
        ValueError: Shapes that differ, or a negative ``margin`` or ``reach``.
    """
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and prediction {predicted.shape} must have one shape")
    if margin < 0 or reach < 0:
        raise ValueError(f"margin and reach must be >= 0, got {margin} and {reach}")
    labels_, predicted_ = np.moveaxis(labels, axis, 0), np.moveaxis(predicted, axis, 0)
    deferred = np.zeros(labels_.shape, bool)
    if not len(train_slices):
        return np.moveaxis(deferred, 0, axis)
    corrected = {t: labels_[t] != predicted_[t] for t in train_slices}
    changed = {t: _grown(corrected[t], margin) for t in train_slices}
    removed = {t: _grown(corrected[t] & (predicted_[t] != 0), margin) for t in train_slices}
    for s in unreviewed:
        distance = min(abs(t - s) for t in train_slices)
        for t in (t for t in train_slices if abs(t - s) == distance):
            deferred[s] |= changed[t] if distance <= reach else removed[t] & (predicted_[s] != 0)
    return np.moveaxis(deferred, 0, axis)


def _grown(mask: np.ndarray, margin: int) -> np.ndarray:
    """``mask`` dilated by ``margin`` pixels (4-connected steps)."""
    return ndimage.binary_dilation(mask, iterations=margin) if margin and mask.any() else mask
