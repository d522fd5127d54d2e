"""Turn the paths a user gives the command line into a list of image inputs (files and DICOM folders).

* A NIfTI/TIFF file is one input; a DICOM file (``.dcm`` or DICOM magic) stands for its folder's series.
* A folder holding NIfTI/TIFF files directly gives those files (natural sort: ``case2`` before ``case10``); a folder
  holding DICOM files (``.dcm``, or the 128-byte preamble + ``b"DICM"``, checked on a few files) is one input.
* A folder holding neither is searched in its subfolders, recursively.

Hidden entries (``.name``: temporary files, ``.DS_Store``) are ignored. Inputs are unique and in a deterministic
order. This module imports the standard library only (plus the suffix helpers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from napari_mamba_seg.io._image import ImageReadError
from napari_mamba_seg.io.nifti import nifti_suffix
from napari_mamba_seg.io.tiff import tiff_suffix

__all__ = ["discover_inputs", "is_dicom_file", "is_image_file"]

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_FILES_PROBED_FOR_DICOM = 8
# Files that sit beside DICOM series but are never DICOM themselves: not worth opening.
_NOT_DICOM_SUFFIXES = {
    ".txt", ".json", ".csv", ".tsv", ".md", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".py",
    ".zip", ".gz", ".log", ".yaml", ".yml", ".ini", ".db", ".mat", ".npy", ".npz", ".h5",
}  # fmt: skip


def is_image_file(path: Path) -> bool:
    """Whether ``path``'s name ends with a NIfTI or TIFF suffix (.nii, .nii.gz, .tif, .tiff, .ome.tif)."""
    return nifti_suffix(path) is not None or tiff_suffix(path) is not None


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` looks like a DICOM file: a ``.dcm`` suffix, or ``b"DICM"`` after the 128-byte preamble.

    Cheap (reads at most 132 bytes); a file without either is not necessarily not DICOM (old files without a
    preamble), and a ``.dcm`` file may still be corrupt. False for anything that is not an existing file.
    """
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as file:
            head = file.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


def discover_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The image inputs in ``paths``: NIfTI/TIFF files and DICOM series folders, unique, in a deterministic order.

    Args:
        paths: Files and folders, as given on the command line.

    Returns:
        Files (NIfTI, TIFF) and folders (one DICOM series folder each), in the order of ``paths`` and, inside a
        folder, in natural name order; an input reached twice is listed once (first occurrence).

    Raises:
        ImageReadError: A path does not exist, a file has an unsupported suffix, or a folder (with its subfolders)
            holds no NIfTI, TIFF or DICOM file.
    """
    inputs: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ImageReadError(f"{path}: no such file or folder. Check the path (and that the disk is mounted).")
        found = _inputs_in_folder(path, visited=set()) if path.is_dir() else [_input_for_file(path)]
        if not found:
            raise ImageReadError(
                f"{path}: no NIfTI, TIFF or DICOM files found; give a folder holding .nii/.nii.gz/.tif/.tiff files "
                "or a DICOM series (or folders of them), or the image files themselves."
            )
        for item in found:
            key = item.resolve()
            if key not in seen:
                seen.add(key)
                inputs.append(item)
    return inputs


def _input_for_file(path: Path) -> Path:
    """A NIfTI/TIFF file itself; a DICOM file's folder (its series); anything else is an error."""
    if is_image_file(path):
        return path
    if is_dicom_file(path):
        return path.parent
    raise ImageReadError(
        f"{path}: unsupported file type; supported are .nii, .nii.gz, .tif, .tiff, .ome.tif and DICOM files "
        "(.dcm or a folder of them). Convert the image to NIfTI or TIFF, or give its DICOM folder."
    )


def _inputs_in_folder(folder: Path, visited: set[Path]) -> list[Path]:
    """Image files directly in ``folder`` and ``folder`` itself if it holds DICOM; else its subfolders' inputs."""
    real = folder.resolve()
    if real in visited:  # a symbolic link loop
        return []
    visited.add(real)
    try:
        entries = sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")), key=_natural_key)
    except OSError as error:
        raise ImageReadError(f"{folder}: the folder cannot be listed ({error}); check its permissions.") from None
    files = [entry for entry in entries if entry.is_file()]
    images = [entry for entry in files if is_image_file(entry)]
    found = images + ([folder] if _holds_dicom(entry for entry in files if not is_image_file(entry)) else [])
    if found:
        return found
    for entry in entries:
        if entry.is_dir():
            found.extend(_inputs_in_folder(entry, visited))
    return found


def _holds_dicom(files: Iterable[Path]) -> bool:
    """Whether any ``.dcm`` file is among ``files``, or one of the first few others has the DICOM magic."""
    candidates = [
        file for file in files if file.name.upper() != "DICOMDIR" and file.suffix.lower() not in _NOT_DICOM_SUFFIXES
    ]
    if any(file.suffix.lower() == ".dcm" for file in candidates):
        return True
    return any(is_dicom_file(file) for file in candidates[:_FILES_PROBED_FOR_DICOM])


def _natural_key(path: Path) -> tuple[list[str | int], str]:
    """Sort key putting ``case2`` before ``case10``; the name breaks ties (``a01`` vs ``a1``)."""
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(part) if index % 2 else part for index, part in enumerate(parts)], path.name
