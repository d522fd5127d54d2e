"""DICOM-SEG export: round trips read back with highdicom and with plain pydicom, references, geometry and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dicom_factory import write_dicom_series

from napari_mamba_seg.io._image import ImageGeometry, ImageReadError, MedicalImage
from napari_mamba_seg.io.dicom import read_dicom_series
from napari_mamba_seg.io.dicom_seg import read_dicom_seg, write_dicom_seg

SHAPE = (5, 16, 20)  # (z, y, x)
SPACING = (2.5, 0.8, 0.7)
ORIGIN_LPS = (-12.0, 30.5, 7.25)
# An oblique orientation: unit row (array x) and column (array y) directions, orthogonal, not axis-aligned.
ROW = (0.8, 0.6, 0.0)
COLUMN = (-0.36, 0.48, 0.8)
CLASS_NAMES = ["background", "tumour", "vessel", "cyst"]  # "cyst" is absent from the labels: an empty segment
SEG_CLASS_UID = {"binary": "1.2.840.10008.5.1.4.1.1.66.4", "labelmap": "1.2.840.10008.5.1.4.1.1.66.7"}


def _series(folder: Path, seed: int = 0, **options) -> list[Path]:
    volume = np.random.default_rng(seed).integers(0, 2000, SHAPE).astype(np.int16)
    return write_dicom_series(
        folder, volume, spacing=SPACING, origin_lps=ORIGIN_LPS, row_direction=ROW, column_direction=COLUMN,
        seed=seed, **options,
    )  # fmt: skip


def _labels() -> np.ndarray:
    """``(z, y, x)`` labels 0..2 on three of the five slices (slices 0 and 4 are empty)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:4, 3:9, 4:12] = 1
    labels[2, 10:14, 2:18] = 2
    labels[3, 0, 0] = 2
    return labels


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> MedicalImage:
    """An oblique single-series MR source with shuffled instance numbers and random file names."""
    folder = tmp_path_factory.mktemp("series")
    _series(folder)
    return read_dicom_series(folder)


def _labels_from_pydicom(dataset: pydicom.Dataset, sop_uids: list[str]) -> np.ndarray:
    """Rebuild ``(z, y, x)`` labels from a SEG with pydicom only, placing frames by their referenced source UIDs."""
    labels = np.zeros((len(sop_uids), dataset.Rows, dataset.Columns), dtype=np.uint16)
    pixels = dataset.pixel_array.reshape(-1, dataset.Rows, dataset.Columns)
    for frame, item in zip(pixels, dataset.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        index = sop_uids.index(uid)
        if dataset.SegmentationType == "LABELMAP":
            labels[index] = np.where(frame > 0, frame, labels[index])
        else:
            number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            labels[index][frame > 0] = number
    return labels


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("encoding", ["binary", "labelmap", "fractional"])
def test_round_trip_matches_labels_references_and_geometry(tmp_path, source, encoding):
    labels = _labels()
    path = write_dicom_seg(
        labels, tmp_path / "seg.dcm", source, class_names=CLASS_NAMES, model_name="umamba-bot-breast",
        fractional=encoding == "fractional", labelmap=encoding == "labelmap",
    )  # fmt: skip
    assert path == tmp_path / "seg.dcm"
    assert [entry.name for entry in tmp_path.iterdir()] == ["seg.dcm"]  # no temporary file left behind

    read_back, segment_labels = read_dicom_seg(path, source)
    assert read_back.dtype == np.uint8
    np.testing.assert_array_equal(read_back, labels)
    assert segment_labels == CLASS_NAMES[1:]

    dataset = pydicom.dcmread(path)  # a proper DICOM file: preamble, DICM, file meta
    sop_uids = source.metadata["sop_instance_uids"][0]
    np.testing.assert_array_equal(_labels_from_pydicom(dataset, sop_uids), labels)
    assert dataset.Modality == "SEG"
    assert dataset.SOPClassUID == SEG_CLASS_UID.get(encoding, SEG_CLASS_UID["binary"])
    assert dataset.SegmentationType == encoding.upper()
    assert dataset.StudyInstanceUID == source.metadata["study_uid"]
    assert dataset.FrameOfReferenceUID == source.metadata["frame_of_reference_uid"]
    assert dataset.SeriesInstanceUID not in source.metadata["series_uids"]
    assert dataset.SeriesDescription == "Segmentation"

    for item in dataset.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        index = sop_uids.index(uid)
        source_header = pydicom.dcmread(source.metadata["files"][0][index], stop_before_pixels=True)
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source_header.ImagePositionPatient],
            atol=1e-4,
        )
        expected_lps = source.geometry.lps_affine() @ np.array([index, 0.0, 0.0, 1.0])
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], expected_lps[:3], atol=1e-3
        )
        assert labels[index].any(), "empty slices get no frame"
    orientation = dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [*ROW, *COLUMN], atol=1e-6)

    segments = [item for item in dataset.SegmentSequence if item.SegmentNumber != 0]
    assert [item.SegmentLabel for item in segments] == CLASS_NAMES[1:]
    assert [item.SegmentNumber for item in segments] == [1, 2, 3]
    for item in segments:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "napari-mamba-seg"
        assert "umamba-bot-breast" in algorithm.AlgorithmParameters


def test_reading_without_a_reference_spans_the_stored_frames(tmp_path, source):
    labels = _labels()
    path = write_dicom_seg(labels, tmp_path / "seg.dcm", source, class_names=CLASS_NAMES)
    read_back, segment_labels = read_dicom_seg(path)
    np.testing.assert_array_equal(read_back, labels[1:4])  # slices 0 and 4 hold no segment, so no frame
    assert segment_labels == CLASS_NAMES[1:]


def test_three_series_dce_source_references_channel_zero(tmp_path):
    folder = tmp_path / "dce"
    for phase in range(3):
        _series(folder, seed=phase, series_number=phase + 1, series_description=f"DCE phase {phase}")
    source = read_dicom_series(folder)
    assert source.num_channels == 3
    labels = _labels()
    path = write_dicom_seg(labels, tmp_path / "dce_seg.dcm", source, class_names=CLASS_NAMES[:3])

    dataset = pydicom.dcmread(path)
    channel_zero = source.metadata["sop_instance_uids"][0]
    referenced = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in dataset.PerFrameFunctionalGroupsSequence
    ]
    assert set(referenced) <= set(channel_zero)
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == source.metadata["series_uids"][0]
    assert dataset.SeriesNumber == 1001
    np.testing.assert_array_equal(_labels_from_pydicom(dataset, channel_zero), labels)
    read_back, segment_labels = read_dicom_seg(path, source)
    np.testing.assert_array_equal(read_back, labels)
    assert segment_labels == CLASS_NAMES[1:3]


# ------------------------------------------------------------------------------------------- errors


def test_non_dicom_sources_are_refused_with_a_pointer_to_nifti(tmp_path, source):
    nifti = MedicalImage(
        np.zeros((1, *SHAPE), np.float32), ImageGeometry.from_spacing(SPACING), source=tmp_path / "t1.nii.gz",
        format="nifti",
    )  # fmt: skip
    with pytest.raises(ValueError, match="DICOM-SEG needs a DICOM source") as caught:
        write_dicom_seg(_labels(), tmp_path / "seg.dcm", nifti, class_names=CLASS_NAMES)
    assert "NIfTI" in str(caught.value) and "t1.nii.gz" in str(caught.value)
    without_files = MedicalImage(source.array, source.geometry, format="dicom", metadata={})
    with pytest.raises(ValueError, match="DICOM-SEG needs a DICOM source"):
        write_dicom_seg(_labels(), tmp_path / "seg.dcm", without_files, class_names=CLASS_NAMES)
    assert not any(tmp_path.iterdir())


def test_wrong_shape_and_too_few_class_names_are_refused(tmp_path, source):
    with pytest.raises(ValueError, match=r"\(5, 16, 19\).*\(5, 16, 20\)"):
        write_dicom_seg(_labels()[..., :19], tmp_path / "seg.dcm", source, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="up to 2 but only 2 class names"):
        write_dicom_seg(_labels(), tmp_path / "seg.dcm", source, class_names=CLASS_NAMES[:2])
    with pytest.raises(ValueError, match="must be integers"):
        write_dicom_seg(_labels().astype(np.float32), tmp_path / "seg.dcm", source, class_names=CLASS_NAMES)
    assert not any(tmp_path.iterdir())


def test_all_background_labels_are_nothing_to_export(tmp_path, source):
    with pytest.raises(ValueError, match="nothing to export"):
        write_dicom_seg(np.zeros(SHAPE, np.uint8), tmp_path / "seg.dcm", source, class_names=CLASS_NAMES)
    assert not any(tmp_path.iterdir())


def test_existing_file_is_kept_unless_overwrite(tmp_path, source):
    path = tmp_path / "seg.dcm"
    path.write_bytes(b"a file the user wants to keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_dicom_seg(_labels(), path, source, class_names=CLASS_NAMES)
    assert path.read_bytes() == b"a file the user wants to keep"

    write_dicom_seg(_labels(), path, source, class_names=CLASS_NAMES, overwrite=True)
    read_back, _ = read_dicom_seg(path, source)
    np.testing.assert_array_equal(read_back, _labels())
    assert [entry.name for entry in tmp_path.iterdir()] == ["seg.dcm"]


def test_moved_source_files_and_foreign_references_are_reported(tmp_path, source):
    folder = tmp_path / "moved"
    files = _series(folder, seed=5)
    moved = read_dicom_series(folder)
    files[2].unlink()
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        write_dicom_seg(_labels(), tmp_path / "seg.dcm", moved, class_names=CLASS_NAMES)
    assert not (tmp_path / "seg.dcm").exists()

    path = write_dicom_seg(_labels(), tmp_path / "seg.dcm", source, class_names=CLASS_NAMES)
    with pytest.raises(ImageReadError, match="reference none of the 5 images"):
        read_dicom_seg(path, moved)
    with pytest.raises(ImageReadError, match="not a readable DICOM Segmentation"):
        read_dicom_seg(files[0])
