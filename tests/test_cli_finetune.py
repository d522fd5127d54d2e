"""``napari-mamba-seg finetune``: studies from files, reviewed slices from indices or a review record, a new bundle
with provenance, never over an existing folder, one-line errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mamba_seg import cli
from napari_mamba_seg.bundles import ModelCard, load_bundle, save_bundle
from napari_mamba_seg.interactive import ReviewState
from napari_mamba_seg.models import create_model

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])  # NIfTI (i, j, k): 3 mm slices along k = array axis 0


@pytest.fixture
def study_files(tmp_path):
    torch.manual_seed(0)
    bundle = tmp_path / "parent"
    save_bundle(create_model("test_unet", in_channels=1, num_classes=2), bundle, ModelCard(patch_size=[32, 32]))
    rng = np.random.default_rng(0)
    labels = np.zeros((32, 32, 6), np.uint8)  # (i, j, k)
    labels[10:20, 12:22, :] = 1
    image = rng.normal(size=labels.shape).astype(np.float32) + 2 * labels
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image(labels, AFFINE), tmp_path / "case_labels.nii.gz")
    return tmp_path, bundle


def _args(tmp_path, bundle, *extra):
    return [
        "finetune", "--model", str(bundle), "--images", str(tmp_path / "case.nii.gz"),
        "--labels", str(tmp_path / "case_labels.nii.gz"), "--steps", "2", "--device", "cpu", "-q", *extra,
    ]  # fmt: skip


def test_finetune_writes_a_new_bundle_with_provenance(study_files, capsys) -> None:
    tmp_path, bundle = study_files
    output = tmp_path / "tuned"
    assert cli.main(_args(tmp_path, bundle, "--reviewed", "1,2,4", "-o", str(output))) == 0
    provenance = json.loads((output / "provenance.json").read_text())
    (study,) = provenance["studies"]
    assert (study["axis"], study["train_slices"], study["holdout_slices"]) == (0, [1, 4], [2])
    assert load_bundle(output).card.parent_sha256 == load_bundle(bundle).card.sha256
    out = capsys.readouterr().out
    assert "held-out Dice" in out and ("activated" in out)

    assert cli.main(_args(tmp_path, bundle, "--reviewed", "1,2,4", "-o", str(output))) == 2
    assert "always written to a new folder" in capsys.readouterr().err


def test_a_review_record_from_the_correct_widget(study_files) -> None:
    tmp_path, bundle = study_files
    record = tmp_path / "review.json"
    record.write_text(json.dumps(ReviewState(0, 6, {0, 3, 5}).to_dict()))
    output = tmp_path / "tuned"
    assert cli.main(_args(tmp_path, bundle, "--reviewed", str(record), "-o", str(output))) == 0
    study = json.loads((output / "provenance.json").read_text())["studies"][0]
    assert study["train_slices"] == [0, 5] and study["holdout_slices"] == [3]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reviewed", "1,x"], "give slice indices"),
        (["--reviewed", "1,2", "3"], "one per image"),
        (["--reviewed", "99"], "reviewed slice"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(study_files, capsys, extra, message) -> None:
    tmp_path, bundle = study_files
    output = tmp_path / "tuned"
    assert cli.main(_args(tmp_path, bundle, *extra, "-o", str(output))) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not output.exists()


def test_labels_off_the_image_grid_are_refused(study_files, capsys) -> None:
    tmp_path, bundle = study_files
    labels = nib.load(tmp_path / "case_labels.nii.gz")
    nib.save(
        nib.Nifti1Image(np.asarray(labels.dataobj), np.diag([2.0, 1.0, 3.0, 1.0])), tmp_path / "case_labels.nii.gz"
    )
    assert cli.main(_args(tmp_path, bundle, "-o", str(tmp_path / "tuned"))) == 2
    assert "voxel grid" in capsys.readouterr().err
