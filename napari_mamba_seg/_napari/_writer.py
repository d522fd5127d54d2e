"""npe2 writers: one Labels layer to NIfTI (``.nii.gz``, ``.nii``) or OME-TIFF (``.tif``, ``.tiff``, ``.ome.tif``).

The voxels land on the source image's grid with its exact affine: the geometry comes from the layer's
``napari_mamba_seg`` metadata (:func:`~napari_mamba_seg._napari._layer_data.geometry_from_layer`); a NIfTI file
written for an image read from a NIfTI file that still exists reuses that file's header (qform/sform codes and
affine bit for bit). A layer without that metadata is written with its scale/translate and a warning that the
orientation is lost.

napari's save dialog has already asked before replacing a file, so an existing file is replaced, atomically: the
file is written under a temporary name in the same folder and renamed, so no half-written file carries the name.
Once the labels are saved, the layer's recovery journal (the Correct widget's autosave) is discarded.
Imports numpy and nibabel/tifffile (through :mod:`napari_mamba_seg.io`); never napari or torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._napari._layer_data import METADATA_KEY, geometry_from_layer, recovery_key
from napari_mamba_seg.io import ImageGeometry, MedicalImage, write_labels
from napari_mamba_seg.io.nifti import nifti_suffix
from napari_mamba_seg.io.tiff import tiff_suffix

__all__ = ["write_labels_layer", "write_labels_nifti", "write_labels_tiff"]


def write_labels_nifti(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer to ``.nii.gz`` / ``.nii``.

    Args:
        path: Target file (napari adds ``.nii.gz`` when the name has no extension).
        data: The layer's data, ``(*spatial)`` integer labels in array order.
        meta: The layer's attributes (``metadata``, ``scale``, ``translate``, ``name``, ...).

    Returns:
        ``[path]``, the file written.
    """
    if nifti_suffix(path) is None:
        raise ValueError(f"Cannot write {path} as NIfTI: the name must end with .nii.gz or .nii.")
    return [str(write_labels_layer(path, data, meta))]


def write_labels_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer to OME-TIFF (``.tif``, ``.tiff``, ``.ome.tif``) with spacing in mm.

    Args:
        path: Target file.
        data: The layer's data, ``(*spatial)`` integer labels in array order.
        meta: The layer's attributes.

    Returns:
        ``[path]``, the file written.
    """
    if tiff_suffix(path) is None:
        raise ValueError(f"Cannot write {path} as TIFF: the name must end with .tif, .tiff or .ome.tif.")
    return [str(write_labels_layer(path, data, meta))]


def write_labels_layer(path: str | Path, data: Any, meta: dict[str, Any]) -> Path:
    """Write a Labels layer's data with its source geometry; replaces an existing file atomically.

    Args:
        path: ``.nii.gz``/``.nii``/``.tif``/``.tiff``/``.ome.tif`` target.
        data: ``(*spatial)`` labels (2 or 3 axes), integer or bool, values in [0, 65535].
        meta: Layer attributes as npe2 passes them (``metadata``, ``scale``, ``translate``, ``name``, ...).

    Returns:
        The path written.

    Raises:
        ValueError: Float or negative labels, a multiscale layer, a layer that is not 2D/3D, labels whose shape does
            not match the image named in the metadata, or a geometry that cannot be written (see
            :func:`geometry_from_layer`). The message names the layer and the file.
    """
    path = Path(path)
    name = meta.get("name") or "labels"
    if meta.get("multiscale"):
        raise ValueError(f"Cannot write layer {name!r} to {path}: multiscale labels are not supported.")
    labels = np.asarray(data)
    if labels.dtype.kind == "f":
        raise ValueError(
            f"Cannot write layer {name!r} to {path}: labels must be integers, got {labels.dtype}. Convert the layer "
            "to integer labels first (e.g. np.rint(data).astype(np.uint16))."
        )
    if labels.ndim not in (2, 3):
        raise ValueError(
            f"Cannot write layer {name!r} to {path}: labels must have 2 or 3 spatial axes, got shape {labels.shape}."
        )
    entry = (meta.get("metadata") or {}).get(METADATA_KEY) or {}
    _check_shape(labels.shape, entry, name, path)
    geometry = geometry_from_layer(meta, labels.ndim)
    reference = _nifti_reference(entry, geometry, labels.shape) if nifti_suffix(path) is not None else None
    written = write_labels(labels, path, reference if reference is not None else geometry, overwrite=True)
    _discard_recovery_journal(meta, labels.shape, name)
    return written


def _discard_recovery_journal(meta: dict[str, Any], shape: tuple[int, ...], name: str) -> None:
    """The labels are saved: their recovery journal (unsaved corrections) is no longer needed. Never fails a save."""
    from napari_mamba_seg.interactive import default_recovery_root, discard_journal

    try:
        discard_journal(default_recovery_root(), recovery_key(meta.get("metadata"), shape, meta.get("name") or name))
    except Exception as error:  # the file is written; a journal left behind only means a later restore offer
        warnings.warn(f"the recovery journal of {name!r} could not be removed: {error}", stacklevel=2)


def _check_shape(shape: tuple[int, ...], entry: dict[str, Any], name: str, path: Path) -> None:
    expected = entry.get("spatial_shape")
    if expected is not None and tuple(shape) != tuple(expected):
        raise ValueError(
            f"Cannot write layer {name!r} to {path}: its shape {tuple(shape)} differs from the shape "
            f"{tuple(expected)} of the image it belongs to ({entry.get('source') or 'in memory'}); the labels must "
            "lie on that image's voxel grid."
        )


def _nifti_reference(entry: dict[str, Any], geometry: ImageGeometry, shape: tuple[int, ...]) -> MedicalImage | None:
    """A header-only stand-in for the source NIfTI image, so the labels get its header; None when not usable.

    Usable when the metadata names a NIfTI source that still exists, whose header still has the same geometry and
    spatial shape (the file was not replaced meanwhile).
    """
    source = entry.get("source")
    if entry.get("format") != "nifti" or not source or nifti_suffix(source) is None or not Path(source).is_file():
        return None
    import nibabel as nib

    try:
        header = nib.load(source).header.copy()  # reads the header only
        source_geometry = ImageGeometry.from_nifti_affine(header.get_best_affine())
    except Exception:  # the source changed into something unreadable: write with the metadata's geometry
        return None
    voxel_shape = tuple(int(n) for n in header.get_data_shape()[:3])
    if voxel_shape[::-1] != tuple(shape) or not source_geometry.is_close(geometry):
        return None
    placeholder = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, *shape))  # no memory: only the shape is used
    return MedicalImage(placeholder, geometry, source=Path(source), format="nifti", metadata={"nifti_header": header})
