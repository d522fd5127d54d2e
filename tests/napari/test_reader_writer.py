"""The npe2 reader and writers, headless: NIfTI (3D, 4D DCE), DICOM series and TIFF in; Labels layers out to NIfTI and
TIFF with the source geometry; clear errors for what is claimed but unreadable or unwritable."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from nifti_cases import SFORM_CODE, array_order, expected_scale, oblique_nifti_affine, write_nifti_case

from napari_mamba_seg._napari._layer_data import METADATA_KEY, labels_layer_kwargs
from napari_mamba_seg._napari._reader import CHANNELS_ENV, get_reader, read_layers
from napari_mamba_seg._napari._writer import write_labels_nifti, write_labels_tiff
from napari_mamba_seg.io import ImageGeometry, ImageReadError, read_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
from dicom_factory import write_dicom_series

PLUGIN = "napari-mamba-seg"
CLASSES = ["background", "breast", "fibroglandular", "lesion"]


@pytest.fixture(autouse=True)
def _default_channel_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHANNELS_ENV, raising=False)


@pytest.fixture
def notifications():
    """Messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    seen: list[str] = []

    def record(notification) -> None:
        seen.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture(scope="module")
def napari_plugins() -> None:
    """napari's plugin manager with this plugin registered (what a running napari has)."""
    from napari.plugins import _initialize_plugins

    _initialize_plugins()


def _read(path: Path) -> list[tuple]:
    reader = get_reader(str(path))
    assert reader is not None, f"the plugin does not claim {path}"
    return reader(str(path))


def _labels_from(layer_kwargs: dict, seed: int = 1):
    """A real napari Labels layer over the image of ``layer_kwargs``, made as the widgets make theirs."""
    import napari

    shape = tuple(layer_kwargs["metadata"][METADATA_KEY]["spatial_shape"])
    labels = np.random.default_rng(seed).integers(0, len(CLASSES), shape).astype(np.uint8)
    return napari.layers.Labels(labels, name="seg", **labels_layer_kwargs(CLASSES, like=layer_kwargs))


# --------------------------------------------------------------------------------------------- reader: NIfTI


def test_reader_places_a_3d_nifti_in_mm_and_keeps_its_affine(tmp_path: Path) -> None:
    path = tmp_path / "t1.nii.gz"
    voxels = write_nifti_case(path)
    [(data, kwargs, layer_type)] = _read(path)
    assert layer_type == "image"
    np.testing.assert_array_equal(data, array_order(voxels))
    assert kwargs["name"] == "t1"
    np.testing.assert_allclose(kwargs["scale"], expected_scale(), rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], oblique_nifti_affine()[:3, 3], rtol=0, atol=1e-4)
    geometry = read_image(path).geometry
    assert (kwargs["scale"], kwargs["translate"]) == geometry.napari_scale_translate()
    entry = kwargs["metadata"][METADATA_KEY]
    assert ImageGeometry(entry["affine"]) == geometry  # the rotation survives in the metadata, bit for bit
    assert entry["source"] == str(path) and entry["format"] == "nifti"
    assert entry["spatial_shape"] == [6, 10, 12]
    low, high = kwargs["contrast_limits"]
    assert voxels.min() <= low < high <= voxels.max()


def test_reader_gives_one_layer_per_dce_phase_by_default(tmp_path: Path) -> None:
    path = tmp_path / "dce.nii"
    voxels = array_order(write_nifti_case(path, phases=3))
    layers = _read(path)
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["dce (phase 0)", "dce (phase 1)", "dce (phase 2)"]
    for index, (data, kwargs, layer_type) in enumerate(layers):
        assert layer_type == "image"
        np.testing.assert_array_equal(data, voxels[index])
        np.testing.assert_allclose(kwargs["scale"], expected_scale(), rtol=1e-6)
        entry = kwargs["metadata"][METADATA_KEY]
        assert entry["channel_index"] == index
        assert entry["channel_names"] == ["phase 0", "phase 1", "phase 2"]
    assert len({kwargs["contrast_limits"] for _, kwargs, _ in layers}) == 1  # one window: enhancement shows


def test_reader_gives_one_layer_with_a_phase_axis_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHANNELS_ENV, "axis")
    path = tmp_path / "dce.nii.gz"
    voxels = array_order(write_nifti_case(path, phases=3))
    [(data, kwargs, _)] = _read(path)
    np.testing.assert_array_equal(data, voxels)
    np.testing.assert_allclose(kwargs["scale"], (1.0, *expected_scale()), rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], (0.0, *oblique_nifti_affine()[:3, 3]), atol=1e-4)
    assert kwargs["metadata"][METADATA_KEY]["channel_index"] is None
    assert kwargs["metadata"][METADATA_KEY]["channel_names"] == ["phase 0", "phase 1", "phase 2"]


def test_a_bad_channel_setting_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHANNELS_ENV, "stack")
    path = tmp_path / "dce.nii.gz"
    write_nifti_case(path, phases=2)
    with pytest.raises(ValueError, match=f"{CHANNELS_ENV}='stack'.*layers, axis"):
        _read(path)


def test_a_corrupt_nifti_is_claimed_and_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not a NIfTI file" * 10)
    with pytest.raises(ImageReadError, match=r"broken\.nii\.gz"):
        _read(path)


# --------------------------------------------------------------------------------------------- reader: DICOM, TIFF


def _dicom_volume(seed: int = 0, shape=(5, 8, 9)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2000, shape).astype(np.int16)


def test_reader_opens_a_dicom_series_folder_or_one_of_its_files(tmp_path: Path) -> None:
    volume = _dicom_volume()
    files = write_dicom_series(
        tmp_path / "series", volume, spacing=(3.0, 0.6, 0.7), origin_lps=(10.0, -20.0, 30.0), series_uid="1.2.3.4"
    )
    from_folder = _read(tmp_path / "series")
    from_file = _read(files[2])
    for [(data, kwargs, layer_type)] in (from_folder, from_file):
        assert layer_type == "image"
        assert kwargs["name"] == "series"
        np.testing.assert_array_equal(data, volume)
        np.testing.assert_allclose(kwargs["scale"], (3.0, 0.6, 0.7), rtol=1e-9)
        np.testing.assert_allclose(kwargs["translate"], (-10.0, 20.0, 30.0), atol=1e-6)  # LPS → RAS+
        entry = kwargs["metadata"][METADATA_KEY]
        assert entry["format"] == "dicom" and entry["series_uid"] == "1.2.3.4"
        assert entry["source"] == str(tmp_path / "series")
        assert [sorted(channel) for channel in entry["source_files"]] == [sorted(str(f) for f in files)]


def test_dce_phases_stored_as_separate_series_become_channels_and_are_announced(tmp_path: Path, notifications) -> None:
    volumes = [_dicom_volume(seed) for seed in range(2)]
    for number, volume in enumerate(volumes, start=1):
        write_dicom_series(tmp_path, volume, spacing=(2.0, 0.7, 0.7), series_number=number,
                           series_description=f"dce {number}", series_uid=f"1.2.3.{number}")  # fmt: skip
    layers = _read(tmp_path)
    assert len(layers) == 2
    for volume, (data, _kwargs, _type) in zip(volumes, layers, strict=True):
        np.testing.assert_array_equal(data, volume)
    assert layers[0][1]["metadata"][METADATA_KEY]["series_uid"] is None  # all series of the folder were read
    [message] = notifications
    assert "2 DICOM series" in message and "'dce 1'" in message and "'dce 2'" in message


def test_a_folder_of_unrelated_series_reads_the_first_and_says_which(tmp_path: Path, notifications) -> None:
    first, second = _dicom_volume(0), _dicom_volume(1, shape=(4, 6, 7))
    write_dicom_series(tmp_path, second, spacing=(4.0, 1.0, 1.0), series_number=7, series_uid="1.2.3.7")
    write_dicom_series(tmp_path, first, spacing=(2.0, 0.7, 0.7), series_number=3, series_uid="1.2.3.3")
    [(data, kwargs, _)] = _read(tmp_path)
    np.testing.assert_array_equal(data, first)  # the lowest SeriesNumber
    assert kwargs["metadata"][METADATA_KEY]["series_uid"] == "1.2.3.3"
    [message] = notifications
    assert "read the first" in message and "1.2.3.3" in message and "1.2.3.7" in message


def test_a_study_folder_is_claimed_and_refused_listing_its_series(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "study" / "T1_pre", _dicom_volume(), spacing=(2.0, 1.0, 1.0))
    write_dicom_series(tmp_path / "study" / "T1_post", _dicom_volume(1), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(ImageReadError, match="T1_post, T1_pre"):
        _read(tmp_path / "study")


def test_reader_opens_an_ome_tiff_with_named_channels(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 255, (2, 4, 8, 9)).astype(np.uint8)  # C Z Y X
    metadata = {"axes": "CZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 3.0}
    metadata.update({f"PhysicalSize{axis}Unit": "mm" for axis in "XYZ"})
    metadata["Channel"] = {"Name": ["T2", "ADC"]}
    path = tmp_path / "mr.ome.tif"
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", metadata=metadata)
    layers = _read(path)
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["mr (T2)", "mr (ADC)"]
    for channel, (layer_data, kwargs, _) in enumerate(layers):
        np.testing.assert_array_equal(layer_data, data[channel])
        np.testing.assert_allclose(kwargs["scale"], (3.0, 0.5, 0.5), rtol=1e-12)


def test_reader_leaves_what_it_cannot_read_to_other_readers(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "readme.txt").write_text("nothing here")
    write_nifti_case(tmp_path / "a.nii.gz")
    write_nifti_case(tmp_path / "b.nii.gz")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "photo.png")) is None
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]) is None  # no stacking
    assert get_reader([str(tmp_path / "a.nii.gz")]) is read_layers


# --------------------------------------------------------------------------------------------- writers


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii", "seg.tif", "seg.ome.tiff"])
def test_labels_saved_through_napari_land_on_the_source_grid(tmp_path: Path, napari_plugins, name: str) -> None:
    source = tmp_path / "dce.nii.gz"
    write_nifti_case(source, phases=2)
    layer = _labels_from(_read(source)[1][1])
    [written] = layer.save(str(tmp_path / name), plugin=PLUGIN)
    assert Path(written) == tmp_path / name
    back = read_image(written)
    np.testing.assert_array_equal(back.array[0], layer.data)
    assert back.geometry == read_image(source).geometry  # the oblique affine, bit for bit
    if ".nii" in name:
        assert int(nib.load(written).header["sform_code"]) == SFORM_CODE  # the source's header was reused


def test_labels_of_a_deleted_source_keep_the_affine_from_the_metadata(tmp_path: Path) -> None:
    source = tmp_path / "t1.nii.gz"
    write_nifti_case(source)
    [(_, image_kwargs, _)] = _read(source)
    geometry = read_image(source).geometry
    source.unlink()
    layer = _labels_from(image_kwargs)
    data, meta, _ = layer.as_layer_data_tuple()
    [written] = write_labels_nifti(str(tmp_path / "seg.nii.gz"), data, meta)
    back = read_image(written)
    assert back.geometry == geometry
    assert int(nib.load(written).header["sform_code"]) == 1  # a fresh header: scanner coordinates


def test_writer_replaces_an_existing_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    source = tmp_path / "t1.nii.gz"
    write_nifti_case(source)
    layer = _labels_from(_read(source)[0][1])
    data, meta, _ = layer.as_layer_data_tuple()
    target = tmp_path / "out" / "seg.tif"
    target.parent.mkdir()
    target.write_bytes(b"an older export")
    write_labels_tiff(str(target), data, meta)
    np.testing.assert_array_equal(read_image(target).array[0], data)
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.tif"]


def test_a_failing_write_keeps_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "t1.nii.gz"
    write_nifti_case(source)
    layer = _labels_from(_read(source)[0][1])
    data, meta, _ = layer.as_layer_data_tuple()
    target = tmp_path / "out" / "seg.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"the previous export")

    def disk_full(image, filename) -> None:
        Path(filename).write_bytes(b"half a fi")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_labels_nifti(str(target), data, meta)
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.nii.gz"]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full((6, 10, 12), 1.5, dtype=np.float32), "labels must be integers"),
        (np.full((6, 10, 12), -1, dtype=np.int16), r"must lie in \[0, 65535\]"),
        (np.zeros((6, 10, 11), dtype=np.uint8), "differs from the shape"),
    ],
    ids=["float", "negative", "wrong-shape"],
)
def test_writer_refuses_labels_it_cannot_write_faithfully(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    source = tmp_path / "t1.nii.gz"
    write_nifti_case(source)
    meta = _labels_from(_read(source)[0][1]).as_layer_data_tuple()[1]
    target = tmp_path / "seg.nii.gz"
    with pytest.raises(ValueError, match=message):
        write_labels_nifti(str(target), labels, meta)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1.nii.gz"]


def test_writer_refuses_a_layer_moved_since_it_was_read(tmp_path: Path) -> None:
    source = tmp_path / "t1.nii.gz"
    write_nifti_case(source)
    layer = _labels_from(_read(source)[0][1])
    layer.translate = (0.0, 0.0, 5.0)
    data, meta, _ = layer.as_layer_data_tuple()
    with pytest.raises(ValueError, match="moved or rescaled"):
        write_labels_nifti(str(tmp_path / "seg.nii.gz"), data, meta)


def test_a_layer_without_geometry_metadata_is_written_with_its_scale_and_a_warning(tmp_path: Path) -> None:
    import napari

    labels = np.random.default_rng(2).integers(0, 3, (4, 5, 6)).astype(np.uint8)
    layer = napari.layers.Labels(labels, scale=(2.0, 0.5, -0.25), translate=(1.0, 2.0, 3.0))
    data, meta, _ = layer.as_layer_data_tuple()
    with pytest.warns(UserWarning, match="orientation .* is lost"):
        [written] = write_labels_nifti(str(tmp_path / "seg.nii.gz"), data, meta)
    back = read_image(written)
    np.testing.assert_array_equal(back.array[0], labels)
    np.testing.assert_allclose(back.geometry.affine, np.array([[2, 0, 0, 1], [0, 0.5, 0, 2], [0, 0, -0.25, 3],
                                                               [0, 0, 0, 1.0]]))  # fmt: skip


def test_saved_nifti_labels_open_as_a_labels_layer_on_the_image(tmp_path: Path) -> None:
    source = tmp_path / "t1.nii.gz"
    write_nifti_case(source)
    [(_, image_kwargs, _)] = _read(source)
    layer = _labels_from(image_kwargs)
    data, meta, _ = layer.as_layer_data_tuple()
    [written] = write_labels_nifti(str(tmp_path / "seg.nii.gz"), data, meta)
    [(back, kwargs, layer_type)] = _read(Path(written))
    assert layer_type == "labels"
    np.testing.assert_array_equal(back, data)
    assert kwargs["scale"] == image_kwargs["scale"] and kwargs["translate"] == image_kwargs["translate"]


# --------------------------------------------------------------------------------------------- real data


def test_reader_on_the_real_breast_dce_case(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = shared_data / "breast_nact" / "UCSF-BR-06" / "dce.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    nifti = nib.load(path)
    zooms = nifti.header.get_zooms()[:3]
    layers = _read(path)
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["dce (phase 0)", "dce (phase 1)", "dce (phase 2)"]
    voxels = np.asarray(nifti.dataobj)
    for phase, (data, kwargs, _) in enumerate(layers):
        np.testing.assert_array_equal(data, voxels[..., phase].transpose(2, 1, 0))
        np.testing.assert_allclose(kwargs["scale"], zooms[::-1], rtol=1e-6)
        np.testing.assert_allclose(kwargs["translate"], nifti.affine[:3, 3], atol=1e-4)
    monkeypatch.setenv(CHANNELS_ENV, "axis")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [(data, kwargs, _)] = _read(path)
    assert data.shape == (3, *voxels.shape[:3][::-1])
