"""Write a label map as a DICOM Segmentation (DICOM-SEG) of the DICOM series it was computed on, and read one back.

The SEG is built by highdicom (imported lazily: it is slow to import and an optional dependency) from the headers of
the source series' files, so it shares the study, the patient, the frame of reference and the slice geometry of the
source, and every frame references the source image it segments (SOP Instance UID in the per-frame
DerivationImageSequence / SourceImageSequence). Frame ``k`` of the label volume (array order ``(z, y, x)``) is the
segmentation of the file ``source.metadata["files"][0][k]``: the DICOM reader sorted them along the slice normal.

Encoding choices:

* Segments: one per foreground class, ``class_names[1:]`` (value 0 = background has none), segment number = label
  value. Every class is described even when the labels do not contain it (an empty segment, without frames), so a
  SEG of a model always lists the same segments.
* Segmentation type: ``"BINARY"`` (Segmentation Storage, 1 bit per pixel per segment) by default: every PACS and
  viewer that knows DICOM-SEG stores and shows it. ``labelmap=True`` writes ``"LABELMAP"`` (Label Map Segmentation
  Storage, one integer per pixel, added to DICOM in 2024): compact for many classes, but a separate SOP class that
  older PACS refuse and older viewers cannot show. ``fractional=True`` writes ``"FRACTIONAL"`` (probabilities 0 or 1,
  8 bits per pixel per segment) for tools that read only that type.
* Empty frames (no segment in a slice) are left out, as highdicom does by default; reading rebuilds them as zeros.
* Algorithm: type AUTOMATIC, family "Artificial Intelligence", name/version of the algorithm and the model name as a
  parameter.
* Labels that are all background raise ``ValueError`` (nothing to export): DICOM-SEG needs at least one frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg.io._atomic import atomic_output, integer_labels, refuse_existing
from napari_mamba_seg.io._image import ImageReadError, MedicalImage

__all__ = ["read_dicom_seg", "write_dicom_seg"]

_MAX_LO_LENGTH = 64  # DICOM "long string" (SegmentLabel, SeriesDescription, ...)
_SEG_SERIES_NUMBER_OFFSET = 1000  # SEG series number = source series number + this
# Patient/study attributes highdicom copies from the source: DICOM allows them empty (Type 2), some exports omit them.
_TYPE2_COPIED_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_INSTALL_HINT = "DICOM-SEG needs highdicom: pip install highdicom (or pip install 'napari-mamba-seg[dicom]')"


def _package_version() -> str:
    from napari_mamba_seg import __version__

    return __version__


def _import_highdicom() -> Any:
    try:
        import highdicom
    except ImportError as error:  # an optional dependency
        raise ImportError(_INSTALL_HINT) from error
    return highdicom


# --------------------------------------------------------------------------------------------- writing


def write_dicom_seg(
    labels: np.ndarray,
    path: str | Path,
    source: MedicalImage,
    *,
    class_names: Sequence[str],
    algorithm_name: str = "napari-mamba-seg",
    algorithm_version: str | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    manufacturer: str = "napari-mamba-seg",
    series_description: str = "Segmentation",
    fractional: bool = False,
    labelmap: bool = False,
) -> Path:
    """Write integer labels as a DICOM-SEG that references the DICOM series they were computed on.

    Args:
        labels: ``(z, y, x)`` integer (or bool) labels on the source's voxel grid, array order; 0 = background,
            ``k`` = ``class_names[k]``.
        path: Target file (``.dcm`` by convention); its folder is created when missing.
        source: The image read by :func:`napari_mamba_seg.io.dicom.read_dicom_series` (``format="dicom"`` with
            ``metadata["files"]``); the SEG references its channel 0's files (the first series or phase).
        class_names: Name of every class, background first: ``class_names[k]`` labels segment ``k`` (at most 64
            characters each). Must cover the labels' largest value.
        algorithm_name: Name of the segmentation algorithm (AlgorithmName, ManufacturerModelName).
        algorithm_version: Its version (AlgorithmVersion, SoftwareVersions); the package version when None.
        model_name: The model (bundle) that computed the labels, stored as an algorithm parameter ``model`` and in
            the ContentDescription; none when None.
        overwrite: Replace an existing file.
        manufacturer: Manufacturer of the software that writes the SEG.
        series_description: SeriesDescription of the new SEG series.
        fractional: Write a FRACTIONAL SEG (probability 0 or 1 per pixel) instead of BINARY.
        labelmap: Write a LABELMAP SEG (Label Map Segmentation Storage, one integer per pixel) instead of BINARY;
            ignored when ``fractional``. Not every PACS or viewer accepts this newer SOP class.

    Returns:
        The path written.

    Raises:
        ValueError: The source was not read from DICOM (write NIfTI or TIFF instead) or its files changed; the labels
            are not integers, are negative, have another shape than the source, exceed ``class_names``, or are all
            background (nothing to export); a class name is empty or too long.
        FileExistsError: ``path`` exists and ``overwrite`` is False (the file is left untouched).
        FileNotFoundError: A source file no longer exists.
        ImportError: highdicom is not installed.
    """
    path = Path(path)
    _require_dicom_source(source, path)
    labels = _checked_labels(labels, source, path, class_names)
    refuse_existing(path, overwrite)
    hd = _import_highdicom()
    version = algorithm_version or _package_version()
    segmentation = hd.seg.Segmentation(
        source_images=_source_headers(source, labels.shape, path),
        pixel_array=labels.astype(np.uint8 if len(class_names) <= 256 else np.uint16, copy=False),
        segment_descriptions=_segment_descriptions(hd, class_names[1:], algorithm_name, version, model_name),
        series_instance_uid=hd.UID(),
        series_number=_seg_series_number(source),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=version,
        device_serial_number="none",
        content_description=_content_description(algorithm_name, model_name),
        series_description=series_description[:_MAX_LO_LENGTH],
        omit_empty_frames=True,
        **_segmentation_type(hd, fractional, labelmap),
    )
    with atomic_output(path, overwrite=overwrite, suffix=path.suffix) as temporary:
        segmentation.save_as(temporary, enforce_file_format=True)
    return path


def non_dicom_origin(source: MedicalImage) -> str | None:
    """Where ``source`` came from, e.g. ``"/data/a.nii.gz (format 'nifti')"``, when it cannot be the source of a
    DICOM-SEG (not read from a DICOM series with its files listed); None when it can."""
    files = source.metadata.get("files")
    if source.format == "dicom" and files and files[0]:
        return None
    return f"{source.source or 'an in-memory array'} (format {source.format!r})"


def _require_dicom_source(source: MedicalImage, path: Path) -> None:
    """ValueError unless ``source`` was read from a DICOM series (its files are needed for the references)."""
    if not isinstance(source, MedicalImage):
        raise TypeError(f"source must be a MedicalImage read from DICOM, got {type(source).__name__}")
    origin = non_dicom_origin(source)
    if origin is not None:
        raise ValueError(
            f"Cannot write {path}: DICOM-SEG needs a DICOM source (its segments reference the source's DICOM files), "
            f"but the image was read from {origin}. Write the labels as NIfTI (.nii.gz) or TIFF instead, or segment "
            "the DICOM series itself."
        )


def _checked_labels(labels: np.ndarray, source: MedicalImage, path: Path, class_names: Sequence[str]) -> np.ndarray:
    """The labels as a non-negative integer array of the source's spatial shape, with a name for every value."""
    labels = integer_labels(labels, path)
    if labels.shape != source.spatial_shape:
        raise ValueError(
            f"Cannot write {path}: the labels have shape {labels.shape} but the source image {source.name!r} has "
            f"spatial shape {source.spatial_shape} (z, y, x); they must be on the same voxel grid."
        )
    lowest, highest = int(labels.min()), int(labels.max())
    if lowest < 0:
        raise ValueError(f"Cannot write {path}: label values must be >= 0 (0 = background), got {lowest}.")
    if highest >= len(class_names):
        raise ValueError(
            f"Cannot write {path}: the labels go up to {highest} but only {len(class_names)} class names were given "
            f"({list(class_names)}); give one name per class, background first (class_names[k] names label k)."
        )
    _check_class_names(class_names, path)
    if highest == 0:
        raise ValueError(
            f"Cannot write {path}: nothing to export: the labels are all background (0). A DICOM-SEG needs at least "
            "one segmented voxel; segment the image first (or check the model and its threshold)."
        )
    return labels


def _check_class_names(class_names: Sequence[str], path: Path) -> None:
    """ValueError unless every foreground name is a non-empty DICOM long string (≤ 64 characters, no backslash)."""
    if isinstance(class_names, str):
        raise ValueError(f"Cannot write {path}: class_names must be a list of names, got the string {class_names!r}.")
    for value, name in enumerate(class_names[1:], start=1):
        if not isinstance(name, str) or not name.strip() or len(name) > _MAX_LO_LENGTH or "\\" in name:
            raise ValueError(
                f"Cannot write {path}: class {value}'s name {name!r} cannot be a segment label; it must be a "
                f"non-empty string of at most {_MAX_LO_LENGTH} characters without backslashes."
            )


def _source_headers(source: MedicalImage, shape: tuple[int, ...], path: Path) -> list[Any]:
    """The headers (no pixels) of channel 0's files, in slice order, checked against the read image."""
    import pydicom

    files = [Path(file) for file in source.metadata["files"][0]]
    expected_uids = (source.metadata.get("sop_instance_uids") or [[]])[0]
    if len(files) != shape[0]:
        raise ValueError(
            f"Cannot write {path}: the source lists {len(files)} files for {shape[0]} slices; read the series again."
        )
    headers = []
    for index, file in enumerate(files):
        if not file.is_file():
            raise FileNotFoundError(
                f"Cannot write {path}: the source file {file} no longer exists; DICOM-SEG references the source files, "
                "so read the series again from where it lies now."
            )
        header = pydicom.dcmread(file, stop_before_pixels=True)
        if expected_uids and str(header.SOPInstanceUID) != expected_uids[index]:
            raise ValueError(
                f"Cannot write {path}: the source file {file} changed since the series was read (another "
                "SOPInstanceUID); read the series again."
            )
        if (int(header.Rows), int(header.Columns)) != tuple(shape[1:]):
            raise ValueError(
                f"Cannot write {path}: the source file {file} has {header.Rows}×{header.Columns} pixels but the labels "
                f"{shape[1]}×{shape[2]} (rows × columns); read the series again."
            )
        for keyword in _TYPE2_COPIED_ATTRIBUTES:
            if keyword not in header:
                setattr(header, keyword, "")
        headers.append(header)
    return headers


def _segmentation_type(hd: Any, fractional: bool, labelmap: bool) -> dict[str, Any]:
    """highdicom's ``segmentation_type`` (and ``fractional_type``) for the requested encoding."""
    types = hd.seg.SegmentationTypeValues
    if fractional:
        return {
            "segmentation_type": types.FRACTIONAL,
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        }
    return {"segmentation_type": types.LABELMAP if labelmap else types.BINARY, "fractional_type": None}


def _segment_descriptions(
    hd: Any, names: Sequence[str], algorithm_name: str, version: str, model_name: str | None
) -> list[Any]:
    """One description per foreground class (segment number = label value), generic "Tissue" codes, AUTOMATIC."""
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        parameters={"model": model_name} if model_name else None,
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(names, start=1)
    ]


def _seg_series_number(source: MedicalImage) -> int:
    """The source series' number plus 1000 (a common convention for derived series), 1000 when unknown."""
    numbers = source.metadata.get("series_numbers") or [None]
    return (numbers[0] or 0) + _SEG_SERIES_NUMBER_OFFSET


def _content_description(algorithm_name: str, model_name: str | None) -> str:
    text = f"{algorithm_name} ({model_name})" if model_name else algorithm_name
    return text[:_MAX_LO_LENGTH]


# --------------------------------------------------------------------------------------------- reading


def read_dicom_seg(path: str | Path, reference: MedicalImage | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a DICOM-SEG as a label volume, on the slice grid of its source series when that series is given.

    Segments become label values ``1..N`` in order of their segment numbers (for a SEG written by
    :func:`write_dicom_seg`, the original label values).

    Args:
        path: The DICOM-SEG file.
        reference: The source series as read by :func:`napari_mamba_seg.io.dicom.read_dicom_series`: the labels are
            rebuilt slice by slice on its (sorted) instances, through the SOP Instance UIDs the SEG's frames
            reference, with zeros where the SEG has no frame. When None, the volume is built from the SEG's own
            frame positions, slices sorted along the normal as the DICOM reader sorts them: it spans only the
            slices from the first to the last stored frame (empty slices at either end have no frame).

    Returns:
        ``(labels, segment_labels)``: ``(z, y, x)`` uint8 labels (uint16 for more than 255 segments) and the
        SegmentLabel of each value ``1..N`` (``segment_labels[k - 1]`` names value ``k``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: The file is not a DICOM-SEG, or its frames reference none of the reference's instances.
        ValueError: ``reference`` was not read from DICOM.
        ImportError: highdicom is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DICOM-SEG file")
    hd = _import_highdicom()
    try:
        segmentation = hd.seg.segread(path)
    except Exception as error:  # pydicom and highdicom raise many kinds for a file that is not a SEG
        raise ImageReadError(
            f"{path}: not a readable DICOM Segmentation ({type(error).__name__}: {error}); give a DICOM-SEG file"
        ) from error
    numbers = list(segmentation.segment_numbers)  # without a LABELMAP's background segment
    segment_labels = [str(segmentation.get_segment_description(number).segment_label) for number in numbers]
    dtype = np.uint8 if len(segment_labels) < 256 else np.uint16
    options = {"segment_numbers": numbers, "combine_segments": True, "relabel": True, "dtype": dtype}
    if reference is None:
        labels = _volume_along_normal(segmentation.get_volume(**options))
    else:
        uids = _referenced_channel_uids(segmentation, reference, path)
        labels = segmentation.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True, **options)
    return np.ascontiguousarray(labels, dtype=dtype), segment_labels


def _volume_along_normal(volume: Any) -> np.ndarray:
    """A highdicom Volume's ``(slice, row, column)`` array with the slices sorted along row × column direction.

    That is the order of :func:`napari_mamba_seg.io.dicom.read_dicom_series`; highdicom may stack them the other
    way (its affine's slice column then points against the normal).
    """
    affine = np.asarray(volume.affine, dtype=np.float64)  # array index (slice, row, column) → LPS
    normal = np.cross(affine[:3, 2], affine[:3, 1])  # row direction (along a row) × column direction
    return volume.array[::-1] if float(affine[:3, 0] @ normal) < 0 else volume.array


def _referenced_channel_uids(segmentation: Any, reference: MedicalImage, path: Path) -> list[str]:
    """The SOP Instance UIDs (slice order) of the reference channel whose instances the SEG's frames reference."""
    channels = reference.metadata.get("sop_instance_uids")
    if reference.format != "dicom" or not channels:
        raise ValueError(
            f"Cannot read {path} on {reference.name!r}: the reference must be the DICOM series the SEG was made "
            f"from (read with read_dicom_series), got a {reference.format!r} image."
        )
    referenced = _frame_source_uids(segmentation)
    overlaps = [len(referenced.intersection(uids)) for uids in channels]
    best = int(np.argmax(overlaps))
    if overlaps[best] == 0:
        raise ImageReadError(
            f"{path}: its frames reference none of the {sum(len(uids) for uids in channels)} images of "
            f"{reference.name!r}; it segments another series. Give the series it was made from."
        )
    return list(channels[best])


def _frame_source_uids(segmentation: Any) -> set[str]:
    """The SOP Instance UIDs of the source images the SEG's frames were derived from."""
    uids = set()
    for frame in segmentation.PerFrameFunctionalGroupsSequence:
        for derivation in frame.get("DerivationImageSequence", []):
            for source_image in derivation.get("SourceImageSequence", []):
                uids.add(str(source_image.ReferencedSOPInstanceUID))
    return uids
