"""Write synthetic DICOM image series with pydicom, for tests of the DICOM reader and of anything that reads DICOM.

One call writes one series (or one temporal position of a series) as single-frame MR/CT image files: explicit VR
little endian, uncompressed, one file per slice, with the geometry given in DICOM's LPS+ frame.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

__all__ = ["SOP_CLASS_UIDS", "save_dicom", "write_dicom_series"]

SOP_CLASS_UIDS = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
}


def _ds(value: float) -> str:
    """A float as a DICOM decimal string (at most 16 characters, as many digits as fit)."""
    return format_number_as_ds(float(value))


def _unit(vector: Sequence[float], name: str) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(vector)
    if vector.shape != (3,) or norm == 0:
        raise ValueError(f"{name} must be 3 values, not all zero; got {vector.tolist()}")
    return vector / norm


def write_dicom_series(
    folder: str | Path,
    volume: np.ndarray,
    *,
    spacing: Sequence[float],
    origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
    row_direction: Sequence[float] = (1.0, 0.0, 0.0),
    column_direction: Sequence[float] = (0.0, 1.0, 0.0),
    slice_direction: Sequence[float] | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "synthetic series",
    temporal_position: int | None = None,
    trigger_time: float | None = None,
    acquisition_number: int | None = None,
    content_time: str | None = None,
    acquisition_time: str | None = None,
    first_instance_number: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    modality: str = "MR",
    patient_id: str = "SYNTHETIC-001",
    suffix: str = ".dcm",
) -> list[Path]:
    """Write ``volume`` as a DICOM series, one file per slice.

    The voxel ``volume[k, r, c]`` lies at ``origin_lps + k * spacing[0] * slice_direction
    + r * spacing[1] * column_direction + c * spacing[2] * row_direction`` (LPS+ mm). DICOM's naming: the
    *row direction* (first triplet of ImageOrientationPatient) is the direction along a row, i.e. of increasing
    column index (array axis x); the *column direction* (second triplet) is that of increasing row index (array
    axis y); PixelSpacing is ``[spacing[1], spacing[2]]`` = (between rows, between columns).

    Args:
        folder: Existing or new folder; files get random names, so several calls can share a folder.
        volume: ``(z, y, x)`` integer array (int16, uint16, int8 or uint8) of *stored* values; a reader must
            return ``volume * rescale_slope + rescale_intercept``.
        spacing: ``(slice gap, row spacing, column spacing)`` in mm, array order.
        origin_lps: ImagePositionPatient of slice 0 (LPS+ mm).
        row_direction: Direction of array axis x (ImageOrientationPatient[:3]); normalised.
        column_direction: Direction of array axis y (ImageOrientationPatient[3:]); normalised; must be orthogonal
            to ``row_direction``.
        slice_direction: Direction of array axis z; the normal ``row × column`` when None. May be its opposite
            (then a reader that sorts along the normal returns the slices reversed) or oblique (gantry tilt).
        rescale_slope: RescaleSlope of every slice.
        rescale_intercept: RescaleIntercept of every slice.
        series_uid: SeriesInstanceUID; a new one when None (pass the same one to write phases of one series).
        study_uid: StudyInstanceUID; a fixed synthetic one when None, so separate calls share the study.
        frame_of_reference_uid: FrameOfReferenceUID; a fixed synthetic one when None.
        series_number: SeriesNumber.
        series_description: SeriesDescription.
        temporal_position: TemporalPositionIdentifier, omitted when None.
        trigger_time: TriggerTime (ms), omitted when None.
        acquisition_number: AcquisitionNumber, omitted when None.
        content_time: ContentTime (``HHMMSS.FFFFFF``), omitted when None.
        acquisition_time: AcquisitionTime, omitted when None.
        first_instance_number: Smallest InstanceNumber.
        shuffle: Give the slices InstanceNumbers in random order (file names are random anyway), so a reader that
            sorts by name or InstanceNumber gets them wrong.
        seed: Seed of the shuffle.
        modality: ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage).
        patient_id: PatientID.
        suffix: File name suffix (``""`` for scanner-style names without one).

    Returns:
        The written files in array order: element ``k`` holds slice ``volume[k]``.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype not in (np.int16, np.uint16, np.int8, np.uint8):
        raise ValueError(f"volume must be a (z, y, x) int16/uint16/int8/uint8 array, got {volume.dtype} {volume.shape}")
    if modality not in SOP_CLASS_UIDS:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS_UIDS)}, got {modality!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row = _unit(row_direction, "row_direction")
    column = _unit(column_direction, "column_direction")
    if abs(float(row @ column)) > 1e-6:
        raise ValueError(f"row_direction {row.tolist()} and column_direction {column.tolist()} must be orthogonal")
    normal = np.cross(row, column)
    step = (normal if slice_direction is None else _unit(slice_direction, "slice_direction")) * float(spacing[0])
    origin = np.asarray(origin_lps, dtype=np.float64)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or "1.2.826.0.1.3680043.8.498.1"
    frame_of_reference_uid = frame_of_reference_uid or "1.2.826.0.1.3680043.8.498.2"
    depth = volume.shape[0]
    order = np.random.default_rng(seed).permutation(depth) if shuffle else np.arange(depth)
    paths = []
    for k in range(depth):
        ds = _slice_dataset(volume[k], modality, study_uid, series_uid, frame_of_reference_uid)
        ds.PatientID = patient_id
        ds.PatientName = "Synthetic^Phantom"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = first_instance_number + int(order[k])
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * step]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *column)]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
        ds.SliceThickness = _ds(spacing[0])
        ds.RescaleSlope = _ds(rescale_slope)
        ds.RescaleIntercept = _ds(rescale_intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
        optional = {
            "TemporalPositionIdentifier": temporal_position,
            "TriggerTime": None if trigger_time is None else _ds(trigger_time),
            "AcquisitionNumber": acquisition_number,
            "ContentTime": content_time,
            "AcquisitionTime": acquisition_time,
        }
        for keyword, value in optional.items():
            if value is not None:
                setattr(ds, keyword, value)
        path = folder / f"{uuid.uuid4().hex[:16]}{suffix}"
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
        save_dicom(ds, path)
        paths.append(path)
    return paths


def _slice_dataset(pixels: np.ndarray, modality: str, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    """A single-frame image dataset with its file meta, UIDs and pixel module; ``pixels`` is ``(rows, columns)``."""
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS_UIDS[modality]
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.3"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = SOP_CLASS_UIDS[modality]
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = modality
    ds.StudyDate = ds.SeriesDate = datetime.date(2024, 1, 2).strftime("%Y%m%d")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    ds.PixelData = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).tobytes()
    return ds


def save_dicom(ds: Dataset, path: str | Path) -> None:
    """Save a dataset (with its ``file_meta``) as a DICOM file: preamble, ``DICM``, file meta; pydicom 3 or 2.4."""
    try:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)
