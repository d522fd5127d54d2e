"""From the fine tissue map to an acquired image: partial volume, labels, bias field, motion, Rician noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_mamba_seg.data._anatomy import AIR, LUNG
from napari_mamba_seg.data._grid import Grid


def subvoxel_views(fine: np.ndarray, factor: int) -> list[np.ndarray]:
    """The ``factor²`` in-plane sub-voxel samples of each acquisition voxel, as contiguous ``(z, y, x)`` arrays."""
    z, y, x = fine.shape
    blocks = fine.reshape(z, y // factor, factor, x // factor, factor)
    return [np.ascontiguousarray(blocks[:, :, i, :, j]) for i in range(factor) for j in range(factor)]


def code_counts(subvoxels: list[np.ndarray], codes: list[int] | np.ndarray) -> dict[int, np.ndarray]:
    """How many sub-voxels of each acquisition voxel hold each code.

    Args:
        subvoxels: Output of :func:`subvoxel_views` (uint8 codes).
        codes: Codes to count.

    Returns:
        ``{code: (z, y, x) uint8 count}`` (0 to ``len(subvoxels)``).
    """
    counts = {}
    for code in codes:
        total = (subvoxels[0] == code).view(np.uint8).copy()
        for sub in subvoxels[1:]:
            total += (sub == code).view(np.uint8)
        counts[int(code)] = total
    return counts


def majority_labels(subvoxels: list[np.ndarray], lookup: np.ndarray, n_labels: int) -> np.ndarray:
    """The most frequent label among each voxel's sub-voxels; ties go to the label of the first sub-voxel.

    Args:
        subvoxels: Output of :func:`subvoxel_views` (tissue codes).
        lookup: Tissue code → label table.
        n_labels: Number of label values.

    Returns:
        ``(z, y, x)`` uint8 labels.
    """
    sub_labels = [lookup[s] for s in subvoxels]
    counts = code_counts(sub_labels, range(n_labels))
    # doubled counts + 1 for the first sub-voxel's label break exact ties without changing any strict majority
    score = np.stack([2 * counts[k].astype(np.int16) + (sub_labels[0] == k) for k in range(n_labels)])
    return np.argmax(score, axis=0).astype(np.uint8)


def bias_field(
    rng: np.random.Generator,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    body: np.ndarray,
    peak_to_peak: float,
    order: int = 3,
) -> np.ndarray:
    """A smooth multiplicative coil-sensitivity field.

    ``exp(p)`` with ``p`` a 3rd-order polynomial of the normalised coordinates (coefficients uniform in ±0.4,
    the TorchIO RandomBiasField convention) plus a linear anterior-to-posterior fall-off; ``p`` is then
    rescaled so that ``max - min`` over the body equals ``peak_to_peak`` (so ``max/min = exp(peak_to_peak)``),
    with zero mean over the body.

    Args:
        rng: Random generator.
        axes: Acquisition coordinates ``(z, y, x)`` in mm (y grows posteriorly).
        body: ``(z, y, x)`` bool mask where the field is normalised.
        peak_to_peak: Range of the log field over the body; 0 gives a field of ones.
        order: Polynomial order.

    Returns:
        ``(z, y, x)`` float32 field.
    """
    shape = tuple(a.size for a in axes)
    if peak_to_peak <= 0 or not body.any():
        return np.ones(shape, np.float32)
    z, y, x = (np.float32(a / max(float(np.abs(a).max()), 1e-6)) for a in axes)
    log_field = np.zeros(shape, np.float32)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                if i + j + k == 0:
                    continue
                coefficient = float(rng.uniform(-0.4, 0.4)) - (1.2 if (i, j, k) == (0, 1, 0) else 0.0)
                plane = np.float32(coefficient) * (y[:, None] ** j) * (x[None, :] ** k)
                log_field += (z[:, None, None] ** i) * plane[None]
    inside = log_field[body]
    span = float(inside.max() - inside.min())
    log_field -= np.float32(inside.mean())
    log_field *= np.float32(peak_to_peak / max(span, 1e-6))
    return np.exp(log_field)


def rician_magnitude(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma`` per channel.

    Args:
        rng: Random generator.
        signal: Real, noiseless magnitude (any shape).
        sigma: Noise standard deviation of the real and the imaginary part.

    Returns:
        float32 Rician-distributed magnitude of the same shape.
    """
    if sigma <= 0:
        return signal.astype(np.float32)
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imaginary)


def rigid_shift(volume: np.ndarray, shift_voxels: np.ndarray) -> np.ndarray:
    """Translate a ``(z, y, x)`` volume by a sub-voxel shift (linear interpolation, zeros enter at the edges)."""
    return ndi.shift(volume, shift_voxels, order=1, mode="constant", cval=0.0)


def slice_profile(volume: np.ndarray, sigma_slices: float = 0.35) -> np.ndarray:
    """Blur along the slice axis: the slab profile of a 2 mm partition mixes neighbouring slices a little."""
    return ndi.gaussian_filter1d(volume, sigma_slices, axis=0, mode="nearest", truncate=3.0)


def degrade(
    rng: np.random.Generator,
    grid: Grid,
    signal: np.ndarray,
    counts: dict[int, np.ndarray],
    bias: float,
    motion: float,
    sigma: float,
) -> np.ndarray:
    """Slice profile, motion, bias field and Rician noise, phase by phase.

    Args:
        rng: Random generator.
        grid: The grid.
        signal: ``(T, z, y, x)`` noiseless signal.
        counts: Sub-voxel count of each tissue code (air and lung set where the bias field is normalised).
        bias: Peak-to-peak range of the log bias field over the body.
        motion: Largest rigid shift (mm) of a post-contrast phase.
        sigma: Noise standard deviation per quadrature channel.

    Returns:
        ``(T, z, y, x)`` float32 magnitude image.
    """
    n_sub = grid.factor**2
    empty = np.zeros(grid.shape, np.uint8)
    void = counts.get(AIR, empty).astype(np.int16) + counts.get(LUNG, empty)
    field = bias_field(rng, grid.acquisition_axes(), void < n_sub / 2, bias)
    image = np.empty_like(signal)
    for p in range(signal.shape[0]):
        phase = slice_profile(signal[p])
        if p > 0 and motion > 0:
            direction = rng.normal(size=3)
            shift_mm = direction / np.linalg.norm(direction) * rng.uniform(0, motion)
            phase = rigid_shift(phase, shift_mm / np.asarray(grid.spacing))
        image[p] = rician_magnitude(rng, phase * field, sigma)
    return image
