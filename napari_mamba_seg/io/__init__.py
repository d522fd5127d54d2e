"""Image input/output: NIfTI, TIFF and DICOM series in, labels and probability maps out.

Every reader returns a :class:`MedicalImage` (channel-first array in array order + RAS+ geometry, see
:mod:`napari_mamba_seg.io._image`); every writer takes an array and the image (or geometry) it belongs to, refuses to
replace an existing file unless ``overwrite=True``, and writes under a temporary name that is renamed when complete.

This package imports numpy, nibabel and tifffile (pydicom only when DICOM is read); never torch, napari or Qt,
because napari's readers use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg.io._atomic import integer_labels
from napari_mamba_seg.io._image import ImageGeometry, ImageReadError, MedicalImage
from napari_mamba_seg.io.discover import discover_inputs, is_dicom_file
from napari_mamba_seg.io.export import EXPORT_FORMATS, ExportResult, export_format_for, export_labels
from napari_mamba_seg.io.nifti import nifti_suffix, read_nifti, write_nifti
from napari_mamba_seg.io.nnunet import (
    NnUNetExport,
    export_nnunet_case,
    file_sha256,
    sanitize_case_name,
    write_provenance,
)
from napari_mamba_seg.io.tiff import read_tiff, tiff_suffix, write_tiff

__all__ = [
    "EXPORT_FORMATS",
    "ExportResult",
    "ImageGeometry",
    "ImageReadError",
    "MedicalImage",
    "NnUNetExport",
    "discover_inputs",
    "export_format_for",
    "export_labels",
    "export_nnunet_case",
    "file_sha256",
    "read_dicom_seg",
    "read_image",
    "read_nifti",
    "read_tiff",
    "sanitize_case_name",
    "supported_suffixes",
    "write_dicom_seg",
    "write_image",
    "write_labels",
    "write_nifti",
    "write_provenance",
    "write_tiff",
]

_WRITE_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff", ".ome.tif", ".ome.tiff")
_READ_SUFFIXES = (*_WRITE_SUFFIXES, ".dcm")
_MAX_LABEL = np.iinfo(np.uint16).max


def supported_suffixes(*, for_writing: bool = False) -> tuple[str, ...]:
    """The file suffixes :func:`read_image` reads (or, with ``for_writing``, the writers write).

    Reading also accepts a folder holding one or more DICOM series, and DICOM files without a suffix.
    """
    return _WRITE_SUFFIXES if for_writing else _READ_SUFFIXES


def read_image(path: str | Path, *, series_uid: str | None = None) -> MedicalImage:
    """Read an image file or DICOM folder; the format is chosen by the suffix.

    Args:
        path: A ``.nii``/``.nii.gz`` file, a ``.tif``/``.tiff``/``.ome.tif`` file, a folder holding a DICOM series,
            or one DICOM file (``.dcm`` or no suffix), which reads the series it belongs to from its folder.
        series_uid: For a DICOM folder holding several series: the SeriesInstanceUID to read.

    Returns:
        The image: ``array`` ``(C, *spatial)`` in array order, RAS+ ``geometry``, channel names, source and metadata.

    Raises:
        ImageReadError: Missing path, unsupported suffix, or a file that cannot be read (the message names the file,
            the problem and the fix).
        ValueError: ``series_uid`` given for a file that is not DICOM.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder. Check the path (and that the disk is mounted).")
    if path.is_dir():
        return _read_dicom(path, series_uid)
    if nifti_suffix(path) is not None or tiff_suffix(path) is not None:
        if series_uid is not None:
            raise ValueError(f"series_uid applies to DICOM only; {path.name} is not a DICOM file or folder")
        return read_nifti(path) if nifti_suffix(path) is not None else read_tiff(path)
    if is_dicom_file(path):
        return _read_dicom(path, series_uid)
    raise ImageReadError(
        f"{path}: unsupported file type; supported are {', '.join(_READ_SUFFIXES)} files and DICOM folders. "
        "Convert the image to NIfTI or TIFF, or give its DICOM folder."
    )


def _read_dicom(path: Path, series_uid: str | None) -> MedicalImage:
    """A DICOM series: from a folder, or (given one file) the series that file belongs to, read from its folder."""
    from napari_mamba_seg.io.dicom import read_dicom_series  # lazy: pydicom only when DICOM is read

    return read_dicom_series(path, series_uid=series_uid)


def write_dicom_seg(*args: Any, **kwargs: Any) -> Path:
    """Write labels of a DICOM-read image as a DICOM-SEG referencing its series (see :mod:`.dicom_seg`)."""
    from napari_mamba_seg.io.dicom_seg import write_dicom_seg as write  # lazy: highdicom is slow to import

    return write(*args, **kwargs)


def read_dicom_seg(*args: Any, **kwargs: Any) -> tuple[np.ndarray, list[str]]:
    """Read a DICOM-SEG back as a label volume and its segment labels (see :mod:`.dicom_seg`)."""
    from napari_mamba_seg.io.dicom_seg import read_dicom_seg as read

    return read(*args, **kwargs)


def write_labels(
    labels: np.ndarray, path: str | Path, reference: MedicalImage | ImageGeometry, *, overwrite: bool = False
) -> Path:
    """Write an integer label map for ``reference`` as NIfTI or TIFF (chosen by the suffix).

    The labels are stored as uint8 when their maximum is below 256, else uint16. NIfTI files written for an image
    read from NIfTI reuse its header (same qform/sform codes and affine); TIFF files are OME-TIFF with the spacing
    in mm.

    Args:
        labels: ``(*spatial)`` integer (or bool) labels in array order, 0 = background, values in [0, 65535].
        path: Target file: ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff`` or ``.ome.tif``.
        reference: The image the labels belong to (its spatial shape is checked), or just its geometry.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        ValueError: Unknown suffix, non-integer or out-of-range labels, or a shape that does not match the reference.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    writer = _writer_for(path)
    image, geometry = _reference_parts(reference)
    labels = integer_labels(labels, path)
    _check_spatial_shape(labels.shape, image, geometry, path, "labels")
    lowest, highest = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lowest < 0 or highest > _MAX_LABEL:
        raise ValueError(f"Cannot write {path}: label values must lie in [0, {_MAX_LABEL}], got [{lowest}, {highest}].")
    dtype = np.uint8 if highest < 256 else np.uint16
    return writer(labels.astype(dtype, copy=False), path, geometry, image, overwrite)


def write_image(
    array: np.ndarray, path: str | Path, reference: MedicalImage | ImageGeometry, *, overwrite: bool = False
) -> Path:
    """Write a channel-first image (e.g. class probabilities) for ``reference`` as NIfTI or TIFF.

    Float arrays are stored as float32 (float16/float64 are converted). A NIfTI file gets the channels as its 4th
    axis (none for one channel); a TIFF file a ``C`` axis.

    Args:
        array: ``(C, *spatial)`` in array order, with the reference's spatial shape.
        path: Target file: ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff`` or ``.ome.tif``.
        reference: The image the array belongs to, or just its geometry.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        ValueError: Unknown suffix, unsupported dtype, or a shape that does not match the reference.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    writer = _writer_for(path)
    image, geometry = _reference_parts(reference)
    array = np.asarray(array)
    if array.ndim != geometry.spatial_dims + 1:
        raise ValueError(
            f"Cannot write {path}: the image must be (channels, *spatial) with {geometry.spatial_dims} spatial axes, "
            f"got shape {array.shape}. Add a channel axis, e.g. array[None]."
        )
    _check_spatial_shape(array.shape[1:], image, geometry, path, "image")
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    return writer(array, path, geometry, image, overwrite)


def _writer_for(path: Path) -> Callable[[np.ndarray, Path, ImageGeometry, MedicalImage | None, bool], Path]:
    """A function ``(array, path, geometry, reference_image, overwrite) -> Path`` for ``path``'s suffix."""
    if nifti_suffix(path) is not None:
        return lambda array, target, geometry, image, overwrite: write_nifti(
            array, target, geometry, reference=image, overwrite=overwrite
        )
    if tiff_suffix(path) is not None:
        return lambda array, target, geometry, image, overwrite: write_tiff(
            array, target, geometry, overwrite=overwrite
        )
    raise ValueError(f"Cannot write {path}: unknown file type; use one of {', '.join(_WRITE_SUFFIXES)}.")


def _reference_parts(reference: MedicalImage | ImageGeometry) -> tuple[MedicalImage | None, ImageGeometry]:
    if isinstance(reference, MedicalImage):
        return reference, reference.geometry
    if isinstance(reference, ImageGeometry):
        return None, reference
    raise TypeError(f"reference must be a MedicalImage or an ImageGeometry, got {type(reference).__name__}")


def _check_spatial_shape(
    shape: tuple[int, ...], image: MedicalImage | None, geometry: ImageGeometry, path: Path, what: str
) -> None:
    """ValueError unless ``shape`` (spatial) fits the reference image (or at least its number of axes)."""
    if image is not None and tuple(shape) != image.spatial_shape:
        raise ValueError(
            f"Cannot write {path}: the {what} array has spatial shape {tuple(shape)} but the reference image "
            f"{image.name!r} has {image.spatial_shape} (array order); they must be on the same voxel grid."
        )
    if len(shape) != geometry.spatial_dims:
        raise ValueError(
            f"Cannot write {path}: the {what} array has {len(shape)} spatial axes (shape {tuple(shape)}) but the "
            f"reference geometry has {geometry.spatial_dims}."
        )
