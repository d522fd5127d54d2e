"""The DICOM series reader against the written volumes, SimpleITK (GDCM) and real NIfTI volumes, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import save_dicom, write_dicom_series
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from scipy.spatial.transform import Rotation

from napari_mamba_seg.io._image import ImageGeometry, ImageReadError
from napari_mamba_seg.io.dicom import SeriesInfo, is_dicom_file, list_dicom_series, read_dicom_series

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
OBLIQUE = Rotation.from_euler("xyz", [20.0, -30.0, 40.0], degrees=True).as_matrix()  # columns: unit axes


def _random_volume(shape=(7, 20, 24), seed=0, dtype=np.int16) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _small_series(folder: Path, seed: int = 0, **overrides) -> tuple[np.ndarray, list[Path]]:
    """A plain 6×8×10 axial int16 series; returns its volume and files (array order)."""
    volume = overrides.pop("volume", _random_volume((6, 8, 10), seed=seed))
    options = {"spacing": (2.0, 0.8, 0.6), "origin_lps": (-10.0, 20.0, 5.0), "seed": seed, **overrides}
    return volume, write_dicom_series(folder, volume, **options)


def _expected_lps_affine(spacing, origin, row, column, slice_direction=None) -> np.ndarray:
    """Array-order (z, y, x) → LPS affine of a series written by the factory."""
    row, column = np.asarray(row, float), np.asarray(column, float)
    normal = np.cross(row, column) if slice_direction is None else np.asarray(slice_direction, float)
    affine = np.eye(4)
    affine[:3, 0] = normal / np.linalg.norm(normal) * spacing[0]
    affine[:3, 1] = column / np.linalg.norm(column) * spacing[1]
    affine[:3, 2] = row / np.linalg.norm(row) * spacing[2]
    affine[:3, 3] = origin
    return affine


def _read_with_simpleitk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(z, y, x)`` array and array-order LPS affine of the folder's series, as SimpleITK/GDCM read it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    index_to_lps = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
    affine = np.eye(4)
    affine[:3, :3] = index_to_lps[:, ::-1]  # ITK index (x, y, z) → array order (z, y, x)
    affine[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image), affine


def _raises(match: str, folder_or_file: Path, call, *args, **kwargs) -> str:
    """Run ``call``; assert an ImageReadError whose message matches and names ``folder_or_file``."""
    with pytest.raises(ImageReadError, match=match) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert str(folder_or_file) in message or folder_or_file.name in message, message
    return message


def _rewrite(path: Path, edit) -> None:
    """Re-save a DICOM file after ``edit(dataset)``."""
    dataset = pydicom.dcmread(path)
    edit(dataset)
    save_dicom(dataset, path)


# ------------------------------------------------------------------------------------------- geometry and values


def test_oblique_shuffled_series_matches_the_written_volume_and_simpleitk(tmp_path):
    volume = _random_volume()
    spacing, origin = (2.5, 0.7, 0.9), (12.5, -30.25, 41.0)
    files = write_dicom_series(
        tmp_path,
        volume,
        spacing=spacing,
        origin_lps=origin,
        row_direction=OBLIQUE[:, 0],
        column_direction=OBLIQUE[:, 1],
        rescale_slope=2.0,
        rescale_intercept=-100,
        seed=3,
    )

    image = read_dicom_series(tmp_path)

    expected = volume.astype(np.int64) * 2 - 100
    assert image.array.shape == (1, 7, 20, 24)
    assert image.array.dtype == np.int32  # int16 × 2 − 100 can leave the int16 range
    np.testing.assert_array_equal(image.array[0], expected)
    expected_affine = _expected_lps_affine(spacing, origin, OBLIQUE[:, 0], OBLIQUE[:, 1])
    np.testing.assert_allclose(image.geometry.lps_affine(), expected_affine, atol=1e-4)
    np.testing.assert_allclose(image.geometry.spacing, spacing, atol=1e-6)
    assert image.metadata["files"] == [files]  # sorted by position, not by (random) name or InstanceNumber
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in files] != sorted(range(1, 8))
    assert image.metadata["sop_instance_uids"][0] == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    assert image.format == "dicom" and image.source == tmp_path

    sitk_array, sitk_affine = _read_with_simpleitk(tmp_path)
    np.testing.assert_array_equal(image.array[0], sitk_array)
    np.testing.assert_allclose(image.geometry.lps_affine(), sitk_affine, atol=1e-4)


def test_ras_geometry_negates_x_and_y_of_the_lps_positions(tmp_path):
    _small_series(tmp_path, row_direction=OBLIQUE[:, 0], column_direction=OBLIQUE[:, 1])
    image = read_dicom_series(tmp_path)
    lps = _expected_lps_affine((2.0, 0.8, 0.6), (-10.0, 20.0, 5.0), OBLIQUE[:, 0], OBLIQUE[:, 1])
    ras_voxel = image.geometry.affine @ np.array([3, 5, 7, 1.0])
    lps_voxel = lps @ np.array([3, 5, 7, 1.0])
    np.testing.assert_allclose(ras_voxel[:3], lps_voxel[:3] * [-1, -1, 1], atol=1e-4)


def test_slices_reversed_against_the_normal_are_sorted_along_it(tmp_path):
    volume, files = _small_series(tmp_path, slice_direction=(0.0, 0.0, -1.0))  # slice k at z = 5 − 2k
    image = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(image.array[0], volume[::-1])
    assert image.metadata["files"] == [files[::-1]]
    np.testing.assert_allclose(image.geometry.lps_affine()[:3, 3], [-10.0, 20.0, 5.0 - 2.0 * 5], atol=1e-6)
    np.testing.assert_allclose(image.geometry.lps_affine()[:3, 0], [0, 0, 2.0], atol=1e-6)


def test_gantry_tilted_slices_keep_their_true_positions(tmp_path):
    tilt = np.deg2rad(15.0)
    slice_direction = (0.0, np.sin(tilt), np.cos(tilt))  # not along the normal (0, 0, 1)
    _small_series(tmp_path, slice_direction=slice_direction)
    image = read_dicom_series(tmp_path)
    expected = _expected_lps_affine((2.0, 0.8, 0.6), (-10.0, 20.0, 5.0), (1, 0, 0), (0, 1, 0), slice_direction)
    np.testing.assert_allclose(image.geometry.lps_affine(), expected, atol=1e-4)


def test_trivial_rescale_keeps_the_stored_dtype(tmp_path):
    volume, _ = _small_series(tmp_path, volume=_random_volume((4, 8, 10), dtype=np.uint16))
    image = read_dicom_series(tmp_path)
    assert image.array.dtype == np.uint16
    np.testing.assert_array_equal(image.array[0], volume)


def test_fractional_rescale_gives_float32(tmp_path):
    volume, _ = _small_series(tmp_path, rescale_slope=0.25, rescale_intercept=-0.5)
    image = read_dicom_series(tmp_path)
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array[0], (volume * 0.25 - 0.5).astype(np.float32))


def test_single_slice_takes_its_spacing_from_slice_thickness(tmp_path):
    volume, _ = _small_series(tmp_path, volume=_random_volume((1, 8, 10)), spacing=(3.0, 0.8, 0.6))
    image = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(image.array[0], volume)
    np.testing.assert_allclose(image.geometry.spacing, (3.0, 0.8, 0.6))
    assert image.metadata["slice_spacing_source"] == "SliceThickness"


def test_a_file_path_reads_that_files_series_and_hidden_files_and_subfolders_are_ignored(tmp_path):
    volume, files = _small_series(tmp_path, series_description="T1")
    _small_series(tmp_path, seed=1, spacing=(3.0, 1.0, 1.0), series_description="other geometry")
    (tmp_path / f".{files[0].name}").write_bytes(files[0].read_bytes())  # a hidden duplicate slice
    _small_series(tmp_path / "subfolder", seed=2)
    image = read_dicom_series(files[2])
    np.testing.assert_array_equal(image.array[0], volume)
    assert image.channel_names == ["T1"]


# ------------------------------------------------------------------------------------------- channels (DCE)


def test_series_of_one_geometry_become_channels_in_series_number_order(tmp_path):
    volumes = {number: _random_volume((5, 8, 10), seed=number) for number in (7, 5, 6)}
    uids = {}
    for number, volume in volumes.items():  # written out of order on purpose
        uids[number] = generate_uid()
        write_dicom_series(
            tmp_path,
            volume,
            spacing=(2.0, 0.7, 0.7),
            origin_lps=(1.0, 2.0, 3.0),
            row_direction=OBLIQUE[:, 0],
            column_direction=OBLIQUE[:, 1],
            series_number=number,
            series_description=f"DCE {number}",
            series_uid=uids[number],
            seed=number,
        )

    image = read_dicom_series(tmp_path)

    assert image.array.shape == (3, 5, 8, 10)
    for channel, number in enumerate((5, 6, 7)):
        np.testing.assert_array_equal(image.array[channel], volumes[number])
    assert image.channel_names == ["DCE 5", "DCE 6", "DCE 7"]
    assert image.metadata["channel_source"] == "series"
    assert image.metadata["series_uids"] == [uids[5], uids[6], uids[7]]
    assert image.metadata["series_numbers"] == [5, 6, 7]
    assert [len(files) for files in image.metadata["files"]] == [5, 5, 5]


PHASE_TAGS = {
    "temporal_position": ("TemporalPositionIdentifier", [3, 1, 2]),
    "trigger_time": ("TriggerTime", [120000.0, 0.0, 60000.5]),
    "acquisition_number": ("AcquisitionNumber", [12, 10, 11]),
    "content_time": ("ContentTime", ["103832", "102551", "103238.5"]),
}


@pytest.mark.parametrize("argument", list(PHASE_TAGS))
def test_phases_of_one_series_become_channels_in_time_order(tmp_path, argument):
    keyword, values = PHASE_TAGS[argument]
    series_uid = generate_uid()
    volumes = [_random_volume((5, 8, 10), seed=seed) for seed in range(3)]
    for seed, (volume, value) in enumerate(zip(volumes, values, strict=True)):
        write_dicom_series(
            tmp_path,
            volume,
            spacing=(2.0, 0.7, 0.7),
            series_uid=series_uid,
            seed=seed,
            first_instance_number=1,
            **{argument: value},
        )

    image = read_dicom_series(tmp_path)

    time_order = np.argsort([float(v) for v in values])
    assert image.array.shape == (3, 5, 8, 10)
    for channel, written in enumerate(time_order):
        np.testing.assert_array_equal(image.array[channel], volumes[written])
    assert image.channel_names == ["phase 0", "phase 1", "phase 2"]
    assert image.metadata["channel_source"] == "temporal position"
    assert image.metadata["phase_attribute"] == keyword
    assert image.metadata["series_uids"] == [series_uid] * 3


def test_list_dicom_series_describes_each_series(tmp_path):
    uid_dce = generate_uid()
    for phase in (1, 2):
        _small_series(
            tmp_path, seed=phase, series_uid=uid_dce, series_number=4, temporal_position=phase, series_description="dce"
        )
    _small_series(
        tmp_path,
        volume=_random_volume((3, 12, 9)),
        spacing=(5.0, 1.5, 1.25),
        series_number=2,
        series_description="localizer",
    )
    (tmp_path / "notes.txt").write_text("not DICOM")

    infos = list_dicom_series(tmp_path)

    assert [info.description for info in infos] == ["localizer", "dce"]
    localizer, dce = infos
    assert isinstance(localizer, SeriesInfo)
    assert (localizer.number, localizer.num_images, localizer.shape, localizer.num_phases) == (2, 3, (3, 12, 9), 1)
    np.testing.assert_allclose(localizer.spacing, (5.0, 1.5, 1.25))
    assert (dce.uid, dce.number, dce.num_images, dce.shape, dce.num_phases) == (uid_dce, 4, 12, (6, 8, 10), 2)
    assert "localizer" in localizer.summary() and "6×8×10" in dce.summary()
    (tmp_path / "empty").mkdir()
    assert list_dicom_series(tmp_path / "empty") == []


def test_is_dicom_file(tmp_path):
    (without_suffix,) = write_dicom_series(tmp_path, _random_volume((1, 4, 4)), spacing=(1, 1, 1), suffix="")
    (text := tmp_path / "notes.txt").write_text("x" * 200)
    assert is_dicom_file(without_suffix)
    assert not is_dicom_file(text)
    assert not is_dicom_file(tmp_path)
    assert not is_dicom_file(tmp_path / "absent.dcm")


# ------------------------------------------------------------------------------------------- real data


def _nifti_to_dicom(nifti_path: Path, folder: Path, num_slices: int = 10) -> tuple[np.ndarray, ImageGeometry]:
    """Write the first slices (first phase) of a NIfTI volume as a DICOM series.

    Returns:
        The expected ``(z, y, x)`` values a reader must return (float data is quantised to uint16 with a rescale)
        and the NIfTI geometry of those slices, both in the NIfTI's array order ``(k, j, i)``.
    """
    nib = pytest.importorskip("nibabel")
    image = nib.load(nifti_path)
    data = np.asanyarray(image.dataobj[..., :num_slices, 0] if image.ndim == 4 else image.dataobj[..., :num_slices])
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))  # (i, j, k) → array order (k, j, i)
    geometry = ImageGeometry.from_nifti_affine(image.affine)
    lps = geometry.lps_affine()
    slope, intercept = 1.0, 0.0
    if not np.issubdtype(volume.dtype, np.integer):
        intercept = float(np.floor(volume.min()))
        slope = float(f"{(float(volume.max()) - intercept) / 60000:.6g}")
        volume = np.clip(np.round((volume - intercept) / slope), 0, 65535).astype(np.uint16)
    write_dicom_series(
        folder,
        volume,
        spacing=geometry.spacing,
        origin_lps=lps[:3, 3],
        row_direction=lps[:3, 2],
        column_direction=lps[:3, 1],
        slice_direction=lps[:3, 0],
        rescale_slope=slope,
        rescale_intercept=intercept,
    )
    expected = volume if slope == 1.0 else (volume * slope + intercept).astype(np.float32)
    return expected, geometry


REAL_CASES = {
    "breast_dce_phase0": "breast_nact/UCSF-BR-06/dce.nii.gz",
    "sarcoma_STS_002": "ibsi_sarcoma_mr/STS_002/image.nii.gz",
    "brain1_left_handed": "pyradiomics/brain1/image.nii.gz",  # slices run against the normal: reversed on read
}


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_real_nifti_volume_written_as_dicom_reads_back_with_its_geometry(tmp_path, case):
    nifti_path = DATA / REAL_CASES[case]
    if not nifti_path.is_file():
        pytest.skip(f"real data {nifti_path} is absent (see /work/shared/data/README.md)")
    expected, geometry = _nifti_to_dicom(nifti_path, tmp_path)
    affine = geometry.lps_affine()
    if np.cross(affine[:3, 2], affine[:3, 1]) @ affine[:3, 0] < 0:  # slice axis against the normal
        expected = expected[::-1]
        affine[:3, 3] += affine[:3, 0] * (len(expected) - 1)
        affine[:3, 0] *= -1

    image = read_dicom_series(tmp_path)
    sitk_array, sitk_affine = _read_with_simpleitk(tmp_path)

    np.testing.assert_array_equal(image.array[0], expected)
    np.testing.assert_allclose(image.geometry.lps_affine(), affine, atol=1e-4)
    np.testing.assert_allclose(image.array[0], sitk_array, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(sitk_affine, affine, atol=1e-4)
    if case != "brain1_left_handed":
        assert image.geometry.is_close(geometry, atol=1e-4)  # same voxel order as the NIfTI


def test_real_breast_dce_as_one_series_splits_into_its_three_phases_by_content_time(tmp_path):
    nifti_path = DATA / REAL_CASES["breast_dce_phase0"]
    if not nifti_path.is_file():
        pytest.skip(f"real data {nifti_path} is absent (see /work/shared/data/README.md)")
    nib = pytest.importorskip("nibabel")
    nifti = nib.load(nifti_path)
    phases = np.asanyarray(nifti.dataobj).transpose(3, 2, 1, 0)  # (phase, k, j, i)
    geometry = ImageGeometry.from_nifti_affine(nifti.affine)
    lps = geometry.lps_affine()
    content_times = ["102551", "103238", "103832"]  # the source's acquisition start times of phases 0, 1, 2
    for phase in (2, 0, 1):
        write_dicom_series(
            tmp_path,
            np.ascontiguousarray(phases[phase]),
            spacing=geometry.spacing,
            origin_lps=lps[:3, 3],
            row_direction=lps[:3, 2],
            column_direction=lps[:3, 1],
            series_uid="1.2.826.0.1.3680043.8.498.77",
            content_time=content_times[phase],
            seed=phase,
            first_instance_number=1 + 60 * (2 - phase),
        )  # InstanceNumbers run against time: only ContentTime orders the phases

    image = read_dicom_series(tmp_path)

    assert image.metadata["phase_attribute"] == "ContentTime"
    assert image.channel_names == ["phase 0", "phase 1", "phase 2"]
    np.testing.assert_array_equal(image.array, phases)
    assert image.geometry.is_close(geometry, atol=1e-4)


# ------------------------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path):
    _raises("no such folder", tmp_path / "absent", read_dicom_series, tmp_path / "absent")


def test_empty_folder(tmp_path):
    _raises(r"no DICOM images found \(0 files, 0 DICOM non-image objects\)", tmp_path, read_dicom_series, tmp_path)


def test_folder_without_dicom_images_counts_what_it_skipped(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    report = pydicom.Dataset()
    report.SOPClassUID, report.SOPInstanceUID, report.Modality = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid(), "SR"
    report.SeriesInstanceUID = generate_uid()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID, report.file_meta.MediaStorageSOPInstanceUID = report.SOPClassUID, "1.2"
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    save_dicom(report, tmp_path / "report.dcm")
    save_dicom(report, tmp_path / "DICOMDIR")
    (tmp_path / "STUDY1").mkdir()

    message = _raises(r"\(4 files, 2 DICOM non-image objects\)", tmp_path, read_dicom_series, tmp_path)
    assert "DICOMDIR" in message and "STUDY1" in message


def test_mixed_geometry_is_refused_and_series_uid_selects_one(tmp_path):
    volume_a, files_a = _small_series(tmp_path, series_description="axial T1", series_number=1)
    volume_b, files_b = _small_series(
        tmp_path, seed=1, spacing=(3.0, 0.8, 0.6), series_description="axial T2", series_number=2
    )
    uid_a, uid_b = (str(pydicom.dcmread(files[0]).SeriesInstanceUID) for files in (files_a, files_b))

    message = _raises("mixed series with different geometry", tmp_path, read_dicom_series, tmp_path)
    assert uid_a in message and uid_b in message and "axial T2" in message and "series_uid=" in message

    np.testing.assert_array_equal(read_dicom_series(tmp_path, series_uid=uid_b).array[0], volume_b)
    np.testing.assert_array_equal(read_dicom_series(tmp_path, series_uid=uid_a).array[0], volume_a)


def test_unknown_series_uid_lists_the_series(tmp_path):
    _, files = _small_series(tmp_path, series_description="sagittal DCE")
    message = _raises(
        "no image series with SeriesInstanceUID 1.2.3", tmp_path, read_dicom_series, tmp_path, series_uid="1.2.3"
    )
    assert str(pydicom.dcmread(files[0]).SeriesInstanceUID) in message and "sagittal DCE" in message
    assert "6 images" in message


def test_missing_slice_in_the_middle(tmp_path):
    _, files = _small_series(tmp_path)
    files[3].unlink()
    message = _raises(r"non-uniform slice spacing .*\(missing slices\?\)", tmp_path, read_dicom_series, tmp_path)
    assert "2 mm ×3" in message and "4 mm ×1" in message and files[2].name in message


def test_duplicate_slice(tmp_path):
    _, files = _small_series(tmp_path)
    copy = tmp_path / "copy_of_slice_2.dcm"
    copy.write_bytes(files[2].read_bytes())
    _rewrite(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    message = _raises("duplicate slice position", tmp_path, read_dicom_series, tmp_path)
    assert copy.name in message and files[2].name in message


def test_truncated_pixel_data(tmp_path):
    _, files = _small_series(tmp_path)
    files[4].write_bytes(files[4].read_bytes()[:-50])
    _raises("truncated", files[4], read_dicom_series, tmp_path)


def test_header_without_position(tmp_path):
    _, files = _small_series(tmp_path)
    _rewrite(files[1], lambda ds: delattr(ds, "ImagePositionPatient"))
    _raises("lacks ImagePositionPatient", files[1], read_dicom_series, tmp_path)


def test_compressed_pixel_data_without_a_decoder(tmp_path):
    _, files = _small_series(tmp_path)

    def compress(ds):
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"not a JPEG 2000 codestream"])
        ds["PixelData"].VR = "OB"

    _rewrite(files[0], compress)
    message = _raises("cannot decode the pixel data", files[0], read_dicom_series, tmp_path)
    assert "JPEG 2000" in message and "pylibjpeg" in message and "uncompressed" in message


def test_colour_image(tmp_path):
    _, files = _small_series(tmp_path)
    _rewrite(files[0], lambda ds: setattr(ds, "SamplesPerPixel", 3))
    _raises("colour image", files[0], read_dicom_series, tmp_path)


def test_an_unusable_series_beside_a_good_one_is_ignored_unless_asked_for(tmp_path):
    volume, _ = _small_series(tmp_path / "study", series_number=3)
    _, colour_files = _small_series(tmp_path / "study", seed=1, series_number=1, spacing=(3.0, 1.0, 1.0))
    for path in colour_files:
        _rewrite(path, lambda ds: setattr(ds, "SamplesPerPixel", 3))
    colour_uid = str(pydicom.dcmread(colour_files[0]).SeriesInstanceUID)

    np.testing.assert_array_equal(read_dicom_series(tmp_path / "study").array[0], volume)
    with pytest.raises(ImageReadError, match="colour image") as caught:
        read_dicom_series(tmp_path / "study", series_uid=colour_uid)
    assert any(path.name in str(caught.value) for path in colour_files)


def test_orientation_differs_within_a_series(tmp_path):
    _, files = _small_series(tmp_path)
    _rewrite(files[5], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    message = _raises("mixes images of different orientation", tmp_path, read_dicom_series, tmp_path)
    assert files[5].name in message


def test_phases_with_different_numbers_of_slices(tmp_path):
    series_uid = generate_uid()
    _small_series(tmp_path, series_uid=series_uid, temporal_position=1)
    _, files = _small_series(tmp_path, seed=1, series_uid=series_uid, temporal_position=2)
    files[-1].unlink()
    _raises(
        r"different number of slices between channels: .* has 5, the first channel 6",
        tmp_path,
        read_dicom_series,
        tmp_path,
    )
