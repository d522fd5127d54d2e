"""TIFF reading and writing with tifffile: ImageJ hyperstacks, OME-TIFF and plain TIFF.

Reading gives a channel-first array ``(C, z, y, x)`` or, for a 2D TIFF, ``(C, y, x)`` with a 2D geometry. Where the
voxel size comes from, first match wins:

1. A file written by :func:`write_tiff`: the full affine (spacing, origin, direction) from a private TIFF tag.
2. OME-TIFF: ``PhysicalSizeX/Y/Z`` and their units from the OME-XML.
3. ImageJ: the ``XResolution``/``YResolution`` tags with the ``unit`` of the ImageJ description, and its ``spacing``
   for z.
4. Anything else: 1 mm per voxel, ``metadata["spacing_known"] = False``.

Other software's TIFFs give spacing only: the origin is 0 and the axes are mapped as a NIfTI affine
``diag(sx, sy, sz)`` would map them (x → R, y → A, z → S). Units (m, cm, mm, µm/micron, nm, inch) become mm.

Axes: ``C`` gives the channels; without ``C`` a ``T`` (time points, e.g. DCE phases) or ``S`` (RGB samples) axis
does; ``Z`` (or, without ``Z``, the page axis ``I``/``Q`` of a plain multi-page TIFF) is the slice axis. Any other
axis longer than 1 is an error.

This module imports numpy and tifffile only (no torch, no napari).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_mamba_seg.io._atomic import atomic_output, check_writable_dtype
from napari_mamba_seg.io._image import ImageGeometry, ImageReadError, MedicalImage, matching_suffix

__all__ = ["TIFF_SUFFIXES", "read_tiff", "tiff_suffix", "write_tiff"]

TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
GEOMETRY_TAG = 65099  # private TIFF tag (65000-65535 are private): JSON with our full affine
_GEOMETRY_KEY = "napari_mamba_seg_geometry"
# Exact conversion factors to millimetres (Fractions: 0.5 µm → 0.0005 mm without a stray last bit).
_MM_PER_UNIT = {
    "m": Fraction(1000),
    "cm": Fraction(10),
    "mm": Fraction(1),
    "um": Fraction(1, 1000),
    "micron": Fraction(1, 1000),
    "microns": Fraction(1, 1000),
    "micrometer": Fraction(1, 1000),
    "micrometre": Fraction(1, 1000),
    "nm": Fraction(1, 10**6),
    "nanometer": Fraction(1, 10**6),
    "a": Fraction(1, 10**7),
    "angstrom": Fraction(1, 10**7),
    "pm": Fraction(1, 10**9),
    "inch": Fraction(254, 10),
    "in": Fraction(254, 10),
}


def tiff_suffix(path: str | Path) -> str | None:
    """The TIFF suffix of ``path`` as spelled there (``.ome.tif``, ``.tif``, ... any case), else None."""
    return matching_suffix(path, TIFF_SUFFIXES)


# --------------------------------------------------------------------------------------------- reading


def read_tiff(path: str | Path) -> MedicalImage:
    """Read a TIFF (ImageJ hyperstack, OME-TIFF, plain) as a channel-first image in array order.

    Args:
        path: The TIFF file; the first image series is read.

    Returns:
        A :class:`MedicalImage` with ``array`` ``(C, z, y, x)`` (or ``(C, y, x)`` and a 2D geometry for a 2D TIFF)
        in the file's dtype (bool → uint8, native byte order). ``metadata``: ``"axes"`` (the file's axes, tifffile
        letters), ``"tiff_kind"`` (``"napari-mamba-seg"``, ``"ome"``, ``"imagej"`` or ``"plain"``) and
        ``"spacing_known"``.

    Raises:
        ImageReadError: Missing file, not a TIFF, corrupt data, or an axis that is neither spatial nor channels.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a TIFF file" if path.is_dir() else "does not exist"
        raise ImageReadError(f"{path}: the file {what}. Check the path (and that the disk or share is mounted).")
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(path) as tif:
            image = _read_open_tiff(tif, path)
        if errors:  # tifffile logs (rather than raises) broken page offsets and series it cannot shape
            raise ImageReadError(
                f"{path}: the file is truncated or corrupt (tifffile: {errors[0]}); re-export or re-download it."
            )
        return image
    except ImageReadError:
        raise
    except Exception as error:  # TiffFileError, truncated strips, bad compression, broken metadata, ...
        if isinstance(error, tifffile.TiffFileError) and not _has_tiff_magic(path):
            raise ImageReadError(
                f"{path}: not a readable TIFF file ({error}). Check that it really is a .tif/.tiff image (not a "
                "renamed file of another format); otherwise re-export or re-download it."
            ) from None
        raise ImageReadError(
            f"{path}: the file is truncated or corrupt ({type(error).__name__}: {' '.join(str(error).split())}); "
            "re-export or re-download it."
        ) from None


def _has_tiff_magic(path: Path) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (so a read error means damage, not a wrong format)."""
    with path.open("rb") as file:
        return file.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class _ErrorRecords(logging.Handler):
    """Collects the messages of ERROR records."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """The errors tifffile logs while the block runs."""
    logger = logging.getLogger("tifffile")
    handler = _ErrorRecords()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _read_open_tiff(tif: tifffile.TiffFile, path: Path) -> MedicalImage:
    if not tif.series:
        raise ImageReadError(f"{path}: the TIFF holds no image; re-export it.")
    series = tif.series[0]
    file_axes = series.get_axes(False)
    data = series.asarray().reshape(series.get_shape(False))
    own_affine = _own_affine(tif)
    wanted_dims = None if own_affine is None else own_affine.shape[0] - 1
    array, spatial_axes, channel_axis = _channel_first(data, file_axes, path, wanted_dims)
    spacing, kind, known = _spacing_mm(tif, spatial_axes)
    if own_affine is not None and _agrees(own_affine, spacing, kind):
        geometry, kind, known = ImageGeometry(own_affine), "napari-mamba-seg", True
    else:
        geometry = _geometry_from_spacing(spacing)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    return MedicalImage(
        array=array,
        geometry=geometry,
        channel_names=_channel_names(tif, channel_axis, array.shape[0]),
        source=path,
        format="tiff",
        metadata={"axes": series.axes, "tiff_kind": kind, "spacing_known": known},
    )


def _channel_first(
    data: np.ndarray, axes: str, path: Path, wanted_dims: int | None
) -> tuple[np.ndarray, str, str | None]:
    """Reorder ``data`` with tifffile ``axes`` to ``(C, [Z,] Y, X)``.

    Returns:
        ``(array, spatial_axes, channel_axis)``: ``spatial_axes`` is ``"ZYX"`` or ``"YX"``; ``channel_axis`` the
        letter that gave the channels, or None for a single channel.
    """
    keep = [i for i, axis in enumerate(axes) if data.shape[i] > 1 or axis in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Z" not in axes:
        for page_axis in "IQ":
            if page_axis in axes:
                axes = axes.replace(page_axis, "Z")
                break
    channel_axis = next((axis for axis in "CTS" if axis in axes), None)
    known = "ZYX" + (channel_axis or "")
    extra = [f"{axis} ({data.shape[axes.index(axis)]})" for axis in axes if axis not in known]
    if extra or "Y" not in axes or "X" not in axes:
        raise ImageReadError(
            f"{path}: axes {axes} (shape {data.shape}) cannot be read as channels × z × y × x: the axes "
            f"{', '.join(extra) or 'Y/X'} have no place. Save one volume per file (e.g. split time points or "
            "positions in Fiji: Image > Stacks > Tools) with at most one channel-like axis (C, or T without C)."
        )
    if wanted_dims == 3 and "Z" not in axes:  # our own 3D file with one slice: tifffile squeezed Z
        data, axes = data[np.newaxis], "Z" + axes
    order = [axes.index(axis) for axis in (channel_axis or "") + ("Z" if "Z" in axes else "") + "YX"]
    array = data.transpose(order)
    if channel_axis is None:
        array = array[np.newaxis]
    return array, "ZYX" if "Z" in axes else "YX", channel_axis


def _spacing_mm(tif: tifffile.TiffFile, spatial_axes: str) -> tuple[dict[str, float], str, bool]:
    """Voxel size in mm per spatial axis letter, where it came from, and whether it is known for every axis."""
    sizes: dict[str, float | None] = {}
    kind = "plain"
    if tif.is_ome and tif.ome_metadata:
        sizes, kind = _ome_sizes(tif.ome_metadata), "ome"
    elif tif.is_imagej and tif.imagej_metadata is not None:
        sizes, kind = _imagej_sizes(tif), "imagej"
    spacing = {axis: sizes.get(axis) for axis in spatial_axes}
    known = kind != "plain" and all(value is not None for value in spacing.values())
    in_plane = [value for axis, value in spacing.items() if axis in "YX" and value is not None]
    for axis, value in spacing.items():
        if value is None:  # unknown: z as the mean in-plane size (isotropic guess), in-plane 1 mm
            spacing[axis] = float(np.mean(in_plane)) if axis == "Z" and len(in_plane) == 2 else 1.0
    return spacing, kind, known


def _to_mm(value: Any, unit: str | None) -> float | None:
    """``value`` in ``unit`` as mm; None when either is missing, not positive or the unit is not a length."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number <= 0 or unit is None:
        return None
    key = unit.strip().lower().replace("\\u00b5", "u").replace("\u00b5", "u").replace("\u03bc", "u")
    factor = _MM_PER_UNIT.get(key)
    if factor is None:
        return None
    return float(Fraction(number) * factor)


def _ome_sizes(ome_xml: str) -> dict[str, float | None]:
    """``PhysicalSize{X,Y,Z}`` of the first OME ``Pixels`` element, in mm (OME's default unit is µm)."""
    root = ElementTree.fromstring(ome_xml)
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    return {
        axis: _to_mm(pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")) for axis in "XYZ"
    }


def _imagej_sizes(tif: tifffile.TiffFile) -> dict[str, float | None]:
    """x/y from the resolution tags (pixels per unit), z from ``spacing``, all in the description's ``unit``."""
    metadata = tif.imagej_metadata or {}
    unit = metadata.get("unit")
    tags = tif.pages.first.tags
    sizes: dict[str, float | None] = {}
    for axis, tag_name in (("X", "XResolution"), ("Y", "YResolution")):
        tag = tags.get(tag_name)
        pixels_per_unit = Fraction(*tag.value) if tag is not None and tag.value[0] and tag.value[1] else Fraction(1)
        sizes[axis] = _to_mm(1 / pixels_per_unit, unit)
    sizes["Z"] = _to_mm(metadata.get("spacing"), unit)
    return sizes


def _own_affine(tif: tifffile.TiffFile) -> np.ndarray | None:
    """The affine :func:`write_tiff` stored in its private tag, or None (absent, unreadable, not ours)."""
    tag = tif.pages.first.tags.get(GEOMETRY_TAG)
    if tag is None:
        return None
    try:
        record = json.loads(tag.value)
        affine = np.asarray(record[_GEOMETRY_KEY]["affine"], dtype=np.float64)
        ImageGeometry(affine)  # validates shape and values
    except (ValueError, TypeError, KeyError):
        return None
    return affine


def _agrees(affine: np.ndarray, spacing: dict[str, float], kind: str) -> bool:
    """Whether our stored affine still fits: an OME file (as we write) whose voxel sizes are the affine's."""
    geometry = ImageGeometry(affine)
    if kind != "ome" or geometry.spatial_dims != len(spacing):
        return False
    return bool(np.allclose(geometry.spacing, [spacing[axis] for axis in "ZYX" if axis in spacing], rtol=1e-9, atol=0))


def _geometry_from_spacing(spacing: dict[str, float]) -> ImageGeometry:
    """Origin 0, x → R, y → A, z → S (as NIfTI's ``diag(sx, sy, sz)``), in array order."""
    if "Z" in spacing:
        return ImageGeometry.from_nifti_affine(np.diag([spacing["X"], spacing["Y"], spacing["Z"], 1.0]))
    affine = np.eye(3)
    affine[:2, :2] = [[0.0, spacing["X"]], [spacing["Y"], 0.0]]  # column 0 = array axis y → A; column 1 = x → R
    return ImageGeometry(affine)


def _channel_names(tif: tifffile.TiffFile, channel_axis: str | None, channels: int) -> list[str]:
    """OME channel names when given, else ``"channel c"`` / ``"time t"`` / RGB names."""
    if channel_axis == "C" and tif.is_ome and tif.ome_metadata:
        root = ElementTree.fromstring(tif.ome_metadata)
        names = [element.get("Name") for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Channel"]
        if len(names) == channels and all(names):
            return [str(name) for name in names]
    if channel_axis == "T":
        return [f"time {t}" for t in range(channels)]
    if channel_axis == "S" and channels in (3, 4):
        return ["red", "green", "blue", "alpha"][:channels]
    return [f"channel {c}" for c in range(channels)]


# --------------------------------------------------------------------------------------------- writing


def write_tiff(array: np.ndarray, path: str | Path, geometry: ImageGeometry, *, overwrite: bool = False) -> Path:
    """Write labels ``(*spatial)`` or an image ``(C, *spatial)`` as an OME-TIFF with the voxel size in mm.

    ``PhysicalSizeX/Y/Z`` are the exact float spacings in mm, so any OME reader gets the spacing back exactly; the
    resolution tags carry it too (pixels per cm) for ImageJ's plain TIFF reader. The full affine (origin, direction)
    is stored as JSON in a private tag that only :func:`read_tiff` uses. Integer arrays are zlib-compressed.

    Args:
        array: ``(*spatial)`` (e.g. uint8/uint16 labels) or ``(C, *spatial)`` in array order.
        path: Target ``.tif``/``.tiff``/``.ome.tif`` file.
        geometry: Where the voxels lie; its number of spatial axes fixes how ``array`` is read.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: Bad suffix, dtype or shape.
    """
    path = Path(path)
    suffix = tiff_suffix(path)
    if suffix is None:
        raise ValueError(f"Cannot write {path} as TIFF: the name must end with .tif, .tiff or .ome.tif.")
    array = np.ascontiguousarray(array)
    check_writable_dtype(array, path)
    spatial_axes = "ZYX"[-geometry.spatial_dims :]
    if array.ndim == geometry.spatial_dims:
        axes = spatial_axes
    elif array.ndim == geometry.spatial_dims + 1:
        axes = "C" + spatial_axes
    else:
        raise ValueError(
            f"Cannot write {path}: array shape {array.shape} is neither (*spatial) nor (channels, *spatial) for a "
            f"{geometry.spatial_dims}D geometry."
        )
    spacing = dict(zip(spatial_axes, geometry.spacing, strict=True))
    metadata: dict[str, Any] = {"axes": axes}
    for axis, size in spacing.items():
        metadata[f"PhysicalSize{axis}"] = size
        metadata[f"PhysicalSize{axis}Unit"] = "mm"
    record = json.dumps({_GEOMETRY_KEY: {"version": 1, "affine": geometry.affine.tolist(), "axes": axes}})
    with atomic_output(path, overwrite=overwrite, suffix=suffix) as temporary:
        tifffile.imwrite(
            temporary,
            array,
            ome=True,
            photometric="minisblack",
            metadata=metadata,
            resolution=(10.0 / spacing["X"], 10.0 / spacing["Y"]),
            resolutionunit="CENTIMETER",
            compression="zlib" if array.dtype.kind in "iu" else None,
            extratags=[(GEOMETRY_TAG, "s", 0, record, True)],
        )
    return path
