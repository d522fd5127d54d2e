"""NIfTI reading and writing: array order, qform/sform kept bit for bit, real data, errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_mamba_seg.io import ImageGeometry, ImageReadError, read_nifti, write_labels, write_nifti

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DCE = DATA / "breast_nact" / "UCSF-BR-06" / "dce.nii.gz"
SARCOMA = DATA / "ibsi_sarcoma_mr" / "STS_002"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is absent (see /work/shared/data/README.md)")
    return path


def oblique_affine() -> np.ndarray:
    """A NIfTI affine rotated about two axes, anisotropic, with a flipped first axis."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
        [[1.0, 0.0, 0.0], [0.0, np.cos(0.2), -np.sin(0.2)], [0.0, np.sin(0.2), np.cos(0.2)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, 0.7, 2.5])
    affine[:3, 3] = [91.25, -120.5, 33.0]
    return affine


def save_synthetic(path: Path, forms: str, affine: np.ndarray, shape: tuple[int, ...] = (7, 6, 5)) -> np.ndarray:
    """Save int16 voxels with the affine in the qform, the sform or both; returns the voxels (i, j, k...)."""
    voxels = np.random.default_rng(0).integers(-500, 2000, shape).astype(np.int16)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_sform(affine, code=2 if "s" in forms else 0)
    header.set_qform(affine, code=1 if "q" in forms else 0)
    nib.save(nib.Nifti1Image(voxels, None, header=header), path)
    return voxels


@pytest.mark.parametrize(
    ("forms", "oblique"),
    [("q", False), ("s", False), ("qs", False), ("qs", True), ("s", True), ("q", True)],
    ids=["qform", "sform", "both", "both-oblique", "sform-oblique", "qform-oblique"],
)
def test_read_write_read_keeps_the_affine_bit_for_bit(tmp_path: Path, forms: str, oblique: bool) -> None:
    affine = oblique_affine() if oblique else np.diag([-0.8, 0.9, 3.0, 1.0])
    affine[:3, 3] = affine[:3, 3] if oblique else [100.3, -17.1, 52.9]
    source = tmp_path / "image.nii.gz"
    voxels = save_synthetic(source, forms, affine)
    on_disk = nib.load(source)

    image = read_nifti(source)
    assert image.array.shape == (1, 5, 6, 7)
    np.testing.assert_array_equal(image.array[0], voxels.transpose(2, 1, 0))
    assert np.array_equal(image.geometry.nifti_affine(), on_disk.affine)

    out = write_nifti(image.array, tmp_path / "copy.nii.gz", image.geometry, reference=image)
    written = nib.load(out)
    assert np.array_equal(written.affine, on_disk.affine)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (
        int(on_disk.header["qform_code"]),
        int(on_disk.header["sform_code"]),
    )
    again = read_nifti(out)
    assert again.geometry == image.geometry
    np.testing.assert_array_equal(again.array, image.array)


def test_labels_with_the_reference_header_read_back_equal(tmp_path: Path) -> None:
    source = tmp_path / "image.nii"
    save_synthetic(source, "qs", oblique_affine())
    image = read_nifti(source)
    labels = (image.array[0] > 700).astype(np.uint8) + (image.array[0] > 1500)
    out = write_labels(labels, tmp_path / "labels.nii.gz", image)
    written = nib.load(out)
    assert np.array_equal(written.affine, nib.load(source).affine)
    assert written.get_data_dtype() == np.uint8
    assert written.header.get_intent()[0] == "label"
    assert np.isnan(written.header["scl_slope"]) or written.header["scl_slope"] in (0.0, 1.0)
    back = read_nifti(out)
    assert back.geometry == image.geometry
    np.testing.assert_array_equal(back.array[0], labels)


def test_fresh_header_stores_the_geometry_in_both_forms(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_nifti_affine(oblique_affine())
    labels = np.zeros((4, 5, 6), np.uint16)
    labels[1:3, 2:4, 3:5] = 300
    out = write_nifti(labels, tmp_path / "labels.nii", geometry)
    written = nib.load(out)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(written.header.get_sform(), geometry.nifti_affine(), atol=1e-5)
    np.testing.assert_allclose(written.header.get_qform(), geometry.nifti_affine(), atol=1e-5)
    np.testing.assert_allclose(written.header.get_zooms(), geometry.spacing[::-1], rtol=1e-6)
    back = read_nifti(out)
    assert back.geometry.is_close(geometry, atol=1e-5)
    np.testing.assert_array_equal(back.array[0], labels)
    assert back.array.dtype == np.uint16


def test_changed_geometry_overrides_the_reference_affine_but_keeps_codes(tmp_path: Path) -> None:
    source = tmp_path / "image.nii"
    save_synthetic(source, "s", np.diag([1.0, 1.0, 2.0, 1.0]))
    image = read_nifti(source)
    moved = ImageGeometry.from_spacing(image.geometry.spacing, origin=(5.0, 6.0, 7.0))
    out = write_nifti(image.array[0], tmp_path / "moved.nii", moved, reference=image)
    written = nib.load(out)
    assert int(written.header["sform_code"]) == 2
    assert read_nifti(out).geometry == moved  # small integers: exact in float32


def test_dce_four_phases_become_channels(tmp_path: Path) -> None:
    dce = require(DCE)
    on_disk = nib.load(dce)
    image = read_nifti(dce)
    assert image.array.shape == (3, 60, 256, 256)
    assert image.array.dtype == on_disk.get_data_dtype()
    assert image.array.flags.c_contiguous
    assert image.channel_names == ["phase 0", "phase 1", "phase 2"]
    assert np.array_equal(image.array, np.asarray(on_disk.dataobj).transpose(3, 2, 1, 0))
    assert np.array_equal(image.geometry.nifti_affine(), on_disk.affine)
    assert image.geometry.spacing == (2.0, 0.703125, 0.703125)
    assert image.metadata["nifti_header"]["dim"][4] == 3

    copy = write_nifti(image.array, tmp_path / "dce.nii", image.geometry, reference=image)
    written = nib.load(copy)
    assert written.shape == on_disk.shape
    assert np.array_equal(written.affine, on_disk.affine)
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(on_disk.dataobj))

    labels = (image.array[2] > image.array[0]).astype(np.uint8)
    out = write_labels(labels, tmp_path / "labels.nii.gz", image)
    assert nib.load(out).shape == on_disk.shape[:3]
    assert np.array_equal(nib.load(out).affine, on_disk.affine)
    np.testing.assert_array_equal(read_nifti(out).array[0], labels)


def test_sarcoma_mask_written_for_the_image_matches_the_original_mask(tmp_path: Path) -> None:
    image_path, mask_path = require(SARCOMA / "image.nii.gz"), require(SARCOMA / "mask.nii.gz")
    image, mask = read_nifti(image_path), read_nifti(mask_path)
    assert image.array.dtype == np.float32
    assert image.spatial_shape == mask.spatial_shape == (35, 90, 115)
    assert image.geometry == mask.geometry
    out = write_labels(mask.array[0], tmp_path / "mask.nii.gz", image)
    written, original = nib.load(out), nib.load(mask_path)
    assert np.array_equal(written.affine, original.affine)
    assert int(written.header["qform_code"]) == int(original.header["qform_code"])
    assert int(written.header["sform_code"]) == int(original.header["sform_code"])
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))


@pytest.mark.parametrize("shape", [(9, 8), (9, 8, 1)], ids=["2d", "one-slice"])
def test_two_dimensional_files_keep_one_slice(tmp_path: Path, shape: tuple[int, ...]) -> None:
    voxels = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    path = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(voxels, np.diag([0.5, 0.6, 4.0, 1.0])), path)
    image = read_nifti(path)
    assert image.array.shape == (1, 1, 8, 9)
    np.testing.assert_array_equal(image.array[0, 0], voxels.reshape(9, 8).T)
    assert image.geometry.spacing == (4.0, 0.6000000238418579, 0.5)


def test_scaled_integers_become_float32(tmp_path: Path) -> None:
    values = np.random.default_rng(1).uniform(-3.0, 50.0, (6, 5, 4))
    stored = nib.Nifti1Image(values, np.eye(4))
    stored.set_data_dtype(np.int16)  # nibabel stores scl_slope/scl_inter
    path = tmp_path / "scaled.nii.gz"
    nib.save(stored, path)
    assert nib.load(path).dataobj.slope != 1.0
    image = read_nifti(path)
    assert image.array.dtype == np.float32
    np.testing.assert_allclose(image.array[0], nib.load(path).get_fdata().transpose(2, 1, 0), rtol=1e-6, atol=1e-4)


def test_big_endian_file_gives_native_values(tmp_path: Path) -> None:
    voxels = np.arange(60, dtype=">i2").reshape(5, 4, 3)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(">i2")
    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(voxels, np.eye(4), header=header), path)
    image = read_nifti(path)
    assert image.array.dtype == np.dtype("int16") and image.array.dtype.isnative
    np.testing.assert_array_equal(image.array[0], voxels.transpose(2, 1, 0))


def test_trailing_unit_axes_beyond_four_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "five.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 3, 2, 2, 1), np.uint8), np.eye(4)), path)
    assert read_nifti(path).array.shape == (2, 2, 3, 4)


def test_five_dimensional_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vector.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 3, 2, 2, 3), np.uint8), np.eye(4)), path)
    with pytest.raises(ImageReadError, match=r"vector\.nii.*5D.*Split"):
        read_nifti(path)


@pytest.mark.parametrize(
    ("name", "kept"), [("cut.nii.gz", 0.5), ("cut.nii", 0.5), ("stub.nii.gz", 0.01)], ids=["gz", "nii", "gz-header"]
)
def test_truncated_file_is_explained(tmp_path: Path, name: str, kept: float) -> None:
    whole = tmp_path / f"whole{name[name.index('.') :]}"
    save_synthetic(whole, "qs", np.eye(4), shape=(40, 50, 30))
    content = whole.read_bytes()
    (tmp_path / name).write_bytes(content[: int(len(content) * kept)])
    with pytest.raises(ImageReadError, match=rf"{name}.*truncated or corrupt.*re-download"):
        read_nifti(tmp_path / name)


def test_garbage_and_empty_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(np.random.default_rng(2).bytes(2000))
    with pytest.raises(ImageReadError, match=r"garbage\.nii.*not a readable NIfTI"):
        read_nifti(garbage)
    empty_file = tmp_path / "nothing.nii.gz"
    empty_file.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"nothing\.nii\.gz"):
        read_nifti(empty_file)


def test_image_with_an_empty_axis_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hollow.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.uint8), np.eye(4)), path)
    with pytest.raises(ImageReadError, match=r"hollow\.nii\.gz.*empty axis"):
        read_nifti(path)


def test_missing_file_and_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"absent\.nii\.gz.*does not exist"):
        read_nifti(tmp_path / "absent.nii.gz")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_nifti(tmp_path)


def test_singular_header_affine_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "flat.nii"
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), None, header=header), path)
    with pytest.raises(ImageReadError, match=r"flat\.nii.*affine is unusable"):
        read_nifti(path)


def test_two_dimensional_geometry_and_channels_write(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_spacing((0.5, 0.25), origin=(1.0, 2.0))
    probabilities = np.random.default_rng(3).random((2, 6, 7)).astype(np.float32)
    out = write_nifti(probabilities, tmp_path / "probs.nii.gz", geometry)
    written = nib.load(out)
    assert written.shape == (7, 6, 1, 2)
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, 0, :], probabilities.transpose(2, 1, 0))
    back = read_nifti(out)
    assert back.array.shape == (2, 1, 6, 7)
    np.testing.assert_allclose(back.geometry.spacing[1:], (0.5, 0.25))


def test_write_refuses_bad_suffix_and_shape(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_spacing((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        write_nifti(np.zeros((2, 2, 2), np.uint8), tmp_path / "labels.nrrd", geometry)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        write_nifti(np.zeros((2, 2), np.uint8), tmp_path / "labels.nii", geometry)
    assert list(tmp_path.iterdir()) == []
