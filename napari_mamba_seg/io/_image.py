"""The in-memory image every reader returns and every writer takes: an array plus where its voxels lie.

Conventions (shared by the readers, the writers, the inference engine and the napari layers):

* Arrays are channel-first, ``(C, *spatial)``, with the spatial axes in *array order*: for a volume
  ``(z, y, x)`` = slowest to fastest varying in the file, the order SimpleITK's ``GetArrayFromImage`` and
  napari use (axis 0 is the slice axis of an axially acquired series). A NIfTI file's voxel axes ``(i, j, k)``
  are therefore reversed: array axis 0 is NIfTI's ``k``.
* The world frame is RAS+ millimetres (NIfTI/nibabel). DICOM and ITK use LPS+; :meth:`ImageGeometry.lps_affine`
  converts.
* :attr:`ImageGeometry.affine` maps an array index ``(axis0, axis1, ..., 1)`` to world ``(R, A, S, 1)``-like
  coordinates; spacing, origin and direction are derived from it, so a file's affine survives a round trip bit
  for bit.

This module imports numpy only (no torch, no napari): the napari readers use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._spacing import checked_spacing

__all__ = ["IMAGE_SUFFIXES", "ImageGeometry", "ImageReadError", "MedicalImage", "matching_suffix"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".ome.tiff", ".ome.tif", ".tiff", ".tif")
"""Suffixes of the image files the readers take, longest first (so ``.nii.gz`` wins over ``.gz``)."""

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def matching_suffix(path: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> str | None:
    """The first of ``suffixes`` that ``path``'s name ends with, as spelled there (any case), else None."""
    name = Path(path).name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[-len(suffix) :]
    return None


class ImageReadError(ValueError):
    """A file or folder could not be read as an image; the message names the path, the problem and the fix."""


@dataclass(frozen=True, eq=False)
class ImageGeometry:
    """Where the voxels of an array lie in the patient.

    Attributes:
        affine: ``(n + 1, n + 1)`` float64 matrix, n = number of spatial axes (2 or 3), mapping an array index in
            array order to RAS+ millimetres. Column ``a`` (of the upper-left n×n block) is the world step of one
            voxel along array axis ``a``; the last column is the world position of voxel ``(0, ..., 0)``.
    """

    affine: np.ndarray

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)  # a private copy: geometry is immutable
        n = affine.shape[0] - 1
        if affine.ndim != 2 or affine.shape[0] != affine.shape[1] or n not in (2, 3):
            raise ValueError(f"an affine must be 3×3 (2D) or 4×4 (3D), got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise ValueError(f"the affine has NaN or infinite values:\n{affine}")
        if abs(np.linalg.det(affine[:n, :n])) < 1e-12:
            raise ValueError(f"the affine is singular (a zero spacing or collinear axes):\n{affine}")
        affine.setflags(write=False)
        object.__setattr__(self, "affine", affine)

    @classmethod
    def from_spacing(
        cls,
        spacing: tuple[float, ...] | list[float],
        origin: tuple[float, ...] | list[float] | None = None,
        direction: np.ndarray | None = None,
    ) -> ImageGeometry:
        """A geometry from spacing (array order, mm), origin (world position of voxel 0) and direction.

        Args:
            spacing: Voxel size along each array axis, e.g. ``(2.0, 0.7, 0.7)`` for ``(z, y, x)``.
            origin: World position of the first voxel; zeros when None.
            direction: ``(n, n)`` matrix whose column ``a`` is the unit world direction of array axis ``a``; the
                identity when None.
        """
        spacing = np.asarray(checked_spacing(spacing, (2, 3)), dtype=np.float64)
        n = spacing.size
        direction = np.eye(n) if direction is None else np.asarray(direction, dtype=np.float64)
        origin = np.zeros(n) if origin is None else np.asarray(origin, dtype=np.float64)
        if direction.shape != (n, n) or origin.shape != (n,):
            raise ValueError(f"direction must be {n}×{n} and origin {n} values for {n} spacing values")
        affine = np.eye(n + 1)
        affine[:n, :n] = direction * spacing[None, :]
        affine[:n, n] = origin
        return cls(affine)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.affine.shape[0] - 1

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (length of the affine's columns)."""
        n = self.spatial_dims
        return tuple(float(s) for s in np.linalg.norm(self.affine[:n, :n], axis=0))

    @property
    def origin(self) -> tuple[float, ...]:
        """World (RAS+) position of voxel ``(0, ..., 0)`` in mm."""
        n = self.spatial_dims
        return tuple(float(v) for v in self.affine[:n, n])

    @property
    def direction(self) -> np.ndarray:
        """``(n, n)``: column ``a`` is the unit world (RAS+) direction of array axis ``a``."""
        n = self.spatial_dims
        return self.affine[:n, :n] / np.asarray(self.spacing)[None, :]

    def lps_affine(self) -> np.ndarray:
        """The affine in DICOM/ITK's LPS+ world frame (x and y negated); 3D only."""
        if self.spatial_dims != 3:
            raise ValueError("LPS is defined for 3D geometries only")
        lps = self.affine.copy()
        lps[:3, :] = _LPS_FROM_RAS @ lps[:3, :]
        return lps

    @classmethod
    def from_lps_affine(cls, affine: np.ndarray) -> ImageGeometry:
        """The geometry of a 4×4 array-order affine given in LPS+ (DICOM/ITK)."""
        affine = np.array(affine, dtype=np.float64)
        affine[:3, :] = _LPS_FROM_RAS @ affine[:3, :]
        return cls(affine)

    def nifti_affine(self) -> np.ndarray:
        """The 4×4 NIfTI affine: voxel ``(i, j, k)`` = reversed array axes → RAS+ (a 2D geometry gets one slice)."""
        n = self.spatial_dims
        nifti = np.eye(4)
        nifti[:n, :n] = self.affine[:n, :n][:, ::-1]
        nifti[:n, 3] = self.affine[:n, n]
        return nifti

    @classmethod
    def from_nifti_affine(cls, affine: np.ndarray) -> ImageGeometry:
        """The geometry of a NIfTI affine (voxel ``(i, j, k)`` → RAS+), in array order ``(k, j, i)``."""
        nifti = np.asarray(affine, dtype=np.float64)
        if nifti.shape != (4, 4):
            raise ValueError(f"a NIfTI affine is 4×4, got {nifti.shape}")
        array_affine = np.eye(4)
        array_affine[:3, :3] = nifti[:3, :3][:, ::-1]
        array_affine[:3, 3] = nifti[:3, 3]
        return cls(array_affine)

    def napari_scale_translate(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(scale, translate)`` for a napari layer, in array order: spacing and origin, rotation ignored."""
        return self.spacing, self.origin

    def is_close(self, other: ImageGeometry, *, atol: float = 1e-4) -> bool:
        """Whether two geometries agree within ``atol`` mm (same number of axes)."""
        return self.affine.shape == other.affine.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageGeometry) and np.array_equal(self.affine, other.affine)

    def __hash__(self) -> int:
        return hash(self.affine.tobytes())

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{o:g}" for o in self.origin)
        return f"ImageGeometry(spacing=({spacing}), origin=({origin}))"


@dataclass(eq=False)
class MedicalImage:
    """An image as read from a file or folder: channel-first array, geometry, names and metadata.

    Attributes:
        array: ``(C, *spatial)``: channels first (DCE phases, MR sequences; 1 for a plain image), then the
            spatial axes in array order (see the module docstring). The file's dtype, or float32 when a DICOM
            rescale or NIfTI scaling made the values non-integer.
        geometry: Where the voxels lie (affine, spacing, origin, direction).
        channel_names: One name per channel, e.g. ``["phase 0", "phase 1", "phase 2"]``.
        source: The file or folder it was read from; None for an image built in memory.
        format: ``"nifti"``, ``"dicom"``, ``"tiff"`` or ``"array"``.
        metadata: Format-specific facts a writer or exporter needs: for NIfTI the ``"nifti_header"``
            (a ``nibabel.Nifti1Header``) so labels are written with the same qform/sform codes; for DICOM the UIDs,
            modality and the sorted ``"files"`` per channel; for TIFF the axes string.
    """

    array: np.ndarray
    geometry: ImageGeometry
    channel_names: list[str] = field(default_factory=list)
    source: Path | None = None
    format: str = "array"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.geometry.spatial_dims
        if self.array.ndim != n + 1:
            raise ValueError(
                f"array shape {self.array.shape} is not (channels, *spatial) for a {n}D geometry; "
                "add a channel axis of length 1 for a single-channel image"
            )
        if not self.channel_names:
            self.channel_names = [f"channel {c}" for c in range(self.array.shape[0])]
        if len(self.channel_names) != self.array.shape[0]:
            raise ValueError(f"{len(self.channel_names)} channel names for {self.array.shape[0]} channels")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes, array order."""
        return tuple(self.array.shape[1:])

    @property
    def num_channels(self) -> int:
        """Number of channels."""
        return self.array.shape[0]

    @property
    def name(self) -> str:
        """A short name for layers and output files: the source's name without image suffixes."""
        if self.source is None:
            return "image"
        suffix = matching_suffix(self.source)
        return self.source.name[: -len(suffix)] if suffix else self.source.name
