"""npe2 reader: NIfTI, DICOM series and TIFF images as napari layers placed in mm, with their geometry kept.

What it claims (the manifest's ``filename_patterns`` plus ``accepts_directories``):

* ``.nii`` / ``.nii.gz`` files; a NIfTI written as labels (intent code "label", integer, one volume) opens as a
  Labels layer, anything else as Image layers;
* ``.tif`` / ``.tiff`` / ``.ome.tif`` files;
* a folder holding DICOM files (``.dcm`` or the DICOM magic) directly, and a ``.dcm`` file, which stands for its
  series, read from its folder. When a folder holds several series that share one geometry, they are read as
  channels (DCE phases exported as separate series); when their geometries differ, the first series (lowest
  SeriesNumber) is read. A napari notification says which series were read either way;
* a folder whose subfolders hold DICOM series (a study folder): claimed, and refused with an error listing them.

For anything else :func:`get_reader` returns None, so napari tries other readers. A file it claims but cannot read
raises :class:`~napari_mamba_seg.io.ImageReadError` naming the file, the problem and the fix.

Multi-channel images (DCE phases) become one layer per channel or one layer with a channel axis, as
:func:`channels_setting` says. Imports numpy, nibabel and tifffile (pydicom for DICOM); napari only to notify.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._napari._layer_data import CHANNELS_AS, METADATA_KEY, LayerData, image_layer_data
from napari_mamba_seg._napari._layer_data import plugin_metadata as _plugin_metadata
from napari_mamba_seg.io import ImageReadError, MedicalImage, read_image
from napari_mamba_seg.io.discover import is_dicom_file
from napari_mamba_seg.io.nifti import nifti_suffix
from napari_mamba_seg.io.tiff import tiff_suffix

__all__ = ["CHANNELS_ENV", "channels_setting", "get_reader", "read_layers"]

CHANNELS_ENV = "NAPARI_MAMBA_SEG_CHANNELS"
"""Environment variable: ``layers`` (default: one layer per DCE phase) or ``axis`` (one layer, a channel slider)."""

_NIFTI_INTENT_LABEL = 1002
_DICOM_FILES_PROBED = 8
_SERIES_LISTED = 6  # series named in a notification or error before "..."

PathOrPaths = str | os.PathLike | list[str] | tuple[str, ...]


def channels_setting() -> str:
    """How multi-channel images become layers: ``"layers"`` or ``"axis"`` (the user's setting).

    Read from the environment variable :data:`CHANNELS_ENV` (default ``"layers"``); kept in this one function so a
    settings panel can replace it.

    Raises:
        ValueError: The variable holds something else.
    """
    value = os.environ.get(CHANNELS_ENV, "").strip().lower() or "layers"
    if value not in CHANNELS_AS:
        raise ValueError(
            f"{CHANNELS_ENV}={os.environ[CHANNELS_ENV]!r} is not a valid setting; use one of {', '.join(CHANNELS_AS)} "
            "(or unset it for one layer per DCE phase)."
        )
    return value


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """npe2 ``get_reader``: :func:`read_layers` if ``path`` is an image this plugin reads, else None.

    Cheap: looks at the name, and for folders and suffix-less files at a few file headers (132 bytes each).

    Args:
        path: A file or folder, or a list holding one (a list of several is left to other readers).
    """
    single = _single_path(path)
    if single is None or _what_is(single) is None:
        return None
    return read_layers


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Read an image file or DICOM folder as napari layer data (the reader function :func:`get_reader` returns).

    Args:
        path: A path :func:`get_reader` claimed (or a list holding one).

    Returns:
        ``[(data, kwargs, "image"), ...]`` from :func:`image_layer_data` (per :func:`channels_setting`), or one
        ``(labels, kwargs, "labels")`` for a NIfTI label file.

    Raises:
        ImageReadError: The file or folder cannot be read (the message names it, the problem and the fix).
        ValueError: A bad :data:`CHANNELS_ENV` setting, or a list of several paths.
    """
    single = _single_path(path)
    if single is None:
        raise ValueError(f"napari-mamba-seg reads one file or folder at a time, got {path!r}")
    kind = _what_is(single)
    if kind == "dicom study":
        raise ImageReadError(_study_folder_message(single))
    image = _read_dicom(single) if kind == "dicom" else read_image(single)
    if _is_nifti_labels(image):
        return [_labels_layer_data(image)]
    return image_layer_data(image, channels_as=channels_setting())


# --------------------------------------------------------------------------------------------- claiming


def _single_path(path: PathOrPaths) -> Path | None:
    if isinstance(path, (list, tuple)):
        return Path(path[0]) if len(path) == 1 else None
    return Path(path)


def _what_is(path: Path) -> str | None:
    """``"image file"``, ``"dicom"`` (a series folder or file), ``"dicom study"`` (series in subfolders) or None."""
    if path.is_dir():
        if _holds_dicom(path):
            return "dicom"
        return "dicom study" if _dicom_subfolders(path) else None
    if nifti_suffix(path) is not None or tiff_suffix(path) is not None:
        return "image file"
    if is_dicom_file(path):
        return "dicom"
    return None


def _visible_entries(folder: Path) -> list[Path]:
    try:
        return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError:
        return []


def _holds_dicom(folder: Path) -> bool:
    """Whether the folder holds DICOM files directly: any ``.dcm``, or the DICOM magic in one of the first few."""
    files = [entry for entry in _visible_entries(folder) if entry.is_file() and entry.name.upper() != "DICOMDIR"]
    if any(file.suffix.lower() == ".dcm" for file in files):
        return True
    candidates = [file for file in files if nifti_suffix(file) is None and tiff_suffix(file) is None]
    return any(is_dicom_file(file) for file in candidates[:_DICOM_FILES_PROBED])


def _dicom_subfolders(folder: Path) -> list[Path]:
    """The subfolders (one level down) that hold DICOM files."""
    return [entry for entry in _visible_entries(folder) if entry.is_dir() and _holds_dicom(entry)]


def _study_folder_message(folder: Path) -> str:
    subfolders = _dicom_subfolders(folder)
    shown = ", ".join(entry.name for entry in subfolders[:_SERIES_LISTED])
    more = ", ..." if len(subfolders) > _SERIES_LISTED else ""
    return (
        f"{folder}: holds no DICOM files itself, but {len(subfolders)} of its subfolders do ({shown}{more}). "
        "Open one series folder at a time (File > Open Folder...)."
    )


# --------------------------------------------------------------------------------------------- reading


def _read_dicom(path: Path) -> MedicalImage:
    """A DICOM series (or a DCE group of series); falls back to the first series of a mixed folder, and says so."""
    try:
        image = read_image(path)
    except ImageReadError:
        if path.is_file():
            raise
        from napari_mamba_seg.io.dicom import list_dicom_series

        series = list_dicom_series(path)
        if len(series) < 2:
            raise
        image = read_image(path, series_uid=series[0].uid)  # its own clear error if this one is broken too
        others = "\n".join(f"  {info.summary()}" for info in series[1 : 1 + _SERIES_LISTED])
        more = "\n  ..." if len(series) > 1 + _SERIES_LISTED else ""
        _notify(
            f"{path.name}: {len(series)} image series that cannot be read together; read the first:\n"
            f"  {series[0].summary()}\nnot read:\n{others}{more}\n"
            "To open another series, put its files in a folder of their own (or use the command line's --series)."
        )
        return image
    uids = image.metadata.get("series_uids") or []
    if len(set(uids)) > 1:
        descriptions = image.metadata.get("series_descriptions") or [""] * len(uids)
        listing = ", ".join(f"{name} = {desc!r}" for name, desc in zip(image.channel_names, descriptions, strict=False))
        _notify(
            f"{path.name}: read {len(set(uids))} DICOM series with one geometry as the channels (DCE phases) of one "
            f"image: {listing}."
        )
    return image


def _notify(message: str) -> None:
    """Show ``message`` as a napari notification (napari is running when a reader is used)."""
    from napari.utils.notifications import show_info

    show_info(message)


def _is_nifti_labels(image: MedicalImage) -> bool:
    """A NIfTI written as labels: intent code "label", integer voxels, one volume."""
    header = image.metadata.get("nifti_header")
    if image.format != "nifti" or header is None or image.num_channels != 1:
        return False
    return int(header.get("intent_code", 0)) == _NIFTI_INTENT_LABEL and image.array.dtype.kind in "iub"


def _labels_layer_data(image: MedicalImage) -> LayerData:
    scale, translate = image.geometry.napari_scale_translate()
    entry: dict[str, Any] = _plugin_metadata(image, channel_index=None)
    kwargs = {
        "name": image.name,
        "scale": tuple(scale),
        "translate": tuple(translate),
        "metadata": {METADATA_KEY: entry},
    }
    return (np.asarray(image.array[0]), kwargs, "labels")
