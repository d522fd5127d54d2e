"""Voxel grids of the phantom and smooth random fields on them.

Three grids share one field of view (all in mm, centred on the middle of the volume):

* the *acquisition* grid ``(z, y, x)`` with the configured shape and spacing (the output);
* the *fine* grid: the acquisition grid supersampled ``factor`` times in-plane (same slices), on which the
  tissue map is built and then averaged down (partial volume);
* the *coarse* grid: the acquisition grid with half the in-plane resolution, on which random fields with
  correlation lengths of millimetres are generated cheaply and then interpolated up.

Axes: ``z`` increases towards the head (superior), ``y`` towards the back (posterior), ``x`` towards the
patient's left, so array row 0 is anterior (where the prone breasts hang) and column 0 is the patient's right,
the radiological display of an axial slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

COARSE_PER_ACQUISITION = 2
"""In-plane acquisition voxels per coarse voxel."""


@dataclass(frozen=True)
class Grid:
    """The acquisition grid and its in-plane supersampled twin.

    Attributes:
        shape: Acquisition shape ``(z, y, x)``.
        spacing: Acquisition voxel size ``(z, y, x)`` in mm.
        factor: In-plane supersampling of the fine grid (1 = none).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    factor: int = 2

    @property
    def fov(self) -> tuple[float, float, float]:
        """Field of view ``(z, y, x)`` in mm."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))

    @property
    def fine_shape(self) -> tuple[int, int, int]:
        """Fine-grid shape ``(z, y * factor, x * factor)``."""
        return self.shape[0], self.shape[1] * self.factor, self.shape[2] * self.factor

    @property
    def fine_spacing(self) -> tuple[float, float, float]:
        """Fine voxel size ``(z, y, x)`` in mm."""
        return self.spacing[0], self.spacing[1] / self.factor, self.spacing[2] / self.factor

    @property
    def fine_voxel_ml(self) -> float:
        """Volume of one fine voxel in ml."""
        return float(np.prod(self.fine_spacing)) / 1000.0

    @property
    def coarse_shape(self) -> tuple[int, int, int]:
        """Coarse-grid shape: acquisition slices, in-plane halved (rounded up)."""
        c = COARSE_PER_ACQUISITION
        return self.shape[0], -(-self.shape[1] // c), -(-self.shape[2] // c)

    @property
    def coarse_spacing(self) -> tuple[float, float, float]:
        """Coarse voxel size ``(z, y, x)`` in mm."""
        c = COARSE_PER_ACQUISITION
        return self.spacing[0], self.spacing[1] * c, self.spacing[2] * c

    def axis_mm(self, axis: int, per_voxel: int = 1) -> np.ndarray:
        """Centred coordinates (mm) of the voxel centres along one axis.

        Args:
            axis: 0 (z), 1 (y) or 2 (x).
            per_voxel: Samples per acquisition voxel along this axis (1 = acquisition grid, ``factor`` = fine
                grid in-plane).

        Returns:
            ``(n * per_voxel,)`` float32 coordinates; the acquisition voxel ``j`` is centred at
            ``(j - (n - 1) / 2) * spacing``.
        """
        n, step = self.shape[axis], self.spacing[axis]
        index = (np.arange(n * per_voxel) + 0.5) / per_voxel - 0.5
        return ((index - (n - 1) / 2) * step).astype(np.float32)

    def fine_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fine-grid coordinates ``(z, y, x)`` in mm, each a 1-D array."""
        return self.axis_mm(0), self.axis_mm(1, self.factor), self.axis_mm(2, self.factor)

    def acquisition_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Acquisition-grid coordinates ``(z, y, x)`` in mm, each a 1-D array."""
        return self.axis_mm(0), self.axis_mm(1), self.axis_mm(2)


def gaussian_random_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], correlation_mm: float
) -> np.ndarray:
    """Zero-mean, unit-variance smooth Gaussian noise.

    White noise filtered by a Gaussian of standard deviation ``correlation_mm / 2``: the field's correlation
    then falls to 1/e at a distance of ``correlation_mm``.

    Args:
        rng: Random generator.
        shape: Array shape.
        spacing: Voxel size per axis in mm.
        correlation_mm: Correlation length in mm.

    Returns:
        float32 array of ``shape``.
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = [correlation_mm / 2.0 / s for s in spacing]
    field = ndi.gaussian_filter(noise, sigma, mode="wrap", truncate=3.0)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def distance_to_zero_level(field: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """First-order distance (mm) to the field's zero level set and the unit normal there.

    Args:
        field: ``(z, y, x)`` smooth field.
        spacing: Voxel size ``(z, y, x)`` in mm.

    Returns:
        ``(distance, normal)``: signed distance ``field / |grad field|`` (float32, same shape) and the unit
        gradient ``(3, z, y, x)``.
    """
    gradient = np.stack(np.gradient(field, *spacing)).astype(np.float32)
    norm = np.sqrt((gradient**2).sum(axis=0)) + np.float32(1e-6)
    return field / norm, gradient / norm


def _linear_weights(n_in: int, ratio: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower neighbour, upper neighbour and upper weight of fine samples ``start:stop`` on a coarse axis."""
    position = np.clip((np.arange(start, stop) + 0.5) / ratio - 0.5, 0, n_in - 1)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (position - lower).astype(np.float32)


def upsample_inplane(coarse: np.ndarray, ratio: int, y_range: tuple[int, int], x_range: tuple[int, int]) -> np.ndarray:
    """Bilinear in-plane upsampling of a ``(z, y, x)`` field onto a ``ratio`` times finer grid, in a window.

    The coarse and the fine grid cover the same extent: fine sample ``j`` lies at coarse position
    ``(j + 0.5) / ratio - 0.5`` (edges clamp). Gathers, not matrix products: no BLAS threads to fight over.

    Args:
        coarse: ``(z, Yc, Xc)`` field.
        ratio: Fine samples per coarse sample in y and x.
        y_range: ``(start, stop)`` fine rows wanted.
        x_range: ``(start, stop)`` fine columns wanted.

    Returns:
        ``(z, y_stop - y_start, x_stop - x_start)`` float32 window.
    """
    y_lo, y_hi, y_w = _linear_weights(coarse.shape[1], ratio, *y_range)
    x_lo, x_hi, x_w = _linear_weights(coarse.shape[2], ratio, *x_range)
    rows = coarse[:, y_lo].astype(np.float32, copy=False) * (1 - y_w)[None, :, None]
    rows += coarse[:, y_hi] * y_w[None, :, None]
    out = rows[:, :, x_lo] * (1 - x_w)
    out += rows[:, :, x_hi] * x_w
    return out


def smooth_modulation(
    rng: np.random.Generator, axes: tuple[np.ndarray, np.ndarray, np.ndarray], wavelength_mm: float, modes: int = 4
) -> np.ndarray:
    """A slowly varying field in [-1, 1]: a normalised sum of a few random plane waves.

    Args:
        rng: Random generator.
        axes: 1-D coordinates ``(z, y, x)`` in mm.
        wavelength_mm: Typical wavelength of the waves.
        modes: Number of waves.

    Returns:
        ``(z, y, x)`` float32 field.
    """
    z, y, x = (a.astype(np.float32) for a in axes)
    total = np.zeros((z.size, y.size, x.size), np.float32)
    for _ in range(modes):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = [float(v) for v in 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4)) * direction]
        phase = float(rng.uniform(0, 2 * np.pi))
        in_plane = (k[1] * y)[:, None] + (k[2] * x)[None, :]
        total += np.cos((k[0] * z + phase)[:, None, None] + in_plane[None], dtype=np.float32)
    total /= max(float(np.abs(total).max()), 1e-6)
    return total
