"""Read a folder of single-frame DICOM image files as one :class:`MedicalImage` (pydicom only; no torch, no napari).

What the reader does, in order:

1. Reads the header of every regular, non-hidden file in the folder (not its subfolders) with
   ``stop_before_pixels=True``; files that are not DICOM, DICOMDIR files and non-image objects (SEG, RTSTRUCT,
   SR, presentation states, enhanced multi-frame objects) are skipped and counted.
2. Groups the image instances into *series* by SeriesInstanceUID. Several series in the folder become channels
   when they share one geometry (DCE phases exported as separate series), in order of SeriesNumber then
   AcquisitionTime; otherwise the caller must choose one with ``series_uid``.
3. Within a series, several instances at one slice position are split into *phases* by the first of
   TemporalPositionIdentifier, TriggerTime, AcquisitionNumber, ContentTime that separates them cleanly (DCE
   acquired as one series).
4. Sorts the slices of each channel by their position along the slice normal (row direction × column direction
   of ImageOrientationPatient, dotted with ImagePositionPatient), never by file name or InstanceNumber, and
   checks that the slices are evenly spaced, not duplicated, and alike in orientation, pixel spacing and size.
5. Decodes the pixels and applies RescaleSlope/RescaleIntercept per slice.

Geometry: array axes ``(z, y, x)`` = (slice, row, column). ImageOrientationPatient's first triplet is the
direction of increasing *column* index (array axis x), its second that of increasing *row* index (array axis y);
PixelSpacing is ``[between rows (y), between columns (x)]``. The slice step is the mean difference of consecutive
ImagePositionPatient vectors (not SliceThickness), so a gantry-tilted series keeps its true voxel positions
(ITK instead uses normal × spacing, which is the same vector for an untilted series). Positions are converted
from DICOM's LPS+ to the RAS+ world frame with :meth:`ImageGeometry.from_lps_affine`.

Values: the stored integers times RescaleSlope plus RescaleIntercept. The array keeps an integer dtype when
every slope and intercept is an integer (widened, e.g. int16 → int32, when the rescaled range needs it, as
SimpleITK does) and is float32 otherwise (float64 for 32-bit stored values). MONOCHROME1 images are returned
as stored (the photometric interpretation is a display instruction; it is recorded in the metadata). Colour
images (SamplesPerPixel ≠ 1) and multi-frame files are refused with an error.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg.io._image import ImageGeometry, ImageReadError, MedicalImage
from napari_mamba_seg.io.discover import is_dicom_file

__all__ = ["SeriesInfo", "is_dicom_file", "list_dicom_series", "read_dicom_series"]

_IMAGE_ATTRIBUTES = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_PHASE_ATTRIBUTES = ("TemporalPositionIdentifier", "TriggerTime", "AcquisitionNumber", "ContentTime")
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_POSITION_TOL_MM = 1e-3  # two slices closer than this along the normal are at the same position
_ORIENTATION_TOL = 1e-4  # direction cosines and pixel spacings that differ by less are equal
_GAP_RTOL = 0.01  # slice steps may differ from their mean by 1 % (plus _POSITION_TOL_MM)
_DECODER_FIX = (
    "install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm) or export the "
    "series uncompressed (e.g. dcmdjpeg / gdcmconv --raw)"
)


@dataclass(frozen=True)
class SeriesInfo:
    """One image series of a folder, as :func:`list_dicom_series` shows it (from the headers only).

    Attributes:
        uid: SeriesInstanceUID ("" when the files have none).
        description: SeriesDescription ("" when absent).
        number: SeriesNumber, None when absent.
        num_images: Number of image files.
        shape: ``(z, y, x)``: distinct slice positions, rows, columns.
        spacing: ``(z, y, x)`` in mm: median gap between slice positions (SpacingBetweenSlices or SliceThickness
            for a single slice, 0 when unknown), then PixelSpacing.
        num_phases: Images per slice position (DCE phases in one series), 1 for a plain series.
        modality: Modality ("" when absent).
    """

    uid: str
    description: str
    number: int | None
    num_images: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_phases: int = 1
    modality: str = ""

    def summary(self) -> str:
        """One line for error messages, the command line and the widget."""
        shape = "×".join(str(n) for n in self.shape)
        spacing = "×".join(f"{s:.4g}" for s in self.spacing)
        phases = f", {self.num_phases} phases" if self.num_phases > 1 else ""
        number = "?" if self.number is None else self.number
        return (
            f"{self.uid} (#{number} {self.description!r}, {self.modality or '?'}): {self.num_images} images, "
            f"shape {shape}{phases}, spacing {spacing} mm"
        )


@dataclass
class _Instance:
    """One image file: its path, its header (no pixels) and its geometry as arrays (LPS+ mm)."""

    path: Path
    header: Any  # pydicom Dataset read with stop_before_pixels=True
    position: np.ndarray  # (3,) ImagePositionPatient
    orientation: np.ndarray  # (6,) ImageOrientationPatient, each triplet normalised
    pixel_spacing: np.ndarray  # (2,) between rows, between columns
    size: tuple[int, int]  # rows, columns

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


@dataclass
class _FolderScan:
    """The image instances of a folder and what was skipped."""

    folder: Path
    images: list[_Instance] = field(default_factory=list)
    num_files: int = 0
    num_non_image: int = 0
    num_dicomdir: int = 0
    num_multiframe: int = 0
    subfolders: list[str] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)  # series UID → why some of its files are unusable

    def raise_problem(self, series_uids: Sequence[str]) -> None:
        """Raise the first problem recorded for one of these series, if any."""
        for uid in series_uids:
            if self.problems.get(uid):
                raise ImageReadError(self.problems[uid][0])


@dataclass
class _Series:
    """One series, checked and sorted: its channels (phases) of slices sorted along the normal."""

    uid: str
    channels: list[list[_Instance]]
    phase_attribute: str | None
    phase_values: list[float]

    @property
    def first(self) -> _Instance:
        return self.channels[0][0]


# --------------------------------------------------------------------------------------------- public API


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """The image series in a folder (not its subfolders), from the file headers only.

    Args:
        folder: A folder of DICOM files (a file's folder when given a file).

    Returns:
        One :class:`SeriesInfo` per SeriesInstanceUID, in order of SeriesNumber then AcquisitionTime; empty when
        the folder holds no DICOM images. Series made only of files that cannot be read (colour, multi-frame,
        broken geometry) are left out.

    Raises:
        ImageReadError: The folder does not exist, or a DICOM file's header cannot be read.
    """
    folder, _ = _resolve_folder(folder)
    scan = _scan_folder(folder)
    return [_series_info(instances) for instances in _group_by_series(scan.images).values()]


def read_dicom_series(folder: str | Path, *, series_uid: str | None = None) -> MedicalImage:
    """Read the DICOM image series in a folder as one channel-first image.

    Args:
        folder: The folder that holds the series' image files (not recursive). A file may be given instead: its
            folder is read, and its series chosen unless ``series_uid`` says otherwise.
        series_uid: SeriesInstanceUID of the series to read when the folder holds several
            (see :func:`list_dicom_series`); None reads all of them as channels when they share one geometry.

    Returns:
        A :class:`MedicalImage` with ``array`` ``(C, z, y, x)`` (C = series or phases), ``geometry`` in RAS+,
        ``format="dicom"`` and ``metadata`` with ``"files"`` and ``"sop_instance_uids"`` (per channel, in slice
        order), ``"series_uids"``, ``"series_descriptions"``, ``"series_numbers"`` (per channel),
        ``"study_uid"``, ``"patient_id"``, ``"modality"``, ``"frame_of_reference_uid"``, ``"sop_class_uid"``,
        ``"photometric_interpretation"``, ``"channel_source"`` (``"series"``, ``"temporal position"`` or
        ``"series and temporal position"``), ``"phase_attribute"`` (the DICOM keyword that split the phases, or
        None) and ``"slice_spacing_source"``.

    Raises:
        ImageReadError: No images; several series of different geometry; an unknown ``series_uid``; duplicate,
            missing or unevenly spaced slices; mixed orientation, pixel spacing or size; colour or multi-frame
            images; pixel data that is truncated or cannot be decoded. The message names the folder or file.
    """
    folder, file_series_uid = _resolve_folder(folder)
    series_uid = series_uid if series_uid is not None else file_series_uid
    scan = _scan_folder(folder)
    if not scan.images:
        scan.raise_problem([series_uid] if series_uid is not None else list(scan.problems))
        raise ImageReadError(_no_images_message(scan))
    groups = _select_series(scan, _group_by_series(scan.images), series_uid)
    series = [_analyse_series(folder, uid, instances) for uid, instances in groups.items()]
    _check_same_slices(folder, series)
    channels = [channel for one in series for channel in one.channels]
    array = _read_pixels(channels)
    geometry, spacing_source = _geometry(series[0].channels[0])
    return MedicalImage(
        array=array,
        geometry=geometry,
        channel_names=_channel_names(series),
        source=folder,
        format="dicom",
        metadata=_metadata(series, spacing_source),
    )


# --------------------------------------------------------------------------------------------- scanning


def _resolve_folder(path: str | Path) -> tuple[Path, str | None]:
    """The folder to read and, when a file was given, that file's SeriesInstanceUID."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path, None
    if not path.is_file():
        raise ImageReadError(f"{path}: no such folder; point at the folder that holds the series' DICOM files")
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        raise ImageReadError(f"{path}: not a DICOM file ({error}); point at a folder of DICOM image files") from error
    except Exception as error:  # a truncated or unreadable file
        raise ImageReadError(f"{path}: cannot read the DICOM header ({type(error).__name__}: {error})") from error
    uid = header.get("SeriesInstanceUID")
    return path.parent, None if uid is None else str(uid)


def _scan_folder(folder: Path) -> _FolderScan:
    """Read the headers of the folder's files and keep the image instances."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    scan = _FolderScan(folder)
    entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    scan.subfolders = [entry.name for entry in entries if entry.is_dir()]
    headers = []
    for path in (entry for entry in entries if entry.is_file()):
        scan.num_files += 1
        if path.name.upper() == "DICOMDIR":
            scan.num_non_image += 1
            scan.num_dicomdir += 1
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue
        except Exception as error:  # pydicom raises many kinds on a truncated or corrupt header
            raise ImageReadError(
                f"{path}: cannot read the DICOM header ({type(error).__name__}: {error}); the file is truncated or "
                "corrupt: copy it again from the source, or remove it from the folder"
            ) from error
        headers.append((path, header))
    for path, header in headers:
        try:
            _classify(scan, path, header)
        except ImageReadError as error:  # raised only if this series is read
            scan.problems.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(str(error))
    _find_incomplete_images(scan, headers)
    return scan


def _classify(scan: _FolderScan, path: Path, header: Any) -> None:
    """Add an image instance to ``scan.images`` or count a non-image object."""
    meta = getattr(header, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY:
        scan.num_non_image += 1
        scan.num_dicomdir += 1
        return
    if "PerFrameFunctionalGroupsSequence" in header:
        scan.num_non_image += 1
        scan.num_multiframe += 1
        return
    if any(header.get(keyword) in (None, "") for keyword in _IMAGE_ATTRIBUTES):
        scan.num_non_image += 1
        return
    scan.images.append(_instance(path, header))


def _instance(path: Path, header: Any) -> _Instance:
    """An image instance from its header; refuses colour and multi-frame images and malformed geometry."""
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageReadError(
            f"{path}: a colour image ({samples} samples per pixel, {header.get('PhotometricInterpretation', '?')}); "
            "only greyscale series (MR, CT, PET) can be segmented: export the greyscale series"
        )
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(
            f"{path}: a multi-frame image ({frames} frames); only single-frame series are supported: "
            "export the series as one file per slice (e.g. with dcm2niix to NIfTI, or emf2sf)"
        )
    try:
        position = np.array([float(v) for v in header.ImagePositionPatient], dtype=np.float64)
        orientation = np.array([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
        pixel_spacing = np.array([float(v) for v in header.PixelSpacing], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ImageReadError(f"{path}: unreadable geometry attributes ({error})") from error
    if position.shape != (3,) or orientation.shape != (6,) or pixel_spacing.shape != (2,) or pixel_spacing.min() <= 0:
        raise ImageReadError(
            f"{path}: malformed geometry: ImagePositionPatient {position.tolist()}, ImageOrientationPatient "
            f"{orientation.tolist()}, PixelSpacing {pixel_spacing.tolist()} (need 3, 6 and 2 positive values)"
        )
    return _Instance(
        path,
        header,
        position,
        _normalised_orientation(path, orientation),
        pixel_spacing,
        (int(header.Rows), int(header.Columns)),
    )


def _normalised_orientation(path: Path, orientation: np.ndarray) -> np.ndarray:
    """ImageOrientationPatient with unit triplets; refuses zero or non-orthogonal direction cosines."""
    row, column = orientation[:3], orientation[3:]
    norms = np.array([np.linalg.norm(row), np.linalg.norm(column)])
    if norms.min() < 0.5 or abs(row @ column) / norms.prod() > 1e-3:
        raise ImageReadError(
            f"{path}: ImageOrientationPatient {orientation.tolist()} does not hold two orthogonal unit vectors; "
            "the file's geometry is broken: re-export the series from the scanner or PACS"
        )
    return np.concatenate([row / norms[0], column / norms[1]])


def _find_incomplete_images(scan: _FolderScan, headers: list[tuple[Path, Any]]) -> None:
    """Record as a problem of its series a file that lacks image attributes its series' images have (truncated)."""
    complete = {(inst.series_uid, str(inst.header.get("SOPClassUID", ""))) for inst in scan.images}
    image_paths = {inst.path for inst in scan.images}
    for path, header in headers:
        key = (str(header.get("SeriesInstanceUID", "")), str(header.get("SOPClassUID", "")))
        if path in image_paths or key not in complete or "PerFrameFunctionalGroupsSequence" in header:
            continue
        missing = [keyword for keyword in _IMAGE_ATTRIBUTES if header.get(keyword) in (None, "")]
        scan.problems.setdefault(key[0], []).append(
            f"{path}: belongs to image series {key[0]} but lacks {', '.join(missing)}; the file is truncated or "
            f"corrupt: copy it again from the source, or remove it from {scan.folder}"
        )


def _no_images_message(scan: _FolderScan) -> str:
    """Why a folder gave no images, and where to point instead."""
    message = (
        f"{scan.folder}: no DICOM images found ({scan.num_files} files, {scan.num_non_image} DICOM non-image "
        "objects); point at the folder that holds the series' image files"
    )
    if scan.num_dicomdir:
        message += "; the folder holds a DICOMDIR: its images lie in the subfolders it lists"
    if scan.num_multiframe:
        message += (
            f"; {scan.num_multiframe} enhanced multi-frame objects are not supported: convert them to single-frame "
            "files (e.g. emf2sf) or to NIfTI (dcm2niix)"
        )
    if scan.subfolders:
        shown = ", ".join(scan.subfolders[:5]) + (", ..." if len(scan.subfolders) > 5 else "")
        message += f"; its subfolders: {shown}"
    return message


# --------------------------------------------------------------------------------------------- grouping


def _group_by_series(images: list[_Instance]) -> dict[str, list[_Instance]]:
    """Instances per SeriesInstanceUID, series in order of SeriesNumber, then AcquisitionTime, then UID."""
    groups: dict[str, list[_Instance]] = defaultdict(list)
    for inst in images:
        groups[inst.series_uid].append(inst)

    def order(uid: str) -> tuple[float, float, str]:
        header = groups[uid][0].header
        number = _number(header.get("SeriesNumber"))
        time = _seconds(header.get("AcquisitionTime")) or _seconds(header.get("SeriesTime"))
        return (np.inf if number is None else number, np.inf if time is None else time, uid)

    return {uid: groups[uid] for uid in sorted(groups, key=order)}


def _select_series(
    scan: _FolderScan, groups: dict[str, list[_Instance]], series_uid: str | None
) -> dict[str, list[_Instance]]:
    """The series to read: the one asked for, or all when they share one geometry.

    Series whose files are unusable (colour, multi-frame, broken geometry, truncated header) are refused when
    they are read and ignored otherwise; a series made only of such files is never read together with others.
    """
    folder = scan.folder
    scan.raise_problem([series_uid] if series_uid is not None else list(groups))
    if series_uid is not None:
        if series_uid not in groups:
            listing = "\n  ".join(_series_info(instances).summary() for instances in groups.values())
            raise ImageReadError(
                f"{folder}: no image series with SeriesInstanceUID {series_uid}; the folder holds:\n  {listing}"
            )
        return {series_uid: groups[series_uid]}
    if len(groups) > 1:
        signatures = [_geometry_signature(instances) for instances in groups.values()]
        if not all(_same_geometry(signatures[0], other) for other in signatures[1:]):
            listing = "\n  ".join(_series_info(instances).summary() for instances in groups.values())
            raise ImageReadError(
                f"{folder}: mixed series with different geometry:\n  {listing}\npass series_uid= (--series on the "
                "command line) or put each series in its own folder"
            )
    return groups


def _slice_coordinates(instances: Sequence[_Instance]) -> np.ndarray:
    """``(n,)`` position of each instance along the first instance's slice normal (mm)."""
    normal = instances[0].normal
    return np.array([inst.position @ normal for inst in instances])


def _distinct_positions(instances: Sequence[_Instance]) -> np.ndarray:
    """``(m, 3)`` ImagePositionPatient of each distinct slice position, sorted along the normal."""
    coordinates = _slice_coordinates(instances)
    order = np.argsort(coordinates, kind="stable")
    keep = [order[0]] + [b for a, b in itertools.pairwise(order) if coordinates[b] - coordinates[a] > _POSITION_TOL_MM]
    return np.array([instances[i].position for i in keep])


def _geometry_signature(instances: Sequence[_Instance]) -> tuple[np.ndarray, np.ndarray, tuple, np.ndarray]:
    """(orientation, pixel spacing, size, distinct positions) of a series' first instance and slices."""
    first = instances[0]
    return first.orientation, first.pixel_spacing, first.size, _distinct_positions(instances)


def _same_geometry(a: tuple, b: tuple) -> bool:
    """Whether two geometry signatures agree (positions within 1e-3 mm)."""
    return (
        np.allclose(a[0], b[0], atol=_ORIENTATION_TOL)
        and np.allclose(a[1], b[1], atol=_ORIENTATION_TOL)
        and a[2] == b[2]
        and a[3].shape == b[3].shape
        and np.allclose(a[3], b[3], atol=_POSITION_TOL_MM)
    )


def _series_info(instances: Sequence[_Instance]) -> SeriesInfo:
    """A :class:`SeriesInfo` from headers; never raises, so it can describe broken series in error messages."""
    header = instances[0].header
    positions = _distinct_positions(instances)
    if len(positions) > 1:
        slice_gap = float(np.median(np.linalg.norm(np.diff(positions, axis=0), axis=1)))
    else:
        slice_gap = _single_slice_gap(header)[0]
    rows, columns = instances[0].size
    return SeriesInfo(
        uid=instances[0].series_uid,
        description=str(header.get("SeriesDescription", "")),
        number=_integer(header.get("SeriesNumber")),
        num_images=len(instances),
        shape=(len(positions), rows, columns),
        spacing=(slice_gap, *(float(s) for s in instances[0].pixel_spacing)),
        num_phases=max(1, round(len(instances) / len(positions))),
        modality=str(header.get("Modality", "")),
    )


# --------------------------------------------------------------------------------------------- one series


def _analyse_series(folder: Path, uid: str, instances: list[_Instance]) -> _Series:
    """Check one series, split it into phases and sort each phase's slices along the normal."""
    _check_uniform_frames(folder, uid, instances)
    channels, attribute, values = _split_phases(folder, uid, instances)
    channels = [_sorted_along_normal(channel) for channel in channels]
    return _Series(uid, channels, attribute, values)


def _sorted_along_normal(instances: list[_Instance]) -> list[_Instance]:
    """The instances in ascending order of their position along the slice normal."""
    return [instances[i] for i in np.argsort(_slice_coordinates(instances), kind="stable")]


def _check_uniform_frames(folder: Path, uid: str, instances: list[_Instance]) -> None:
    """Refuse a series whose images differ in orientation, pixel spacing or size."""
    first = instances[0]
    checks = [
        (
            "orientation",
            lambda inst: np.allclose(inst.orientation, first.orientation, atol=_ORIENTATION_TOL),
            lambda inst: f"ImageOrientationPatient {np.round(inst.orientation, 5).tolist()}",
        ),
        (
            "pixel spacing",
            lambda inst: np.allclose(inst.pixel_spacing, first.pixel_spacing, atol=_ORIENTATION_TOL),
            lambda inst: f"PixelSpacing {inst.pixel_spacing.tolist()}",
        ),
        ("size", lambda inst: inst.size == first.size, lambda inst: f"{inst.size[0]}×{inst.size[1]} pixels"),
    ]
    for what, agrees, describe in checks:
        odd = next((inst for inst in instances if not agrees(inst)), None)
        if odd is not None:
            raise ImageReadError(
                f"{folder}: series {uid} mixes images of different {what}: {first.path.name} has {describe(first)}, "
                f"{odd.path.name} has {describe(odd)}; this is not one volume (a localizer or a reformatted set?): "
                "put the files of each volume in their own folder"
            )


def _split_phases(
    folder: Path, uid: str, instances: list[_Instance]
) -> tuple[list[list[_Instance]], str | None, list[float]]:
    """Split a series with several instances per slice position into phases.

    Returns:
        The phases (unsorted instances), the DICOM keyword that separated them (None for one phase) and its value
        per phase (ascending).
    """
    coordinates = _slice_coordinates(instances)
    order = np.argsort(coordinates, kind="stable")
    clusters = np.cumsum(np.r_[0, np.diff(coordinates[order]) > _POSITION_TOL_MM])
    multiplicity = int(np.bincount(clusters).max())
    if multiplicity == 1:
        return [instances], None, []
    for attribute in _PHASE_ATTRIBUTES:
        phases = _phases_by(instances, attribute, multiplicity)
        if phases is not None:
            values = sorted(phases)
            return [phases[v] for v in values], attribute, values
    sorted_coordinates = coordinates[order]
    first = int(np.argmax(np.diff(sorted_coordinates) <= _POSITION_TOL_MM))
    a, b = instances[order[first]], instances[order[first + 1]]
    raise ImageReadError(
        f"{folder}: duplicate slice position in series {uid}: {a.path.name} and {b.path.name} both lie at "
        f"{sorted_coordinates[first]:.4f} mm along the slice normal, and none of {', '.join(_PHASE_ATTRIBUTES)} "
        f"separates them into {multiplicity} phases; remove the duplicate files, or put each phase in its own folder"
    )


def _phases_by(instances: list[_Instance], attribute: str, num_phases: int) -> dict[float, list[_Instance]] | None:
    """Instances grouped by an attribute's value, or None unless that gives ``num_phases`` duplicate-free groups."""
    parse: Callable[[Any], float | None] = _seconds if attribute == "ContentTime" else _number
    values = [parse(inst.header.get(attribute)) for inst in instances]
    if any(value is None for value in values):
        return None
    phases: dict[float, list[_Instance]] = defaultdict(list)
    for value, inst in zip(values, instances, strict=True):
        phases[value].append(inst)
    if len(phases) != num_phases:
        return None
    for phase in phases.values():
        coordinates = np.sort(_slice_coordinates(phase))
        if np.any(np.diff(coordinates) <= _POSITION_TOL_MM):
            return None
    return dict(phases)


def _check_same_slices(folder: Path, series: list[_Series]) -> None:
    """Refuse channels with different numbers or positions of slices, or unevenly spaced slices."""
    reference = series[0].channels[0]
    for one in series:
        for index, channel in enumerate(one.channels):
            label = f"series {one.uid}" + (f" phase {index}" if len(one.channels) > 1 else "")
            if len(channel) != len(reference):
                raise ImageReadError(
                    f"{folder}: different number of slices between channels: {label} has {len(channel)}, the "
                    f"first channel {len(reference)}; a phase is incomplete (missing files?): copy the series "
                    "again, or read one phase at a time"
                )
            offsets = np.linalg.norm([a.position - b.position for a, b in zip(channel, reference, strict=True)], axis=1)
            if offsets.max() > _POSITION_TOL_MM:
                worst = int(np.argmax(offsets))
                raise ImageReadError(
                    f"{folder}: the slices of {label} lie elsewhere than those of the first channel "
                    f"({channel[worst].path.name} is {offsets[worst]:.3f} mm from {reference[worst].path.name}); "
                    "read each volume on its own (series_uid=)"
                )
    _check_even_spacing(folder, reference)


def _check_even_spacing(folder: Path, channel: list[_Instance]) -> None:
    """Refuse slices whose consecutive steps differ from their mean by more than 1 % (+1e-3 mm)."""
    if len(channel) < 3:
        return
    positions = np.array([inst.position for inst in channel])
    steps = np.diff(positions, axis=0)
    mean_step = (positions[-1] - positions[0]) / (len(channel) - 1)
    deviation = np.linalg.norm(steps - mean_step, axis=1)
    tolerance = _GAP_RTOL * np.linalg.norm(mean_step) + _POSITION_TOL_MM
    if deviation.max() <= tolerance:
        return
    gaps = np.linalg.norm(steps, axis=1)
    counts = Counter(float(g) for g in np.round(gaps, 3))
    summary = ", ".join(f"{gap:g} mm ×{count}" for gap, count in sorted(counts.items()))
    worst = int(np.argmax(deviation))
    raise ImageReadError(
        f"{folder}: non-uniform slice spacing (missing slices?): gaps between consecutive slices {summary}; the "
        f"largest deviation is between {channel[worst].path.name} and {channel[worst + 1].path.name} "
        f"({gaps[worst]:.4g} mm, mean {np.linalg.norm(mean_step):.4g} mm); copy the series again, or remove the "
        "files of other volumes from the folder"
    )


# --------------------------------------------------------------------------------------------- pixels


def _read_pixels(channels: list[list[_Instance]]) -> np.ndarray:
    """``(C, z, y, x)`` rescaled pixel values of every channel's sorted slices."""
    rows, columns = channels[0][0].size
    stored: np.ndarray | None = None
    slopes = np.ones((len(channels), len(channels[0])))
    intercepts = np.zeros_like(slopes)
    for c, channel in enumerate(channels):
        for z, inst in enumerate(channel):
            pixels, slopes[c, z], intercepts[c, z] = _read_slice(inst)
            if stored is None:
                stored = np.empty((len(channels), len(channel), rows, columns), dtype=pixels.dtype)
            elif pixels.dtype != stored.dtype:
                stored = stored.astype(np.result_type(stored.dtype, pixels.dtype))
            stored[c, z] = pixels
    assert stored is not None
    bits_stored = max(int(inst.header.get("BitsStored") or 0) for channel in channels for inst in channel)
    return _rescale(stored, slopes, intercepts, bits_stored)


def _read_slice(inst: _Instance) -> tuple[np.ndarray, float, float]:
    """One slice's ``(rows, columns)`` stored values, RescaleSlope and RescaleIntercept."""
    import pydicom

    path = inst.path
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        raise ImageReadError(
            f"{path}: cannot read the file ({type(error).__name__}: {error}); it is truncated or "
            "corrupt: copy it again from the source"
        ) from error
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        pixels = dataset.pixel_array
    except AttributeError as error:
        raise ImageReadError(f"{path}: the image has no pixel data (a truncated file?): copy it again") from error
    except Exception as error:
        if syntax is not None and syntax.is_compressed:
            raise ImageReadError(
                f"{path}: cannot decode the pixel data, compressed as {syntax.name} ({syntax}): {error}; {_DECODER_FIX}"
            ) from error
        raise ImageReadError(
            f"{path}: the pixel data is truncated or corrupt ({error}); copy the file again from the source"
        ) from error
    if pixels.shape != inst.size:
        raise ImageReadError(f"{path}: pixel data of shape {pixels.shape}, but Rows×Columns is {inst.size}")
    slope = _number(dataset.get("RescaleSlope"))
    intercept = _number(dataset.get("RescaleIntercept"))
    slope = 1.0 if slope is None else slope
    if slope == 0:
        raise ImageReadError(f"{path}: RescaleSlope is 0, which would erase the image; fix the header")
    return pixels, slope, 0.0 if intercept is None else intercept


def _rescale(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray, bits_stored: int) -> np.ndarray:
    """``stored * slope + intercept`` per slice, in a dtype that holds every value the headers allow.

    Integer slopes and intercepts keep an integer dtype: the stored one when the rescaled range of all possible
    stored values (BitsStored bits) fits in it, else the narrowest wider signed integer, so the dtype depends on
    the headers, not on the pixel values (as in SimpleITK/GDCM). Otherwise float32 (float64 for 32-bit data).

    Args:
        stored: ``(C, z, y, x)`` stored values.
        slopes: ``(C, z)`` RescaleSlope per slice.
        intercepts: ``(C, z)`` RescaleIntercept per slice.
        bits_stored: BitsStored (0 when unknown: the stored dtype's width).
    """
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return stored
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if integral and np.issubdtype(stored.dtype, np.integer):
        bits = min(bits_stored or 64, stored.dtype.itemsize * 8)
        signed = np.issubdtype(stored.dtype, np.signedinteger)
        lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        low = np.minimum(lowest * slopes, highest * slopes) + intercepts
        high = np.maximum(lowest * slopes, highest * slopes) + intercepts
        dtype = _integer_dtype(stored.dtype, float(low.min()), float(high.max()))
    else:
        dtype = np.dtype(np.float32 if stored.dtype.itemsize <= 2 else np.float64)
    result = np.empty(stored.shape, dtype=dtype)
    for c, z in np.ndindex(*slopes.shape):
        if dtype.kind == "f":
            result[c, z] = stored[c, z] * slopes[c, z] + intercepts[c, z]
        else:
            result[c, z] = stored[c, z].astype(np.int64) * int(slopes[c, z]) + int(intercepts[c, z])
    return result


def _integer_dtype(stored: np.dtype, low: float, high: float) -> np.dtype:
    """The stored dtype when ``[low, high]`` fits in it, else the narrowest wider signed integer that holds it."""
    for candidate in (stored, np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)):
        info = np.iinfo(candidate)
        if candidate.itemsize >= stored.itemsize and info.min <= low and high <= info.max:
            return candidate
    return np.dtype(np.float64)


# --------------------------------------------------------------------------------------------- geometry + metadata


def _geometry(channel: list[_Instance]) -> tuple[ImageGeometry, str]:
    """The RAS+ geometry of sorted slices, and where the slice spacing came from."""
    first = channel[0]
    row_direction, column_direction = first.orientation[:3], first.orientation[3:]
    if len(channel) > 1:
        slice_step = (channel[-1].position - first.position) / (len(channel) - 1)
        source = "ImagePositionPatient"
    else:
        gap, source = _single_slice_gap(first.header)
        slice_step = first.normal * (gap or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = slice_step
    lps[:3, 1] = column_direction * first.pixel_spacing[0]
    lps[:3, 2] = row_direction * first.pixel_spacing[1]
    lps[:3, 3] = first.position
    return ImageGeometry.from_lps_affine(lps), source


def _single_slice_gap(header: Any) -> tuple[float, str]:
    """The slice spacing of a single slice: SpacingBetweenSlices, else SliceThickness, else 0 (→ 1 mm)."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _number(header.get(keyword))
        if value is not None and value > 0:
            return abs(value), keyword
    return 0.0, "none (single slice; 1 mm assumed)"


def _channel_names(series: list[_Series]) -> list[str]:
    """``"phase N"`` for the phases of one series, SeriesDescription (or ``"series N"``) for several series."""
    if len(series) == 1:
        one = series[0]
        if len(one.channels) > 1:
            return [f"phase {index}" for index in range(len(one.channels))]
        return [str(one.first.header.get("SeriesDescription", "")) or "image"]
    names = []
    for one in series:
        header = one.first.header
        base = str(header.get("SeriesDescription", "")) or f"series {header.get('SeriesNumber', '?')}"
        names += [base if len(one.channels) == 1 else f"{base} phase {i}" for i in range(len(one.channels))]
    if len(set(names)) < len(names):  # same description in several series: add the series number
        numbers = [one.first.header.get("SeriesNumber", "?") for one in series for _ in one.channels]
        names = [f"{name} (#{number})" for name, number in zip(names, numbers, strict=True)]
    return names


def _metadata(series: list[_Series], spacing_source: str) -> dict[str, Any]:
    """The facts a writer or DICOM-SEG exporter needs, per channel where they differ."""
    per_channel = [(one, channel) for one in series for channel in one.channels]
    header = series[0].first.header
    has_phases = any(len(one.channels) > 1 for one in series)
    if len(series) > 1:
        source = "series and temporal position" if has_phases else "series"
    else:
        source = "temporal position" if has_phases else "series"
    return {
        "files": [[inst.path for inst in channel] for _, channel in per_channel],
        "sop_instance_uids": [[str(inst.header.get("SOPInstanceUID", "")) for inst in ch] for _, ch in per_channel],
        "series_uids": [one.uid for one, _ in per_channel],
        "series_descriptions": [str(one.first.header.get("SeriesDescription", "")) for one, _ in per_channel],
        "series_numbers": [_integer(one.first.header.get("SeriesNumber")) for one, _ in per_channel],
        "study_uid": str(header.get("StudyInstanceUID", "")),
        "patient_id": str(header.get("PatientID", "")),
        "modality": str(header.get("Modality", "")),
        "frame_of_reference_uid": str(header.get("FrameOfReferenceUID", "")),
        "sop_class_uid": str(header.get("SOPClassUID", "")),
        "photometric_interpretation": str(header.get("PhotometricInterpretation", "")),
        "channel_source": source,
        "phase_attribute": next((one.phase_attribute for one in series if one.phase_attribute), None),
        "phase_values": next((one.phase_values for one in series if one.phase_attribute), []),
        "slice_spacing_source": spacing_source,
    }


def _integer(value: Any) -> int | None:
    """A DICOM IS value as an int, None when absent or not an integer."""
    number = _number(value)
    return None if number is None or number != round(number) else int(number)


def _number(value: Any) -> float | None:
    """A DICOM IS/DS/number as a float, None when absent or unparsable."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _seconds(value: Any) -> float | None:
    """A DICOM TM value ``HHMMSS.FFFFFF`` (or ``HH:MM:SS``) as seconds since midnight, None when absent/bad."""
    if value is None:
        return None
    text = str(value).strip().replace(":", "")
    try:
        hours = int(text[0:2]) if len(text) >= 2 else None
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return None if hours is None else hours * 3600 + minutes * 60 + seconds
