"""One check for voxel spacings, shared by every part that takes one (no napari, no torch).

A spacing is the voxel size in mm along each array axis. Whatever a user hands in (a tuple, a list, a numpy array,
a layer's ``scale``) must be one finite, positive number per axis: a zero divides, a NaN compares false with
everything (so a bare ``min(spacing) <= 0`` lets it through) and a string iterates as characters.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

__all__ = ["checked_spacing"]


def checked_spacing(
    spacing: Any, ndim: int | Collection[int], *, name: str = "spacing", axes: str = "one per spatial axis, array order"
) -> tuple[float, ...]:
    """The spacing as a tuple of floats, or a ValueError that names what is wrong and what is expected.

    Args:
        spacing: Voxel sizes in mm, one per axis.
        ndim: The number of axes expected, or the numbers allowed (e.g. ``(2, 3)``).
        name: How the error names the value, e.g. ``"case 'STS_004': spacing"``.
        axes: What the error says the values are one of, e.g. ``"z, y, x"``.

    Returns:
        ``ndim`` floats, each finite and > 0.

    Raises:
        ValueError: Not a sequence of numbers, the wrong count, or a value that is not finite and positive.
    """
    allowed = (ndim,) if isinstance(ndim, int) else tuple(sorted(ndim))
    expected = " or ".join(map(str, allowed))
    problem = f"{name} must be {expected} positive finite voxel sizes in mm ({axes}), got {spacing!r}"
    if isinstance(spacing, (str, bytes)):
        raise ValueError(problem)
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if len(values) not in allowed or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(problem)
    return values
