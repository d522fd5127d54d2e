"""``napari-mamba-seg export``: NIfTI and nnU-Net exports from files end to end, reviewed slices from indices or a
review record, class names from the labels' own record, a DICOM-SEG as labels, the model's sha in the provenance,
one-line errors that write nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_mamba_seg import _cli_export, cli
from napari_mamba_seg._durable import file_sha256
from napari_mamba_seg.interactive import ReviewState
from napari_mamba_seg.io import EXPORT_FORMATS, MedicalImage, export_labels, read_image
from napari_mamba_seg.training.cases import NnUNetRawDataset

sys.path.insert(0, str(Path(__file__).parent / "io"))
from dicom_factory import write_dicom_series

AFFINE = np.array([[0.0, -0.7, 0.0, 80.0], [0.7, 0.0, 0.0, -60.5], [0.0, 0.0, 3.0, 10.25], [0, 0, 0, 1]])
SHAPE = (6, 32, 32)  # array order (z, y, x); 3 mm slices along z


def _labels(seed: int = 0) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:5, 4:28, 6:26] = 1
    labels[2:4, 10 + seed : 16 + seed, 12:20] = 2
    return labels


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A NIfTI image and its labels on the same grid (NIfTI voxel order is the reverse of array order)."""
    image = np.random.default_rng(0).normal(size=SHAPE[::-1]).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "study 1.nii.gz")
    nib.save(nib.Nifti1Image(_labels().transpose(2, 1, 0), AFFINE), tmp_path / "study 1_labels.nii.gz")
    return tmp_path / "study 1.nii.gz", tmp_path / "study 1_labels.nii.gz"


def _main(image: Path, labels: Path, target: Path, *extra: str) -> int:
    return cli.main(["export", "--image", str(image), "--labels", str(labels), "-o", str(target), "-q", *extra])


def _snapshot(folder: Path) -> dict[str, str | None]:
    return {str(p.relative_to(folder)): (file_sha256(p) if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_format_choices_are_the_exporters() -> None:
    assert _cli_export.FORMAT_CHOICES == EXPORT_FORMATS


def test_nifti_export_of_the_reviewed_slices(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    target = tmp_path / "out" / "corrected.nii.gz"
    target.parent.mkdir()
    code = _main(image, labels, target, "--class-names", "background,breast,lesion", "--reviewed", "1,3")
    assert code == 0, capsys.readouterr().err
    assert _main(image, labels, target.with_name("only.nii.gz"), "--reviewed", "1,3", "--reviewed-only") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote {target}",
        f"wrote {target}.provenance.json",
        f"wrote {target.with_name('only.nii.gz')}",
        f"wrote {target.with_name('only_reviewed.nii.gz')}",
        f"wrote {target.with_name('only.nii.gz.provenance.json')}",
    ]
    back = read_image(target)
    np.testing.assert_array_equal(back.array[0], _labels())
    assert back.geometry == read_image(image).geometry
    record = json.loads(Path(f"{target}.provenance.json").read_text())
    assert record["class_names"] == ["background", "breast", "lesion"]
    assert record["review"] == {
        "axis": 0,  # auto: the coarsest axis (3 mm slices)
        "num_slices": 6,
        "reviewed_slices": [1, 3],
        "reviewed_only": False,
        "unreviewed_slices": "exported as drawn (every slice)",
    }
    assert record["labels_file"] == str(labels) and record["source"]["files"][0]["sha256"] == file_sha256(image)
    assert record["exported_from"].startswith("command line")
    only = read_image(target.with_name("only.nii.gz")).array[0]
    np.testing.assert_array_equal(only[[1, 3]], _labels()[[1, 3]])
    assert not only[[0, 2, 4, 5]].any()
    mask = read_image(target.with_name("only_reviewed.nii.gz")).array[0]
    np.testing.assert_array_equal(mask.any(axis=(1, 2)), [False, True, False, True, False, False])
    # The second export's classes came from nowhere but the labels: generic names.
    assert json.loads(Path(f"{target.with_name('only.nii.gz')}.provenance.json").read_text())["class_names"] == [
        "background",
        "class 1",
        "class 2",
    ]


def test_nnunet_cases_from_the_command_line(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    folder = tmp_path / "Dataset201_Cli"
    assert _main(image, labels, folder, "--class-names", "background,breast,lesion") == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"nnU-Net case 'study_1' in {folder}"
    review = tmp_path / "review.json"
    review.write_text(json.dumps(ReviewState(2, 32, {5, 6, 7}).to_dict()))
    second = [image, labels, folder, "--class-names", "background,breast,lesion", "--case-name", "study 1 (b)"]
    assert _main(*second, "--reviewed", str(review), "--reviewed-only") == 0
    dataset = NnUNetRawDataset(folder)
    assert dataset.case_names == ["study_1", "study_1_b"] and dataset.class_names == ["background", "breast", "lesion"]
    np.testing.assert_array_equal(dataset[0].labels, _labels())
    assert dataset[0].trusted is None
    trusted = ReviewState(2, 32, {5, 6, 7}).trusted_mask(SHAPE)
    np.testing.assert_array_equal(dataset[1].trusted, trusted)
    record = json.loads((folder / "provenance" / "study_1_b.json").read_text())
    assert record["review"]["axis"] == 2 and record["review"]["reviewed_slices"] == [5, 6, 7]
    assert [entry["sha256"] for entry in record["files"]] == [
        file_sha256(folder / "imagesTr" / "study_1_b_0000.nii.gz"),
        file_sha256(folder / "labelsTr" / "study_1_b.nii.gz"),
    ]


def test_errors_are_one_line_and_write_nothing(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    out = tmp_path / "out"
    out.mkdir()
    assert _main(image, labels, out / "a.nii.gz") == 0
    capsys.readouterr()
    before = _snapshot(out)
    for extra, message in [
        ((), "already exist"),
        (("--reviewed-only",), "no review was given"),
        (("--reviewed", "1,9"), "from 0 to 5, got 9"),
        (("--reviewed", "1", "--axis", "7"), "axis 0-2, got 7"),
        (("--class-names", "background,breast"), r"[0, 1]"),
        (("--format", "tiff"), "must end with"),
    ]:
        assert _main(image, labels, out / "a.nii.gz", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert _main(image, labels, out / "seg.dcm") == 2
    assert "Export as NIfTI" in capsys.readouterr().err
    assert _snapshot(out) == before
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 6), np.uint8), np.diag([1.0, 1.0, 1.0, 1.0])), other)
    assert _main(image, other, out / "b.nii.gz") == 2
    assert "resample the labels" in capsys.readouterr().err


def test_class_names_from_the_labels_own_provenance_record(files, tmp_path: Path) -> None:
    image, labels = files
    first = tmp_path / "first.nii.gz"
    assert _main(image, labels, first, "--class-names", "background,breast,lesion") == 0
    folder = tmp_path / "Dataset202_Names"
    assert _main(image, first, folder) == 0
    assert NnUNetRawDataset(folder).class_names == ["background", "breast", "lesion"]


def test_a_dicom_seg_as_labels_and_the_model_sha(tmp_path: Path) -> None:
    from napari_mamba_seg.bundles import ModelCard, read_card, save_bundle
    from napari_mamba_seg.models import create_model

    bundle = tmp_path / "bundle"
    card = ModelCard(class_names=["background", "tissue", "tumour"], patch_size=[32, 32])
    save_bundle(create_model("test_unet", in_channels=1, num_classes=3), bundle, card)
    series = tmp_path / "series"
    write_dicom_series(series, np.random.default_rng(1).integers(0, 900, SHAPE).astype(np.int16), spacing=(3, 1, 1))
    source: MedicalImage = read_image(series)
    export_labels(_labels(), source, tmp_path / "seg.dcm", class_names=["background", "fat", "lesion"])
    target = tmp_path / "from_seg.nii.gz"
    assert _main(series, tmp_path / "seg.dcm", target, "--model", str(bundle)) == 0
    np.testing.assert_array_equal(read_image(target).array[0], _labels())
    record = json.loads(Path(f"{target}.provenance.json").read_text())
    assert record["class_names"] == ["background", "fat", "lesion"]  # the SEG's segments win over the model's
    assert (
        record["segmented_with"]["model_sha256"]
        == read_card(bundle).sha256
        == file_sha256(bundle / "model.safetensors")
    )
    assert len(record["source"]["files"]) == SHAPE[0]


def test_our_train_command_trains_on_an_exported_nnunet_folder(files, tmp_path: Path, capsys) -> None:
    """The round trip of the issue: corrected cases exported (one reviewed-only, with "ignore") -> ``train`` reads the
    folder and writes a bundle whose card has the exported classes and channels."""
    import torch

    from napari_mamba_seg.bundles import read_card

    image, labels = files
    folder = tmp_path / "Dataset101_Corrected"
    classes = ["--class-names", "background,breast,lesion", "--channel-names", "T1"]
    assert _main(image, labels, folder, *classes, "--case-name", "a") == 0, capsys.readouterr().err
    code = _main(image, labels, folder, *classes, "--case-name", "b", "--reviewed", "1,2,3", "--reviewed-only")
    assert code == 0, capsys.readouterr().err
    assert NnUNetRawDataset(folder).ignore_label == 3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path / "run"
        argv = ["train", str(folder), "-o", str(run), "--arch", "test_unet", "--patch-size", "16", "16"]
        argv += ["--device", "cpu", "--quiet", "--steps", "2", "--batch-size", "2", "--val-every", "2"]
        code = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    card = read_card(run / "last")
    assert card.class_names == ["background", "breast", "lesion"] and card.channel_names == ["T1"]
