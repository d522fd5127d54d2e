"""export_labels: every format round-trips with its geometry, reviewed-only exports, provenance records, nnU-Net
cases that NnUNetRawDataset reads, refusals that leave the target folder as it was, and roll-back on failure."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dicom_factory import write_dicom_series
from nnunet_expected import CHANNELS, CLASSES, ONE_CASE_DATASET_JSON

import napari_mamba_seg
from napari_mamba_seg._durable import file_sha256
from napari_mamba_seg.interactive import ReviewState
from napari_mamba_seg.io import (
    EXPORT_FORMATS,
    ExportResult,
    ImageGeometry,
    MedicalImage,
    export_format_for,
    export_labels,
    read_dicom_seg,
    read_image,
    sanitize_case_name,
    write_tiff,
)
from napari_mamba_seg.io import _atomic as atomic_module
from napari_mamba_seg.io import export as export_module
from napari_mamba_seg.io.dicom import read_dicom_series
from napari_mamba_seg.training.cases import NnUNetRawDataset

SHAPE = (6, 32, 32)  # (z, y, x)
# NIfTI (i, j, k) → RAS: oblique, anisotropic (2 mm slices along k = array axis 0).
NIFTI_AFFINE = np.array([[0.0, -0.7, 0.1, 80.0], [0.7, 0.0, 0.0, -60.5], [0.0, 0.05, 2.0, 10.25], [0, 0, 0, 1]])


# --------------------------------------------------------------------------------------------- fixtures, helpers


def _labels(seed: int = 0) -> np.ndarray:
    """``(z, y, x)`` uint8 labels: breast on slices 1-4, a lesion inside it on slices 2-3, some noise."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:5, 4:28, 6:26] = 1
    labels[2:4, 10:16, 12:20] = 2
    rng = np.random.default_rng(seed)
    labels[1:5][rng.random((4, *SHAPE[1:])) < 0.05] = 2
    return labels


def _nifti_source(folder: Path, name: str = "patient 1", seed: int = 0) -> MedicalImage:
    """A 2-phase oblique NIfTI read back through read_image: array (2, 6, 32, 32) int16."""
    folder.mkdir(parents=True, exist_ok=True)
    voxels = np.random.default_rng(seed).integers(-100, 1000, (*SHAPE[::-1], 2)).astype(np.int16)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(voxels, NIFTI_AFFINE), path)
    image = read_image(path)
    image.channel_names = list(CHANNELS)
    return image


@pytest.fixture
def source(tmp_path: Path) -> MedicalImage:
    return _nifti_source(tmp_path / "source")


@pytest.fixture(scope="module")
def dicom_source(tmp_path_factory) -> MedicalImage:
    folder = tmp_path_factory.mktemp("dicom")
    volume = np.random.default_rng(3).integers(0, 2000, SHAPE).astype(np.int16)
    write_dicom_series(
        folder, volume, spacing=(2.0, 0.7, 0.7), origin_lps=(-12.0, 30.5, 7.25), row_direction=(0.8, 0.6, 0.0),
        column_direction=(-0.36, 0.48, 0.8),
    )  # fmt: skip
    return read_dicom_series(folder)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An export folder that already holds an unrelated file (it must survive every export untouched)."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("not ours\n")
    return folder


def _snapshot(folder: Path) -> dict[str, str | None]:
    """Every entry under ``folder``: relative path → sha256 (None for folders); hidden entries included."""
    return {str(p.relative_to(folder)): (file_sha256(p) if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _review(*slices: int, axis: int = 0) -> ReviewState:
    return ReviewState(axis, SHAPE[axis], set(slices))


def _provenance(result: ExportResult) -> dict:
    return json.loads(result.provenance_file.read_text(encoding="utf-8"))


def _export(labels, source, target, **kwargs) -> ExportResult:
    return export_labels(labels, source, target, class_names=CLASSES, **kwargs)


# --------------------------------------------------------------------------------------------- format from target


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.nii.gz", "nifti"), ("a.NII", "nifti"), ("a.tif", "tiff"), ("a.tiff", "tiff"), ("a.ome.tif", "tiff"),
        ("a.dcm", "dicom-seg"), ("Dataset101_Breast", "nnunet"),
    ],
)  # fmt: skip
def test_format_from_target(tmp_path: Path, name: str, expected: str) -> None:
    assert export_format_for(tmp_path / name) == expected
    assert expected in EXPORT_FORMATS


def test_format_of_an_existing_folder_and_an_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "data.v2").mkdir()
    assert export_format_for(tmp_path / "data.v2") == "nnunet"
    with pytest.raises(ValueError, match=r"\.png.*\.nii\.gz.*\.ome\.tif.*\.dcm"):
        export_format_for(tmp_path / "labels.png")


def test_a_format_that_contradicts_the_suffix_is_refused(source: MedicalImage, out: Path) -> None:
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"must end with \.nii\.gz or \.nii"):
        _export(_labels(), source, out / "labels.tif", format="nifti")
    with pytest.raises(ValueError, match="unknown format 'png'"):
        _export(_labels(), source, out / "labels.tif", format="png")
    assert _snapshot(out) == before


# --------------------------------------------------------------------------------------------- file round trips


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.ome.tif", "labels.tiff"])
def test_file_export_round_trips_labels_and_geometry(source: MedicalImage, out: Path, name: str) -> None:
    labels = _labels()
    result = _export(labels.astype(np.int64), source, out / name)
    assert result.files == (out / name,) and result.provenance_file == out / f"{name}.provenance.json"
    assert result.reviewed_slices is None and result.case_name is None
    assert result.format == export_format_for(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", name, f"{name}.provenance.json"])
    back = read_image(out / name)
    np.testing.assert_array_equal(back.array[0], labels)
    assert back.array.dtype == np.uint8
    assert back.geometry == source.geometry  # the affine bit for bit (NIfTI header reused; TIFF's private tag)


def test_nifti_export_keeps_the_source_header_codes(source: MedicalImage, out: Path) -> None:
    _export(_labels(), source, out / "labels.nii.gz")
    written, original = nib.load(out / "labels.nii.gz").header, source.metadata["nifti_header"]
    assert (int(written["sform_code"]), int(written["qform_code"])) == (
        int(original["sform_code"]),
        int(original["qform_code"]),
    )
    np.testing.assert_array_equal(written.get_best_affine(), original.get_best_affine())


def test_tiff_source_exports_nifti_with_its_spacing(tmp_path: Path, out: Path) -> None:
    geometry = ImageGeometry.from_spacing((2.5, 0.6, 0.8), origin=(3.0, -4.0, 5.0))
    write_tiff(np.zeros((1, *SHAPE), np.uint16), tmp_path / "image.ome.tif", geometry)
    tiff_source = read_image(tmp_path / "image.ome.tif")
    result = _export(_labels(), tiff_source, out / "labels.nii.gz")
    back = read_image(out / "labels.nii.gz")
    np.testing.assert_array_equal(back.array[0], _labels())
    assert back.geometry.is_close(geometry, atol=1e-6) and back.geometry.spacing == pytest.approx((2.5, 0.6, 0.8))
    record = _provenance(result)
    assert record["source"]["files"] == [
        {
            "path": str((tmp_path / "image.ome.tif").absolute()),
            "bytes": (tmp_path / "image.ome.tif").stat().st_size,
            "sha256": file_sha256(tmp_path / "image.ome.tif"),
        }
    ]


def test_dicom_source_exports_nifti_on_its_grid(dicom_source: MedicalImage, out: Path) -> None:
    _export(_labels(), dicom_source, out / "labels.nii.gz")
    back = read_image(out / "labels.nii.gz")
    np.testing.assert_array_equal(back.array[0], _labels())
    assert back.geometry.is_close(dicom_source.geometry, atol=1e-5)


# --------------------------------------------------------------------------------------------- reviewed only


@pytest.mark.parametrize(("suffix", "axis"), [(".nii.gz", 0), (".ome.tif", 0), (".nii.gz", 2)])
def test_reviewed_only_zeroes_unreviewed_slices_and_writes_the_mask(
    source: MedicalImage, out: Path, suffix: str, axis: int
) -> None:
    labels = _labels()
    review = _review(1, 3, 20, axis=axis) if axis == 2 else _review(1, 3, axis=axis)
    result = _export(labels, source, out / f"case{suffix}", review=review, reviewed_only=True)
    mask_path = out / f"case_reviewed{suffix}"
    assert result.files == (out / f"case{suffix}", mask_path)
    assert result.reviewed_slices == tuple(sorted(review.reviewed))
    trusted = review.trusted_mask(SHAPE)
    mask = read_image(mask_path)
    np.testing.assert_array_equal(mask.array[0], trusted.astype(np.uint8))
    assert mask.geometry == source.geometry
    back = read_image(out / f"case{suffix}").array[0]
    np.testing.assert_array_equal(back[trusted], labels[trusted])
    assert not back[~trusted].any() and labels[~trusted].any()  # there was something to drop
    review_record = _provenance(result)["review"]
    assert review_record["axis"] == axis and review_record["reviewed_slices"] == sorted(review.reviewed)
    assert review_record["reviewed_only"] is True


def test_a_review_without_reviewed_only_exports_every_slice_and_records_the_review(
    source: MedicalImage, out: Path
) -> None:
    result = _export(_labels(), source, out / "labels.nii.gz", review=_review(2, 4))
    assert result.files == (out / "labels.nii.gz",) and result.reviewed_slices == (2, 4)
    np.testing.assert_array_equal(read_image(out / "labels.nii.gz").array[0], _labels())
    record = _provenance(result)["review"]
    assert (record["reviewed_slices"], record["reviewed_only"], record["num_slices"]) == ([2, 4], False, 6)


def test_reviewed_only_exports_reviewed_slices_that_are_empty(source: MedicalImage, out: Path) -> None:
    result = _export(np.zeros(SHAPE, np.uint8), source, out / "labels.nii.gz", review=_review(0), reviewed_only=True)
    assert not read_image(result.files[0]).array.any()
    assert read_image(result.files[1]).array[0, 0].all()


# --------------------------------------------------------------------------------------------- DICOM-SEG


def test_dicom_seg_references_the_source_instances(dicom_source: MedicalImage, out: Path) -> None:
    labels = _labels()
    result = _export(labels, dicom_source, out / "seg.dcm", provenance={"model": "breast-v1"}, review=_review(2))
    assert result.files == (out / "seg.dcm",) and result.format == "dicom-seg"
    back, names = read_dicom_seg(out / "seg.dcm", reference=dicom_source)
    np.testing.assert_array_equal(back, labels)
    assert names == CLASSES[1:]
    source_files = dicom_source.metadata["files"][0]
    source_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in source_files]
    seg = pydicom.dcmread(out / "seg.dcm")
    instances = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    referenced = {str(item.ReferencedSOPInstanceUID) for item in instances}
    assert referenced == set(source_uids)
    frame_uids = [
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    labelled_slices = {source_uids[z] for z in range(SHAPE[0]) if labels[z].any()}
    assert set(frame_uids) == labelled_slices
    first = pydicom.dcmread(source_files[0], stop_before_pixels=True)
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)
    assert "breast-v1" in seg.ContentDescription
    record = _provenance(result)
    assert [entry["sha256"] for entry in record["source"]["files"]] == [file_sha256(f) for f in source_files]
    assert record["model"] == "breast-v1" and record["review"]["reviewed_slices"] == [2]
    nifti = _export(labels, dicom_source, out / "seg.nii.gz")  # the same layer as NIfTI: its own record
    assert nifti.provenance_file == out / "seg.nii.gz.provenance.json" and _provenance(result) == record


def test_dicom_seg_needs_a_dicom_source_and_refuses_reviewed_only(
    source: MedicalImage, dicom_source: MedicalImage, out: Path
) -> None:
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"Export as NIfTI \(\.nii\.gz\) or TIFF"):
        _export(_labels(), source, out / "seg.dcm")
    with pytest.raises(ValueError, match="cannot mark slices as unreviewed"):
        _export(_labels(), dicom_source, out / "seg.dcm", review=_review(1), reviewed_only=True)
    assert _snapshot(out) == before


# --------------------------------------------------------------------------------------------- nnU-Net


def test_nnunet_case_structure_and_dataset_reader(source: MedicalImage, tmp_path: Path) -> None:
    folder = tmp_path / "Dataset101_Breast"
    labels = _labels()
    result = _export(labels, source, folder, case_name="case01", provenance={"reviewer": "dr x"})
    assert result.format == "nnunet" and result.case_name == "case01"
    assert result.files == (
        folder / "imagesTr" / "case01_0000.nii.gz",
        folder / "imagesTr" / "case01_0001.nii.gz",
        folder / "labelsTr" / "case01.nii.gz",
    )
    assert result.provenance_file == folder / "provenance" / "case01.json"
    assert json.loads((folder / "dataset.json").read_text()) == ONE_CASE_DATASET_JSON
    for channel, path in enumerate(result.files[:2]):
        image = read_image(path)
        np.testing.assert_array_equal(image.array[0], source.array[channel])
        assert image.geometry == source.geometry
    label_image = read_image(result.files[2])
    np.testing.assert_array_equal(label_image.array[0], labels)
    assert label_image.geometry == source.geometry
    dataset = NnUNetRawDataset(folder)
    assert dataset.case_names == ["case01"] and dataset.class_names == CLASSES and dataset.channel_names == CHANNELS
    case = dataset[0]
    np.testing.assert_array_equal(case.labels, labels)
    np.testing.assert_array_equal(case.image, source.array)
    assert case.trusted is None
    assert _provenance(result)["reviewer"] == "dr x" and _provenance(result)["case_name"] == "case01"


def test_nnunet_reviewed_only_stores_unreviewed_voxels_as_ignore(source: MedicalImage, tmp_path: Path) -> None:
    folder = tmp_path / "Dataset102_Partial"
    review = _review(1, 2)
    result = _export(_labels(), source, folder, case_name="case01", review=review, reviewed_only=True)
    assert json.loads((folder / "dataset.json").read_text())["labels"]["ignore"] == 3
    case = NnUNetRawDataset(folder)[0]
    trusted = review.trusted_mask(SHAPE)
    np.testing.assert_array_equal(case.trusted, trusted)
    np.testing.assert_array_equal(case.labels[trusted], _labels()[trusted])
    record = _provenance(result)
    assert record["nnunet"]["ignore_label"] == 3 and record["nnunet"]["num_ignored_voxels"] == int((~trusted).sum())
    assert record["voxels_per_class"]["ignore"] == int((~trusted).sum())
    assert result.reviewed_slices == (1, 2)


def test_nnunet_reviewed_only_with_every_slice_reviewed_needs_no_ignore(source: MedicalImage, tmp_path: Path) -> None:
    folder = tmp_path / "Dataset112_All"
    result = _export(_labels(), source, folder, review=_review(*range(SHAPE[0])), reviewed_only=True)
    assert "ignore" not in json.loads((folder / "dataset.json").read_text())["labels"]
    assert NnUNetRawDataset(folder)[0].trusted is None
    values, counts = np.unique(_labels(), return_counts=True)
    assert _provenance(result)["voxels_per_class"] == {CLASSES[v]: int(c) for v, c in zip(values, counts, strict=True)}


def test_appending_a_case_keeps_the_first_case_and_its_record(tmp_path: Path) -> None:
    folder = tmp_path / "Dataset103_Two"
    first_source = _nifti_source(tmp_path / "a", "patient 1", seed=0)
    second_source = _nifti_source(tmp_path / "b", "patient 2", seed=1)
    first = _export(_labels(0), first_source, folder)
    first_files = {path: file_sha256(path) for path in (*first.files, first.provenance_file)}
    second = _export(_labels(1), second_source, folder)
    assert (first.case_name, second.case_name) == ("patient_1", "patient_2")  # default: the source's name
    assert {path: file_sha256(path) for path in first_files} == first_files
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    dataset = NnUNetRawDataset(folder)
    assert dataset.case_names == ["patient_1", "patient_2"]
    np.testing.assert_array_equal(dataset[1].labels, _labels(1))
    assert sorted(p.name for p in (folder / "provenance").iterdir()) == ["patient_1.json", "patient_2.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "provenance"]


def test_unsafe_case_names_are_sanitised(source: MedicalImage, tmp_path: Path) -> None:
    folder = tmp_path / "Dataset104_Names"
    unsafe = "../../étude/Layer 1: lesion_0000"
    result = _export(_labels(), source, folder, case_name=unsafe)
    assert result.case_name == sanitize_case_name(unsafe) == "etude_Layer_1_lesion-0000"
    for path in (*result.files, result.provenance_file):
        assert path.resolve().is_relative_to(folder.resolve()) and path.is_file()
    assert _provenance(result)["nnunet"]["requested_case_name"] == unsafe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset104_Names", "source"]


# --------------------------------------------------------------------------------------------- provenance


def test_provenance_record_content(source: MedicalImage, out: Path) -> None:
    facts = {"segmented_with": {"model": "breast-v1", "model_sha256": "ab" * 32}, "settings": {"tta": True}}
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    result = _export(_labels(), source, out / "labels.nii.gz", provenance=facts, review=_review(1, 4))
    record = _provenance(result)
    assert record["format"] == "nifti" and record["class_names"] == CLASSES
    assert record["software"] == {"name": "napari-mamba-seg", "version": napari_mamba_seg.__version__}
    created = datetime.datetime.fromisoformat(record["created_utc"].replace("Z", "+00:00"))
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc)
    (entry,) = record["files"]
    assert entry == {
        "path": "labels.nii.gz",
        "role": "labels",
        "bytes": (out / "labels.nii.gz").stat().st_size,
        "sha256": file_sha256(out / "labels.nii.gz"),
    }
    (source_file,) = record["source"]["files"]
    assert source_file["sha256"] == file_sha256(source.source)
    assert record["source"]["spatial_shape"] == list(SHAPE)
    np.testing.assert_array_equal(record["source"]["affine_ras"], source.geometry.affine)
    values, counts = np.unique(_labels(), return_counts=True)
    assert record["voxels_per_class"] == {CLASSES[v]: int(c) for v, c in zip(values, counts, strict=True)}
    assert record["segmented_with"] == facts["segmented_with"] and record["settings"] == {"tta": True}
    assert record["review"]["reviewed_slices"] == [1, 4]


def test_an_in_memory_source_and_a_missing_source_file_are_recorded(tmp_path: Path, out: Path) -> None:
    in_memory = MedicalImage(np.zeros((1, *SHAPE), np.float32), ImageGeometry.from_spacing((2.0, 1.0, 1.0)))
    record = _provenance(_export(_labels(), in_memory, out / "a.nii.gz"))
    assert record["source"]["files"] == [] and record["source"]["path"] is None
    gone = _nifti_source(tmp_path / "gone")
    gone.source.unlink()
    record = _provenance(_export(_labels(), gone, out / "b.nii.gz"))
    assert record["source"]["files"][0]["sha256"] is None and "missing" in record["source"]["files"][0]["note"]


# --------------------------------------------------------------------------------------------- overwriting


@pytest.mark.parametrize("existing", ["labels.nii.gz", "labels.nii.gz.provenance.json", "labels_reviewed.nii.gz"])
def test_file_export_never_overwrites_without_overwrite(source: MedicalImage, out: Path, existing: str) -> None:
    (out / existing).write_bytes(b"earlier export")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=f"{existing}.*overwrite=True"):
        _export(_labels(), source, out / "labels.nii.gz", review=_review(1), reviewed_only=True)
    assert _snapshot(out) == before


def test_overwrite_replaces_the_whole_earlier_export(source: MedicalImage, out: Path) -> None:
    _export(_labels(0), source, out / "labels.nii.gz", review=_review(1), reviewed_only=True)
    assert (out / "labels_reviewed.nii.gz").is_file()
    result = _export(_labels(1), source, out / "labels.nii.gz", overwrite=True)
    np.testing.assert_array_equal(read_image(out / "labels.nii.gz").array[0], _labels(1))
    assert not (out / "labels_reviewed.nii.gz").exists()  # the stale mask of the earlier export went with it
    assert _provenance(result)["files"][0]["sha256"] == file_sha256(out / "labels.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["labels.nii.gz", "labels.nii.gz.provenance.json", "notes.txt"]


def test_nnunet_case_never_overwritten_without_overwrite(source: MedicalImage, tmp_path: Path) -> None:
    folder = tmp_path / "Dataset105_Again"
    _export(_labels(0), source, folder, case_name="case01")
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _export(_labels(1), source, folder, case_name="case01")
    assert _snapshot(folder) == before
    (folder / "provenance" / "case02.json").write_text("{}")  # a stale record alone also blocks case02
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match=r"case02\.json"):
        _export(_labels(1), source, folder, case_name="case02")
    assert _snapshot(folder) == before
    result = _export(_labels(1), source, folder, case_name="case01", overwrite=True)
    np.testing.assert_array_equal(NnUNetRawDataset(folder)[0].labels, _labels(1))
    assert _provenance(result)["files"][-1]["sha256"] == file_sha256(folder / "labelsTr" / "case01.nii.gz")


# --------------------------------------------------------------------------------------------- bad input


BAD_INPUTS = {
    "all background": ({"labels": np.zeros(SHAPE, np.uint8)}, ValueError, "nothing to export"),
    "reviewed_only without review": ({"reviewed_only": True}, ValueError, "no review was given"),
    "reviewed_only, nothing reviewed": (
        {"reviewed_only": True, "review": ReviewState(0, SHAPE[0])},
        ValueError,
        "no slice is marked as reviewed",
    ),
    "review of other labels": ({"review": ReviewState(0, 9, {1})}, ValueError, "does not fit labels"),
    "shape": ({"labels": np.ones((6, 32, 31), np.uint8)}, ValueError, r"shape \(6, 32, 31\).*\(6, 32, 32\)"),
    "value beyond the classes": ({"labels": _labels() * 2}, ValueError, r"\[0, 2\].*got \[0, 4\]"),
    "negative value": ({"labels": _labels().astype(np.int16) - 1}, ValueError, r"got \[-1, 1\]"),
    "float labels": ({"labels": _labels().astype(np.float32)}, ValueError, "must be integers"),
    "one class name": ({"class_names": ["background"]}, ValueError, "at least two distinct"),
    "duplicate class names": ({"class_names": ["background", "a", "a"]}, ValueError, "at least two distinct"),
    "reserved provenance key": ({"provenance": {"files": 1}}, ValueError, r"\['files'\] are reserved"),
    "provenance not JSON": ({"provenance": {"model": object()}}, ValueError, "cannot be stored as JSON"),
}


@pytest.mark.parametrize("target_name", ["labels.nii.gz", "labels.ome.tif", "Dataset106_Bad"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_writes_nothing(source: MedicalImage, out: Path, target_name: str, case: str) -> None:
    _export(_labels(), source, out / "earlier.nii.gz")  # the folder holds an earlier export too
    if target_name.startswith("Dataset"):
        _export(_labels(), source, out / target_name, case_name="earlier")
    overrides, error, message = BAD_INPUTS[case]
    kwargs = {"labels": _labels(), "class_names": CLASSES, **overrides}
    before = _snapshot(out)
    with pytest.raises(error, match=message):
        export_labels(source=source, target=out / target_name, **kwargs)
    assert _snapshot(out) == before


@pytest.mark.parametrize("target_name", ["missing/labels.nii.gz", "missing/Dataset107_X"])
def test_a_missing_folder_is_not_created(source: MedicalImage, out: Path, target_name: str) -> None:
    before = _snapshot(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _export(_labels(), source, out / target_name)
    assert _snapshot(out) == before


@pytest.mark.parametrize("target_name", ["labels.nii.gz", "Dataset108_X"])
def test_an_unwritable_folder_is_refused(
    source: MedicalImage, out: Path, monkeypatch: pytest.MonkeyPatch, target_name: str
) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out and real_access(path, mode))
    before = _snapshot(out)
    with pytest.raises(PermissionError, match="not writable"):
        _export(_labels(), source, out / target_name)
    assert _snapshot(out) == before


def test_nnunet_case_name_and_channel_checks_write_nothing(source: MedicalImage, out: Path) -> None:
    before = _snapshot(out)
    with pytest.raises(ValueError, match="one non-empty name per image channel"):
        _export(_labels(), source, out / "Dataset109_X", channel_names=["only one"])
    with pytest.raises(ValueError, match='"background" first'):
        export_labels(_labels(), source, out / "Dataset109_X", class_names=["bg", "breast", "lesion"])
    assert _snapshot(out) == before


# --------------------------------------------------------------------------------------------- failures midway


def test_a_failing_file_export_restores_the_earlier_export(
    source: MedicalImage, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _export(_labels(0), source, out / "labels.nii.gz", review=_review(1), reviewed_only=True)
    before = _snapshot(out)

    def disk_full(record, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _export(_labels(1), source, out / "labels.nii.gz", review=_review(2), reviewed_only=True, overwrite=True)
    assert _snapshot(out) == before


def test_a_failure_while_moving_files_into_place_rolls_back(
    source: MedicalImage, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _export(_labels(0), source, out / "labels.nii.gz")
    before = _snapshot(out)
    real_move = atomic_module._move_into_place

    def fail_on_provenance(staged: Path, final: Path, overwrite: bool) -> None:
        if final.name.endswith(".provenance.json"):
            raise OSError(5, "Input/output error")
        real_move(staged, final, overwrite)

    monkeypatch.setattr(atomic_module, "_move_into_place", fail_on_provenance)
    with pytest.raises(OSError, match="Input/output"):
        _export(_labels(1), source, out / "labels.nii.gz", review=_review(2), reviewed_only=True, overwrite=True)
    assert _snapshot(out) == before  # labels and mask were placed, then removed / restored
    with pytest.raises(OSError, match="Input/output"):
        _export(_labels(1), source, out / "new.nii.gz")
    assert _snapshot(out) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failing_nnunet_record_rolls_the_case_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    folder = tmp_path / "Dataset110_Rollback"
    first = _nifti_source(tmp_path / "a", "first", seed=0)
    _export(_labels(0), first, folder)
    if overwrite:
        _export(_labels(0), _nifti_source(tmp_path / "b", "second", seed=1), folder)
    before = _snapshot(folder)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_provenance", disk_full)
    second = _nifti_source(tmp_path / "b", "second", seed=2)
    with pytest.raises(OSError, match="No space left"):
        _export(_labels(1), second, folder, review=_review(3), reviewed_only=True, overwrite=overwrite)
    assert _snapshot(folder) == before
    assert len(NnUNetRawDataset(folder)) == (2 if overwrite else 1)


def test_a_failing_first_nnunet_case_leaves_no_folder(
    source: MedicalImage, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(out)
    monkeypatch.setattr(export_module, "write_provenance", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        _export(_labels(), source, out / "Dataset111_New")
    assert _snapshot(out) == before


def test_progress_reports_each_step(source: MedicalImage, out: Path) -> None:
    messages: list[str] = []
    _export(_labels(), source, out / "labels.nii.gz", review=_review(1), reviewed_only=True, progress=messages.append)
    assert messages[0].startswith("checking") and any("review mask" in m for m in messages)
    assert any("provenance" in m for m in messages)
