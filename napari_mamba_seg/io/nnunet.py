"""Export corrected cases as an nnU-Net v2 raw data set (what :class:`~napari_mamba_seg.training.NnUNetRawDataset`
and nnU-Net's own planning read), and write a provenance record beside it.

Layout written (one case per call; further calls append)::

    Dataset001_Breast/
        dataset.json     {"channel_names": {"0": "phase 0", ...}, "labels": {"background": 0, "lesion": 1,
                          "ignore": 2}, "numTraining": 2, "file_ending": ".nii.gz"}
        imagesTr/        <case>_0000.nii.gz, <case>_0001.nii.gz, ...   (one file per channel, the image's geometry)
        labelsTr/        <case>.nii.gz                                  (labels on the same voxel grid)

Voxels outside a ``trusted`` mask (e.g. slices nobody reviewed) get nnU-Net's ``"ignore"`` label, the highest label
value, so they add nothing to the loss. A case is all or nothing: its files are written into a hidden staging folder
inside the data set folder, then renamed into place, then ``dataset.json`` is replaced in one atomic rename; a
failure anywhere removes what was staged and moved, restores replaced files and leaves ``dataset.json`` as it was.

This module imports numpy, nibabel (through :mod:`.nifti`) and the standard library only.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._durable import file_sha256
from napari_mamba_seg.io._atomic import WRITABLE_DTYPES, StagedFiles, atomic_output, integer_labels
from napari_mamba_seg.io._image import MedicalImage
from napari_mamba_seg.io.nifti import write_nifti

__all__ = ["NnUNetExport", "export_nnunet_case", "file_sha256", "sanitize_case_name", "write_provenance"]

FILE_ENDING = ".nii.gz"
IGNORE_LABEL_NAME = "ignore"
BACKGROUND_NAME = "background"
_MAX_LABEL = int(np.iinfo(np.uint16).max)
_MAX_CASE_NAME = 120
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


@dataclass(frozen=True)
class NnUNetExport:
    """What :func:`export_nnunet_case` wrote.

    Attributes:
        folder: The data set folder.
        case_name: The case identifier used in the file names (sanitised).
        requested_name: The name the caller gave (differs from ``case_name`` when it had to be sanitised).
        image_files: ``imagesTr/<case>_0000.nii.gz``, ... one per channel.
        label_file: ``labelsTr/<case>.nii.gz``.
        dataset_json: The ``dataset.json`` written.
        num_training: Number of cases in the folder now (``numTraining``).
        ignore_label: The value of the ``"ignore"`` label in ``dataset.json``, or None when it has none.
        num_ignored_voxels: Voxels of this case stored as ``"ignore"`` (untrusted).
    """

    folder: Path
    case_name: str
    requested_name: str
    image_files: tuple[Path, ...]
    label_file: Path
    dataset_json: Path
    num_training: int
    ignore_label: int | None
    num_ignored_voxels: int

    @property
    def files(self) -> tuple[Path, ...]:
        """Every case file written (channels, then labels), e.g. for a provenance record."""
        return (*self.image_files, self.label_file)


# --------------------------------------------------------------------------------------------- case names


def sanitize_case_name(name: str) -> str:
    """A case identifier safe in file names on every OS and unambiguous for nnU-Net.

    Accents are dropped (``é`` → ``e``); any run of other characters than ASCII letters, digits, ``_`` and ``-``
    becomes ``_`` (so no dots, slashes or spaces, hence no leading dot); leading/trailing ``_``/``-`` go; a trailing
    ``_0000``-like channel suffix becomes ``-0000``; Windows device names get ``_case``; at most 120 characters; an
    empty result becomes ``"case"``.

    Args:
        name: The requested name, e.g. an image's file name stem.

    Returns:
        The safe name (``name`` itself when it already was safe).
    """
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    safe = _UNSAFE_CHARACTERS.sub("_", ascii_name).strip("_-")[:_MAX_CASE_NAME].strip("_-")
    safe = _CHANNEL_SUFFIX.sub(r"-\1", safe)
    if safe.upper() in _WINDOWS_RESERVED:
        safe = f"{safe}_case"
    return safe or "case"


# --------------------------------------------------------------------------------------------- export


def export_nnunet_case(
    folder: str | os.PathLike[str],
    case_name: str,
    image: MedicalImage,
    labels: np.ndarray,
    *,
    channel_names: Sequence[str],
    class_names: Sequence[str],
    trusted: np.ndarray | None = None,
    overwrite: bool = False,
) -> NnUNetExport:
    """Add one case (image channels + labels) to an nnU-Net v2 raw data set folder, creating it when missing.

    Args:
        folder: The data set folder, e.g. ``nnUNet_raw/Dataset101_BreastCorrected``; created when missing.
        case_name: The case identifier; sanitised with :func:`sanitize_case_name` (the result says the name used).
        image: The image, ``(C, *spatial)``; each channel is written to its own file with the image's geometry (and
            its NIfTI header when it was read from NIfTI, so the affine survives bit for bit).
        labels: ``(*spatial)`` integer (or bool) labels on the image's voxel grid, values in
            ``[0, len(class_names))``.
        channel_names: One name per image channel, e.g. ``["pre", "post 1", "post 2"]`` (nnU-Net picks the
            normalisation by name: ``"CT"`` means CT normalisation, anything else z-score).
        class_names: One name per class, ``"background"`` first, e.g. ``["background", "lesion"]``.
        trusted: ``(*spatial)`` bool: True where the labels are known to be right (e.g. reviewed slices); the other
            voxels are stored as the ``"ignore"`` label (value ``len(class_names)``). None: every voxel trusted.
        overwrite: Replace an existing case of the same name (other cases are never touched).

    Returns:
        What was written, with the case name used and the new ``numTraining``.

    Raises:
        ValueError: Bad input (names, shapes, dtypes, label values, no foreground where every voxel is trusted, no
            trusted voxel), or an existing ``dataset.json`` whose channels, classes or file ending differ.
        FileExistsError: The case exists and ``overwrite`` is False.
        PermissionError: The folder (or its ``imagesTr``/``labelsTr``) is not writable.
        Nothing is written in any of these cases.
    """
    folder = Path(folder)
    name = sanitize_case_name(case_name)
    channel_names, class_names = _checked_names(image, channel_names, class_names)
    label_volume = _checked_labels(image, labels, class_names, folder, name)
    trust = _checked_trust(image, trusted, label_volume, folder, name)
    _check_writable_folder(folder)
    existing = _read_existing_dataset_json(folder)
    dataset = _merged_dataset_json(existing, folder, channel_names, class_names, needs_ignore=trust is not None)
    ignore_label = dataset["labels"].get(IGNORE_LABEL_NAME)
    image_files = [folder / "imagesTr" / f"{name}_{channel:04d}{FILE_ENDING}" for channel in range(len(channel_names))]
    label_file = folder / "labelsTr" / f"{name}{FILE_ENDING}"
    _refuse_existing_case(folder, name, [*image_files, label_file], overwrite)
    stored_labels, ignored = _labels_to_store(label_volume, trust, ignore_label)
    cases = _case_names_present(folder) | {name}
    dataset["numTraining"] = len(cases)
    subfolders = (folder / "imagesTr", folder / "labelsTr")
    with StagedFiles(folder, prefix=".nnunet-export-", create=(folder, *subfolders)) as staging:
        for channel, path in enumerate(image_files):
            _write_channel(image, channel, staging.stage(path))
        _write_label_volume(stored_labels, image, staging.stage(label_file))
        _write_json(dataset, staging.stage(folder / "dataset.json"))
        staging.commit(overwrite=True)  # the case was refused above unless overwrite; dataset.json is always replaced
    return NnUNetExport(
        folder=folder,
        case_name=name,
        requested_name=str(case_name),
        image_files=tuple(image_files),
        label_file=label_file,
        dataset_json=folder / "dataset.json",
        num_training=len(cases),
        ignore_label=ignore_label,
        num_ignored_voxels=ignored,
    )


def _checked_names(
    image: MedicalImage, channel_names: Sequence[str], class_names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The channel and class names as lists of strings, checked against the image and nnU-Net's rules."""
    if not isinstance(image, MedicalImage):
        raise TypeError(
            f"image must be a MedicalImage (see napari_mamba_seg.io.read_image), got {type(image).__name__}"
        )
    channels = [str(n) for n in channel_names]
    if len(channels) != image.num_channels or any(not n.strip() for n in channels):
        raise ValueError(
            f"channel_names must give one non-empty name per image channel ({image.num_channels}: "
            f"{image.channel_names}), got {channels}"
        )
    classes = [str(n) for n in class_names]
    if len(classes) < 2 or classes[0] != BACKGROUND_NAME:
        raise ValueError(
            f'class_names must list "{BACKGROUND_NAME}" first and at least one class, e.g. ["background", "lesion"] '
            f"(nnU-Net requires background = 0), got {classes}"
        )
    if len(set(classes)) != len(classes) or IGNORE_LABEL_NAME in classes or any(not n.strip() for n in classes):
        raise ValueError(
            f'class_names must be unique, non-empty and not "{IGNORE_LABEL_NAME}" (reserved for untrusted voxels), '
            f"got {classes}"
        )
    return channels, classes


def _checked_labels(
    image: MedicalImage, labels: np.ndarray, class_names: list[str], folder: Path, name: str
) -> np.ndarray:
    """``labels`` as an integer array on the image's grid with values that are classes."""
    where = f"case {name!r} for {folder}"
    labels = np.asarray(labels)
    if labels.shape != image.spatial_shape:
        raise ValueError(
            f"Cannot export {where}: labels have shape {labels.shape} but the image's spatial shape is "
            f"{image.spatial_shape} (array order); they must lie on the same voxel grid."
        )
    labels = integer_labels(labels, folder / "labelsTr" / f"{name}{FILE_ENDING}")
    lowest, highest = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lowest < 0 or highest >= len(class_names):
        raise ValueError(
            f"Cannot export {where}: label values must lie in [0, {len(class_names) - 1}] (class_names "
            f"{class_names}), got [{lowest}, {highest}]; add the missing classes or fix the labels."
        )
    if len(class_names) > _MAX_LABEL:
        raise ValueError(f"Cannot export {where}: at most {_MAX_LABEL} classes, got {len(class_names)}.")
    return labels


def _checked_trust(
    image: MedicalImage, trusted: np.ndarray | None, labels: np.ndarray, folder: Path, name: str
) -> np.ndarray | None:
    """The trust mask (None when every voxel is trusted); refuses a case with nothing to learn from."""
    where = f"case {name!r} for {folder}"
    if trusted is not None:
        trusted = np.asarray(trusted)
        if trusted.dtype != bool or trusted.shape != image.spatial_shape:
            raise ValueError(
                f"Cannot export {where}: trusted must be a bool mask of the image's spatial shape "
                f"{image.spatial_shape}, got shape {trusted.shape} and dtype {trusted.dtype}."
            )
        if not trusted.any():
            raise ValueError(
                f"Cannot export {where}: no voxel is trusted (the trusted mask is all False, e.g. no slice was "
                "reviewed); review some slices first or pass trusted=None to trust every voxel."
            )
        if trusted.all():
            trusted = None
    if trusted is None and not labels.any():
        raise ValueError(
            f"Cannot export {where}: the labels are all background; a case without any labelled structure "
            "teaches nothing. Export the labels after segmenting, or pass a trusted mask of the reviewed slices."
        )
    return trusted


def _labels_to_store(
    labels: np.ndarray, trusted: np.ndarray | None, ignore_label: int | None
) -> tuple[np.ndarray, int]:
    """The label volume as written (ignore label where untrusted), uint8 or uint16, and the number ignored."""
    ignored = 0
    if trusted is not None:
        assert ignore_label is not None  # declared whenever a trust mask is given
        labels = np.where(trusted, labels, ignore_label)
        ignored = int(trusted.size - np.count_nonzero(trusted))
    highest = int(labels.max()) if labels.size else 0
    return labels.astype(np.uint8 if highest < 256 else np.uint16), ignored


# --------------------------------------------------------------------------------------------- folder checks


def _check_writable_folder(folder: Path) -> None:
    """PermissionError/ValueError unless ``folder`` (and its sub folders, where present) can be created and written."""
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"Cannot export to {folder}: {ancestor} is a file, not a folder. Choose a data set folder elsewhere."
        )
    for path in (ancestor, folder / "imagesTr", folder / "labelsTr"):
        if path.exists() and not path.is_dir():
            raise ValueError(f"Cannot export to {folder}: {path} is a file, not a folder. Move it away first.")
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(
                f"Cannot export to {folder}: {path} is not writable. Choose a folder you can write to, or fix its "
                "permissions."
            )


def _read_existing_dataset_json(folder: Path) -> dict[str, Any] | None:
    """The folder's ``dataset.json`` (None when there is none and no case yet); ValueError when unusable."""
    path = folder / "dataset.json"
    if not path.exists():
        if _case_names_present(folder):
            raise ValueError(
                f"Cannot export to {folder}: labelsTr holds cases but there is no dataset.json; restore it or "
                "export into a new folder."
            )
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Cannot export to {folder}: {path} is not readable JSON ({error}); fix or remove it."
        ) from None
    if not isinstance(info, dict) or not all(key in info for key in ("channel_names", "labels", "file_ending")):
        raise ValueError(
            f"Cannot export to {folder}: {path} is not an nnU-Net v2 dataset.json (it needs channel_names, labels "
            "and file_ending); fix it or export into a new folder."
        )
    return info


def _merged_dataset_json(
    existing: dict[str, Any] | None,
    folder: Path,
    channel_names: list[str],
    class_names: list[str],
    *,
    needs_ignore: bool,
) -> dict[str, Any]:
    """The ``dataset.json`` content after adding a case (``numTraining`` set later); refuses a mismatch."""
    channels = {str(index): name for index, name in enumerate(channel_names)}
    labels: dict[str, int] = {name: value for value, name in enumerate(class_names)}
    if existing is None:
        if needs_ignore:
            labels[IGNORE_LABEL_NAME] = len(class_names)
        return {"channel_names": channels, "labels": labels, "numTraining": 0, "file_ending": FILE_ENDING}
    path = folder / "dataset.json"
    if existing["file_ending"] != FILE_ENDING:
        raise ValueError(
            f"Cannot export to {folder}: {path} has file_ending {existing['file_ending']!r} but this exporter writes "
            f"{FILE_ENDING!r}; export into a new folder."
        )
    old_channels = _listed_channels(existing["channel_names"])
    if old_channels != channel_names:
        raise ValueError(
            f"Cannot export to {folder}: the channel names {channel_names} do not match {path}'s {old_channels}; "
            "every case of a data set needs the same channels in the same order. Export into a new folder or pass "
            "the data set's channel names."
        )
    old_labels = dict(existing["labels"])
    old_ignore = old_labels.pop(IGNORE_LABEL_NAME, None)
    if old_labels != labels:
        raise ValueError(
            f"Cannot export to {folder}: the classes {labels} do not match {path}'s {old_labels}; every case of a "
            "data set needs the same classes with the same values. Export into a new folder or pass its classes."
        )
    if old_ignore is not None or needs_ignore:
        labels[IGNORE_LABEL_NAME] = len(class_names)
    return {**existing, "channel_names": channels, "labels": labels}


def _listed_channels(channels: Any) -> list[str] | Any:
    """``{"0": a, "1": b}`` as ``[a, b]`` (the raw value when it is not such an object, so it never matches)."""
    if not isinstance(channels, dict):
        return channels
    try:
        return [str(channels[key]) for key in sorted(channels, key=int)]
    except (ValueError, TypeError):
        return channels


def _case_names_present(folder: Path) -> set[str]:
    """The cases in ``labelsTr`` (visible ``.nii.gz`` files)."""
    labels = folder / "labelsTr"
    if not labels.is_dir():
        return set()
    return {
        p.name[: -len(FILE_ENDING)]
        for p in labels.iterdir()
        if p.name.endswith(FILE_ENDING) and not p.name.startswith(".")
    }


def _refuse_existing_case(folder: Path, name: str, files: list[Path], overwrite: bool) -> None:
    """FileExistsError when any file of the case exists (or, with overwrite, a folder takes a file's name)."""
    clashes = [path for path in files if path.exists()]
    folders = [path for path in clashes if path.is_dir()]
    if folders:
        raise ValueError(f"Cannot export case {name!r} to {folder}: {folders[0]} is a folder; move it away first.")
    if clashes and not overwrite:
        raise FileExistsError(
            f"Cannot export case {name!r} to {folder}: it already exists ({clashes[0]}). Choose another case name, "
            "or pass overwrite=True (--overwrite on the command line) to replace that case."
        )


# --------------------------------------------------------------------------------------------- writing


def _write_channel(image: MedicalImage, channel: int, target: Path) -> None:
    """One image channel ``(*spatial)`` as NIfTI with the image's geometry (and header when read from NIfTI)."""
    write_nifti(_storable(image.array[channel]), target, image.geometry, reference=image)


def _write_label_volume(labels: np.ndarray, image: MedicalImage, target: Path) -> None:
    """The label volume ``(*spatial)`` as NIfTI on the image's grid."""
    write_nifti(labels, target, image.geometry, reference=image)


def _write_json(content: dict[str, Any], target: Path) -> None:
    target.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


def _storable(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype NIfTI stores: bool → uint8, float16 → float32, 64-bit integers → int32 or float64."""
    array = np.asarray(array)
    if array.dtype.newbyteorder("=") in WRITABLE_DTYPES:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        info = np.iinfo(np.int32)
        fits = array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max)
        return array.astype(np.int32 if fits else np.float64)
    raise ValueError(f"image voxels of dtype {array.dtype} cannot be exported; convert the image to real numbers")


# --------------------------------------------------------------------------------------------- provenance


def write_provenance(path: str | os.PathLike[str], record: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write a provenance record (who/what/when produced an export) as JSON, atomically.

    Args:
        path: The JSON file, or a folder (e.g. the data set folder) to write ``provenance.json`` into.
        record: JSON-serialisable facts: model bundle name and sha256, software versions, case names, file hashes
            (see :func:`file_sha256`), reviewer, date. Paths, numpy scalars and arrays are converted.
        overwrite: Replace an existing file.

    Returns:
        The file written.

    Raises:
        FileExistsError: The file exists and ``overwrite`` is False.
        TypeError: ``record`` holds a value JSON cannot store; nothing is written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "provenance.json"
    if not isinstance(record, dict):
        raise TypeError(f"Cannot write {path}: the provenance record must be a dict, got {type(record).__name__}")
    text = json.dumps(record, indent=2, default=_json_value) + "\n"
    with atomic_output(path, overwrite=overwrite, suffix=".json") as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def _json_value(value: Any) -> Any:
    """Paths → str, numpy scalars → Python numbers, arrays → lists; anything else is refused."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(
        f"the provenance record holds a {type(value).__name__} ({value!r:.80}), which JSON cannot store; "
        "convert it to a string, number, list or dict"
    )
