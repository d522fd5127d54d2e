"""Small NIfTI files for the napari reader/writer tests, written with nibabel directly (not the plugin's writers)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

VOXEL_SHAPE = (12, 10, 6)  # NIfTI (i, j, k): array order (z, y, x) = (6, 10, 12)
ZOOMS = (0.8, 0.75, 2.5)  # mm along i, j, k
ORIGIN = (91.5, -120.25, -40.0)  # RAS+ mm of voxel (0, 0, 0)
SFORM_CODE = 2  # "aligned": a writer that reuses the source header keeps it; a fresh header gets 1


def oblique_nifti_affine() -> np.ndarray:
    """A NIfTI affine with a rotation, a flipped axis and anisotropic voxels (a typical oblique breast MRI)."""
    rotation = Rotation.from_euler("xyz", [12.0, -7.0, 20.0], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2]])
    affine[:3, 3] = ORIGIN
    return affine


def write_nifti_case(path: Path, *, phases: int | None = None, seed: int = 0) -> np.ndarray:
    """Write an int16 image ``(i, j, k)`` or, with ``phases``, ``(i, j, k, phases)``; returns the voxels as written."""
    shape = VOXEL_SHAPE if phases is None else (*VOXEL_SHAPE, phases)
    voxels = np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)
    image = nib.Nifti1Image(voxels, oblique_nifti_affine())
    image.header.set_sform(oblique_nifti_affine(), code=SFORM_CODE)
    image.header.set_qform(oblique_nifti_affine(), code=1)
    nib.save(image, path)
    return voxels


def array_order(voxels: np.ndarray) -> np.ndarray:
    """NIfTI voxels ``(i, j, k[, t])`` as the plugin's arrays: ``(z, y, x)`` or ``(t, z, y, x)``."""
    if voxels.ndim == 4:
        return np.moveaxis(voxels, 3, 0).transpose(0, 3, 2, 1)
    return voxels.transpose(2, 1, 0)


def expected_scale() -> tuple[float, float, float]:
    """Voxel size in array order (z, y, x): the NIfTI zooms reversed."""
    return ZOOMS[2], ZOOMS[1], ZOOMS[0]
