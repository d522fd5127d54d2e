"""Segmentation metrics on label maps: per-class Dice and the 95th percentile Hausdorff distance (HD95).

Conventions for empty masks (the usual ones, e.g. nnU-Net's and medpy's):

* Dice of a class absent from both prediction and reference: ``nan`` (undefined; average with ``np.nanmean``).
  Present in one of them only: 0.
* HD95 when both masks are empty: ``nan``; when exactly one is empty: ``inf``.

This module imports numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from napari_mamba_seg._spacing import checked_spacing

__all__ = ["confusion_matrix", "dice_per_class", "hd95", "surface_distances"]


def confusion_matrix(
    prediction: np.ndarray, target: np.ndarray, num_classes: int, ignore: np.ndarray | None = None
) -> np.ndarray:
    """Voxel counts ``[predicted class, reference class]``.

    Args:
        prediction: ``(*spatial)`` integer labels in ``[0, num_classes)``.
        target: ``(*spatial)`` integer labels, same shape.
        num_classes: Number of classes, background included.
        ignore: ``(*spatial)`` bool: True for voxels left out (e.g. untrusted); None = none.

    Returns:
        ``(num_classes, num_classes)`` int64.

    Raises:
        ValueError: Shapes differ, or labels outside ``[0, num_classes)``.
    """
    prediction, target = np.asarray(prediction), np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} must have the same shape")
    if ignore is not None:
        ignore = np.asarray(ignore, dtype=bool)
        if ignore.shape != target.shape:
            raise ValueError(f"ignore mask {ignore.shape} must have the labels' shape {target.shape}")
        keep = ~ignore
        prediction, target = prediction[keep], target[keep]
    prediction = prediction.reshape(-1).astype(np.int64)
    target = target.reshape(-1).astype(np.int64)
    for name, values in (("prediction", prediction), ("target", target)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{values.min()}, {values.max()}]")
    counts = np.bincount(prediction * num_classes + target, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def dice_per_class(
    prediction: np.ndarray, target: np.ndarray, num_classes: int, ignore: np.ndarray | None = None
) -> np.ndarray:
    """Dice ``2 |P ∩ T| / (|P| + |T|)`` of every class, background included.

    Args:
        prediction: ``(*spatial)`` integer labels.
        target: ``(*spatial)`` integer reference labels.
        num_classes: Number of classes, background included.
        ignore: ``(*spatial)`` bool: True for voxels left out of the counts; None = none.

    Returns:
        ``(num_classes,)`` float64; ``nan`` for a class absent from both (see the module docstring).
    """
    counts = confusion_matrix(prediction, target, num_classes, ignore)
    overlap = np.diag(counts).astype(np.float64)
    sizes = counts.sum(axis=1) + counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2 * overlap / np.maximum(sizes, 1), np.nan)


def surface_distances(mask: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``mask`` to the nearest surface voxel of ``reference``.

    A surface voxel is a voxel of the mask with at least one face neighbour (6-connectivity in 3D, 4 in 2D) outside
    the mask or outside the array. Distances are between voxel centres, with the spacing.

    Args:
        mask: ``(*spatial)`` bool, not empty.
        reference: ``(*spatial)`` bool, not empty.
        spacing: Voxel size per axis (mm); None = 1.

    Returns:
        1D float64, one distance per surface voxel of ``mask``.
    """
    mask, reference = np.asarray(mask, dtype=bool), np.asarray(reference, dtype=bool)
    sampling = _sampling(spacing, mask.ndim)
    to_reference = ndimage.distance_transform_edt(~_surface(reference), sampling=sampling)
    return to_reference[_surface(mask)]


def hd95(
    prediction_mask: np.ndarray,
    target_mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    percentile: float = 95.0,
) -> float:
    """The 95th percentile of the symmetric surface distances (mm) between two masks.

    The surface distances from the prediction to the target and from the target to the prediction (see
    :func:`surface_distances`) are pooled and their ``percentile`` taken (medpy's definition).

    Args:
        prediction_mask: ``(*spatial)`` bool (or 0/1).
        target_mask: ``(*spatial)`` bool, same shape.
        spacing: Voxel size per axis in mm (array order); None = 1 (distances in voxels).
        percentile: 95 for HD95, 100 for the Hausdorff distance.

    Returns:
        The distance in mm; ``nan`` when both masks are empty, ``inf`` when exactly one is.
    """
    prediction_mask, target_mask = np.asarray(prediction_mask, dtype=bool), np.asarray(target_mask, dtype=bool)
    if prediction_mask.shape != target_mask.shape:
        raise ValueError(f"masks must have the same shape, got {prediction_mask.shape} and {target_mask.shape}")
    has_prediction, has_target = bool(prediction_mask.any()), bool(target_mask.any())
    if not has_prediction and not has_target:
        return float("nan")
    if not has_prediction or not has_target:
        return float("inf")
    distances = np.concatenate(
        [
            surface_distances(prediction_mask, target_mask, spacing),
            surface_distances(target_mask, prediction_mask, spacing),
        ]
    )
    return float(np.percentile(distances, percentile))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _sampling(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    return checked_spacing(spacing, ndim)
