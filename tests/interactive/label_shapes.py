"""Synthetic shapes with known sizes for the interactive-tool tests (numpy only)."""

from __future__ import annotations

import numpy as np

from napari_mamba_seg.interactive import Edit


def disk(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """``shape`` bool: True within ``radius`` (Euclidean, in pixels) of ``center``."""
    y, x = np.indices(shape)
    return (y - center[0]) ** 2 + (x - center[1]) ** 2 <= radius**2


def ball(shape: tuple[int, int, int], center: tuple[float, float, float], radius: float) -> np.ndarray:
    """``shape`` bool: True within ``radius`` (in voxels) of ``center``."""
    z, y, x = np.indices(shape)
    return (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2 <= radius**2


def applied(labels: np.ndarray, edit: Edit | None) -> np.ndarray:
    """A copy of ``labels`` with ``edit`` applied (the copy unchanged when the edit is None)."""
    result = labels.copy()
    if edit is not None:
        edit.apply(result)
    return result
