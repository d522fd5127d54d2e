"""Intensity normalisation of an image before prediction, as a model card's ``normalization`` dict says.

Schema (``ModelCard.normalization``; an empty dict means ``{"method": "zscore"}``):

* ``{"method": "zscore"}``: per channel, subtract the mean and divide by the standard deviation over the whole
  image. With ``"mask": "nonzero"`` the statistics come from the nonzero voxels only and the zero voxels stay 0
  (nnU-Net's convention for images with a zero background).
* ``{"method": "percentile", "lower": 0.5, "upper": 99.5}``: per channel, clip to the ``lower`` and ``upper``
  percentiles (0 to 100) and rescale that range to [0, 1]. ``"mask": "nonzero"`` takes the percentiles over the
  nonzero voxels. The percentiles are exact (``np.percentile`` on a float32 copy of one channel: one extra channel
  of memory, about 0.2 GB for a 52 M-voxel channel; no subsampling).
* ``{"method": "none"}``: only the conversion to float32.

A constant channel (no spread to normalise by) becomes zeros, never NaN. Everything is computed channel by
channel in float32 (statistics accumulated in float64 in chunks), so the peak memory is the float32 output plus
about one channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["NORMALIZATION_METHODS", "check_normalization", "normalize_channel", "normalize_image"]

NORMALIZATION_METHODS: dict[str, dict[str, Any]] = {
    "zscore": {"mask": None},
    "percentile": {"lower": 0.5, "upper": 99.5, "mask": None},
    "none": {},
}
"""Each method with its optional keys and their defaults."""

MASKS = (None, "nonzero")
_CHUNK = 1 << 18  # elements per chunk of the float64 statistics (2 MB of float64)


def check_normalization(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a normalisation dict and fill in the defaults.

    Args:
        spec: A card's ``normalization`` dict; None or ``{}`` means z-score.

    Returns:
        A new dict with ``"method"`` and every key of that method, e.g.
        ``{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": None}``.

    Raises:
        ValueError: Unknown method or key, or an invalid value; the message lists the valid ones.
    """
    spec = dict(spec or {})
    method = spec.pop("method", "zscore")
    if method not in NORMALIZATION_METHODS:
        raise ValueError(
            f"Unknown normalisation method {method!r}; valid methods: {', '.join(NORMALIZATION_METHODS)} "
            '(e.g. {"method": "percentile", "lower": 0.5, "upper": 99.5})'
        )
    defaults = NORMALIZATION_METHODS[method]
    unknown = sorted(set(spec) - set(defaults))
    if unknown:
        valid = ", ".join(["method", *defaults])
        raise ValueError(f"Unknown key(s) {unknown} for normalisation method {method!r}; valid keys: {valid}")
    checked = {"method": method, **defaults, **spec}
    if checked.get("mask") not in MASKS:
        raise ValueError(f"normalisation 'mask' must be null (all voxels) or 'nonzero', got {checked['mask']!r}")
    if method == "percentile":
        lower, upper = checked["lower"], checked["upper"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lower, upper)):
            raise ValueError(f"percentile 'lower' and 'upper' must be numbers, got {lower!r} and {upper!r}")
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentile bounds must satisfy 0 <= lower < upper <= 100, got {lower} and {upper}")
    return checked


def normalize_image(image: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    """Normalise every channel of an image.

    Args:
        image: ``(C, *spatial)``, any real dtype. Never modified.
        spec: The normalisation dict (see the module docstring).

    Returns:
        ``(C, *spatial)`` float32. For ``"none"`` on a float32 input this is ``image`` itself.
    """
    spec = check_normalization(spec)
    if spec["method"] == "none" and image.dtype == np.float32:
        return image
    out = np.empty(image.shape, dtype=np.float32)
    for channel in range(image.shape[0]):
        normalize_channel(image[channel], spec, out=out[channel])
    return out


def normalize_channel(
    channel: np.ndarray, spec: Mapping[str, Any] | None, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Normalise one channel.

    Args:
        channel: ``(*spatial)``, any real dtype. Never modified.
        spec: The normalisation dict (see the module docstring).
        out: ``(*spatial)`` float32 array to write into; a new one when None.

    Returns:
        ``out``: ``(*spatial)`` float32.
    """
    spec = check_normalization(spec)
    if out is None:
        out = np.empty(channel.shape, dtype=np.float32)
    out[...] = channel
    mask = out != 0 if spec.get("mask") == "nonzero" else None
    if spec["method"] == "zscore":
        _zscore_in_place(out, mask)
    elif spec["method"] == "percentile":
        _percentile_in_place(out, mask, spec["lower"], spec["upper"])
    return out


def _zscore_in_place(values: np.ndarray, mask: np.ndarray | None) -> None:
    sample = values if mask is None else values[mask]
    if sample.size == 0 or sample.min() == sample.max():  # nothing to scale by: all zeros, never NaN
        values[...] = 0
        return
    mean, std = _mean_std(sample.reshape(-1))
    values -= np.float32(mean)
    values /= np.float32(std)
    if mask is not None:
        values[~mask] = 0


def _mean_std(flat: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of a 1D array, in float64 chunk by chunk (no full float64 copy)."""
    total = 0.0
    for begin in range(0, flat.size, _CHUNK):
        total += float(np.sum(flat[begin : begin + _CHUNK], dtype=np.float64))
    mean = total / flat.size
    squares = 0.0
    for begin in range(0, flat.size, _CHUNK):
        deviation = flat[begin : begin + _CHUNK].astype(np.float64)
        deviation -= mean
        squares += float(np.dot(deviation, deviation))
    return mean, (squares / flat.size) ** 0.5


def _percentile_in_place(values: np.ndarray, mask: np.ndarray | None, lower: float, upper: float) -> None:
    sample = values.reshape(-1).copy() if mask is None else values[mask]
    if sample.size == 0:
        values[...] = 0
        return
    low, high = (float(v) for v in np.percentile(sample, [lower, upper], overwrite_input=True))
    del sample
    if not high > low:  # constant (or almost everywhere constant) channel
        values[...] = 0
        return
    np.clip(values, low, high, out=values)
    values -= np.float32(low)
    values /= np.float32(high - low)
