"""Linear resampling between voxel grids: an image to the spacing a model was trained at, and its class
probabilities back to the image's grid.

Grid convention (the one of ``torch.nn.functional.interpolate(..., align_corners=False)``, scikit-image's
``resize`` and nnU-Net): a grid of ``n`` voxels resampled to ``m`` voxels keeps the extent of the image, so output
voxel ``j`` samples the input at index ``(j + 0.5) * n / m - 0.5``, linearly interpolated, clamped to the first and
last voxel at the borders. An axis whose size does not change is copied exactly. Resampling there and back with
the same two shapes is therefore consistent, and the output of a prediction always has the input's shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resample_to_shape", "resampled_shape"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """The grid shape of an image of ``shape`` voxels at ``spacing`` resampled to ``target_spacing``.

    Args:
        shape: Spatial shape.
        spacing: Voxel size along each axis (mm).
        target_spacing: Voxel size to resample to (mm), same length.

    Returns:
        ``round(n * spacing / target_spacing)`` per axis, at least 1.
    """
    if not len(shape) == len(spacing) == len(target_spacing):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target spacing must have equal lengths")
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing, strict=True))


def resample_to_shape(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample every channel of ``array`` linearly to the spatial ``shape`` (see the module docstring).

    Args:
        array: ``(C, *spatial)`` with 1 to 3 spatial axes, any real dtype.
        shape: Target spatial shape, same number of axes.

    Returns:
        ``(C, *shape)`` float32; ``array`` itself when it is float32 and already has that shape.
    """
    shape = tuple(int(s) for s in shape)
    spatial = array.shape[1:]
    if len(shape) != len(spatial) or len(shape) not in _MODES:
        raise ValueError(f"cannot resample an array of shape {array.shape} to spatial shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"target shape {shape} has an empty axis")
    if shape == spatial and array.dtype == np.float32:
        return array
    out = np.empty((array.shape[0], *shape), dtype=np.float32)
    for channel in range(array.shape[0]):  # one channel at a time keeps the peak memory at one channel
        source = torch.from_numpy(np.ascontiguousarray(array[channel], dtype=np.float32))[None, None]
        resampled = F.interpolate(source, size=shape, mode=_MODES[len(shape)], align_corners=False)
        out[channel] = resampled[0, 0].numpy()
    return out
