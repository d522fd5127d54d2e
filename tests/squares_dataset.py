"""A tiny nnU-Net v2 raw data set for the training tests: noise volumes with one bright square each (label 1)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

SPACING_ZYX = (2.0, 1.0, 1.0)
"""Voxel size of every volume in array order (z, y, x), in mm."""


def write_squares_dataset(root: Path, squares: dict[str, tuple[int, int]]) -> Path:
    """Write ``root/Dataset042_Squares``: per case, a 4×24×24 volume of noise (mean 100, sd 10) with a bright (+80)
    square on slices 1-2 that is label 1 ("lesion"); one channel ("T1").

    Args:
        root: The folder to write into.
        squares: Case name -> ``(start, size)`` of its square (rows and columns ``start:start + size``).

    Returns:
        The data set folder.
    """
    folder = root / "Dataset042_Squares"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    info = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(squares),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(info))
    rng = np.random.default_rng(7)
    for case, (start, size) in squares.items():
        labels = np.zeros((4, 24, 24), np.uint8)
        labels[1:3, start : start + size, start : start + size] = 1
        image = rng.normal(100, 10, labels.shape).astype(np.float32) + 80 * labels
        write_nifti(folder / "imagesTr" / f"{case}_0000.nii.gz", image)
        write_nifti(folder / "labelsTr" / f"{case}.nii.gz", labels)
    return folder


def write_nifti(path: Path, array_zyx: np.ndarray, spacing_zyx: Sequence[float] = SPACING_ZYX) -> None:
    """Write an array in array order (z, y, x) as NIfTI (voxel order x, y, z) with the given spacing."""
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose()), affine), str(path))
