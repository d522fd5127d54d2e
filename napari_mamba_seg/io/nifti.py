"""NIfTI-1/NIfTI-2 reading and writing (``.nii``, ``.nii.gz``) with nibabel.

A NIfTI file stores voxels in ``(i, j, k[, t])`` order; the arrays here are channel-first in array order
``(C, k, j, i)`` (see :mod:`napari_mamba_seg.io._image`). A 4D file's 4th axis (e.g. DCE phases) becomes the
channels. The header of the file read is kept in ``metadata["nifti_header"]`` so labels written for it carry the same
qform/sform codes and read back with a bit-for-bit equal affine.

This module imports numpy and nibabel only (no torch, no napari).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_mamba_seg.io._atomic import atomic_output, check_writable_dtype
from napari_mamba_seg.io._image import ImageGeometry, ImageReadError, MedicalImage, matching_suffix

__all__ = ["NIFTI_SUFFIXES", "nifti_suffix", "read_nifti", "write_nifti"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_XFORM_SCANNER = 1  # NIfTI xform code "scanner anatomical": what dcm2niix writes for both forms
_INTENT_LABEL = "label"


def nifti_suffix(path: str | Path) -> str | None:
    """The NIfTI suffix of ``path`` as spelled there (``".nii.gz"`` or ``".nii"``, any case), else None."""
    return matching_suffix(path, NIFTI_SUFFIXES)


# --------------------------------------------------------------------------------------------- reading


def read_nifti(path: str | Path) -> MedicalImage:
    """Read a ``.nii`` / ``.nii.gz`` file as a channel-first image in array order.

    Args:
        path: The NIfTI file.

    Returns:
        A :class:`MedicalImage` with ``array`` of shape ``(1, z, y, x)`` for a 3D file (and a 2D file, kept as one
        slice), ``(T, z, y, x)`` for a 4D file ``(x, y, z, T)`` with channels named ``"phase 0"``, ...; the file's
        dtype (native byte order), or float32 when the header's scl_slope/scl_inter scale integer voxels.
        ``metadata["nifti_header"]`` is a copy of the header.

    Raises:
        ImageReadError: Missing file, not a NIfTI file, truncated or corrupt data, an unusable affine, an empty axis,
            or more than 4 axes. The message names the file and the fix.
    """
    path = Path(path)
    image = _load(path)
    voxel_shape = _usable_voxel_shape(image.shape, path)
    voxels = _read_voxels(image, path).reshape(voxel_shape)
    array = _to_array_order(voxels)
    try:
        geometry = ImageGeometry.from_nifti_affine(image.affine)
    except ValueError as error:
        raise ImageReadError(
            f"{path}: the header's affine is unusable ({error}). Fix the qform/sform (e.g. with nibabel, "
            "fslorient or 3D Slicer) or re-export the image."
        ) from None
    names = [f"phase {t}" for t in range(array.shape[0])] if len(voxel_shape) == 4 else []
    return MedicalImage(
        array=array,
        geometry=geometry,
        channel_names=names,
        source=path,
        format="nifti",
        metadata={"nifti_header": image.header.copy()},
    )


def _load(path: Path) -> nib.Nifti1Image:
    """The nibabel image of ``path`` (header parsed, data not yet read)."""
    if not path.is_file():
        what = "is a folder, not a NIfTI file" if path.is_dir() else "does not exist"
        raise ImageReadError(f"{path}: the file {what}. Check the path (and that the disk or share is mounted).")
    try:
        image = nib.load(path, mmap=False)  # in memory: no open map of a file the user may replace
    except (EOFError, zlib.error) as error:
        raise ImageReadError(_corrupt_message(path, error)) from None
    except Exception as error:  # nibabel raises ImageFileError, HeaderDataError, OSError, ValueError, ...
        if _is_gzip(path):  # nibabel could not decompress the header: the gzip stream is cut or damaged
            raise ImageReadError(_corrupt_message(path, error)) from None
        raise ImageReadError(
            f"{path}: not a readable NIfTI file ({_describe(error)}). Check that it really is a "
            ".nii/.nii.gz image (not a renamed file of another format); otherwise re-export or re-download it."
        ) from None
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise ImageReadError(f"{path}: nibabel read it as {type(image).__name__}, not NIfTI; convert it to NIfTI.")
    return image


def _describe(error: BaseException) -> str:
    """``"Type: message"`` on one line (nibabel's messages span lines)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _corrupt_message(path: Path, error: BaseException) -> str:
    return f"{path}: the file is truncated or corrupt ({_describe(error)}); re-export or re-download it."


def _is_gzip(path: Path) -> bool:
    """Whether the file starts with the gzip magic bytes (a broken .nii.gz rather than a wrong file)."""
    with path.open("rb") as file:
        return file.read(2) == b"\x1f\x8b"


def _usable_voxel_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """The voxel shape as 3D ``(i, j, k)`` or 4D ``(i, j, k, t)``: 2D gets one slice, trailing 1s beyond 4 go."""
    if any(size == 0 for size in shape):
        raise ImageReadError(
            f"{path}: the image has an empty axis (shape {shape}); the file holds no voxels. Re-export it."
        )
    voxel_shape = tuple(shape) + (1,) * max(0, 3 - len(shape))
    while len(voxel_shape) > 4 and voxel_shape[-1] == 1:
        voxel_shape = voxel_shape[:-1]
    if len(voxel_shape) > 4:
        raise ImageReadError(
            f"{path}: a {len(shape)}D NIfTI image (shape {shape}) is not supported; expected 3D (x, y, z) or 4D "
            "(x, y, z, phases or sequences). Split it into 3D or 4D files (e.g. with fslsplit or nibabel)."
        )
    return voxel_shape


def _read_voxels(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """All voxels in ``(i, j, k[, t])`` order, scaled by scl_slope/scl_inter in float32 (not float64) if set."""
    proxy = image.dataobj
    try:
        if not hasattr(proxy, "get_unscaled"):
            return np.asanyarray(proxy)
        raw = np.asanyarray(proxy.get_unscaled())
        slope, inter = float(proxy.slope), float(proxy.inter)
    except (EOFError, zlib.error, OSError, ValueError) as error:
        raise ImageReadError(_corrupt_message(path, error)) from None
    if raw.dtype.fields is not None or raw.dtype.kind not in "biuf":
        raise ImageReadError(
            f"{path}: voxels of type {raw.dtype} (RGB or complex NIfTI) are not supported; convert the image to "
            "one real-valued volume per channel."
        )
    if slope == 1.0 and inter == 0.0:
        return raw
    compute_dtype = raw.dtype if raw.dtype.kind == "f" else np.dtype(np.float32)
    scaled = raw.astype(compute_dtype)
    scaled *= compute_dtype.type(slope)
    scaled += compute_dtype.type(inter)
    return scaled


def _to_array_order(voxels: np.ndarray) -> np.ndarray:
    """``(i, j, k)`` → ``(1, k, j, i)``; ``(i, j, k, t)`` → ``(t, k, j, i)``; C-contiguous, native byte order."""
    if voxels.ndim == 3:
        voxels = voxels[..., None]
    array = voxels.transpose(3, 2, 1, 0)  # nibabel's arrays are Fortran-ordered: this view is C-contiguous
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------- writing


def write_nifti(
    array: np.ndarray,
    path: str | Path,
    geometry: ImageGeometry,
    *,
    reference: MedicalImage | None = None,
    overwrite: bool = False,
) -> Path:
    """Write labels ``(*spatial)`` or an image ``(C, *spatial)`` (C > 1 → the 4th NIfTI axis) to a NIfTI file.

    With a ``reference`` read from NIfTI, the file gets a copy of its header: same qform/sform codes, and (when
    ``geometry`` is the reference's) the same affine bit for bit. Otherwise a fresh header whose sform and qform hold
    ``geometry.nifti_affine()`` with code 1 (scanner). Integer arrays are written as labels: no scaling, intent
    "label". A 2D geometry gives a file with one slice. The file is written under a temporary name and renamed.

    Args:
        array: ``(*spatial)`` or ``(C, *spatial)`` in array order; a dtype of :data:`._atomic.WRITABLE_DTYPES`.
        path: Target ``.nii`` or ``.nii.gz`` file (nibabel compresses by the suffix).
        geometry: Where the voxels lie; its number of spatial axes fixes how ``array`` is read.
        reference: The image the array belongs to; its NIfTI header is reused when it has one.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: Bad suffix, dtype or shape.
    """
    path = Path(path)
    suffix = nifti_suffix(path)
    if suffix is None:
        raise ValueError(f"Cannot write {path} as NIfTI: the name must end with .nii or .nii.gz.")
    array = np.asarray(array)
    check_writable_dtype(array, path)
    voxels = _to_voxel_order(array, geometry.spatial_dims, path)
    header = _header_for(geometry, reference)
    is_labels = array.dtype.kind in "iu"
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(voxels, None, header=header)  # affine None: the header's qform/sform are written as they are
    image.set_data_dtype(array.dtype.newbyteorder("="))
    _clear_display_fields(image.header, is_labels)
    with atomic_output(path, overwrite=overwrite, suffix=suffix) as temporary:
        nib.save(image, temporary)
    return path


def _to_voxel_order(array: np.ndarray, spatial_dims: int, path: Path) -> np.ndarray:
    """``(*spatial)`` → ``(i, j, k)``; ``(C, *spatial)`` → ``(i, j, k)`` for C = 1, else ``(i, j, k, C)`` (views)."""
    if array.ndim == spatial_dims + 1:
        channels = array.shape[0]
        spatial = array[0] if channels == 1 else np.moveaxis(array, 0, -1)
    elif array.ndim == spatial_dims:
        channels, spatial = 1, array
    else:
        raise ValueError(
            f"Cannot write {path}: array shape {array.shape} is neither (*spatial) nor (channels, *spatial) for a "
            f"{spatial_dims}D geometry."
        )
    order = list(range(spatial_dims))[::-1] + ([spatial_dims] if channels > 1 else [])
    voxels = spatial.transpose(order)
    if spatial_dims == 2:  # a 2D image is one slice of a volume
        voxels = np.expand_dims(voxels, 2)
    return voxels


def _header_for(geometry: ImageGeometry, reference: MedicalImage | None) -> nib.Nifti1Header:
    """A copy of the reference's NIfTI header (affine updated if ``geometry`` differs), or a fresh header."""
    reference_header = None if reference is None else reference.metadata.get("nifti_header")
    if isinstance(reference_header, nib.Nifti1Header):
        header = reference_header.copy()
        try:
            same_geometry = ImageGeometry.from_nifti_affine(header.get_best_affine()) == geometry
        except ValueError:
            same_geometry = False
        if not same_geometry:
            _store_affine(header, geometry, int(header["sform_code"]), int(header["qform_code"]))
        return header
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    _store_affine(header, geometry, 0, 0)
    return header


def _store_affine(header: nib.Nifti1Header, geometry: ImageGeometry, sform_code: int, qform_code: int) -> None:
    """Put ``geometry`` into both the sform and the qform (which also sets the voxel sizes); code 0 → 1."""
    affine = geometry.nifti_affine()
    header.set_sform(affine, code=sform_code or _XFORM_SCANNER)
    header.set_qform(affine, code=qform_code or _XFORM_SCANNER)


def _clear_display_fields(header: nib.Nifti1Header, is_labels: bool) -> None:
    """Reset what described the reference's intensities: window, scaling, intent."""
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    header.set_slope_inter(None, None)
    header.set_intent(_INTENT_LABEL if is_labels else "none", ())
