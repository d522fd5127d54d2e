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
On issue 7's protocol (BENCHMARKS.md) this took the one case below 0.70 Dice from a gain of +0.061 to +0.181 (its
false tumour in the muscle next to the corrected slice, repeated over 15 slices, is no longer rehearsed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["DEFER_MARGIN", "DEFER_REACH", "deferred_to_corrections"]

DEFER_MARGIN = 3
"""Pixels by which a corrected region grows where the anchor defers to it."""

DEFER_REACH = 6
"""Slices from a training slice over which every one of its corrected positions is deferred to."""


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
        margin: Pixels by which each corrected region grows (in-plane), >= 0.
        reach: Slices from a training slice within which every corrected position is deferred, >= 0.

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
