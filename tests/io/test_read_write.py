"""The public io API: dispatch by suffix, write_labels/write_image checks, no overwrite, atomic writes, imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

import napari_mamba_seg.io as mio
from napari_mamba_seg.io import (
    ImageGeometry,
    ImageReadError,
    MedicalImage,
    read_image,
    supported_suffixes,
    write_image,
    write_labels,
)
from napari_mamba_seg.io import nifti as nifti_module
from napari_mamba_seg.io import tiff as tiff_module


@pytest.fixture
def nifti_image(tmp_path: Path) -> MedicalImage:
    """A small 3-phase NIfTI read back through the API: (3, 4, 5, 6) int16."""
    voxels = np.random.default_rng(0).integers(0, 1000, (6, 5, 4, 3)).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    affine[:3, 3] = [-80.0, 60.5, 10.25]
    path = tmp_path / "input" / "case.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(voxels, affine), path)
    return read_image(path)


def test_read_image_dispatches_by_suffix(tmp_path: Path, nifti_image: MedicalImage) -> None:
    assert nifti_image.format == "nifti"
    assert nifti_image.array.shape == (3, 4, 5, 6)
    assert nifti_image.name == "case"
    tiff_path = tmp_path / "stack.TIF"
    tifffile.imwrite(tiff_path, np.zeros((3, 4, 5), np.uint8), photometric="minisblack")
    assert read_image(tiff_path).format == "tiff"


def test_unsupported_and_missing_paths(tmp_path: Path) -> None:
    picture = tmp_path / "scan.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ImageReadError, match=r"scan\.png.*unsupported.*\.nii\.gz.*\.tif"):
        read_image(picture)
    with pytest.raises(ImageReadError, match=r"gone\.nii\.gz.*no such file"):
        read_image(tmp_path / "gone.nii.gz")


def test_folders_and_dicom_files_go_to_the_dicom_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DICOM reader itself is tested in test_dicom.py; here only what read_image hands it."""
    from napari_mamba_seg.io import dicom

    calls = []
    sentinel = MedicalImage(np.zeros((1, 2, 2, 2)), ImageGeometry.from_spacing((1.0, 1.0, 1.0)), format="dicom")
    monkeypatch.setattr(
        dicom, "read_dicom_series", lambda path, *, series_uid=None: calls.append((path, series_uid)) or sentinel
    )
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001").write_bytes(bytes(128) + b"DICM" + bytes(64))  # no suffix: found by its magic
    (series / "slice.dcm").write_bytes(bytes(200))
    assert read_image(series, series_uid="1.2.3") is sentinel
    assert read_image(series / "IM0001") is sentinel
    assert read_image(series / "slice.dcm") is sentinel
    assert calls == [(series, "1.2.3"), (series / "IM0001", None), (series / "slice.dcm", None)]


def test_series_uid_is_for_dicom_only(nifti_image: MedicalImage) -> None:
    with pytest.raises(ValueError, match="series_uid applies to DICOM only"):
        read_image(nifti_image.source, series_uid="1.2.3")


def test_supported_suffixes_and_exports() -> None:
    assert set(supported_suffixes()) == {".nii", ".nii.gz", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".dcm"}
    assert ".dcm" not in supported_suffixes(for_writing=True)
    assert {"read_image", "write_labels", "write_image", "ImageGeometry", "MedicalImage", "ImageReadError"} <= set(
        mio.__all__
    )
    for name in mio.__all__:
        assert getattr(mio, name) is not None


@pytest.mark.parametrize(("maximum", "dtype"), [(1, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16)])
@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_label_dtype_follows_the_largest_label(
    tmp_path: Path, nifti_image: MedicalImage, maximum: int, dtype: type, suffix: str
) -> None:
    labels = np.zeros(nifti_image.spatial_shape, np.int64)
    labels[1, 2, 3] = maximum
    out = write_labels(labels, tmp_path / f"labels{suffix}", nifti_image)
    back = read_image(out)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array[0], labels)
    assert back.geometry == nifti_image.geometry


def test_boolean_labels_and_a_bare_geometry(tmp_path: Path, nifti_image: MedicalImage) -> None:
    mask = nifti_image.array[0] > 500
    out = write_labels(mask, tmp_path / "mask.nii", nifti_image.geometry)
    back = read_image(out)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array[0], mask)
    assert back.geometry.is_close(nifti_image.geometry, atol=1e-6)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((4, 5, 6), np.float32), "labels must be integers"),
        (np.full((4, 5, 6), -1, np.int16), r"\[0, 65535\]"),
        (np.full((4, 5, 6), 70000, np.int32), r"\[0, 65535\]"),
        (np.zeros((4, 5, 7), np.uint8), r"\(4, 5, 7\).*\(4, 5, 6\)"),
        (np.zeros((5, 6), np.uint8), r"\(5, 6\).*\(4, 5, 6\)"),
    ],
    ids=["float", "negative", "too-large", "shape", "ndim"],
)
def test_bad_labels_are_refused(tmp_path: Path, nifti_image: MedicalImage, labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_labels(labels, tmp_path / "labels.nii.gz", nifti_image)
    assert not (tmp_path / "labels.nii.gz").exists()


def test_unknown_output_suffix_lists_the_valid_ones(tmp_path: Path, nifti_image: MedicalImage) -> None:
    with pytest.raises(ValueError, match=r"labels\.mha.*\.nii\.gz, \.nii, \.tif, \.tiff"):
        write_labels(np.zeros(nifti_image.spatial_shape, np.uint8), tmp_path / "labels.mha", nifti_image)


@pytest.mark.parametrize("suffix", [".nii.gz", ".ome.tif"])
def test_probability_maps_are_float32(tmp_path: Path, nifti_image: MedicalImage, suffix: str) -> None:
    probabilities = np.random.default_rng(1).random((2, *nifti_image.spatial_shape))  # float64
    back = read_image(write_image(probabilities, tmp_path / f"probs{suffix}", nifti_image))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, probabilities.astype(np.float32))
    assert back.geometry == nifti_image.geometry
    with pytest.raises(ValueError, match=r"\(channels, \*spatial\)"):
        write_image(probabilities[0], tmp_path / f"flat{suffix}", nifti_image)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".tif"])
def test_existing_file_is_never_overwritten_silently(tmp_path: Path, nifti_image: MedicalImage, suffix: str) -> None:
    target = tmp_path / "out" / f"labels{suffix}"
    first = np.zeros(nifti_image.spatial_shape, np.uint8)
    write_labels(first, target, nifti_image)
    before = target.read_bytes()
    second = first + 2
    with pytest.raises(FileExistsError, match=r"already exists.*overwrite=True"):
        write_labels(second, target, nifti_image)
    assert target.read_bytes() == before
    write_labels(second, target, nifti_image, overwrite=True)
    np.testing.assert_array_equal(read_image(target).array[0], second)
    assert sorted(path.name for path in target.parent.iterdir()) == [target.name]  # no temporary left


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_unsupported_dtype_writes_nothing(tmp_path: Path, nifti_image: MedicalImage, suffix: str) -> None:
    complex_image = np.ones((1, *nifti_image.spatial_shape), np.complex64)
    with pytest.raises(ValueError, match=r"complex64 are not supported"):
        write_image(complex_image, tmp_path / f"probs{suffix}", nifti_image)
    assert list(tmp_path.glob("probs*")) == [] and list(tmp_path.glob(".*")) == []


def _half_write_then_fail(path: Path | str) -> None:
    Path(path).write_bytes(b"half a file")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_a_failed_write_leaves_no_file_and_no_temporary(
    tmp_path: Path, nifti_image: MedicalImage, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    monkeypatch.setattr(nifti_module.nib, "save", lambda image, path: _half_write_then_fail(path))
    monkeypatch.setattr(tiff_module.tifffile, "imwrite", lambda path, *args, **kwargs: _half_write_then_fail(path))
    out_dir = tmp_path / "out"
    labels = np.ones(nifti_image.spatial_shape, np.uint8)
    with pytest.raises(OSError, match="No space left"):
        write_labels(labels, out_dir / f"labels{suffix}", nifti_image)
    assert list(out_dir.iterdir()) == []
    # The same failure while replacing an existing file leaves the old file as it was.
    monkeypatch.undo()
    existing = write_labels(labels, out_dir / f"labels{suffix}", nifti_image)
    before = existing.read_bytes()
    monkeypatch.setattr(nifti_module.nib, "save", lambda image, path: _half_write_then_fail(path))
    monkeypatch.setattr(tiff_module.tifffile, "imwrite", lambda path, *args, **kwargs: _half_write_then_fail(path))
    with pytest.raises(OSError, match="No space left"):
        write_labels(labels * 2, existing, nifti_image, overwrite=True)
    assert existing.read_bytes() == before
    assert [path.name for path in out_dir.iterdir()] == [existing.name]


def test_writing_into_a_missing_folder_creates_it(tmp_path: Path, nifti_image: MedicalImage) -> None:
    out = write_labels(np.zeros(nifti_image.spatial_shape, np.uint8), tmp_path / "a" / "b" / "l.nii", nifti_image)
    assert out.is_file()


def test_io_reads_and_writes_without_torch_or_gui(tmp_path: Path, nifti_image: MedicalImage) -> None:
    """napari's readers use this package: reading and writing must not import torch, napari or Qt."""
    code = f"""
        import json, sys
        import numpy as np
        import napari_mamba_seg.io
        image = napari_mamba_seg.io.read_image({str(nifti_image.source)!r})
        napari_mamba_seg.io.write_labels(
            np.zeros(image.spatial_shape, np.uint8), {str(tmp_path / "out.tif")!r}, image
        )
        heavy = ("torch", "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")
        print(json.dumps([name for name in heavy if name in sys.modules]))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
