"""nnU-Net v2 export: files and dataset.json that NnUNetRawDataset reads back, appending, refusals, atomicity."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_mamba_seg.io import MedicalImage, read_image
from napari_mamba_seg.io import nnunet as nnunet_module
from napari_mamba_seg.io.nnunet import export_nnunet_case, file_sha256, sanitize_case_name, write_provenance
from napari_mamba_seg.training.cases import NnUNetRawDataset

sys.path.insert(0, str(Path(__file__).parent))
from nnunet_expected import CHANNELS, CLASSES, ONE_CASE_DATASET_JSON


def _nifti_image(folder: Path, name: str, seed: int) -> MedicalImage:
    """A 2-phase oblique NIfTI read back through the API: array (2, 4, 5, 6) int16."""
    rng = np.random.default_rng(seed)
    voxels = rng.integers(-100, 1000, (6, 5, 4, 2)).astype(np.int16)
    affine = np.array([[0.0, -0.7, 0.1, 80.0], [0.7, 0.0, 0.0, -60.5], [0.0, 0.05, 2.0, 10.25], [0, 0, 0, 1]])
    path = folder / f"{name}.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(voxels, affine), path)
    return read_image(path)


def _labels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``(*shape)`` uint8 labels with every class present."""
    labels = np.random.default_rng(seed).integers(0, len(CLASSES), shape).astype(np.uint8)
    labels.flat[:3] = [0, 1, 2]
    return labels


@pytest.fixture
def image(tmp_path: Path) -> MedicalImage:
    return _nifti_image(tmp_path / "source", "patient 1", seed=0)


def _export(folder: Path, name: str, image: MedicalImage, labels: np.ndarray, **kwargs):
    return export_nnunet_case(folder, name, image, labels, channel_names=CHANNELS, class_names=CLASSES, **kwargs)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_files_and_dataset_json(tmp_path: Path, image: MedicalImage) -> None:
    labels = _labels(image.spatial_shape, seed=1)
    folder = tmp_path / "Dataset101_Breast"
    result = _export(folder, "case01", image, labels)
    assert result.case_name == "case01" and result.num_training == 1 and result.ignore_label is None
    assert [p.name for p in result.image_files] == ["case01_0000.nii.gz", "case01_0001.nii.gz"]
    for channel, path in enumerate(result.image_files):
        written = read_image(path)
        np.testing.assert_array_equal(written.array[0], image.array[channel])
        assert written.array.dtype == image.array.dtype
        np.testing.assert_array_equal(written.geometry.affine, image.geometry.affine)
    written_labels = read_image(result.label_file)
    np.testing.assert_array_equal(written_labels.array[0], labels)
    np.testing.assert_array_equal(written_labels.geometry.affine, image.geometry.affine)
    assert json.loads((folder / "dataset.json").read_text()) == ONE_CASE_DATASET_JSON
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]  # no staging left


def test_nnunet_raw_dataset_reads_the_export_with_trust(tmp_path: Path, image: MedicalImage) -> None:
    labels = _labels(image.spatial_shape, seed=2)
    trusted = np.zeros(image.spatial_shape, bool)
    trusted[1:3] = True  # two reviewed slices
    folder = tmp_path / "Dataset102"
    result = _export(folder, "reviewed", image, labels, trusted=trusted)
    assert result.ignore_label == len(CLASSES) and result.num_ignored_voxels == int((~trusted).sum())
    dataset = NnUNetRawDataset(folder)
    assert dataset.channel_names == CHANNELS and dataset.class_names == CLASSES
    assert dataset.ignore_label == 3 and dataset.case_names == ["reviewed"]
    case = dataset[0]
    np.testing.assert_array_equal(case.image, image.array)
    np.testing.assert_array_equal(case.trusted, trusted)
    np.testing.assert_array_equal(case.labels[trusted], labels[trusted])
    assert not case.labels[~trusted].any()
    assert case.spacing == pytest.approx(image.geometry.spacing)


def test_appending_updates_num_training_and_keeps_other_cases(tmp_path: Path, image: MedicalImage) -> None:
    folder = tmp_path / "Dataset103"
    first = _export(folder, "a", image, _labels(image.spatial_shape, seed=3))
    before = {path.name: path.read_bytes() for path in first.files}
    second_image = _nifti_image(tmp_path / "source", "patient 2", seed=4)
    trusted = np.ones(second_image.spatial_shape, bool)
    trusted[0] = False
    second = _export(folder, "b", second_image, _labels(second_image.spatial_shape, seed=5), trusted=trusted)
    assert second.num_training == 2
    assert {path.name: path.read_bytes() for path in first.files} == before
    info = json.loads((folder / "dataset.json").read_text())
    assert info["numTraining"] == 2 and info["labels"]["ignore"] == 3  # declared when the first trust mask came
    dataset = NnUNetRawDataset(folder)
    assert dataset.case_names == ["a", "b"]
    assert dataset[0].trusted is None and dataset[1].trusted is not None


def test_appending_keeps_extra_dataset_json_keys(tmp_path: Path, image: MedicalImage) -> None:
    folder = tmp_path / "Dataset104"
    _export(folder, "a", image, _labels(image.spatial_shape, seed=6))
    info = json.loads((folder / "dataset.json").read_text())
    info["name"] = "Breast corrections"
    (folder / "dataset.json").write_text(json.dumps(info))
    _export(folder, "b", image, _labels(image.spatial_shape, seed=7))
    assert json.loads((folder / "dataset.json").read_text())["name"] == "Breast corrections"


def test_mismatched_channels_or_classes_are_refused(tmp_path: Path, image: MedicalImage) -> None:
    folder = tmp_path / "Dataset105"
    labels = _labels(image.spatial_shape, seed=8)
    _export(folder, "a", image, labels)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"channel names \['T1', 'T2'\] do not match.*\['pre', 'post'\]"):
        export_nnunet_case(folder, "b", image, labels, channel_names=["T1", "T2"], class_names=CLASSES)
    with pytest.raises(ValueError, match=r"classes .*tumour.* do not match"):
        export_nnunet_case(
            folder, "b", image, labels, channel_names=CHANNELS, class_names=["background", "breast", "tumour"]
        )
    assert _snapshot(folder) == before


def test_same_name_refused_unless_overwrite(tmp_path: Path, image: MedicalImage) -> None:
    folder = tmp_path / "Dataset106"
    _export(folder, "a", image, _labels(image.spatial_shape, seed=9))
    before = _snapshot(folder)
    new_labels = _labels(image.spatial_shape, seed=10)
    with pytest.raises(FileExistsError, match=r"case 'a'.*already exists.*overwrite=True"):
        _export(folder, "a", image, new_labels)
    assert _snapshot(folder) == before
    result = _export(folder, "a", image, new_labels, overwrite=True)
    assert result.num_training == 1
    np.testing.assert_array_equal(read_image(result.label_file).array[0], new_labels)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("../../etc/passwd", "etc_passwd"),
        (".hidden case", "hidden_case"),
        ("Müller, Ö. 2024/03", "Muller_O_2024_03"),
        ("scan_0001", "scan-0001"),
        ("...", "case"),
        ("CON", "CON_case"),
        ("ok-name_1", "ok-name_1"),
    ],
)
def test_sanitize_case_name(requested: str, expected: str) -> None:
    assert sanitize_case_name(requested) == expected


def test_unsafe_name_is_sanitised_in_the_files(tmp_path: Path, image: MedicalImage) -> None:
    folder = tmp_path / "Dataset107"
    result = _export(folder, "../patient 1.nii.gz", image, _labels(image.spatial_shape, seed=11))
    assert result.case_name == "patient_1_nii_gz" and result.requested_name == "../patient 1.nii.gz"
    assert result.label_file == folder / "labelsTr" / "patient_1_nii_gz.nii.gz" and result.label_file.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset107", "source"]
    assert NnUNetRawDataset(folder).case_names == ["patient_1_nii_gz"]


def test_empty_labels_and_bad_shapes_are_refused(tmp_path: Path, image: MedicalImage) -> None:
    folder = tmp_path / "Dataset108"
    zeros = np.zeros(image.spatial_shape, np.uint8)
    with pytest.raises(ValueError, match=r"all background"):
        _export(folder, "a", image, zeros)
    with pytest.raises(ValueError, match=r"all background"):
        _export(folder, "a", image, zeros, trusted=np.ones(image.spatial_shape, bool))
    with pytest.raises(ValueError, match=r"no voxel is trusted"):
        _export(folder, "a", image, _labels(image.spatial_shape, 1), trusted=np.zeros(image.spatial_shape, bool))
    with pytest.raises(ValueError, match=r"labels have shape \(4, 5, 5\).*\(4, 5, 6\)"):
        _export(folder, "a", image, np.ones((4, 5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"trusted must be a bool mask.*\(4, 5, 6\)"):
        _export(folder, "a", image, _labels(image.spatial_shape, 1), trusted=np.ones((4, 5), bool))
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 2\].*got \[7, 7\]"):
        _export(folder, "a", image, np.full(image.spatial_shape, 7, np.uint8))
    with pytest.raises(ValueError, match=r"one non-empty name per image channel"):
        export_nnunet_case(
            folder, "a", image, _labels(image.spatial_shape, 1), channel_names=["x"], class_names=CLASSES
        )
    with pytest.raises(ValueError, match=r'"background" first'):
        export_nnunet_case(
            folder, "a", image, _labels(image.spatial_shape, 1), channel_names=CHANNELS, class_names=["lesion", "x"]
        )
    assert not folder.exists()


def test_partially_trusted_all_background_is_accepted(tmp_path: Path, image: MedicalImage) -> None:
    """Reviewed slices showing no structure are real training data (background is known there)."""
    trusted = np.zeros(image.spatial_shape, bool)
    trusted[0] = True
    result = _export(tmp_path / "D", "a", image, np.zeros(image.spatial_shape, np.uint8), trusted=trusted)
    case = NnUNetRawDataset(result.folder)[0]
    np.testing.assert_array_equal(case.trusted, trusted)


def test_unwritable_folder_is_refused(tmp_path: Path, image: MedicalImage, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _labels(image.spatial_shape, seed=12)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder"):
        _export(blocker / "Dataset109", "a", image, labels)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root ignores permission bits: make the access check see what a user would see
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    try:
        with pytest.raises(PermissionError, match=r"locked is not writable"):
            _export(locked / "Dataset109", "a", image, labels)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_failure_midway_leaves_nothing_under_final_names(
    tmp_path: Path, image: MedicalImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "Dataset110"
    first = _export(folder, "a", image, _labels(image.spatial_shape, seed=13))
    before = _snapshot(folder)

    def failing_label_writer(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(nnunet_module, "_write_label_volume", failing_label_writer)
    with pytest.raises(OSError, match="simulated"):
        _export(folder, "b", image, _labels(image.spatial_shape, seed=14))
    assert _snapshot(folder) == before  # no b_0000/b_0001 (they were staged first), dataset.json unchanged
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    with pytest.raises(OSError, match="simulated"):  # replacing a case: the old files are kept
        _export(folder, "a", image, _labels(image.spatial_shape, seed=15), overwrite=True)
    assert _snapshot(folder) == before
    assert NnUNetRawDataset(first.folder).case_names == ["a"]


def test_failure_while_moving_into_place_restores_the_replaced_case(
    tmp_path: Path, image: MedicalImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "Dataset111"
    _export(folder, "a", image, _labels(image.spatial_shape, seed=16))
    before = _snapshot(folder)
    real_replace = os.replace

    failures = []

    def replace_failing_on_dataset_json(source: object, target: object) -> None:
        if Path(target).name == "dataset.json" and not failures:  # only the commit's rename, not the restore
            failures.append(target)
            raise OSError("rename failed (simulated)")
        real_replace(source, target)

    monkeypatch.setattr(nnunet_module.os, "replace", replace_failing_on_dataset_json)
    with pytest.raises(OSError, match="simulated"):
        _export(folder, "a", image, _labels(image.spatial_shape, seed=17), overwrite=True)
    monkeypatch.setattr(nnunet_module.os, "replace", real_replace)
    assert failures and _snapshot(folder) == before  # the new a_* files were moved in, then the old ones restored


def test_new_folder_failure_leaves_no_folders(
    tmp_path: Path, image: MedicalImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_channel_writer(*args: object, **kwargs: object) -> None:
        raise OSError("simulated")

    monkeypatch.setattr(nnunet_module, "_write_channel", failing_channel_writer)
    with pytest.raises(OSError, match="simulated"):
        _export(tmp_path / "new" / "Dataset112", "a", image, _labels(image.spatial_shape, seed=18))
    assert not (tmp_path / "new").exists()


def test_write_provenance(tmp_path: Path, image: MedicalImage) -> None:
    result = _export(tmp_path / "Dataset113", "a", image, _labels(image.spatial_shape, seed=19))
    record = {
        "bundle": "breast-vmunet",
        "files": {p.name: file_sha256(p) for p in result.files},
        "source": image.source,
        "reviewed_slices": np.array([1, 2]),
        "voxels": np.int64(120),
    }
    path = write_provenance(result.folder, record)
    assert path == result.folder / "provenance.json"
    stored = json.loads(path.read_text())
    assert stored["source"] == str(image.source) and stored["reviewed_slices"] == [1, 2] and stored["voxels"] == 120
    import hashlib

    assert stored["files"]["a.nii.gz"] == hashlib.sha256(result.label_file.read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_provenance(path, {"other": 1})
    assert json.loads(path.read_text()) == stored
    write_provenance(path, {"other": 1}, overwrite=True)
    assert json.loads(path.read_text()) == {"other": 1}
    with pytest.raises(TypeError, match=r"object.*JSON cannot store"):
        write_provenance(tmp_path / "p.json", {"bad": object()})
    assert not (tmp_path / "p.json").exists()
    assert NnUNetRawDataset(result.folder).case_names == ["a"]  # provenance.json beside the data does not disturb it
