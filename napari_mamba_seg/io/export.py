"""Export corrected labels for a retraining pipeline: NIfTI, TIFF, DICOM-SEG or one case of an nnU-Net v2 data set,
always with a provenance record, all or nothing.

:func:`export_labels` is what the napari Export widget and ``napari-mamba-seg export`` call. What it writes:

================  ==========================================================================================
format            files
================  ==========================================================================================
``"nifti"``       ``<stem>.nii.gz`` (or ``.nii``): the labels, uint8/uint16, with the source's affine; a source
                  read from NIfTI lends its header (same qform/sform codes, affine bit for bit).
``"tiff"``        ``<stem>.ome.tif`` (or ``.tif``/``.tiff``): OME-TIFF with the voxel size in mm, and the full
                  affine in a private tag that :func:`~napari_mamba_seg.io.read_image` reads back.
``"dicom-seg"``   ``<stem>.dcm``: a DICOM Segmentation whose frames reference the source series' instances
                  (SOP Instance UIDs), one segment per foreground class. Only for a source read from DICOM
                  (``metadata["files"]``); any other source is refused: export it as NIfTI or TIFF.
``"nnunet"``      ``<folder>/imagesTr/<case>_0000.nii.gz, ...``, ``labelsTr/<case>.nii.gz`` and
                  ``dataset.json`` (created or appended to, see :func:`~napari_mamba_seg.io.export_nnunet_case`).
================  ==========================================================================================

Beside every export lies a provenance record (JSON): for a file export ``<file name>.provenance.json`` next to the
labels (``labels.nii.gz.provenance.json``: the NIfTI and the DICOM-SEG export of one layer never share a record);
for an nnU-Net case ``<folder>/provenance/<case>.json`` (one per case, so appending a case never touches another
case's record). It holds: ``format``; ``software`` (name, version); ``created_utc``; ``target``; ``files`` (each
exported data file: path relative to the record's export folder, role, size, sha256); ``source`` (name, format, path,
shape, spacing, affine, channel names and every source file that still exists with its sha256: the DICOM files of the
series, or the NIfTI/TIFF file); ``class_names``; ``voxels_per_class`` (of the labels as stored); ``review`` (axis,
number of slices, reviewed slices, whether only they were exported and how the others are stored; None without a
review); ``case_name`` and ``nnunet`` (data set facts) for an nnU-Net case; then the caller's ``provenance`` facts
(model bundle, its sha256, reviewer...) as further top-level keys; a fact whose key is one of the above is refused.

Reviews: a ``review`` (the layer's reviewed slices) is always recorded in the provenance. With ``reviewed_only``:

* NIfTI/TIFF: the labels of unreviewed slices are written as 0, and a review mask ``<stem>_reviewed<suffix>``
  (uint8, 1 on reviewed slices, 0 elsewhere) is written beside them, so a 0 in the labels is background only where
  the mask is 1.
* nnU-Net: unreviewed voxels get nnU-Net's ``"ignore"`` label (declared in ``dataset.json``), so they add nothing to
  the loss.
* DICOM-SEG: refused. A SEG has no way to say "not reviewed": a slice without a frame reads back as background, so
  leaving unreviewed slices out would silently turn them into confirmed background. Export the reviewed slices as
  NIfTI/TIFF (with the mask) or nnU-Net (with "ignore"), or export the whole SEG without ``reviewed_only``.

Labels that are all background are refused ("nothing to export"), except with ``reviewed_only``: there the review
mask (or nnU-Net's "ignore") makes "reviewed and empty" a fact worth exporting (DICOM-SEG needs a segmented voxel).

Safety: every check runs before anything is written (labels, class names, review, shapes, the source's format, the
target folder, every file of the export), and a refused export leaves the target folder as it was. A file export
requires its folder to exist; an nnU-Net data set folder is created when missing but its parent must exist. No file
of the export may exist unless ``overwrite=True`` (then the earlier export is replaced as a whole: a review mask of
the same stem that this export does not write is removed with it). Files are written into a hidden staging folder
beside the target and then renamed into place; if any step fails, the files already placed are removed and the files
they replaced restored. An nnU-Net case is written by :func:`~napari_mamba_seg.io.export_nnunet_case` (itself all or
nothing), then its provenance; if that fails the case is rolled back (files and ``dataset.json`` restored).

This module imports numpy, nibabel, tifffile (and pydicom/highdicom for DICOM-SEG, lazily): never torch, napari or Qt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_mamba_seg._durable import file_sha256, write_durably
from napari_mamba_seg.io._atomic import StagedFiles, integer_labels, keep_copy
from napari_mamba_seg.io._image import MedicalImage, matching_suffix
from napari_mamba_seg.io.dicom_seg import non_dicom_origin
from napari_mamba_seg.io.nifti import NIFTI_SUFFIXES
from napari_mamba_seg.io.nnunet import (
    FILE_ENDING,
    _json_value,
    export_nnunet_case,
    sanitize_case_name,
    write_provenance,
)
from napari_mamba_seg.io.tiff import TIFF_SUFFIXES

if TYPE_CHECKING:
    from napari_mamba_seg.interactive.review import ReviewState

__all__ = [
    "EXPORT_FORMATS",
    "PROVENANCE_SUFFIX",
    "REVIEW_MASK_INFIX",
    "ExportResult",
    "export_format_for",
    "export_labels",
]

EXPORT_FORMATS = ("nifti", "tiff", "dicom-seg", "nnunet")
PROVENANCE_SUFFIX = ".provenance.json"
"""A file export's provenance record is ``<file name>.provenance.json`` beside the labels."""
REVIEW_MASK_INFIX = "_reviewed"
"""A ``reviewed_only`` file export's review mask is ``<stem>_reviewed<suffix>`` beside the labels."""
NNUNET_PROVENANCE_FOLDER = "provenance"
"""An nnU-Net case's provenance record is ``<data set folder>/provenance/<case>.json``."""
RECORD_VERSION = 1
_DICOM_SUFFIXES = (".dcm",)
_FILE_SUFFIXES = {"nifti": NIFTI_SUFFIXES, "tiff": TIFF_SUFFIXES, "dicom-seg": _DICOM_SUFFIXES}
_RESERVED_KEYS = frozenset(
    {
        "napari_mamba_seg_export",
        "format",
        "software",
        "created_utc",
        "target",
        "files",
        "source",
        "class_names",
        "voxels_per_class",
        "review",
        "case_name",
        "nnunet",
    }
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_labels` wrote.

    Attributes:
        format: One of :data:`EXPORT_FORMATS`.
        files: Every data file written: the labels (and review mask) of a file export; the channel files and the
            label file of an nnU-Net case (not ``dataset.json``, which all cases share).
        provenance_file: The provenance record written.
        reviewed_slices: The reviewed slice indices (sorted) along the review's axis; None without a review.
        case_name: The nnU-Net case name used (sanitised); None for the other formats.
    """

    format: str
    files: tuple[Path, ...]
    provenance_file: Path
    reviewed_slices: tuple[int, ...] | None
    case_name: str | None


# --------------------------------------------------------------------------------------------- format


def export_format_for(target: str | os.PathLike[str]) -> str:
    """The export format a target names: by its suffix, or nnU-Net for a folder.

    ``.nii``/``.nii.gz`` → ``"nifti"``; ``.tif``/``.tiff``/``.ome.tif``/``.ome.tiff`` → ``"tiff"``; ``.dcm`` →
    ``"dicom-seg"``; an existing folder or a name without a suffix → ``"nnunet"`` (the data set folder).

    Raises:
        ValueError: Any other suffix; the message lists the valid ones.
    """
    path = Path(target)
    if path.is_dir():
        return "nnunet"
    for format_name, suffixes in _FILE_SUFFIXES.items():
        if matching_suffix(path, suffixes) is not None:
            return format_name
    if not path.suffix:
        return "nnunet"
    raise ValueError(
        f"Cannot export to {path}: unknown suffix {path.suffix!r}. Name a file ending in .nii.gz or .nii (NIfTI), "
        ".ome.tif, .tif or .tiff (TIFF), .dcm (DICOM-SEG), or a folder without a suffix (nnU-Net v2 data set)."
    )


def _checked_format(format: str | None, target: Path) -> str:
    """``format`` (or the target's) checked against the target's suffix."""
    if format is None:
        return export_format_for(target)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Cannot export to {target}: unknown format {format!r}; choose one of {EXPORT_FORMATS}.")
    if format in _FILE_SUFFIXES and matching_suffix(target, _FILE_SUFFIXES[format]) is None:
        raise ValueError(
            f"Cannot export {format} to {target}: the file name must end with {' or '.join(_FILE_SUFFIXES[format])}."
        )
    if format == "nnunet" and not target.is_dir() and export_format_for(target) != "nnunet":
        raise ValueError(
            f"Cannot export an nnU-Net case to {target}: that names a file; give the data set folder instead "
            "(e.g. nnUNet_raw/Dataset101_Breast)."
        )
    return format


# --------------------------------------------------------------------------------------------- export


def export_labels(
    labels: np.ndarray,
    source: MedicalImage,
    target: str | os.PathLike[str],
    *,
    class_names: Sequence[str],
    format: str | None = None,
    review: ReviewState | None = None,
    reviewed_only: bool = False,
    case_name: str | None = None,
    channel_names: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export labels drawn on ``source`` as NIfTI, TIFF, DICOM-SEG or an nnU-Net case, with a provenance record.

    See the module docstring for the files written, the review semantics and the safety rules.

    Args:
        labels: ``(*spatial)`` integer (or bool) labels on the source's voxel grid, array order; ``k`` =
            ``class_names[k]``.
        source: The image the labels were drawn on: its geometry is written; a NIfTI source lends its header;
            DICOM-SEG needs ``metadata["files"]`` (read from DICOM); nnU-Net writes its channels ``(C, *spatial)``.
        target: The labels file (NIfTI, TIFF, DICOM-SEG) or the nnU-Net data set folder.
        class_names: One name per class, background first (nnU-Net requires it to be ``"background"``).
        format: One of :data:`EXPORT_FORMATS`; None = :func:`export_format_for` ``(target)``.
        review: The reviewed slices of the labels (recorded in the provenance; used by ``reviewed_only``).
        reviewed_only: Export only the reviewed slices (see the module docstring); needs a review with at least one
            reviewed slice.
        case_name: nnU-Net case name (sanitised with :func:`~napari_mamba_seg.io.sanitize_case_name`); None = the
            source's name. Recorded in the provenance of file exports.
        channel_names: nnU-Net channel names; None = ``source.channel_names``.
        provenance: Extra JSON-ready facts for the record (model bundle, its sha256, settings, reviewer...).
        overwrite: Replace an earlier export of the same files (an nnU-Net case of the same name).
        progress: Called with a short message before each step.

    Returns:
        The files written, the provenance record, the reviewed slices and the nnU-Net case name.

    Raises:
        ValueError: Bad input (see the module docstring): nothing to export, no reviewed slice for ``reviewed_only``,
            a shape or a label value that does not fit, bad class names, a format the source or the target does not
            allow, or a provenance fact JSON cannot store or whose key is reserved.
        FileNotFoundError: The target's folder does not exist.
        PermissionError: The target's folder is not writable.
        FileExistsError: A file of the export exists and ``overwrite`` is False.
        Nothing is written in any of these cases.
    """
    say = progress or (lambda message: None)
    target = Path(target)
    say(f"checking the export to {target}")
    export_format = _checked_format(format, target)
    if not isinstance(source, MedicalImage):
        raise TypeError(f"source must be the MedicalImage the labels were drawn on, got {type(source).__name__}")
    label_array = _checked_labels(labels, source, class_names, target)
    reviewed = _checked_review(review, reviewed_only, label_array.shape, target)
    if not reviewed_only and not label_array.any():
        raise ValueError(
            f"Cannot export to {target}: nothing to export, the labels are all background (0). Segment or draw the "
            "structures first; to export reviewed slices that are truly empty, pass a review with reviewed_only."
        )
    facts = _checked_facts(provenance, target)
    request = _Request(
        labels=label_array,
        source=source,
        target=target,
        format=export_format,
        class_names=[str(name) for name in class_names],
        review=review,
        reviewed=reviewed,
        reviewed_only=reviewed_only,
        case_name=case_name,
        facts=facts,
        overwrite=overwrite,
        say=say,
    )
    if export_format == "nnunet":
        return _export_nnunet(request, channel_names)
    return _export_file(request)


@dataclass
class _Request:
    """The checked arguments of one export."""

    labels: np.ndarray
    source: MedicalImage
    target: Path
    format: str
    class_names: list[str]
    review: Any
    reviewed: tuple[int, ...] | None
    reviewed_only: bool
    case_name: str | None
    facts: dict[str, Any]
    overwrite: bool
    say: Progress

    def trusted(self) -> np.ndarray | None:
        """``(*spatial)`` bool: True on reviewed slices, when only they are exported; else None."""
        return self.review.trusted_mask(self.labels.shape) if self.reviewed_only else None


# --------------------------------------------------------------------------------------------- checks


def _checked_labels(labels: np.ndarray, source: MedicalImage, class_names: Sequence[str], target: Path) -> np.ndarray:
    """The labels as an integer array on the source's grid whose values all have a class name."""
    names = _checked_class_names(class_names, target)
    array = integer_labels(np.asarray(labels), target)
    if array.shape != source.spatial_shape:
        raise ValueError(
            f"Cannot export to {target}: the labels have shape {array.shape} but the source image {source.name!r} "
            f"has spatial shape {source.spatial_shape} (array order); export labels drawn on that image (or resample "
            "them onto its grid first)."
        )
    lowest, highest = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lowest < 0 or highest >= len(names):
        raise ValueError(
            f"Cannot export to {target}: label values must lie in [0, {len(names) - 1}] (one per class name: "
            f"{names}), got [{lowest}, {highest}]; add the missing class names or fix the labels."
        )
    return array


def _checked_class_names(class_names: Sequence[str], target: Path) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ValueError(
            f"Cannot export to {target}: class_names must be a list of names, background first, e.g. "
            f'["background", "lesion"]; got {class_names!r}.'
        )
    names = [str(name) for name in class_names]
    if len(names) < 2 or any(not name.strip() for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"Cannot export to {target}: class_names must be at least two distinct non-empty names, background "
            f'first (e.g. ["background", "lesion"]); got {names}.'
        )
    return names


def _checked_review(review: Any, reviewed_only: bool, shape: tuple[int, ...], target: Path) -> tuple[int, ...] | None:
    """The sorted reviewed slices (None without a review), checked against the labels' shape."""
    if review is None:
        if reviewed_only:
            raise ValueError(
                f"Cannot export the reviewed slices to {target}: no review was given. Mark the slices you checked as "
                "reviewed first (or export without reviewed_only)."
            )
        return None
    if not all(hasattr(review, name) for name in ("axis", "reviewed", "check_fits", "trusted_mask", "to_dict")):
        raise TypeError(
            f"review must be a napari_mamba_seg.interactive.ReviewState (or None), got {type(review).__name__}"
        )
    try:
        review.check_fits(shape)
    except ValueError as error:
        raise ValueError(f"Cannot export to {target}: the {error}") from None
    reviewed = tuple(sorted(int(index) for index in review.reviewed))
    if reviewed_only and not reviewed:
        raise ValueError(
            f"Cannot export the reviewed slices to {target}: no slice is marked as reviewed. Review and mark some "
            "slices first (or export without reviewed_only)."
        )
    return reviewed


def _checked_facts(provenance: Mapping[str, Any] | None, target: Path) -> dict[str, Any]:
    """The caller's facts as a JSON-ready dict; refuses reserved keys and values JSON cannot store."""
    if provenance is None:
        return {}
    if not isinstance(provenance, Mapping):
        raise ValueError(f"Cannot export to {target}: provenance must be a dict of facts, got {provenance!r:.80}")
    facts = {str(key): value for key, value in provenance.items()}
    clashes = sorted(_RESERVED_KEYS.intersection(facts))
    if clashes:
        raise ValueError(
            f"Cannot export to {target}: the provenance keys {clashes} are reserved for the exporter's own record "
            f"({sorted(_RESERVED_KEYS)}); rename them."
        )
    try:
        return json.loads(json.dumps(facts, default=_json_value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"Cannot export to {target}: a provenance fact cannot be stored as JSON: {error}") from None


def _check_folder(folder: Path, target: Path) -> None:
    """FileNotFoundError/ValueError/PermissionError unless ``folder`` exists, is a folder and is writable."""
    if not folder.exists():
        raise FileNotFoundError(
            f"Cannot export to {target}: the folder {folder} does not exist. Create it first or choose another one."
        )
    if not folder.is_dir():
        raise ValueError(f"Cannot export to {target}: {folder} is a file, not a folder. Choose a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"Cannot export to {target}: the folder {folder} is not writable. Choose a folder you can write to, or "
            "fix its permissions."
        )


def _refuse_existing(paths: Sequence[Path], overwrite: bool, target: Path) -> None:
    """ValueError when a path is a folder; FileExistsError when any exists and ``overwrite`` is False."""
    folders = [path for path in paths if path.is_dir()]
    if folders:
        raise ValueError(f"Cannot export to {target}: {folders[0]} is a folder; move it away or choose another name.")
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(
            f"Cannot export to {target}: {', '.join(existing)} already exist(s); refusing to overwrite. Choose "
            "another name, or pass overwrite=True (--overwrite on the command line) to replace the earlier export."
        )


# --------------------------------------------------------------------------------------------- file exports


@dataclass(frozen=True)
class _FilePaths:
    labels: Path
    mask: Path
    provenance: Path


def _file_paths(target: Path, format_name: str) -> _FilePaths:
    suffix = matching_suffix(target, _FILE_SUFFIXES[format_name]) or ""
    stem = target.name[: -len(suffix)] if suffix else target.name
    return _FilePaths(
        labels=target,
        mask=target.with_name(f"{stem}{REVIEW_MASK_INFIX}{suffix}"),
        provenance=target.with_name(f"{target.name}{PROVENANCE_SUFFIX}"),
    )


def _export_file(request: _Request) -> ExportResult:
    """A NIfTI, TIFF or DICOM-SEG export: labels (+ review mask) + provenance, staged then moved into place."""
    target = request.target
    if request.format == "dicom-seg":
        _check_dicom_seg_request(request)
    paths = _file_paths(target, request.format)
    _check_folder(target.parent, target)
    written = [paths.labels, *([paths.mask] if request.reviewed_only else []), paths.provenance]
    _refuse_existing([paths.labels, paths.mask, paths.provenance], request.overwrite, target)
    stale = [paths.mask] if not request.reviewed_only and paths.mask.exists() else []
    trusted = request.trusted()
    stored = request.labels if trusted is None else np.where(trusted, request.labels, 0)
    with StagedFiles(target.parent, prefix=".napari-mamba-seg-export-") as staging:
        request.say(f"writing {paths.labels.name}")
        staged_labels = staging.stage(paths.labels)
        _write_label_file(request, stored, staged_labels)
        roles = [(paths.labels, staged_labels, "labels")]
        if trusted is not None:
            request.say(f"writing the review mask {paths.mask.name}")
            staged_mask = staging.stage(paths.mask)
            _write_label_file(request, trusted.astype(np.uint8), staged_mask)
            roles.append((paths.mask, staged_mask, "review mask"))
        record = _record(request, stored, [(final.name, staged, role) for final, staged, role in roles], target)
        request.say(f"writing the provenance record {paths.provenance.name}")
        _write_json(record, staging.stage(paths.provenance))
        staging.commit(overwrite=request.overwrite, remove=stale)
    return ExportResult(
        format=request.format,
        files=tuple(path for path in written if path != paths.provenance),
        provenance_file=paths.provenance,
        reviewed_slices=request.reviewed,
        case_name=None,
    )


def _check_dicom_seg_request(request: _Request) -> None:
    target = request.target
    origin = non_dicom_origin(request.source)
    if origin is not None:
        raise ValueError(
            f"Cannot export {target} as DICOM-SEG: a DICOM-SEG references the DICOM images it segments, but the "
            f"labels' source was read from {origin}. Export as NIfTI (.nii.gz) or TIFF (.ome.tif) instead, or open "
            "the DICOM series itself and export its labels."
        )
    if request.reviewed_only:
        raise ValueError(
            f"Cannot export only the reviewed slices as DICOM-SEG ({target}): a DICOM-SEG cannot mark slices as "
            "unreviewed (a slice without a frame reads back as background). Export the reviewed slices as NIfTI or "
            "TIFF (with a review mask) or as an nnU-Net case (unreviewed = 'ignore'), or export the whole DICOM-SEG "
            "without reviewed_only."
        )


def _write_label_file(request: _Request, labels: np.ndarray, path: Path) -> None:
    """Write labels (or the review mask) to ``path`` in the request's format, on the source's grid."""
    if request.format == "dicom-seg":
        from napari_mamba_seg.io.dicom_seg import write_dicom_seg

        write_dicom_seg(labels, path, request.source, class_names=request.class_names, model_name=_model_name(request))
        return
    from napari_mamba_seg.io import write_labels

    write_labels(labels, path, request.source)


def _model_name(request: _Request) -> str | None:
    """The model's name among the caller's facts (``model``, or ``segmented_with.model``), for the DICOM-SEG."""
    facts = request.facts
    nested = facts.get("segmented_with")
    name = facts.get("model") or (nested.get("model") if isinstance(nested, dict) else None)
    return str(name) if name else None


# --------------------------------------------------------------------------------------------- nnU-Net


def _export_nnunet(request: _Request, channel_names: Sequence[str] | None) -> ExportResult:
    """One nnU-Net case (by :func:`export_nnunet_case`) and its provenance record; rolled back if the record fails."""
    folder, source = request.target, request.source
    _check_nnunet_folder(folder)
    requested = request.case_name if request.case_name is not None else source.name
    name = sanitize_case_name(requested)
    channels = list(source.channel_names) if channel_names is None else [str(n) for n in channel_names]
    record_path = folder / NNUNET_PROVENANCE_FOLDER / f"{name}.json"
    case_files = [
        *(folder / "imagesTr" / f"{name}_{channel:04d}{FILE_ENDING}" for channel in range(len(channels))),
        folder / "labelsTr" / f"{name}{FILE_ENDING}",
    ]
    _refuse_existing([*case_files, record_path], request.overwrite, folder)
    trusted = request.trusted()
    with _CaseRollback(folder, [*case_files, folder / "dataset.json", record_path]) as rollback:
        request.say(f"writing case {name!r} into {folder}")
        case = export_nnunet_case(
            folder,
            name,
            source,
            request.labels,
            channel_names=channels,
            class_names=request.class_names,
            trusted=trusted,
            overwrite=request.overwrite,
        )
        rollback.case_written = True
        ignored = trusted is not None and case.ignore_label is not None and not trusted.all()
        stored = np.where(trusted, request.labels, case.ignore_label) if ignored else request.labels
        roles = [
            *((path, f"image channel {index} ({channels[index]})") for index, path in enumerate(case.image_files)),
            (case.label_file, "labels"),
        ]
        request.case_name = case.case_name
        record = _record(request, stored, [(p.relative_to(folder).as_posix(), p, role) for p, role in roles], folder)
        record["nnunet"] = {
            "dataset_json": "dataset.json",
            "requested_case_name": requested,
            "channel_names": channels,
            "ignore_label": case.ignore_label,
            "num_ignored_voxels": case.num_ignored_voxels,
            "num_training_after_export": case.num_training,
        }
        request.say(f"writing the provenance record {record_path.relative_to(folder)}")
        write_provenance(record_path, record, overwrite=request.overwrite)
    return ExportResult(
        format="nnunet",
        files=case.files,
        provenance_file=record_path,
        reviewed_slices=request.reviewed,
        case_name=case.case_name,
    )


def _check_nnunet_folder(folder: Path) -> None:
    """The data set folder may be new, but its parent must exist; its provenance folder must be a folder."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Cannot export an nnU-Net case to {folder}: it is a file; give the data set folder.")
    _check_folder(folder if folder.exists() else folder.parent, folder)
    records = folder / NNUNET_PROVENANCE_FOLDER
    if records.exists() and not records.is_dir():
        raise ValueError(f"Cannot export an nnU-Net case to {folder}: {records} is a file, not a folder; move it.")
    if records.is_dir() and not os.access(records, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot export an nnU-Net case to {folder}: {records} is not writable.")


class _CaseRollback:
    """Undo an nnU-Net case export when a later step (its provenance record) fails.

    On entry, hard links of the given files that exist are kept in a hidden folder inside the data set folder (only
    when there is one); on a failure after ``case_written`` was set, every given file is put back as it was (restored
    or removed), and the folders the export created are removed when empty.
    """

    def __init__(self, folder: Path, files: Sequence[Path]) -> None:
        self.folder = folder
        self.files = list(files)
        self.case_written = False
        self.backup = folder / f".napari-mamba-seg-export-{uuid.uuid4().hex[:12]}"
        self.kept: dict[Path, Path] = {}
        subfolders = (folder, folder / "imagesTr", folder / "labelsTr", folder / NNUNET_PROVENANCE_FOLDER)
        self.missing_folders = [path for path in subfolders if not path.exists()]

    def __enter__(self) -> _CaseRollback:
        existing = [path for path in self.files if path.is_file()]
        if existing:
            self.backup.mkdir()
        for index, path in enumerate(existing):
            backup = self.backup / f"{index:03d}-{path.name}"
            keep_copy(path, backup)
            self.kept[path] = backup
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is not None and self.case_written:
                self._roll_back()
        finally:
            shutil.rmtree(self.backup, ignore_errors=True)

    def _roll_back(self) -> None:
        unrestored = []
        for path in self.files:
            backup = self.kept.get(path)
            try:
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                unrestored.append(path)
        for path in reversed(self.missing_folders):
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        if unrestored:
            raise OSError(
                f"The nnU-Net export to {self.folder} failed and could not restore {', '.join(map(str, unrestored))}; "
                f"check the data set (the earlier versions may be in {self.backup})."
            )


# --------------------------------------------------------------------------------------------- provenance


def _record(
    request: _Request, stored: np.ndarray, files: Sequence[tuple[str, Path, str]], target: Path
) -> dict[str, Any]:
    """The provenance record; ``files`` are ``(name as recorded, file to hash, role)`` of the exported data files."""
    request.say("hashing the exported and the source files")
    values, counts = np.unique(stored, return_counts=True)
    names = [*request.class_names, "ignore"]
    record: dict[str, Any] = {
        "napari_mamba_seg_export": RECORD_VERSION,
        "format": request.format,
        "software": {"name": "napari-mamba-seg", "version": _package_version()},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "target": str(target.absolute()),
        "files": [
            {"path": name, "role": role, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
            for name, path, role in files
        ],
        "source": _source_record(request.source),
        "class_names": request.class_names,
        "voxels_per_class": {names[min(int(v), len(names) - 1)]: int(c) for v, c in zip(values, counts, strict=True)},
        "review": _review_record(request),
        "case_name": request.case_name,
    }
    return {**record, **request.facts}


def _review_record(request: _Request) -> dict[str, Any] | None:
    if request.review is None:
        return None
    if not request.reviewed_only:
        stored_as = "exported as drawn (every slice)"
    elif request.format == "nnunet":
        stored_as = "nnU-Net 'ignore' label"
    else:
        stored_as = f"0, with the review mask ({REVIEW_MASK_INFIX} file) 0 there"
    return {
        "axis": int(request.review.axis),
        "num_slices": int(request.review.num_slices),
        "reviewed_slices": list(request.reviewed or ()),
        "reviewed_only": request.reviewed_only,
        "unreviewed_slices": stored_as,
    }


def _source_record(source: MedicalImage) -> dict[str, Any]:
    """Name, format, geometry and the source files with their sha256 (those that exist)."""
    geometry = source.geometry
    return {
        "name": source.name,
        "format": source.format,
        "path": None if source.source is None else str(source.source.absolute()),
        "spatial_shape": list(source.spatial_shape),
        "spacing_mm": list(geometry.spacing),
        "affine_ras": geometry.affine.tolist(),
        "channel_names": list(source.channel_names),
        "files": [_file_record(path) for path in _source_files(source)],
        **_dicom_facts(source),
    }


def _source_files(source: MedicalImage) -> list[Path]:
    """The files the source was read from: the DICOM files of every channel, or the NIfTI/TIFF file."""
    listed = source.metadata.get("files") or []
    files = [Path(file) for channel in listed for file in channel] if source.format == "dicom" else []
    if not files and source.source is not None:
        files = [source.source]
    return list(dict.fromkeys(files))  # in order, without duplicates


def _file_record(path: Path) -> dict[str, Any]:
    if path.is_file():
        return {"path": str(path.absolute()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    state = "a folder (its files were not listed)" if path.is_dir() else "missing when exported"
    return {"path": str(path.absolute()), "sha256": None, "note": state}


def _dicom_facts(source: MedicalImage) -> dict[str, Any]:
    if source.format != "dicom":
        return {}
    keys = ("study_uid", "series_uids", "frame_of_reference_uid", "modality")
    return {f"dicom_{key}": source.metadata.get(key) for key in keys if key in source.metadata}


def _write_json(record: dict[str, Any], path: Path) -> None:
    write_durably(path, (json.dumps(record, indent=2, default=_json_value) + "\n").encode("utf-8"))


def _package_version() -> str:
    from napari_mamba_seg import __version__

    return __version__
