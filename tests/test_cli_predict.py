"""``napari-mamba-seg predict``: files and DICOM folders in, labels out in the input's format and geometry.

The labels written must be exactly what the engine computes on the image as read (the command adds nothing but
I/O), the geometry must survive bit for bit (NIfTI affine, TIFF spacing), and user errors give one line each,
never a traceback, with a non-zero exit status, while the other inputs are still written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_mamba_seg import cli
from napari_mamba_seg.bundles import ModelCard, save_bundle
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.io import read_dicom_seg, read_image
from napari_mamba_seg.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "io"))
from dicom_factory import write_dicom_series

CLASSES = ["background", "breast", "lesion"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D test model bundle: 1 channel in, 3 classes out, z-score normalisation."""
    folder = tmp_path_factory.mktemp("bundle") / "tiny_unet"
    save_bundle(
        create_model("test_unet", in_channels=1, num_classes=3),
        folder,
        ModelCard(class_names=CLASSES, channel_names=["T1"], modality="MR", normalization={"method": "zscore"}),
    )
    return folder


def _oblique_affine() -> np.ndarray:
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-40.25, 12.5, 7.125]
    return affine


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    image = nib.Nifti1Image(data, _oblique_affine() if affine is None else affine)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=2)
    nib.save(image, path)
    return path


def _volume(seed: int, shape: tuple[int, ...] = (24, 20, 5)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _engine_labels(bundle: Path, path: Path) -> np.ndarray:
    image = read_image(path)
    predictor = Predictor.from_bundle(bundle, PredictionSettings(device="cpu"))
    return predictor.predict(image.array, image.geometry.spacing).labels


def _script() -> Path:
    return Path(sys.executable).parent / "napari-mamba-seg"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_script(), *args], capture_output=True, text=True, timeout=600, check=False)


def test_nifti_in_nifti_out_with_the_affine_bit_for_bit(bundle: Path, tmp_path: Path) -> None:
    source = _write_nifti(tmp_path / "case_01.nii.gz", _volume(0))
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "--model", str(bundle), str(source), "-o", str(out), "--device", "cpu"]) == 0

    written = nib.load(out / "case_01_labels.nii.gz")
    original = nib.load(source)
    assert np.array_equal(written.affine, original.affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    labels = np.asarray(written.dataobj)
    assert labels.shape == original.shape and labels.dtype == np.uint8
    # written in NIfTI voxel order (i, j, k); the engine works in array order (k, j, i)
    assert np.array_equal(labels.transpose(2, 1, 0), _engine_labels(bundle, source))
    assert set(np.unique(labels)) <= set(range(len(CLASSES)))


def test_tiff_in_tiff_out_keeps_the_spacing(bundle: Path, tmp_path: Path) -> None:
    from napari_mamba_seg.io import ImageGeometry, write_image

    geometry = ImageGeometry.from_spacing((2.5, 0.75, 0.625))
    source = tmp_path / "stack.tif"
    write_image(_volume(1, (6, 20, 18))[None], source, geometry)
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "-m", str(bundle), str(source), "-o", str(out), "--device", "cpu"]) == 0

    labels = read_image(out / "stack_labels.tif")
    assert labels.geometry.spacing == (2.5, 0.75, 0.625)
    assert labels.array.shape == (1, 6, 20, 18)
    assert np.array_equal(labels.array[0], _engine_labels(bundle, source))


def test_dicom_folder_in_dicom_seg_out_referencing_the_series(bundle: Path, tmp_path: Path) -> None:
    series = tmp_path / "study" / "series_3"
    stored = np.random.default_rng(2).integers(0, 400, (5, 16, 20)).astype(np.int16)
    write_dicom_series(series, stored, spacing=(3.0, 0.7, 0.9), origin_lps=(10.0, -20.0, 5.0), rescale_slope=2.0)
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "-m", str(bundle), str(tmp_path / "study"), "-o", str(out)]) == 0

    image = read_image(series)
    labels, segment_names = read_dicom_seg(out / "series_3_labels.dcm", reference=image)
    assert segment_names == CLASSES[1:]
    assert np.array_equal(labels, _engine_labels(bundle, series))


def test_dicom_folder_as_nifti_in_the_series_geometry(bundle: Path, tmp_path: Path) -> None:
    series = tmp_path / "series_4"
    stored = np.random.default_rng(3).integers(0, 400, (4, 12, 14)).astype(np.int16)
    write_dicom_series(
        series, stored, spacing=(2.0, 0.8, 0.6), row_direction=(0.8, 0.6, 0.0), column_direction=(-0.6, 0.8, 0.0)
    )
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "-m", str(bundle), str(series), "-o", str(out), "--format", ".nii.gz"]) == 0

    image = read_image(series)
    written = read_image(out / "series_4_labels.nii.gz")
    assert written.geometry.is_close(image.geometry, atol=1e-5)
    assert np.array_equal(written.array[0], _engine_labels(bundle, series))


def test_probabilities_are_written_beside_the_labels(bundle: Path, tmp_path: Path) -> None:
    source = _write_nifti(tmp_path / "case.nii", _volume(3))
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "-m", str(bundle), str(source), "-o", str(out), "--save-probs"]) == 0

    probabilities = read_image(out / "case_probabilities.nii")
    labels = read_image(out / "case_labels.nii")
    assert probabilities.array.shape == (len(CLASSES), *labels.spatial_shape)
    assert probabilities.array.dtype == np.float32
    np.testing.assert_allclose(probabilities.array.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(probabilities.array.argmax(axis=0), labels.array[0])
    assert np.array_equal(probabilities.geometry.affine, labels.geometry.affine)


def test_an_existing_result_is_never_overwritten_without_overwrite(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _write_nifti(tmp_path / "case.nii.gz", _volume(4))
    out = tmp_path / "out"
    out.mkdir()
    precious = out / "case_labels.nii.gz"
    precious.write_bytes(b"hand-corrected labels")
    args = ["predict", "-q", "-m", str(bundle), str(source), "-o", str(out)]

    assert cli.main(args) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert precious.read_bytes() == b"hand-corrected labels"

    assert cli.main([*args, "--overwrite"]) == 0
    assert np.array_equal(np.asarray(nib.load(precious).dataobj).transpose(2, 1, 0), _engine_labels(bundle, source))


def test_the_review_report_ranks_cases_and_slices_by_the_errors_the_model_expects(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    from napari_mamba_seg.interactive import DEFAULT_SPREAD_MM, ReviewState, review_order, slices_within

    sources = [_write_nifti(tmp_path / f"case_{seed}.nii.gz", _volume(seed, (24, 20, 9)) * seed) for seed in (1, 2, 3)]
    out = tmp_path / "out"
    args = ["predict", "-q", "-m", str(bundle), *map(str, sources), "-o", str(out), "--device", "cpu"]
    assert cli.main([*args, "--review-report"]) == 0
    assert not list(out.glob("*probabilities*"))  # computed for the report, written only with --save-probs
    with open(out / "review.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    expected_totals = []
    for row in rows:
        image = read_image(row["input"])
        predictor = Predictor.from_bundle(bundle, PredictionSettings(device="cpu", return_probabilities=True))
        prediction = predictor.predict(image.array, image.geometry.spacing)
        spacing = image.geometry.spacing  # (2.5, 0.8, 0.7) in array order: z is the coarsest, the slice axis
        doubt = 1.0 - prediction.probabilities.max(axis=0).astype(np.float64)
        per_slice = doubt.sum(axis=(1, 2))
        assert row["slice_axis"] == "0"
        assert Path(row["labels"]).name == Path(row["input"]).name.replace(".nii", "_labels.nii")
        assert float(row["expected_wrong_voxels"]) == pytest.approx(per_slice.sum(), abs=0.06)
        assert float(row["expected_wrong_ml"]) == pytest.approx(per_slice.sum() * np.prod(spacing) / 1000, abs=6e-4)
        assert float(row["foreground_ml"]) == pytest.approx(
            (prediction.labels > 0).sum() * np.prod(spacing) / 1000, abs=6e-4
        )
        spread = slices_within(DEFAULT_SPREAD_MM, spacing, 0)
        assert spread == 4  # 10 mm over 2.5 mm slices
        order = review_order(ReviewState(0, 9), per_slice, spread=spread)[:5]
        assert row["slices_to_review"] == " ".join(map(str, order))
        expected_totals.append(float(row["expected_wrong_voxels"]))
    assert expected_totals == sorted(expected_totals, reverse=True)  # the least sure case first

    before = (out / "review.csv").read_bytes()
    assert cli.main([*args, "--review-report"]) == 2  # an earlier report is never replaced without --overwrite
    assert "review.csv already exists; refusing to overwrite" in capsys.readouterr().err
    assert (out / "review.csv").read_bytes() == before
    assert cli.main([*args, "--review-report", "--overwrite"]) == 0
    assert (out / "review.csv").read_bytes() == before  # the same run again: the same report


def test_the_review_report_of_a_2d_image_proposes_no_slices(bundle: Path, tmp_path: Path) -> None:
    import csv

    from napari_mamba_seg.io import ImageGeometry, write_image

    source = tmp_path / "slide.tif"
    write_image(_volume(5, (1, 20, 18))[0][None], source, ImageGeometry.from_spacing((0.75, 0.625)))
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "-m", str(bundle), str(source), "-o", str(out), "--review-report"]) == 0
    with open(out / "review.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    image = read_image(source)
    predictor = Predictor.from_bundle(bundle, PredictionSettings(device="cpu", return_probabilities=True))
    probabilities = predictor.predict(image.array, image.geometry.spacing).probabilities
    assert float(row["expected_wrong_voxels"]) == pytest.approx((1 - probabilities.max(axis=0)).sum(), abs=0.06)
    assert row["slice_axis"] == row["slices_to_review"] == row["expected_wrong_ml"] == row["foreground_ml"] == ""


def test_an_interrupted_run_writes_nothing(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during the prediction: exit 130 and no file (final or temporary) in the output folder."""
    source = _write_nifti(tmp_path / "case.nii.gz", _volume(5))
    out = tmp_path / "out"
    real_iter_predict = Predictor.iter_predict

    def interrupted(self, *args, **kwargs):
        generator = real_iter_predict(self, *args, **kwargs)
        yield next(generator)
        raise KeyboardInterrupt

    monkeypatch.setattr(Predictor, "iter_predict", interrupted)
    assert cli.main(["predict", "-m", str(bundle), str(source), "-o", str(out)]) == 130
    assert "was not written" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_user_errors_are_one_line_each_and_the_good_inputs_are_still_written(bundle: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = _write_nifti(inputs / "good.nii.gz", _volume(6))
    truncated = inputs / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # a copy cut off half-way
    nan_volume = _volume(7)
    nan_volume[3, 4, 2] = np.nan
    _write_nifti(inputs / "with_nan.nii.gz", nan_volume)
    _write_nifti(inputs / "two_phases.nii.gz", np.stack([_volume(8), _volume(9)], axis=-1))
    empty_folder = tmp_path / "no_dicom_here"
    empty_folder.mkdir()
    (empty_folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    result = _run("predict", "-q", "-m", str(bundle), str(inputs), str(empty_folder), "-o", str(out))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, result.stderr
    by_input = {
        name: next((line for line in errors if name in line), "")
        for name in ("truncated.nii.gz", "with_nan.nii.gz", "two_phases.nii.gz", "no_dicom_here")
    }
    assert "truncated" in by_input["truncated.nii.gz"] or "corrupt" in by_input["truncated.nii.gz"], errors
    assert "NaN" in by_input["with_nan.nii.gz"], errors
    assert "T1" in by_input["two_phases.nii.gz"] and "has 2" in by_input["two_phases.nii.gz"], errors
    assert by_input["no_dicom_here"], errors
    assert sorted(path.name for path in out.iterdir()) == ["good_labels.nii.gz"]


def test_an_unknown_model_is_a_usage_error_without_traceback(tmp_path: Path) -> None:
    source = _write_nifti(tmp_path / "case.nii.gz", _volume(10))
    result = _run("predict", "-m", "no_such_model", str(source), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no_such_model" in result.stderr and "User bundles" in result.stderr


def test_models_lists_user_bundles_with_their_card_summary(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_mamba_seg import bundles

    user_root = tmp_path / "user"
    monkeypatch.setenv(bundles.USER_BUNDLES_ENV, str(user_root))
    model = create_model("test_unet", in_channels=1, num_classes=3)
    save_bundle(model, user_root / "my_breast_model", ModelCard(class_names=CLASSES, modality="breast MRI"))

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"Your model bundles (in {user_root}" in out
    line = next(line for line in out.splitlines() if line.startswith("my_breast_model"))
    assert "test_unet" in line and "background, breast, lesion" in line and "breast MRI" in line
