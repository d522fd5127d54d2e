"""TIFF reading (ImageJ hyperstacks, OME-TIFF, plain TIFF) and writing (OME-TIFF with the spacing in mm)."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_mamba_seg.io import ImageGeometry, ImageReadError, read_tiff, write_tiff


def rotated_geometry() -> ImageGeometry:
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    return ImageGeometry.from_spacing((2.2, 0.7, 0.35), origin=(-101.3, 12.07, 55.5), direction=direction)


def ome_pixels(path: Path) -> dict[str, str]:
    """The attributes of the first OME Pixels element, as another OME reader sees them."""
    with tifffile.TiffFile(path) as tif:
        root = ElementTree.fromstring(tif.ome_metadata)
    return next(element.attrib for element in root.iter() if element.tag.endswith("}Pixels"))


def test_labels_round_trip_with_the_full_affine(tmp_path: Path) -> None:
    geometry = rotated_geometry()
    labels = np.random.default_rng(0).integers(0, 4, (5, 12, 10)).astype(np.uint8)
    out = write_tiff(labels, tmp_path / "labels.tif", geometry)
    image = read_tiff(out)
    assert image.array.shape == (1, 5, 12, 10)
    assert image.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array[0], labels)
    assert np.array_equal(image.geometry.affine, geometry.affine)
    assert image.geometry.spacing == geometry.spacing
    assert image.metadata["tiff_kind"] == "napari-mamba-seg"
    assert image.metadata["spacing_known"] is True


def test_other_readers_get_the_spacing_exactly_in_mm(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_spacing((3.0000000000000004, 0.1 + 0.2, 0.7))
    out = write_tiff(np.zeros((2, 3, 4), np.uint16), tmp_path / "labels.ome.tif", geometry)
    pixels = ome_pixels(out)
    assert (pixels["PhysicalSizeXUnit"], pixels["PhysicalSizeYUnit"], pixels["PhysicalSizeZUnit"]) == ("mm",) * 3
    assert (float(pixels["PhysicalSizeZ"]), float(pixels["PhysicalSizeY"]), float(pixels["PhysicalSizeX"])) == (
        geometry.spacing
    )
    with tifffile.TiffFile(out) as tif:  # ImageJ-style resolution: pixels per cm
        x_resolution = tif.pages.first.tags["XResolution"].value
    assert x_resolution[0] / x_resolution[1] == pytest.approx(10 / 0.7, rel=1e-6)


def test_multichannel_float_image_round_trip(tmp_path: Path) -> None:
    geometry = rotated_geometry()
    probabilities = np.random.default_rng(1).random((3, 4, 6, 5)).astype(np.float32)
    image = read_tiff(write_tiff(probabilities, tmp_path / "probs.tiff", geometry))
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, probabilities)
    assert image.geometry == geometry


def test_two_dimensional_round_trip(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_spacing((0.3, 0.45), origin=(4.0, -2.5))
    labels = np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000
    image = read_tiff(write_tiff(labels, tmp_path / "slice.tif", geometry))
    assert image.array.shape == (1, 5, 7)
    assert image.geometry == geometry
    np.testing.assert_array_equal(image.array[0], labels)


def test_single_slice_volume_stays_three_dimensional(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_spacing((5.0, 1.0, 1.0))
    image = read_tiff(write_tiff(np.ones((1, 4, 3), np.uint8), tmp_path / "one.tif", geometry))
    assert image.array.shape == (1, 1, 4, 3)
    assert image.geometry == geometry


def test_imagej_hyperstack_in_microns(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 4000, (4, 2, 6, 5)).astype(np.uint16)  # Z C Y X
    path = tmp_path / "hyperstack.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.5),  # pixels per micron: x 0.25 µm, y 0.5 µm
        metadata={"axes": "ZCYX", "spacing": 2.5, "unit": "micron"},
    )
    image = read_tiff(path)
    assert image.metadata["tiff_kind"] == "imagej"
    assert image.metadata["spacing_known"] is True
    assert image.array.shape == (2, 4, 6, 5)
    np.testing.assert_array_equal(image.array, data.transpose(1, 0, 2, 3))
    np.testing.assert_allclose(image.geometry.spacing, (0.0025, 0.0005, 0.00025), rtol=1e-12)
    # NIfTI-like axes for foreign files: x → R, y → A, z → S, origin 0.
    np.testing.assert_allclose(image.geometry.nifti_affine(), np.diag([0.00025, 0.0005, 0.0025, 1.0]), rtol=1e-12)


def test_imagej_time_series_without_channels_gives_channels(tmp_path: Path) -> None:
    data = np.random.default_rng(3).random((3, 4, 6, 5)).astype(np.float32)  # T Z Y X
    path = tmp_path / "phases.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "TZYX", "unit": "mm"})
    image = read_tiff(path)
    assert image.channel_names == ["time 0", "time 1", "time 2"]
    np.testing.assert_array_equal(image.array, data)
    assert image.geometry.spacing[1:] == (0.5, 0.5)
    assert image.metadata["spacing_known"] is False  # no z spacing in the file: z guessed isotropic
    assert image.geometry.spacing[0] == 0.5


def test_imagej_time_and_channels_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tzc.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 2, 4, 4), np.uint8), imagej=True, metadata={"axes": "TZCYX"})
    with pytest.raises(ImageReadError, match=r"tzc\.tif.*T \(2\).*one volume per file"):
        read_tiff(path)


@pytest.mark.parametrize(
    ("unit", "size", "expected_mm"),
    [(None, 0.65, 0.00065), ("µm", 0.65, 0.00065), ("nm", 325.0, 0.000325), ("cm", 0.05, 0.5)],
    ids=["default-um", "um", "nm", "cm"],
)
def test_ome_physical_sizes_convert_to_mm(tmp_path: Path, unit: str | None, size: float, expected_mm: float) -> None:
    data = np.random.default_rng(4).integers(0, 255, (2, 3, 8, 9)).astype(np.uint8)  # C Z Y X
    metadata = {"axes": "CZYX", "PhysicalSizeX": size, "PhysicalSizeY": 2 * size, "PhysicalSizeZ": 10 * size}
    if unit is not None:
        metadata.update({f"PhysicalSize{axis}Unit": unit for axis in "XYZ"})
    metadata["Channel"] = {"Name": ["DAPI", "GFP"]}
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", metadata=metadata)
    image = read_tiff(path)
    assert image.metadata["tiff_kind"] == "ome"
    assert image.channel_names == ["DAPI", "GFP"]
    np.testing.assert_array_equal(image.array, data)
    np.testing.assert_allclose(image.geometry.spacing, (10 * expected_mm, 2 * expected_mm, expected_mm), rtol=1e-12)
    assert image.geometry.origin == (0.0, 0.0, 0.0)


def test_plain_two_dimensional_tiff(tmp_path: Path) -> None:
    data = np.arange(48, dtype=np.uint8).reshape(6, 8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data)
    image = read_tiff(path)
    assert image.array.shape == (1, 6, 8)
    assert image.geometry.spatial_dims == 2
    assert image.geometry.spacing == (1.0, 1.0)
    assert image.metadata["spacing_known"] is False
    np.testing.assert_array_equal(image.array[0], data)


def test_plain_multipage_stack_is_a_volume(tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(0, 9, (7, 6, 8)).astype(np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data)
    image = read_tiff(path)
    assert image.array.shape == (1, 7, 6, 8)
    assert image.geometry.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(image.array[0], data)


def test_rgb_samples_become_channels(tmp_path: Path) -> None:
    data = np.random.default_rng(6).integers(0, 255, (6, 8, 3)).astype(np.uint8)
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    image = read_tiff(path)
    assert image.channel_names == ["red", "green", "blue"]
    np.testing.assert_array_equal(image.array, data.transpose(2, 0, 1))


def test_a_stripped_private_tag_leaves_spacing_only(tmp_path: Path) -> None:
    """An OME file without our tag (as after re-saving elsewhere): spacing exact, origin 0."""
    geometry = rotated_geometry()
    path = tmp_path / "resaved.ome.tif"
    spacing = dict(zip("ZYX", geometry.spacing, strict=True))
    metadata = {"axes": "ZYX", **{f"PhysicalSize{a}": s for a, s in spacing.items()}}
    metadata.update({f"PhysicalSize{a}Unit": "mm" for a in "ZYX"})
    tifffile.imwrite(path, np.zeros((3, 4, 5), np.uint8), ome=True, metadata=metadata)
    image = read_tiff(path)
    assert image.geometry.spacing == geometry.spacing
    assert image.geometry.origin == (0.0, 0.0, 0.0)


def test_garbage_and_missing_files_are_explained(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(np.random.default_rng(7).bytes(3000))
    with pytest.raises(ImageReadError, match=r"garbage\.tif.*not a readable TIFF"):
        read_tiff(garbage)
    with pytest.raises(ImageReadError, match=r"absent\.tif.*does not exist"):
        read_tiff(tmp_path / "absent.tif")


@pytest.mark.parametrize("kept", [0.05, 0.3, 0.6, 0.9, 0.999])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8], ids=["float-raw", "labels-zlib"])
def test_truncated_file_is_explained(tmp_path: Path, kept: float, dtype: type) -> None:
    data = (np.random.default_rng(8).random((20, 64, 64)) * 5).astype(dtype)
    whole = write_tiff(data, tmp_path / "whole.tif", ImageGeometry.from_spacing((1.0, 1.0, 1.0)))
    content = whole.read_bytes()
    (tmp_path / "cut.tif").write_bytes(content[: int(len(content) * kept)])
    with pytest.raises(ImageReadError, match=r"cut\.tif.*truncated or corrupt.*re-download"):
        read_tiff(tmp_path / "cut.tif")


def test_write_refuses_bad_suffix_and_shape(tmp_path: Path) -> None:
    geometry = ImageGeometry.from_spacing((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\.tif, \.tiff or \.ome\.tif"):
        write_tiff(np.zeros((2, 2, 2), np.uint8), tmp_path / "labels.png", geometry)
    with pytest.raises(ValueError, match=r"shape \(1, 2, 2, 2, 2\)"):
        write_tiff(np.zeros((1, 2, 2, 2, 2), np.uint8), tmp_path / "labels.tif", geometry)
    assert list(tmp_path.iterdir()) == []
