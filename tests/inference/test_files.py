"""Headless file jobs (``napari_mamba_seg.inference.files``): output names, clashes, and read → predict → write
on the real breast DCE study with its affine kept bit for bit."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.inference.files import output_stem_and_suffix, plan_jobs, predict_job
from napari_mamba_seg.io import read_image
from napari_mamba_seg.models import create_model


def test_output_names_follow_the_input_format(tmp_path: Path) -> None:
    for name, expected in [
        ("a.nii.gz", ("a", ".nii.gz")),
        ("b.nii", ("b", ".nii")),
        ("c.ome.tif", ("c", ".tif")),
        ("d.TIFF", ("d", ".tif")),
    ]:
        (tmp_path / name).write_bytes(b"")
        assert output_stem_and_suffix(tmp_path / name) == expected
    (tmp_path / "series_7").mkdir()
    assert output_stem_and_suffix(tmp_path / "series_7") == ("series_7", ".dcm")  # DICOM-SEG for a DICOM series
    assert output_stem_and_suffix(tmp_path / "series_7", ".nii.gz") == ("series_7", ".nii.gz")
    assert output_stem_and_suffix(tmp_path / "a.nii.gz", ".tif") == ("a", ".tif")
    with pytest.raises(ValueError, match="needs a DICOM series"):
        output_stem_and_suffix(tmp_path / "a.nii.gz", ".dcm")
    with pytest.raises(ValueError, match="unknown output format"):
        output_stem_and_suffix(tmp_path / "a.nii.gz", ".png")


def test_two_inputs_that_would_write_the_same_file_are_refused(tmp_path: Path) -> None:
    for folder in ("left", "right"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / folder / "case.nii.gz")
    with pytest.raises(ValueError, match="would both be written to"):
        plan_jobs([tmp_path / "left", tmp_path / "right"], tmp_path / "out")


def test_inputs_without_images_are_reported_and_the_others_planned(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / "case.nii.gz")
    (tmp_path / "empty").mkdir()
    jobs, unusable = plan_jobs(
        [tmp_path / "case.nii.gz", tmp_path / "empty", tmp_path / "missing.nii.gz"], tmp_path / "out"
    )
    assert [job.source.name for job in jobs] == ["case.nii.gz"]
    assert [path.name for path, _ in unusable] == ["empty", "missing.nii.gz"]
    assert (tmp_path / "out").is_dir()


def test_breast_dce_study_round_trip_keeps_the_affine_exactly(shared_data: Path, tmp_path: Path) -> None:
    """The real 3-phase study (256×256×60, 0.7×0.7×2 mm): labels land on the image grid with the same affine,
    header codes and shape, predicted slice-wise along the coarse axis."""
    source = shared_data / "breast_nact" / "UCSF-BR-06" / "dce.nii.gz"
    model = create_model("test_unet", in_channels=3, num_classes=4)
    card = ModelCard(channel_names=["pre", "early", "late"], normalization={"method": "percentile"})
    predictor = Predictor(model, card, PredictionSettings(device="cpu"))
    [job], unusable = plan_jobs([source], tmp_path, save_probabilities=False)
    assert not unusable

    written = predict_job(predictor, job)

    original = nib.load(source)
    labels = nib.load(written[0])
    assert np.array_equal(labels.affine, original.affine)
    for code in ("qform_code", "sform_code"):
        assert int(labels.header[code]) == int(original.header[code])
    assert labels.shape == original.shape[:3]
    image = read_image(source)
    prediction = predictor.predict(image.array, image.geometry.spacing)
    assert prediction.plan.mode == "slices" and prediction.plan.axis == 0  # k: the 2 mm axis
    assert np.array_equal(np.asarray(labels.dataobj).transpose(2, 1, 0), prediction.labels)
